"""The grids every quantization method rounds to: per-row int8 and per-group int4 scales and zeros,
the layers a method replaces, and the int4 group a layer of a given width can use."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from lilliput.compress.qlinear import (GROUP_SIZES, Int4Linear, Int8Linear, QuantLinear, expand, int4_params, int8_scale,
                                       quantize_int4, quantize_int8)


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
