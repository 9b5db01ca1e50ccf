"""LoRA merged into quantized layers (the rule `train.lora.merge_lora_` finds for `QuantLinear`).

W + scaling * B @ A is either re-quantized in the base's own format (int8 per row, int4 per group
of the same size) on a grid refitted to it, which rounds: an update smaller than half a grid step
is partly lost, and the error is returned for `merge_lora_` to report; or, with `dequantize`, kept
as a float `nn.Linear` (exact, four times the bytes of int8). `lilliput.compress` imports this
module once, so the rule is registered whenever a quantized layer exists (importing qlinear runs
the package first).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lilliput.compress.qlinear import (Int4Linear, Int8Linear, QuantLinear, expand, int4_params, int8_scale,
                                       quantize_int4, quantize_int8)
from lilliput.train.lora import register_merge_rule


@register_merge_rule(QuantLinear)
def merge_quantized(base: QuantLinear, delta: torch.Tensor, dequantize: bool) -> tuple[nn.Module, torch.Tensor | None]:
    w = base.dequantize(torch.float32) + delta.float().to(base.qweight.device)  # (N, K) the exact merge
    bias = getattr(base, "bias", None)  # a float bias (Qwen2's q/k/v) is carried over as it is
    if dequantize:
        layer = nn.Linear(base.in_features, base.out_features, bias=bias is not None, device=w.device)
        layer.weight = nn.Parameter(w, requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        return layer, None
    if isinstance(base, Int8Linear):
        scale = int8_scale(w)
        merged = Int8Linear.from_codes(quantize_int8(w, scale), scale, bias)
    elif isinstance(base, Int4Linear):
        g = base.group_size
        scale, zero = int4_params(w, g)
        merged = Int4Linear.from_codes(quantize_int4(w, expand(scale, g), expand(zero, g)), scale, zero, g, bias)
    else:
        raise ValueError(f"cannot re-quantize a {type(base).__name__}: merge with dequantize=True")
    merged = merged.to(base.qweight.device)
    merged.kernel_variant = base.kernel_variant
    return merged, merged.dequantize(torch.float32) - w
