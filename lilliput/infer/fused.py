"""The fused step: one C call runs a whole model over a few tokens on CPU (kernels/csrc/llama_step.c).

A call takes up to `max_tokens` tokens, each with its own cache row and position: one token for
each of B decoding sequences, the k + 1 tokens of a sequence being verified, or a short prefill
chunk. Each weight matrix is read once per call (each expert's once, for the tokens routed to it).

It runs every family `lilliput.core.model` builds from attention blocks: biases, qk-norm (per head
or over the projection), (offset + weight) norms, pre- and post-norms, SwiGLU or GeGLU, embedding
scale, attention scale and soft-caps, sliding-window layers, per-layer rotary tables (partial, NoPE,
local bases, every scaling: the tables come from each layer's `rotary`), and MoE feed-forwards; and
the recurrent mixers, Mamba-2 (core/ssm.py) and the mLSTM (core/xlstm.py), alone or mixed with
attention layer by layer (hybrids). `fast_path_reason(model)` says why a model cannot run here (""
when it can); `FusedStep.for_model` then returns None and the runner uses the torch modules. The
step reads and writes the same `DecodeState` tensors the torch prefill fills: KV caches in fp32, or
fp16 where the build has F16C (`kv_f16`; the engine's default there, as llama.cpp's: attention in a
batched step reads every row's cache, every layer), and a recurrent layer's fp32 states, advanced
token by token in each row's order, their snapshots (for rewinding) in the state's
`snapshot_slots()`.

The argument block is `abi.Step` (step_args_t of kernels/csrc/lilliput.h, checked at load) and
every linear layer is described by `kernels.descriptor.for_module`: plain fp32/bf16 `nn.Linear`
layers (with or without bias), and quantized modules through their `kernel_desc()`.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn as nn

from lilliput.core.model import GPT, DecodeState, KVState
from lilliput.core.recurrent import SNAPSHOTS, RecurrentState
from lilliput.core.ssm import Mamba
from lilliput.core.xlstm import MLSTM
from lilliput.infer.kernels import abi, build, descriptor
from lilliput.infer.kernels.build import Kernel

_QK = {None: abi.QkNorm.NONE, "head": abi.QkNorm.HEAD, "proj": abi.QkNorm.PROJ}
_ACT = {"silu": abi.Act.SILU, "gelu_tanh": abi.Act.GELU_TANH}
_MIXERS = {"attention": abi.Mixer.ATTENTION, "mamba": abi.Mixer.MAMBA, "mlstm": abi.Mixer.MLSTM}
_PROJECTIONS = {"attention": ("wqkv", "wo"), "mamba": ("in_proj", "out_proj"), "mlstm": ("w_in", "w_out")}
"""Each mixer's input and output projections, in the order the step's structs take them."""


def _linears(model: GPT) -> list[tuple[str, nn.Module]]:
    """Every linear layer the step runs, named: the output layer, then per layer the mixer's input
    and output projections, and gate|up, down of the dense feed-forward or of each expert."""
    out = [("lm_head", model.lm_head)]
    for i, blk in enumerate(model.layers):
        out += [(f"layers.{i}.mixer.{name}", getattr(blk.mixer, name))
                for name in _PROJECTIONS[model.config.mixer_at(i)]]
        experts = getattr(blk.ffn, "experts", None)
        for j, ffn in enumerate(experts if experts is not None else [blk.ffn]):
            p = f"layers.{i}.ffn." + (f"experts.{j}." if experts is not None else "")
            out += [(p + "w_gate_up", ffn.w_gate_up), (p + "w_down", ffn.w_down)]
    return out


def _reason(model: nn.Module) -> tuple[str, list[abi.Linear]]:
    """Why the step cannot run `model` ("" when it can), and the descriptors of `_linears(model)`."""
    kernel = build.load()
    if not isinstance(kernel, Kernel):
        return f"the C kernels are unavailable ({kernel})", []
    if not isinstance(model, GPT):
        return f"{type(model).__name__} is not a lilliput GPT", []
    c = model.config
    if model.norm.weight.device.type != "cpu":
        return f"the model is on {model.norm.weight.device.type}, the fused step runs on CPU", []
    mixers = sorted({c.mixer_at(i) for i in range(c.n_layers)} - set(_MIXERS))
    if mixers:
        return f"the fused step runs attention, Mamba and mLSTM layers, not {', '.join(mixers)}", []
    kinds = {"mamba": Mamba, "mlstm": MLSTM}
    for i, blk in enumerate(model.layers):
        kind = kinds.get(c.mixer_at(i))
        if kind is not None and type(blk.mixer) is not kind:
            return f"layer {i}'s mixer is a {type(blk.mixer).__name__}, not lilliput's {kind.__name__}", []
    if c.ffn not in ("swiglu", "moe"):
        return f"the fused step runs gated and MoE feed-forwards, not {c.ffn!r}", []
    if c.ffn == "moe" and c.moe_capacity is not None:
        return "MoE with a capacity (dropped tokens) runs in torch only", []
    descs = []
    for name, m in _linears(model):
        d = descriptor.for_module(m)
        if d is None:
            return f"{name} ({type(m).__name__}) has no kernel descriptor", []
        descs.append(d)
    return "", descs


def fast_path_reason(model: nn.Module) -> str:
    """Why the fused C step cannot run `model` (one line to show once); "" when it can."""
    return _reason(model)[0]


def _norm(m: nn.Module | None) -> torch.Tensor | None:
    """An RMSNorm's fp32 (offset + weight), what the step multiplies by; None for no norm."""
    if m is None:
        return None
    return (m.weight.detach().float() + m.offset).contiguous() if m.offset else m.weight.detach().float().contiguous()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class FusedStep:
    def __init__(self, model: GPT, kernel: Kernel, descs: list[abi.Linear]):
        c = model.config
        lib = kernel.lib
        self.model, self.config, self.fn = model, c, lib.llama_step
        self.max_tokens = lib.llama_step_max_tokens()
        # whether the step can read and write an fp16 cache (F16C, head_dim % 8 == 0)
        self.kv_f16 = bool(lib.llama_step_kv_f16(c.hd))
        self._descs = descs  # they hold converted copies (bf16 biases as fp32)
        moe = c.ffn == "moe"
        a = self.args = abi.Step(
            n_layers=c.n_layers, dim=c.dim, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, head_dim=c.hd,
            ffn_dim=c.ffn_dim, vocab=c.vocab_size, eps=c.norm_eps, act=_ACT[c.act], qk_norm=_QK[c.qk_norm],
            attn_scale=c.attn_scale or 0.0, attn_softcap=c.attn_softcap or 0.0, final_softcap=c.final_softcap or 0.0,
            rot_dim=c.rot_dim, n_experts=c.moe_experts if moe else 0, top_k=c.moe_top_k if moe else 0,
            norm_topk=int(c.moe_norm_topk), n_snap=SNAPSHOTS)
        self.final_norm = _norm(model.norm)
        a.final_norm = self.final_norm.data_ptr()
        a.lm_head = descs[0]
        # rotary: one table per distinct Rotary of the model (shared by every layer with its parameters)
        self.rotaries: list = []
        self.layer_args = (abi.Layer * c.n_layers)()
        self._keep: list = []  # fp32 norms, routers and expert descriptor arrays the structs point at
        it = iter(descs[1:])
        for i, blk in enumerate(model.layers):
            la, mix, kind = self.layer_args[i], blk.mixer, c.mixer_at(i)
            norms = [_norm(getattr(blk, n, None)) for n in ("attn_norm", "attn_post_norm", "ffn_norm", "ffn_post_norm")]
            self._keep += norms
            la.mixer = _MIXERS[kind]
            la.attn_norm, la.attn_post_norm, la.ffn_norm, la.ffn_post_norm = map(_ptr, norms)
            if kind == "attention":
                self._attention(la, mix, next(it), next(it))
            elif kind == "mamba":
                self._mamba(la, mix, next(it), next(it))
            else:
                self._mlstm(la, mix, next(it), next(it))
            if moe:
                E = c.moe_experts
                gate_up, down = (abi.Linear * E)(), (abi.Linear * E)()
                for e in range(E):
                    gate_up[e], down[e] = next(it), next(it)
                router = blk.ffn.router.detach().float().contiguous()
                self._keep += [gate_up, down, router]
                la.moe = abi.Moe(router=router.data_ptr(), gate_up=ctypes.addressof(gate_up),
                                 down=ctypes.addressof(down))
            else:
                la.w_gate_up, la.w_down = next(it), next(it)
        a.layers = ctypes.addressof(self.layer_args)
        self._ref = ctypes.byref(a)
        T = self.max_tokens
        self.emb_scale = None if c.emb_scale is None else torch.tensor(c.emb_scale, dtype=model.tok_emb.weight.dtype)
        self.x = torch.empty(T, c.dim)
        self.logits = torch.empty(T, c.vocab_size)
        self.meta = torch.zeros(3, T, dtype=torch.long)  # rows, positions, output indices
        self.rope = torch.empty(2, max(len(self.rotaries), 1) * T * c.rot_dim)  # cos, sin: (n_rope, n, rot_dim)
        self.scratch = torch.empty(lib.step_scratch_floats(ctypes.byref(a), T))
        a.x, a.logits, a.scratch = self.x.data_ptr(), self.logits.data_ptr(), self.scratch.data_ptr()
        a.cos, a.sin = self.rope[0].data_ptr(), self.rope[1].data_ptr()
        a.rows, a.pos, a.out_idx = (self.meta[i].data_ptr() for i in range(3))
        self._bound: tuple[int, int] | None = None

    def _attention(self, la: abi.Layer, mix: nn.Module, wqkv: abi.Linear, wo: abi.Linear) -> None:
        qk = [_norm(getattr(mix, n, None)) for n in ("q_norm", "k_norm")] if self.config.qk_norm else [None, None]
        self._keep += qk
        la.q_norm, la.k_norm = map(_ptr, qk)
        if mix.rotary is None:
            la.rope = -1
        else:
            if all(r is not mix.rotary for r in self.rotaries):
                self.rotaries.append(mix.rotary)
            la.rope = next(j for j, r in enumerate(self.rotaries) if r is mix.rotary)
        la.window = mix.window or 0
        la.wqkv, la.wo = wqkv, wo

    def _floats(self, *ts: torch.Tensor) -> list[int]:
        """Pointers to fp32 contiguous copies (or the tensors themselves) of small parameters, kept alive."""
        ts = [t.detach().float().contiguous() for t in ts]
        self._keep += ts
        return [t.data_ptr() for t in ts]

    def _mamba(self, la: abi.Layer, mix: Mamba, in_proj: abi.Linear, out_proj: abi.Linear) -> None:
        a = self.args
        a.ssm_heads, a.ssm_head_dim, a.ssm_state, a.ssm_conv = mix.nh, mix.hs, mix.N, mix.K
        conv_w, conv_b, dt_bias, A, D, norm = self._floats(
            mix.conv_weight.t(), mix.conv_bias, mix.dt_bias, -torch.exp(mix.A_log.detach().float()), mix.D,
            mix.norm_weight)
        la.mamba = abi.Mamba(in_proj=in_proj, out_proj=out_proj, conv_w=conv_w, conv_b=conv_b, dt_bias=dt_bias, A=A,
                             D=D, norm=norm)

    def _mlstm(self, la: abi.Layer, mix: MLSTM, w_in: abi.Linear, w_out: abi.Linear) -> None:
        gate_bias, norm = self._floats(mix.gate_bias, mix.norm_weight)
        la.mlstm = abi.Mlstm(w_in=w_in, w_out=w_out, gate_bias=gate_bias, norm=norm)

    @classmethod
    def for_model(cls, model: GPT) -> "FusedStep | None":
        """The step for `model`, or None where it cannot run it (`fast_path_reason` says why)."""
        reason, descs = _reason(model)
        if reason:
            return None
        step = cls(model, build.load(), descs)
        # every layer reads its weights once for any number of tokens (int8 or int4 in the batch
        # layout): prompt chunks then run here too, max_tokens at a time
        step.one_pass = all(d.kind in (abi.Kind.INT8_BATCH, abi.Kind.INT4_BATCH) for d in descs)
        # the tensors the descriptors point at, held even if a module later swaps a buffer for
        # another layout (an int8 layer asked for its row-major kernel unpacks into a new tensor)
        step._alive = [b for _, m in _linears(model) for b in m.buffers()]
        return step

    def bind(self, state: DecodeState) -> None:
        """Point the step at a decode state's caches (fp32, or fp16 where `kv_f16`; CPU) and recurrent
        states (fp32, CPU). Call again after it grows."""
        kv = [s for s in state.layers if isinstance(s, KVState)]
        dtypes = (torch.float32, torch.float16) if self.kv_f16 else (torch.float32,)
        if len({s.k.dtype for s in kv}) > 1 or any(s.k.dtype not in dtypes or s.k.device.type != "cpu" for s in kv):
            raise ValueError(f"the fused step needs CPU attention caches of {' or '.join(map(str, dtypes))}")
        rec = [s for s in state.layers if isinstance(s, RecurrentState)]
        if any(t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous()
               for s in rec for t in s.tensors.values()):
            raise ValueError("the fused step needs contiguous fp32 CPU recurrent states")
        self.args.max_len = kv[0].max_len if kv else state.max_len
        self.args.kv_f16 = int(bool(kv) and kv[0].k.dtype == torch.float16)
        for la, s in zip(self.layer_args, state.layers):
            if la.mixer == abi.Mixer.ATTENTION:
                la.k_cache, la.v_cache = s.k.data_ptr(), s.v.data_ptr()
                continue
            t, slots = s.tensors, s.snapshot_slots()
            if la.mixer == abi.Mixer.MAMBA:
                m = la.mamba
                m.state_ssm, m.state_conv = t["ssm"].data_ptr(), t["conv"].data_ptr()
                m.snap_ssm, m.snap_conv = slots["ssm"].data_ptr(), slots["conv"].data_ptr()
            else:
                m = la.mlstm
                m.state_c, m.state_n, m.state_m = (t[k].data_ptr() for k in "Cnm")
                m.snap_c, m.snap_n, m.snap_m = (slots[k].data_ptr() for k in "Cnm")
        self._recurrent = rec
        self._bound = (id(state), state.generation)

    def _rotary_rows(self, n: int, pos: list[int], rows: list[int], ends: dict[int, int]) -> None:
        """Each rotary's cos and sin rows at the tokens' positions into the step's (n_rope, n, rot_dim)
        buffers, as the torch path picks them: from the tables for a sequence of max(pos) + 1
        positions, or, where the frequencies depend on the length (dynamic NTK, LongRoPE), of each
        token's row's own length after the call (`ends`)."""
        rot, at = self.config.rot_dim, self.meta[1, :n]
        for j, rotary in enumerate(self.rotaries):
            out = [self.rope[i, j * n * rot:(j + 1) * n * rot].view(n, rot) for i in (0, 1)]
            lengths = {ends[r] for r in rows} if rotary.length_dependent else {max(pos) + 1}
            if len(lengths) == 1:
                for table, o in zip(rotary.tables(lengths.pop(), self.x.device), out):
                    torch.index_select(table, 0, at, out=o)
                continue
            for length in lengths:  # rows of different lengths in one call
                idx = torch.tensor([t for t, r in enumerate(rows) if ends[r] == length])
                for table, o in zip(rotary.tables(length, self.x.device), out):
                    o[idx] = table[at[idx]]

    def __call__(self, state: DecodeState, tokens: list[int], rows: list[int], out: list[int] | None = None
                 ) -> torch.Tensor:
        """Append token t to state row rows[t] (at that row's length; a row may appear several times,
        in order: recurrent layers advance the row's state through them in that order) and return the
        logits (len(out), V) fp32 of the tokens indexed by `out` (default all). The returned tensor is
        reused by the next call."""
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
            if self.emb_scale is not None:
                self.x[:n].mul_(self.emb_scale)
        else:  # scaled in the weights' dtype first, as GPT.embed does
            self.x[:n] = emb[ids] if self.emb_scale is None else emb[ids] * self.emb_scale
        self._rotary_rows(n, pos, rows, {r: lengths[r] + k for r, k in seen.items()})
        a.n_tok, a.n_out = n, len(out)
        rc = self.fn(self._ref)
        if rc != 0:
            raise RuntimeError(f"llama_step failed (code {rc}) for rows {rows} at positions {pos}")
        for r, k in seen.items():
            lengths[r] += k
        for s in self._recurrent:
            s.advanced(seen)
        return self.logits[:len(out)]
