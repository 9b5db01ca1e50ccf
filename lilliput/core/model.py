"""A Llama-style decoder in plain PyTorch: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Blocks look up their sequence mixer and feed-forward by name in `MIXERS` and `FFNS`. A new mixer
(Mamba, xLSTM) is a module registered under a name, built as `cls(config, layer)`, that defines `forward(x, state=None, step=None)`
and `new_state(rows, max_len, device, dtype) -> MixerState`; a new feed-forward (MoE) defines
`forward(x)`. Neither touches this file: the config names them (`mixer`, or `layer_mixers` for a
per-layer pattern such as attention every 4th layer), and the model asks each layer's mixer for
its own decode state. The registries, the state protocol, RMSNorm and SwiGLU live below this file
in core/parts.py; the built-in mixers beyond attention and SwiGLU (core/ssm.py "mamba",
core/xlstm.py "mlstm", core/moe.py "moe") register there and are imported here, so loading any
config finds them. Projections are stored fused (q|k|v and gate|up): one matrix-vector
product each at decode.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lilliput.core.config import ModelConfig
from lilliput.core.parts import FFNS, MIXERS, MixerState, RMSNorm, Step, SwiGLU, rms_norm  # noqa: F401
from lilliput.core.rope import Rotary, apply_rotary

# Mixers and feed-forwards beyond attention and SwiGLU register themselves in parts.py when their
# module is imported; importing them here, once, means any code that can build a GPT knows every
# built-in name. (They import parts.py, never this file.)
from lilliput.core import moe, ssm, xlstm  # noqa: F401  isort: skip


def layer_rotary(config: ModelConfig, layer: int) -> Rotary | None:
    """The rotary embedding of layer `layer`: None for a NoPE layer; sliding-window layers of a model
    with a local base (Gemma 3) use that base unscaled."""
    if layer in config.nope_layers:
        return None
    if layer in config.sliding_layers and config.rope_local_theta is not None:
        return Rotary.shared(config.rot_dim, config.rope_local_theta)
    return Rotary.shared(config.rot_dim, config.rope_theta, config.rope_scaling)


# --- decode state: owned by each mixer, held per layer by the model --------------------------------

class KVState(MixerState):
    """Keys and values of one attention layer, addressed by row and position: (rows, nkv, L, hs)."""

    def __init__(self, rows: int, n_kv_heads: int, hd: int, max_len: int, device, dtype):
        self.k = torch.zeros(rows, n_kv_heads, max_len, hd, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def truncate(self, row: int, n: int) -> None:
        pass  # keys past a row's length are masked out and overwritten by its next tokens

    def copy_row(self, src: int, dst: int, n: int) -> None:
        self.k[dst, :, :n] = self.k[src, :, :n]
        self.v[dst, :, :n] = self.v[src, :, :n]

    def reset(self, row: int) -> None:
        pass

    def grow(self, max_len: int) -> None:
        if max_len <= self.max_len:
            return
        R, H, L, D = self.k.shape
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(R, H, max_len, D)
            new[:, :, :L] = old
            setattr(self, name, new)

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class DecodeState:
    """The decode state of every layer for `rows` sequences, and each row's length in tokens.

    Rows are independent: each has its own length (so its own positions: no shared padding).
    `model(idx, state, rows=...)` appends idx's tokens to those rows and advances their lengths.
    """

    def __init__(self, model: "GPT", rows: int, max_len: int, device=None, dtype=None):
        p = next(model.parameters())
        device = p.device if device is None else device
        dtype = (p.dtype if p.is_floating_point() else torch.float32) if dtype is None else dtype
        if max_len > model.config.max_seq_len:
            raise ValueError(f"max_len {max_len} exceeds the model's context of {model.config.max_seq_len} tokens")
        self.layers: list[MixerState] = [blk.mixer.new_state(rows, max_len, device, dtype) for blk in model.layers]
        self.lengths = [0] * rows
        self.limit = model.config.max_seq_len
        self.generation = 0  # bumped when tensors are reallocated (the fused step rebinds then)

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def max_len(self) -> int:
        return min(s.max_len for s in self.layers if hasattr(s, "max_len")) if self.layers else self.limit

    def ensure(self, n: int) -> None:
        """Room for n tokens per row: grows (doubling, up to the model's context) when needed."""
        if n > self.limit:
            raise ValueError(f"{n} tokens exceed the model's context of {self.limit} tokens")
        if n > self.max_len:
            target = min(self.limit, max(n, 2 * self.max_len))
            for s in self.layers:
                s.grow(target)
            self.generation += 1

    @torch.inference_mode()  # tensors grown inside a forward are inference tensors
    def truncate(self, row: int, n: int) -> None:
        if not 0 <= n <= self.lengths[row]:
            raise ValueError(f"cannot truncate row {row} of length {self.lengths[row]} to {n}")
        for s in self.layers:
            s.truncate(row, n)
        self.lengths[row] = n

    def can_truncate(self, row: int, n: int) -> bool:
        """Whether every layer can rewind `row` to n tokens (a recurrent layer only to recent ones)."""
        return 0 <= n <= self.lengths[row] and all(s.can_truncate(row, n) for s in self.layers)

    @torch.inference_mode()  # tensors grown inside a forward are inference tensors
    def copy(self, src: int, dst: int) -> None:
        n = self.lengths[src]
        for s in self.layers:
            s.copy_row(src, dst, n)
        self.lengths[dst] = n

    @torch.inference_mode()  # tensors grown inside a forward are inference tensors
    def free(self, row: int) -> None:
        for s in self.layers:
            s.reset(row)
        self.lengths[row] = 0

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.layers)


