"""The fused decode step: one C call per token for plain Llama models on CPU (csrc/llama_step.c).

`FusedStep.for_model(model)` returns None where it does not apply (no kernel, not CPU, an
architecture other than attention + SwiGLU, weights other than fp32/bf16, a linear layer that
quantization or pruning replaced); the engine then decodes with the torch modules. The step
reads and writes the same `KVCache` tensors the torch prefill fills, which must be fp32.
"""

from __future__ import annotations

import ctypes
import struct

import torch
import torch.nn as nn

from lilliput.core.model import GPT, KVCache
from lilliput.infer import gemv

_WDT = {torch.float32: 0, torch.bfloat16: 1}


class FusedStep:
    def __init__(self, model: GPT, kernel: gemv.Kernel):
        c = model.config
        self.model, self.config, self.fn = model, c, kernel.lib.llama_step
        wdtype = model.lm_head.weight.dtype
        # fp32 copies of the norms (tiny); matrices are used in place
        self.norms = [(blk.attn_norm.weight.float().contiguous(), blk.ffn_norm.weight.float().contiguous())
                      for blk in model.layers]
        self.final_norm = model.norm.weight.float().contiguous()
        self.mats = [(blk.mixer.wqkv.weight, blk.mixer.wo.weight, blk.ffn.w_gate_up.weight, blk.ffn.w_down.weight)
                     for blk in model.layers]
        n = 18 + 8 * c.n_layers
        self.args = (ctypes.c_int64 * n)()
        a = self.args
        a[0:7] = [c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.hd, c.ffn_dim, c.vocab_size]
        a[9] = _WDT[wdtype]
        a[10] = struct.unpack("<q", struct.pack("<d", c.norm_eps))[0]
        self.x = torch.empty(c.dim)
        self.logits = torch.empty(1, c.vocab_size)
        a[11], a[12] = self.x.data_ptr(), self.logits.data_ptr()
        a[16], a[17] = self.final_norm.data_ptr(), model.lm_head.weight.data_ptr()
        for i, ((n1, n2), (wqkv, wo, wgu, wdown)) in enumerate(zip(self.norms, self.mats)):
            a[18 + 8 * i: 24 + 8 * i] = [n1.data_ptr(), wqkv.data_ptr(), wo.data_ptr(), n2.data_ptr(),
                                         wgu.data_ptr(), wdown.data_ptr()]
        self._cache = None

    @classmethod
    def for_model(cls, model: GPT) -> "FusedStep | None":
        kernel = gemv.load()
        if not isinstance(kernel, gemv.Kernel) or not isinstance(model, GPT):
            return None
        c = model.config
        if c.mixer != "attention" or c.ffn != "swiglu" or model.lm_head.weight.device.type != "cpu":
            return None
        linears = [model.lm_head] + [m for blk in model.layers for m in
                                     (blk.mixer.wqkv, blk.mixer.wo, blk.ffn.w_gate_up, blk.ffn.w_down)]
        if any(not isinstance(m, nn.Linear) or m.bias is not None or not m.weight.is_contiguous() for m in linears):
            return None  # e.g. a quantized or pruned layer: the torch modules know how to run it
        dtypes = {m.weight.dtype for m in linears}
        if len(dtypes) != 1 or dtypes.pop() not in _WDT:
            return None
        return cls(model, kernel)

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
            a[24 + 8 * i], a[25 + 8 * i] = cache.k[i].data_ptr(), cache.v[i].data_ptr()

    def __call__(self, token: int, pos: int) -> torch.Tensor:
        """Logits (1, V) fp32 for `token` at cache slot `pos` (the cache holds slots < pos)."""
        model, a = self.model, self.args
        self.x.copy_(model.tok_emb.weight[token])
        cos, sin = model.rotary.tables(pos + 1, self.x.device)
        cos, sin = cos[pos], sin[pos]  # contiguous rows (hs,)
        a[7], a[13], a[14] = pos, cos.data_ptr(), sin.data_ptr()
        if self.fn(self.args) != 0:
            raise RuntimeError(f"llama_step failed at position {pos}")
        return self.logits
