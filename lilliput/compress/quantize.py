"""Weight-only quantization: `quantize_(model, Config)` replaces linear layers in place.

Each method is a frozen config registered on its type in `QUANTIZERS` (torchao's shape):
`RTNConfig` (round to nearest, the baseline), `GPTQConfig` (gptq.py) and `AWQConfig` (awq.py).
bits=8 is symmetric per output channel; bits=4 is asymmetric per group of 32/64/128 columns.
Where the requested group does not divide a layer's width (SmolLM2's 576 is not a multiple of
128), that layer uses the largest of 128/64/32 below it that does, and the group actually used
is recorded per layer (config.json's quantization.layers); no layer is ever skipped silently.

The output layer is quantized too by default (`lm_head=True`): for SmolLM2 it is a fifth of
the weights read per decoded token. A tied embedding stays float for the lookup; the output
layer gets its own quantized copy.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from lilliput.compress.calibration import CalibrationConfig, calibration_batches
from lilliput.compress.qlinear import (GROUP_SIZES, Int4Linear, Int8Linear, QuantLinear, expand, int4_params, int8_scale, quantize_int4, quantize_int8)
from lilliput.core.layers import set_layer
from lilliput.core.registry import Registry

QUANTIZERS: Registry[Callable] = Registry("quantization config")
"""Config type -> handler(model, cfg, calibration) that replaces the layers in place."""
METHODS: dict[str, type] = {}
"""Method name (the CLI's --method) -> its config type."""


def _check_bits(bits: int, group_size: int, lm_head_bits: int | None = None) -> None:
    if lm_head_bits not in (None, 4, 8):
        raise ValueError(f"lm_head_bits must be 4, 8 or None (same as bits), got {lm_head_bits}")
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}: use bits=8 (per channel) or bits=4 (grouped)")
    if bits == 4 and group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {', '.join(map(str, GROUP_SIZES))} for bits=4, "
                         f"got {group_size}: pick the nearest of those")


@dataclass(frozen=True)
class RTNConfig:
    """Round to nearest: each weight to its grid point, no calibration."""

    bits: int = 8
    """Weight bit-width: 8 (symmetric per output channel) or 4 (asymmetric per group)."""
    group_size: int = 128
    """Columns per int4 group (32, 64 or 128); ignored for bits=8."""
    lm_head: bool = True
    """Quantize the output layer too."""
    lm_head_bits: int | None = 8
    """Bits of the output layer (8 or 4); None means `bits`. int4 on SmolLM2's tied output layer
    costs far more perplexity than on any other layer, so it stays int8 unless asked."""

    def __post_init__(self):
        _check_bits(self.bits, self.group_size, self.lm_head_bits)


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ (Frantar et al. 2022): column-by-column rounding with Hessian-based error feedback."""

    bits: int = 4
    """Weight bit-width: 8 or 4."""
    group_size: int = 128
    """Columns per int4 group (32, 64 or 128); ignored for bits=8."""
    lm_head: bool = True
    """Quantize the output layer too."""
    lm_head_bits: int | None = 8
    """Bits of the output layer (8 or 4); None means `bits`. int4 on SmolLM2's tied output layer
    costs far more perplexity than on any other layer, so it stays int8 unless asked."""
    damp: float = 0.01
    """Dampening added to the Hessian diagonal, as a fraction of its mean."""
    act_order: bool = True
    """Quantize columns in order of decreasing Hessian diagonal (static groups keep the format simple)."""
    block_size: int = 128
    """Columns per lazy-update block."""
    calibration: CalibrationConfig = field(default_factory=lambda: CalibrationConfig(samples=32, seq_len=512))
    """Calibration windows from the default corpus."""

    def __post_init__(self):
        _check_bits(self.bits, self.group_size, self.lm_head_bits)
        if not 0 <= self.damp < 1:
            raise ValueError(f"damp must be in [0, 1), got {self.damp}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")


@dataclass(frozen=True)
class AWQConfig:
    """AWQ (Lin et al. 2023): per-input-channel scales s = mean|x|^alpha, alpha searched per layer."""

    bits: int = 4
    """Weight bit-width: 8 or 4."""
    group_size: int = 128
    """Columns per int4 group (32, 64 or 128); ignored for bits=8."""
    lm_head: bool = True
    """Quantize the output layer too."""
    lm_head_bits: int | None = 8
    """Bits of the output layer (8 or 4); None means `bits`. int4 on SmolLM2's tied output layer
    costs far more perplexity than on any other layer, so it stays int8 unless asked."""
    grid: int = 20
    """Values of alpha tried in [0, 1]."""
    max_tokens: int = 4096
    """Calibration tokens used to score each alpha (a random subset)."""
    calibration: CalibrationConfig = field(default_factory=lambda: CalibrationConfig(samples=32, seq_len=512))
    """Calibration windows from the default corpus."""

    def __post_init__(self):
        _check_bits(self.bits, self.group_size, self.lm_head_bits)
        if self.grid < 1:
            raise ValueError(f"grid must be >= 1, got {self.grid}")


METHODS.update(rtn=RTNConfig, gptq=GPTQConfig, awq=AWQConfig)


# --- grids shared by every method -----------------------------------------------------------------

def layer_group(k: int, requested: int, name: str = "layer") -> int:
    """The int4 group a layer of width k uses: `requested` if it divides k, else the largest smaller one."""
    for g in GROUP_SIZES:
        if g <= requested and k % g == 0:
            return g
    raise ValueError(f"{name} has {k} input features, not a multiple of 32: int4 cannot quantize it; "
                     f"use bits=8 for this model")


@dataclass(frozen=True)
class Grid:
    """The quantization grid of one layer: per-row (int8) or per-group (int4) scale and zero."""

    bits: int
    group: int  # columns per group (K for int8)
    scale: torch.Tensor  # (N, K / group)
    zero: torch.Tensor  # (N, K / group); zeros for int8

    @classmethod
    def fit(cls, w: torch.Tensor, bits: int, group: int) -> "Grid":
        w = w.float()
        if bits == 8:
            return cls(8, w.shape[1], int8_scale(w), torch.zeros(w.shape[0], 1))
        scale, zero = int4_params(w, group)
        return cls(4, group, scale, zero)

    def codes(self, w: torch.Tensor, cols: slice | torch.Tensor | None = None) -> torch.Tensor:
        """Codes of w (N, K') for the given columns of the layer (all when None)."""
        s, z = expand(self.scale, self.group), expand(self.zero, self.group)
        if cols is not None:
            s, z = s[:, cols], z[:, cols]
        return quantize_int8(w, s) if self.bits == 8 else quantize_int4(w, s, z)

    def fake(self, w: torch.Tensor, cols: slice | torch.Tensor | None = None) -> torch.Tensor:
        """w rounded to the grid (dequantized), same shape."""
        s, z = expand(self.scale, self.group), expand(self.zero, self.group)
        if cols is not None:
            s, z = s[:, cols], z[:, cols]
        return (self.codes(w, cols) - z) * s

    def module(self, w: torch.Tensor, bias: torch.Tensor | None = None) -> QuantLinear:
        """The quantized layer of w on this grid (w already rounded or not), keeping a float bias."""
        q = self.codes(w.float())
        if self.bits == 8:
            return Int8Linear.from_codes(q, self.scale, bias)
        return Int4Linear.from_codes(q, self.scale, self.zero, self.group, bias)


def target_linears(model: nn.Module, lm_head: bool) -> list[tuple[str, nn.Linear]]:
    """The linear layers a method replaces: every nn.Linear of the blocks, then the output layer."""
    out = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("layers.")]
    if lm_head and isinstance(getattr(model, "lm_head", None), nn.Linear):
        out.append(("lm_head", model.lm_head))
    return out


