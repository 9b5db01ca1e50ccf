"""The fused step: one C call runs a Llama model over a few tokens on CPU (csrc/llama_step.c).

A call takes up to `MAX_TOKENS` tokens, each with its own cache row and position: one token for
each of B decoding sequences, the k + 1 tokens of a sequence being verified, or a short prefill
chunk. Each weight matrix is read once per call.

`FusedStep.for_model(model)` returns None where it does not apply (no kernel, not CPU, a mixer
or feed-forward other than attention + SwiGLU, a linear layer the step cannot run); the runner
then uses the torch modules. The step reads and writes the same `DecodeState` tensors the torch
prefill fills: fp32, or fp16 where the build has F16C (`kv_f16`; the engine's default there, as
llama.cpp's: attention in a batched step reads every row's cache, every layer).

The argument block is `abi.Step` (step_args_t of kernels/csrc/lilliput.h, checked at load) and
every linear layer is described by `kernels.descriptor.for_module`: plain fp32/bf16 `nn.Linear`
layers, and quantized modules through their `kernel_desc()`.
"""

from __future__ import annotations

import ctypes

import torch

from lilliput.core.config import ModelConfig
from lilliput.core.model import GPT, DecodeState, KVState
from lilliput.infer.kernels import abi, build, descriptor
from lilliput.infer.kernels.build import Kernel


