"""The quantization methods' table, at compress's bottom: each method's frozen config and
`QUANTIZERS`, config type -> handler(model, cfg, calibration) that replaces the layers in place
(torchao's shape). Methods register themselves from above (round to nearest in quantize.py, GPTQ
in gptq.py, AWQ in awq.py); `lilliput.compress` imports GPTQ and AWQ once, so they are in the
table whenever any part of compress is imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from lilliput.compress.calibration import CalibrationConfig
from lilliput.compress.qlinear import GROUP_SIZES
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