def layer_bits(cfg, name: str) -> int:
    """The bits layer `name` gets under cfg (the output layer may differ)."""
    return cfg.lm_head_bits if name == "lm_head" and cfg.lm_head_bits else cfg.bits


def grid_for(name: str, w: torch.Tensor, bits: int, group_size: int) -> Grid:
    g = layer_group(w.shape[1], group_size, name) if bits == 4 else w.shape[1]
    return Grid.fit(w, bits, g)


# --- round to nearest --------------------------------------------------------------------------------

@QUANTIZERS.register(RTNConfig)
def _rtn(model: nn.Module, cfg: RTNConfig, calibration: torch.Tensor | None) -> None:
    for name, m in target_linears(model, cfg.lm_head):
        w = m.weight.detach().float()
        set_layer(model, name, grid_for(name, w, layer_bits(cfg, name), cfg.group_size).module(w, m.bias))


# --- the entry point -----------------------------------------------------------------------------------

def quantize_(model: nn.Module, cfg, tokenizer=None, calibration: torch.Tensor | None = None) -> nn.Module:
    """Quantize `model` in place with the method `cfg`'s type names; returns the model.

    Calibrated methods (GPTQ, AWQ) use `calibration` token ids (n, T) when given, else windows of
    the default corpus drawn with `tokenizer` as `cfg.calibration` says.
    """
    from lilliput.compress import awq, gptq  # noqa: F401  (they register their handlers)

    handler = QUANTIZERS[type(cfg)]
    if calibration is None and hasattr(cfg, "calibration"):
        if tokenizer is None:
            raise ValueError(f"{type(cfg).__name__} needs calibration data: pass tokenizer= or calibration=")
        calibration = calibration_batches(tokenizer, cfg.calibration)
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("the model is already quantized: start from a float model")
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:  # methods work in fp32; the unquantized parts return to `dtype`
        model.float()
    with torch.no_grad():
        handler(model, cfg, calibration)
    model.quantization = {"method": next(k for k, v in METHODS.items() if v is type(cfg)) if type(cfg) in
                          METHODS.values() else type(cfg).__name__, "config": config_dict(cfg)}
    return model.to(dtype)


def config_dict(cfg) -> dict[str, Any]:
    """A config dataclass as JSON-ready values (what model.quantization and run.json record)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
