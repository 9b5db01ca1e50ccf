"""Pruning: `prune_(model, cfg)` zeroes weights in place; `structured_prune` (structured.py) shrinks.

Unstructured and N:M methods, one config each, looked up by config type in `PRUNERS`:

- `MagnitudeConfig`: the smallest |W| of each linear layer (no data).
- `WandaConfig`: |W| * ||X_j||_2 per output row (Sun et al. 2023).
- `SparseGPTConfig`: OBS reconstruction with the inverse Hessian (Frantar & Alistarh 2023).

Every `nn.Linear` inside the transformer blocks is pruned; the token embedding and the output
layer (tied to it in SmolLM2) are left dense, as both papers do. The fused q|k|v and gate|up
matrices are one linear layer each (rows concatenated): per-output-row methods apply unchanged.
Wanda and SparseGPT run block by block as the papers do: hooks capture each linear layer's
inputs over the calibration batches, the block is pruned, and its *pruned* outputs become the
next block's inputs.

`lilliput prune` is `lilliput.jobs.prune`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from lilliput.compress.calibration import CalibrationConfig, calibration_batches
from lilliput.compress.sparsegpt import magnitude_mask, sparsegpt_prune, wanda_mask
from lilliput.core.model import GPT
from lilliput.core.registry import Registry

PRUNERS: Registry[Callable] = Registry("pruning method")


def _check_sparsity(sparsity: float, n_m: tuple[int, int] | None) -> None:
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1) (the fraction of weights zeroed), got {sparsity}")
    if n_m is not None:
        if len(n_m) != 2 or not all(isinstance(v, int) for v in n_m) or not 0 < n_m[0] < n_m[1]:
            raise ValueError(f"n_m must be (n, m) with 0 < n < m, e.g. (2, 4) for 2:4, got {n_m}")


@dataclass(frozen=True)
class MagnitudeConfig:
    """Magnitude pruning: the round(sparsity * numel) smallest |W| of each linear layer."""

    sparsity: float = 0.5
    """Fraction of each linear layer's weights set to zero, in [0, 1); unused when n_m is set."""
    n_m: tuple[int, int] | None = None
    """Semi-structured N:M: keep n of every m consecutive input weights ((2, 4) is 2:4); None is unstructured."""

    def __post_init__(self):
        _check_sparsity(self.sparsity, self.n_m)