@MIXERS.register("attention")
class Attention(nn.Module):
    """Grouped-query attention with the families' switches: q/k/v and output biases, RMSNorm of
    queries and keys (per head or over the projection), partial or no rotary, a sliding window,
    a softmax scale and soft-capped scores."""

    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        c = config
        self.n_heads, self.n_kv_heads, self.hd = c.n_heads, c.n_kv_heads, c.hd
        self.wqkv = nn.Linear(c.dim, (c.n_heads + 2 * c.n_kv_heads) * c.hd, bias=c.attn_bias)
        self.wo = nn.Linear(c.n_heads * c.hd, c.dim, bias=c.attn_out_bias)
        self.qk_norm = c.qk_norm
        if c.qk_norm is not None:
            per_head = c.qk_norm == "head"
            self.q_norm = rms_norm(c, c.hd if per_head else c.n_heads * c.hd)
            self.k_norm = rms_norm(c, c.hd if per_head else c.n_kv_heads * c.hd)
        self.rotary = layer_rotary(c, layer)
        self.window = c.sliding_window if layer in c.sliding_layers else None
        self.scale = c.attn_scale
        self.softcap = c.attn_softcap

    def new_state(self, rows: int, max_len: int, device, dtype) -> KVState:
        return KVState(rows, self.n_kv_heads, self.hd, max_len, device, dtype)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> q (B, nh, T, hs), k and v (B, nkv, T, hs), normed, not yet rotated."""
        B, T, _ = x.shape
        nh, nkv, hs = self.n_heads, self.n_kv_heads, self.hd
        qkv = self.wqkv(x)  # (B, T, (nh+2nkv) hs)
        if self.qk_norm == "proj":  # OLMo 2: over the whole projection
            q, k, v = qkv.split([nh * hs, nkv * hs, nkv * hs], dim=-1)
            qkv = torch.cat([self.q_norm(q), self.k_norm(k), v], dim=-1)
        qkv = qkv.view(B, T, nh + 2 * nkv, hs).transpose(1, 2)  # (B, nh+2nkv, T, hs)
        q, k, v = qkv[:, :nh], qkv[:, nh:nh + nkv], qkv[:, nh + nkv:]
        if self.qk_norm == "head":  # Qwen3, Gemma 3: over each head
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def forward(self, x: torch.Tensor, state: KVState | None = None, step: Step | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        nh, hs = self.n_heads, self.hd
        q, k, v = self.project(x)
        if self.rotary is not None:
            cos, sin = step.rope(self.rotary, x.dtype) if step is not None else \
                self.rotary(torch.arange(T, device=x.device), x.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        mask = None
        if state is not None:
            S = step.span
            if B == 1:  # one row: its cache slice is a view
                r, s0 = int(step.rows[0]), int(step.start[0])
                state.k[r, :, s0:s0 + T] = k[0]
                state.v[r, :, s0:s0 + T] = v[0]
                k, v = state.k[r:r + 1, :, :S], state.v[r:r + 1, :, :S]  # (1, nkv, S, hs)
            else:
                rows, pos = step.rows[:, None], step.pos  # (B, 1), (B, T)
                state.k[rows, :, pos] = k.transpose(1, 2).to(state.k.dtype)  # indexed view: (B, T, nkv, hs)
                state.v[rows, :, pos] = v.transpose(1, 2).to(state.v.dtype)
                k, v = state.k[step.rows, :, :S], state.v[step.rows, :, :S]  # (B, nkv, S, hs)
            k, v = k.to(q.dtype), v.to(q.dtype)  # the fused decode path keeps an fp32 cache
            mask = step.mask(self.window)
        elif self.window is not None and T > self.window:
            pos = torch.arange(T, device=x.device)
            mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - self.window)  # (T, T)
        causal = mask is None and T > 1
        if self.softcap is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale,
                                               enable_gqa=True)
        else:
            y = self._capped(q, k, v, mask, causal)
        y = y.transpose(1, 2).reshape(B, T, nh * hs)  # (B, T, nh*hs)
        return self.wo(y)

    def _capped(self, q, k, v, mask, causal) -> torch.Tensor:
        """Attention with scores soft-capped before the softmax (Gemma 2), which SDPA cannot do."""
        g = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # (B, nh, S, hs)
        scale = self.scale if self.scale is not None else self.hd ** -0.5
        s = (q @ k.transpose(-1, -2)) * scale  # (B, nh, T, S)
        s = torch.tanh(s / self.softcap) * self.softcap
        if causal:
            T, S = s.shape[-2:]
            mask = torch.ones(T, S, dtype=torch.bool, device=s.device).tril(S - T)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        return s.softmax(-1).to(v.dtype) @ v


class Block(nn.Module):
    """Residual block: x + post(mixer(pre(x))), then x + post(ffn(pre(x))), where pre is the
    pre-norm (Llama; none in OLMo 2) and post the output norm (Gemma, OLMo 2; none in Llama).

    `block(x)` runs it on whole sequences with no state (calibration, GPTQ, pruning);
    `block(x, state, step)` appends to a decode state."""

    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        if config.pre_norms:
            self.attn_norm = rms_norm(config)
        self.mixer = MIXERS[config.mixer_at(layer)](config, layer)
        if config.post_norms:
            self.attn_post_norm = rms_norm(config)
        if config.pre_norms:
            self.ffn_norm = rms_norm(config)
        self.ffn = FFNS[config.ffn](config)
        if config.post_norms:
            self.ffn_post_norm = rms_norm(config)
        self.pre, self.post = config.pre_norms, config.post_norms

    def forward(self, x: torch.Tensor, state: MixerState | None = None, step: Step | None = None) -> torch.Tensor:
        a = self.mixer(self.attn_norm(x) if self.pre else x, state, step)
        x = x + (self.attn_post_norm(a) if self.post else a)
        f = self.ffn(self.ffn_norm(x) if self.pre else x)
        return x + (self.ffn_post_norm(f) if self.post else f)


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = rms_norm(config)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init)

    def _init(self, m: nn.Module):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        for name, p in m.named_parameters(recurse=False):
            if name in ("wo.weight", "w_down.weight"):  # scaled residual projections (GPT-2)
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.config.n_layers))

    @classmethod
    def from_state_dict(cls, config: ModelConfig, state: dict[str, torch.Tensor]) -> "GPT":
        """Build without random initialisation, taking the given tensors as parameters."""
        with torch.device("meta"):
            model = cls(config)
        state = dict(state)
        if config.tie_embeddings:
            state.setdefault("lm_head.weight", state["tok_emb.weight"])
        model.load_state_dict(state, strict=True, assign=True)
        if config.tie_embeddings:
            model.lm_head.weight = model.tok_emb.weight
        return model

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, T, C), scaled where the family scales them (Gemma: sqrt(dim), rounded
        to the weights' dtype as Hugging Face does)."""
        x = self.tok_emb(idx)
        s = self.config.emb_scale
        return x if s is None else x * torch.tensor(s, dtype=x.dtype)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states (..., C) -> fp32 logits (..., V), soft-capped where the family
        caps them (Gemma 2)."""
        y = self.lm_head(h).float()
        cap = self.config.final_softcap
        return y if cap is None else torch.tanh(y / cap) * cap

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights count once

    def new_state(self, rows: int, max_len: int, device=None, dtype=None) -> DecodeState:
        """Empty decode state for `rows` sequences of up to `max_len` tokens (grows on demand)."""
        return DecodeState(self, rows, max_len, device, dtype)

    def features(self, idx: torch.Tensor, state: DecodeState | None = None,
                 rows: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states (B, T, C): `lm_head` of them are the logits. Scoring a few
        positions of long sequences (evaluation) then costs a few rows of the output layer.

        With a state, idx's tokens are appended to state rows `rows` (default 0..B-1), each at its
        own length, and those lengths advance by T."""
        B, T = idx.shape
        x = self.embed(idx)  # (B, T, C)
        if state is None:
            for block in self.layers:
                x = block(x)
            return self.norm(x)
        rows = torch.arange(B) if rows is None else torch.as_tensor(rows, dtype=torch.long)
        if rows.shape != (B,):
            raise ValueError(f"rows must name one state row per batch row ({B}), got shape {tuple(rows.shape)}")
        start = torch.tensor([state.lengths[r] for r in rows.tolist()])
        state.ensure(int(start.max()) + T)
        step = Step(rows, start, T, idx.device)
        for block, s in zip(self.layers, state.layers):
            x = block(x, s, step)
        for r, s0 in zip(rows.tolist(), start.tolist()):
            state.lengths[r] = s0 + T
        return self.norm(x)

    def forward(self, idx: torch.Tensor, state: DecodeState | None = None,
                rows: Sequence[int] | torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """idx (B, T) -> logits (B, T, V) fp32 (T=1 if last_only); see `features` for the state."""
        x = self.features(idx, state, rows)
        if last_only:
            x = x[:, -1:]
        return self.logits(x)  # (B, T, V)

