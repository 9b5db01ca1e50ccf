"""The decode fast path: layers that send few-row inputs to the C kernels (GEMV, RMSNorm).

`accelerate_(model)` swaps the class of every plain `nn.Linear` to `GemvLinear` in place: the
parameters, state dict and `isinstance(m, nn.Linear)` stay exactly as they were, so training,
saving and quantization see an ordinary model. Inputs with more than `kernels.MAX_ROWS` rows
(prefill, evaluation batches) still go to torch.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lilliput.core.model import RMSNorm
from lilliput.infer import kernels


class GemvLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None and x.shape[-1] and x.numel() // x.shape[-1] <= kernels.MAX_ROWS:
            return kernels.linear(x, self.weight)
        return super().forward(x)


class KernelRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // x.shape[-1] <= kernels.MAX_ROWS:
            w = self.weight + self.offset if self.offset else self.weight  # Gemma: (1 + weight)
            y = kernels.rmsnorm(x, w, self.eps)  # None: not fp32 / needs autograd
            if y is not None:
                return y
        return super().forward(x)


def accelerate_(model: nn.Module) -> nn.Module:
    """Route few-row products and norms of `model` to the C kernels (in place)."""
    if not kernels.available():
        return model
    for m in model.modules():
        if type(m) is nn.Linear and m.bias is None:
            m.__class__ = GemvLinear
        elif type(m) is RMSNorm:
            m.__class__ = KernelRMSNorm
    return model