@dataclass(frozen=True)
class WandaConfig:
    """Wanda: prune the lowest |W_ij| * ||X_j||_2 within each output row."""

    sparsity: float = 0.5
    """Fraction of each output row's weights set to zero, in [0, 1); unused when n_m is set."""
    n_m: tuple[int, int] | None = None
    """Semi-structured N:M: keep n of every m consecutive input weights ((2, 4) is 2:4); None is unstructured."""
    calibration: CalibrationConfig = field(default_factory=lambda: CalibrationConfig(samples=32, seq_len=512))
    """Calibration windows (the papers use 128 x 2048 tokens; 32 x 512 suffices for a 135M model)."""
    batch_size: int = 8
    """Calibration sequences per forward pass."""

    def __post_init__(self):
        _check_sparsity(self.sparsity, self.n_m)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class SparseGPTConfig:
    """SparseGPT: prune with OBS weight reconstruction from the inputs' Hessian."""

    sparsity: float = 0.5
    """Fraction of each linear layer's weights set to zero, in [0, 1); unused when n_m is set."""
    n_m: tuple[int, int] | None = None
    """Semi-structured N:M: keep n of every m consecutive input weights ((2, 4) is 2:4); None is unstructured."""
    blocksize: int = 128
    """Columns per block: the adaptive mask is chosen per block (the paper's Bs = 128)."""
    damp: float = 0.01
    """Dampening added to the Hessian diagonal, as a fraction of its mean (the paper's 1%)."""
    calibration: CalibrationConfig = field(default_factory=lambda: CalibrationConfig(samples=32, seq_len=512))
    """Calibration windows (the paper uses 128 x 2048 tokens; 32 x 512 suffices for a 135M model)."""
    batch_size: int = 8
    """Calibration sequences per forward pass."""

    def __post_init__(self):
        _check_sparsity(self.sparsity, self.n_m)
        if self.blocksize < 1:
            raise ValueError(f"blocksize must be >= 1, got {self.blocksize}")
        if self.damp <= 0:
            raise ValueError(f"damp must be > 0 (it keeps the Hessian invertible), got {self.damp}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def block_linears(model: GPT) -> dict[str, nn.Linear]:
    """The linear layers pruning touches: every nn.Linear inside the blocks (not embedding/lm_head)."""
    return {f"layers.{i}.{name}": m for i, block in enumerate(model.layers)
            for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def sparsity_of(model: GPT) -> dict[str, float]:
    """Fraction of zero weights of each linear layer in the blocks."""
    return {name: (m.weight == 0).float().mean().item() for name, m in block_linears(model).items()}


def _batches(model: GPT, cfg, tokenizer, batches: torch.Tensor | None) -> torch.Tensor:
    if batches is None:
        if tokenizer is None:
            raise ValueError(f"{type(cfg).__name__} needs calibration data: pass tokenizer= (or batches=)")
        batches = calibration_batches(tokenizer, cfg.calibration)
    if batches.dim() != 2:
        raise ValueError(f"calibration batches must be (samples, seq_len) token ids, got shape {tuple(batches.shape)}")
    if batches.shape[1] > model.config.max_seq_len:
        raise ValueError(f"calibration seq_len {batches.shape[1]} exceeds the model's max_seq_len {model.config.max_seq_len}")
    return batches.to(next(model.parameters()).device)


class _InputStats:
    """Accumulates what a pruner needs from a linear layer's inputs x (..., cols)."""

    def __init__(self, cols: int, hessian: bool, device):
        self.n = 0
        self.sumsq = torch.zeros(cols, dtype=torch.float64, device=device)  # sum_t x_tj^2
        self.xtx = torch.zeros(cols, cols, dtype=torch.float32, device=device) if hessian else None

    def __call__(self, module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (tokens, cols)
        self.n += x.shape[0]
        self.sumsq += x.pow(2).sum(0).double()
        if self.xtx is not None:
            self.xtx.addmm_(x.T, x)

    def norm(self) -> torch.Tensor:
        return self.sumsq.sqrt().float()  # (cols,) ||X_j||_2

    def hessian(self) -> torch.Tensor:
        return self.xtx / max(self.n, 1)  # (cols, cols)


@torch.no_grad()
def _blockwise(model: GPT, batches: torch.Tensor, batch_size: int, hessian: bool,
               prune_layer: Callable[[nn.Linear, _InputStats], None]) -> None:
    """Prune block by block: capture the linear inputs of block i, prune it, feed its outputs on."""
    N, device = batches.shape[0], batches.device
    xs = [model.embed(batches[j:j + batch_size]) for j in range(0, N, batch_size)]  # (b, T, C) each
    for i, block in enumerate(model.layers):
        linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
        stats = [_InputStats(m.in_features, hessian, device) for m in linears]
        hooks = [m.register_forward_pre_hook(s) for m, s in zip(linears, stats)]
        try:
            for x in xs:
                block(x)
        finally:
            for h in hooks:
                h.remove()
        for m, s in zip(linears, stats):
            prune_layer(m, s)
        xs = [block(x) for x in xs]  # pruned outputs feed the next block


@PRUNERS.register(MagnitudeConfig)
@torch.no_grad()
def _magnitude(model: GPT, cfg: MagnitudeConfig, tokenizer=None, batches=None) -> GPT:
    for m in block_linears(model).values():
        m.weight.masked_fill_(magnitude_mask(m.weight, cfg.sparsity, cfg.n_m), 0.0)
    return model


@PRUNERS.register(WandaConfig)
def _wanda(model: GPT, cfg: WandaConfig, tokenizer=None, batches=None) -> GPT:
    def prune_layer(m: nn.Linear, s: _InputStats):
        m.weight.masked_fill_(wanda_mask(m.weight, s.norm(), cfg.sparsity, cfg.n_m), 0.0)

    _blockwise(model, _batches(model, cfg, tokenizer, batches), cfg.batch_size, False, prune_layer)
    return model


@PRUNERS.register(SparseGPTConfig)
def _sparsegpt(model: GPT, cfg: SparseGPTConfig, tokenizer=None, batches=None) -> GPT:
    def prune_layer(m: nn.Linear, s: _InputStats):
        m.weight.copy_(sparsegpt_prune(m.weight, s.hessian(), cfg.sparsity, cfg.n_m, cfg.blocksize, cfg.damp))

    _blockwise(model, _batches(model, cfg, tokenizer, batches), cfg.batch_size, True, prune_layer)
    return model


def prune_(model: GPT, cfg, tokenizer=None, batches: torch.Tensor | None = None) -> GPT:
    """Zero weights of `model` in place by the method of `cfg` (a config registered in PRUNERS).

    Wanda and SparseGPT need calibration text: pass `tokenizer` (windows come from
    `calibration_batches(tokenizer, cfg.calibration)`) or `batches` (samples, seq_len) token ids.
    The embedding and the (tied) output layer are never pruned. Returns `model`.
    """
    if not isinstance(model, GPT):
        raise ValueError(f"prune_ expects a lilliput GPT, got {type(model).__name__}")
    from lilliput.compress.structured import StructuredConfig

    if isinstance(cfg, StructuredConfig):
        raise ValueError("structured pruning returns a new, smaller model: call structured_prune(model, cfg)")
    was_training = model.training
    model.eval()
    try:
        return PRUNERS[type(cfg)](model, cfg, tokenizer=tokenizer, batches=batches)
    finally:
        model.train(was_training)


# --- methods by name ---------------------------------------------------------------------------

UNSTRUCTURED = {"magnitude": MagnitudeConfig, "wanda": WandaConfig, "sparsegpt": SparseGPTConfig}
"""Unstructured methods (zero weights in place) by name."""
STRUCTURED = ("heads", "channels", "layers")
"""Structured methods (a smaller dense model, structured.py) by what they remove."""
