"""Descriptors of linear layers (`abi.Linear`, the header's linear_t): the only place one is made.

`for_module(m)` describes a plain fp32/bf16 `nn.Linear` itself; any other layer type joins by
defining `kernel_desc() -> abi.Linear | None` that calls `make(...)` with its tensors (the quantized
layers of compress/qlinear.py do: infer cannot import compress). The tensors a descriptor points at
must stay alive while it is used: a descriptor that needed a converted copy (a bf16 bias as fp32)
holds it in its `keep` attribute, so keep the descriptor object itself alive too.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lilliput.infer.kernels.abi import Kind, Linear, Variant

_FLOAT_KIND = {torch.float32: Kind.F32, torch.bfloat16: Kind.BF16}


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def make(kind: Kind, weight: torch.Tensor, n: int, k: int, *, scale: torch.Tensor | None = None,
         zero: torch.Tensor | None = None, bias: torch.Tensor | None = None, group: int = 0,
         variant: Variant = Variant.AUTO) -> Linear:
    """The descriptor of a layer y (B, n) = x (B, k) W^T + bias whose weight is stored as `kind` says
    (formats: csrc/lilliput.h, ll_kind); bias (n,) in any float dtype (converted to fp32)."""
    if bias is not None:
        bias = bias.detach().to(torch.float32).contiguous()
    desc = Linear(kind=int(kind), weight=weight.data_ptr(), scale=_ptr(scale), zero=_ptr(zero), bias=_ptr(bias),
                  n=n, k=k, group=group, variant=int(variant))
    desc.keep = bias
    return desc


def for_module(m: nn.Module) -> Linear | None:
    """The descriptor of a linear layer on CPU, or None when the kernels cannot run it."""
    if hasattr(m, "kernel_desc"):
        return m.kernel_desc()
    if not isinstance(m, nn.Linear) or m.weight.dtype not in _FLOAT_KIND \
            or not m.weight.is_contiguous() or m.weight.device.type != "cpu":
        return None
    n, k = m.weight.shape
    return make(_FLOAT_KIND[m.weight.dtype], m.weight, n, k, bias=m.bias)