class FusedStep:
    def __init__(self, model: GPT, kernel: Kernel, descs: list[abi.Linear]):
        c = model.config
        lib = kernel.lib
        self.model, self.config, self.fn = model, c, lib.llama_step
        self.max_tokens = lib.llama_step_max_tokens()
        # whether the step can read and write an fp16 cache (F16C, head_dim % 8 == 0)
        self.kv_f16 = bool(lib.llama_step_kv_f16(c.hd))
        # fp32 copies of the norms (tiny); matrices are used in place
        self.norms = [(blk.attn_norm.weight.float().contiguous(), blk.ffn_norm.weight.float().contiguous())
                      for blk in model.layers]
        self.final_norm = model.norm.weight.float().contiguous()
        a = self.args = abi.Step(n_layers=c.n_layers, dim=c.dim, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads,
                                 head_dim=c.hd, ffn_dim=c.ffn_dim, vocab=c.vocab_size, eps=c.norm_eps)
        a.final_norm = self.final_norm.data_ptr()
        a.lm_head = descs[0]
        self.layer_args = (abi.Layer * c.n_layers)()
        for i, (n1, n2) in enumerate(self.norms):
            la = self.layer_args[i]
            la.attn_norm, la.ffn_norm = n1.data_ptr(), n2.data_ptr()
            la.wqkv, la.wo, la.w_gate_up, la.w_down = descs[1 + 4 * i: 5 + 4 * i]
        a.layers = ctypes.addressof(self.layer_args)
        self._ref = ctypes.byref(a)
        T = self.max_tokens
        self.x = torch.empty(T, c.dim)
        self.logits = torch.empty(T, c.vocab_size)
        self.meta = torch.zeros(3, T, dtype=torch.long)  # rows, positions, output indices
        self.scratch = torch.empty(lib.step_scratch_floats(ctypes.byref(a), T))
        a.x, a.logits, a.scratch = self.x.data_ptr(), self.logits.data_ptr(), self.scratch.data_ptr()
        a.rows, a.pos, a.out_idx = (self.meta[i].data_ptr() for i in range(3))
        self._bound: tuple[int, int] | None = None

    @classmethod
    def for_model(cls, model: GPT) -> "FusedStep | None":
        kernel = build.load()
        if not isinstance(kernel, Kernel) or not isinstance(model, GPT):
            return None
        c = model.config
        if c.ffn != "swiglu" or any(c.mixer_at(i) != "attention" for i in range(c.n_layers)) \
                or model.norm.weight.device.type != "cpu":
            return None
        plain = ModelConfig(vocab_size=c.vocab_size)
        quirks = ("attn_bias", "attn_out_bias", "mlp_bias", "qk_norm", "norm_offset", "pre_norms", "post_norms", "act",
                  "emb_scale", "attn_scale", "attn_softcap", "final_softcap", "sliding_window", "rope_scaling",
                  "rope_local_theta", "rotary_dim", "nope_layers")
        if any(getattr(c, q) != getattr(plain, q) for q in quirks):
            return None  # the C step runs plain Llama blocks only
        linears = [model.lm_head] + [m for blk in model.layers for m in
                                     (blk.mixer.wqkv, blk.mixer.wo, blk.ffn.w_gate_up, blk.ffn.w_down)]
        descs = [descriptor.for_module(m) for m in linears]
        if any(d is None for d in descs):
            return None  # e.g. a layer type the C step has no kernel for: the torch modules run it
        step = cls(model, kernel, descs)
        # every layer reads its weights once for any number of tokens (int8 in the batch layout):
        # prompt chunks then run here too, max_tokens at a time
        step.one_pass = all(d.kind == abi.Kind.INT8_BATCH for d in descs)
        # the tensors the descriptors point at, held even if a module later swaps a buffer for
        # another layout (an int8 layer asked for its row-major kernel unpacks into a new tensor)
        step._alive = [b for m in linears for b in m.buffers()]
        return step

    def bind(self, state: DecodeState) -> None:
        """Point the step at a decode state's caches (fp32, or fp16 where `kv_f16`; CPU). Call again
        after it grows."""
        first = state.layers[0]
        dtypes = (torch.float32, torch.float16) if self.kv_f16 else (torch.float32,)
        if not isinstance(first, KVState) or first.k.dtype not in dtypes or first.k.device.type != "cpu":
            raise ValueError(f"the fused step needs a CPU attention state of {' or '.join(map(str, dtypes))}")
        self.args.max_len = first.max_len
        self.args.kv_f16 = int(first.k.dtype == torch.float16)
        for la, s in zip(self.layer_args, state.layers):
            la.k_cache, la.v_cache = s.k.data_ptr(), s.v.data_ptr()
        self._bound = (id(state), state.generation)

    def __call__(self, state: DecodeState, tokens: list[int], rows: list[int], out: list[int] | None = None
                 ) -> torch.Tensor:
        """Append token t to state row rows[t] (at that row's length; a row may appear several times,
        in order) and return the logits (len(out), V) fp32 of the tokens indexed by `out` (default
        all). The returned tensor is reused by the next call."""
        n = len(tokens)
        if not 0 < n <= self.max_tokens or len(rows) != n:
            raise ValueError(f"the fused step takes 1..{self.max_tokens} tokens with one row each, got {n}")
        lengths = state.lengths
        pos, seen = [], {}
        for r in rows:
            p = lengths[r] + seen.get(r, 0)
            seen[r] = seen.get(r, 0) + 1
            pos.append(p)
        state.ensure(max(pos) + 1)
        if self._bound != (id(state), state.generation):
            self.bind(state)
        out = list(range(n)) if out is None else out
        model, a, meta = self.model, self.args, self.meta
        meta[0, :n] = torch.tensor(rows)
        meta[1, :n] = torch.tensor(pos)
        meta[2, :len(out)] = torch.tensor(out)
        emb, ids = model.tok_emb.weight, meta[0, :n].new_tensor(tokens)
        if emb.dtype == torch.float32:
            torch.index_select(emb, 0, ids, out=self.x[:n])
        else:
            self.x[:n] = emb[ids]
        cos, sin = model.layers[0].mixer.rotary.tables(max(pos) + 1, self.x.device)
        cos, sin = cos[meta[1, :n]], sin[meta[1, :n]]  # (n, hs), contiguous
        a.n_tok, a.n_out, a.cos, a.sin = n, len(out), cos.data_ptr(), sin.data_ptr()
        rc = self.fn(self._ref)
        if rc != 0:
            raise RuntimeError(f"llama_step failed (code {rc}) for rows {rows} at positions {pos}")
        for r, k in seen.items():
            lengths[r] += k
        return self.logits[:len(out)]
