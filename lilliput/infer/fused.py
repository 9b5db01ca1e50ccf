"""The fused decode step: one C call per token for Llama models on CPU (csrc/llama_step.c).

`FusedStep.for_model(model)` returns None where it does not apply (no kernel, not CPU, an
architecture other than attention + SwiGLU, a linear layer the step cannot run); the engine
then decodes with the torch modules. The step reads and writes the same `KVCache` tensors the
torch prefill fills, which must be fp32.

Each linear layer reaches C as a descriptor, int64[8] = {kind, weight, scale, zero, N, K,
group, extra}: plain fp32/bf16 `nn.Linear` layers get kinds 0/1 here; a quantized module joins
the fast path by defining `kernel_desc() -> list[int]` (its kind >= 2 is run by the C
`qlinear_run`) and keeping the tensors it points at alive.
"""

from __future__ import annotations

import ctypes
import struct

import torch
import torch.nn as nn

from lilliput.core.model import GPT, KVCache
from lilliput.infer import gemv

_WDT = {torch.float32: 0, torch.bfloat16: 1}


DESC_LEN = 8
LAYER_LEN = 4 + 4 * DESC_LEN
HEAD = 25


def linear_desc(m: nn.Module) -> list[int] | None:
    """The C descriptor of a linear layer, or None when the fused step cannot run it."""
    if hasattr(m, "kernel_desc"):
        return m.kernel_desc()
    if not isinstance(m, nn.Linear) or m.bias is not None or m.weight.dtype not in _WDT \
            or not m.weight.is_contiguous() or m.weight.device.type != "cpu":
        return None
    n, k = m.weight.shape
    return [_WDT[m.weight.dtype], m.weight.data_ptr(), 0, 0, n, k, 0, 0]


class FusedStep:
    def __init__(self, model: GPT, kernel: gemv.Kernel, descs: list[list[int]]):
        c = model.config
        self.model, self.config, self.fn = model, c, kernel.lib.llama_step
        # fp32 copies of the norms (tiny); matrices are used in place
        self.norms = [(blk.attn_norm.weight.float().contiguous(), blk.ffn_norm.weight.float().contiguous())
                      for blk in model.layers]
        self.final_norm = model.norm.weight.float().contiguous()
        a = self.args = (ctypes.c_int64 * (HEAD + LAYER_LEN * c.n_layers))()
        a[0:7] = [c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.hd, c.ffn_dim, c.vocab_size]
        a[10] = struct.unpack("<q", struct.pack("<d", c.norm_eps))[0]
        self.x = torch.empty(c.dim)
        self.logits = torch.empty(1, c.vocab_size)
        a[11], a[12], a[16] = self.x.data_ptr(), self.logits.data_ptr(), self.final_norm.data_ptr()
        a[17:25] = descs[0]
        for i, (n1, n2) in enumerate(self.norms):
            base = HEAD + LAYER_LEN * i
            a[base], a[base + 1] = n1.data_ptr(), n2.data_ptr()
            for j in range(4):
                a[base + 4 + DESC_LEN * j: base + 4 + DESC_LEN * (j + 1)] = descs[1 + 4 * i + j]
        self._cache = None

    @classmethod
    def for_model(cls, model: GPT) -> "FusedStep | None":
        kernel = gemv.load()
        if not isinstance(kernel, gemv.Kernel) or not isinstance(model, GPT):
            return None
        c = model.config
        if c.mixer != "attention" or c.ffn != "swiglu" or model.norm.weight.device.type != "cpu":
            return None
        linears = [model.lm_head] + [m for blk in model.layers for m in
                                     (blk.mixer.wqkv, blk.mixer.wo, blk.ffn.w_gate_up, blk.ffn.w_down)]
        descs = [linear_desc(m) for m in linears]
        if any(d is None for d in descs):
            return None  # e.g. a layer type the C step has no kernel for: the torch modules run it
        return cls(model, kernel, descs)

    def bind(self, cache: KVCache, scratch_len: int) -> None:
        """Point the step at a cache (fp32, batch 1, no padding)."""
        if cache.k[0].dtype != torch.float32 or cache.k[0].shape[0] != 1 or cache.pad is not None:
            raise ValueError("the fused step needs an fp32 KV cache for one unpadded sequence")
        c, a = self.config, self.args
        self._cache = cache
        a[8] = cache.max_len
        self.scratch = torch.empty(c.dim + (c.n_heads + 2 * c.n_kv_heads) * c.hd + c.n_heads * c.hd
                                   + 2 * c.ffn_dim + scratch_len)
        a[15] = self.scratch.data_ptr()
        for i in range(c.n_layers):
            base = HEAD + LAYER_LEN * i
            a[base + 2], a[base + 3] = cache.k[i].data_ptr(), cache.v[i].data_ptr()

    def __call__(self, token: int, pos: int) -> torch.Tensor:
        """Logits (1, V) fp32 for `token` at cache slot `pos` (the cache holds slots < pos).
        The returned tensor is reused by the next call."""
        model, a = self.model, self.args
        self.x.copy_(model.tok_emb.weight[token])
        cos, sin = model.rotary.tables(pos + 1, self.x.device)
        cos, sin = cos[pos], sin[pos]  # contiguous rows (hs,)
        a[7], a[13], a[14] = pos, cos.data_ptr(), sin.data_ptr()
        rc = self.fn(self.args)
        if rc != 0:
            raise RuntimeError(f"llama_step failed at position {pos} (code {rc})")
        return self.logits
