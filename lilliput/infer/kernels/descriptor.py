"""Descriptors of linear layers (`abi.Linear`, the header's linear_t): the only place one is made.

`for_module(m)` describes a plain fp32/bf16 `nn.Linear` itself; any other layer type joins by
defining `kernel_desc() -> abi.Linear | None` that calls `make(...)` with its tensors (the quantized
layers of compress/qlinear.py do: infer cannot import compress). The tensors a descriptor points at
must stay alive while it is used.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lilliput.infer.kernels.abi import Kind, Linear, Variant

_FLOAT_KIND = {torch.float32: Kind.F32, torch.bfloat16: Kind.BF16}


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def make(kind: Kind, weight: torch.Tensor, n: int, k: int, *, scale: torch.Tensor | None = None,
         zero: torch.Tensor | None = None, group: int = 0, variant: Variant = Variant.AUTO) -> Linear:
    """The descriptor of a layer y (B, n) = x (B, k) W^T whose weight is stored as `kind` says
    (formats: csrc/lilliput.h, ll_kind)."""
    return Linear(kind=int(kind), weight=weight.data_ptr(), scale=_ptr(scale), zero=_ptr(zero), n=n, k=k,
                  group=group, variant=int(variant))


def for_module(m: nn.Module) -> Linear | None:
    """The descriptor of a linear layer on CPU, or None when the kernels cannot run it."""
    if hasattr(m, "kernel_desc"):
        return m.kernel_desc()
    if not isinstance(m, nn.Linear) or m.bias is not None or m.weight.dtype not in _FLOAT_KIND \
            or not m.weight.is_contiguous() or m.weight.device.type != "cpu":
        return None
    n, k = m.weight.shape
    return make(_FLOAT_KIND[m.weight.dtype], m.weight, n, k)
