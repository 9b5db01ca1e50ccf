"""A Llama-style decoder in plain PyTorch: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Blocks look up their sequence mixer and feed-forward by name in `MIXERS` and `FFNS`. A new mixer
(Mamba, xLSTM) is a module registered under a name that defines `forward(x, state=None, step=None)`
and `new_state(rows, max_len, device, dtype) -> MixerState`; a new feed-forward (MoE) defines
`forward(x)`. Neither touches this file: the config names them (`mixer`, or `layer_mixers` for a
per-layer pattern such as attention every 4th layer), and the model asks each layer's mixer for
its own decode state. The built-in ones beyond attention and SwiGLU (core/ssm.py "mamba",
core/xlstm.py "mlstm", core/moe.py "moe") are imported at the end of this file, so loading any
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
from lilliput.core.registry import Registry

MIXERS: Registry[type[nn.Module]] = Registry("sequence mixer")
FFNS: Registry[type[nn.Module]] = Registry("feed-forward")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32 whatever the storage dtype, as Hugging Face's LlamaRMSNorm does
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Rotary:
    """Rotary position embedding in the rotate-half convention of Hugging Face Llama.

    Tables are shared by every layer of the same head width and base (one copy per device)."""

    _tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __init__(self, config: ModelConfig):
        self.hd, self.theta = config.hd, config.rope_theta

    def tables(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin tables (>= n, hs) fp32."""
        device = torch.device(device)
        key = (self.hd, self.theta, device)
        cos = self._tables.get(key, (None,))[0]
        if cos is None or cos.shape[0] < n:
            n = max(n, 256 if cos is None else 2 * cos.shape[0])
            inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.hd, 2, dtype=torch.float32) / self.hd))
            freqs = torch.outer(torch.arange(n, dtype=torch.float32), inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1).to(device)  # (n, hs)
            self._tables[key] = (emb.cos(), emb.sin())
        return self._tables[key]

    def __call__(self, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin at integer positions pos (T,) or (B, T): (T, hs) or (B, 1, T, hs)."""
        cos, sin = self.tables(int(pos.max()) + 1 if pos.numel() else 1, pos.device)
        cos, sin = cos[pos].to(dtype), sin[pos].to(dtype)
        if cos.dim() == 3:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hs): broadcast over heads
        return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, hs) rotated in the rotate-half convention."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# --- decode state: owned by each mixer, held per layer by the model --------------------------------

class MixerState:
    """One layer's decode state for a fixed number of rows (sequences). The model's `DecodeState`
    tracks each row's length; a mixer's state only has to follow these calls:

    - `truncate(row, n)`: forget everything after the row's first n tokens (rejected drafts);
    - `copy_row(src, dst, n)`: make row dst hold row src's first n tokens (n samples, one prefill);
    - `reset(row)`: the row is free (its next sequence starts at 0);
    - `grow(max_len)`: room for at least max_len tokens per row; `nbytes()`.

    Attention's KV cache makes truncation free (a row's keys past n are never read). A recurrent
    mixer (Mamba, xLSTM) holds one fixed-size state per row, which cannot be rewound: it keeps a
    snapshot per position it may be truncated to (one per drafted token while verifying, so k+1
    state copies per verification) and copies its state tensor for `copy_row` (one state's bytes).
    """

    def truncate(self, row: int, n: int) -> None:
        raise NotImplementedError

    def copy_row(self, src: int, dst: int, n: int) -> None:
        raise NotImplementedError

    def can_truncate(self, row: int, n: int) -> bool:
        """Whether `truncate(row, n)` would succeed (always, for a cache indexed by position)."""
        return True

    def reset(self, row: int) -> None:
        raise NotImplementedError

    def grow(self, max_len: int) -> None:
        raise NotImplementedError

    def nbytes(self) -> int:
        raise NotImplementedError


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


class Step:
    """Where one forward's tokens go: rows (B,) of the state, each starting at its own position.

    idx (B, T) puts token t of batch row b at position start[b] + t of state row rows[b]."""

    def __init__(self, rows: torch.Tensor, start: torch.Tensor, T: int, device):
        self.rows, self.start, self.T = rows.to(device), start.to(device), T
        self.pos = self.start[:, None] + torch.arange(T, device=device)  # (B, T)
        self.span = int(start.max()) + T  # keys any query may see
        self.uniform = bool((start == start[0]).all())
        self._rope: dict = {}
        self._mask = None

    def rope(self, rotary: Rotary, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (rotary.hd, rotary.theta, dtype)
        if key not in self._rope:
            self._rope[key] = rotary(self.pos if not self.uniform else self.pos[0], dtype)
        return self._rope[key]

    def mask(self) -> torch.Tensor | None:
        """(B, 1, T, span) keys each query may attend to, or None when a causal slice suffices."""
        if self.uniform and self.T == 1:
            return None
        if self._mask is None:
            k = torch.arange(self.span, device=self.pos.device)
            self._mask = (k[None, None, :] <= self.pos[:, :, None])[:, None]  # (B, 1, T, S)
        return self._mask


@MIXERS.register("attention")
class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.hd = config.n_heads, config.n_kv_heads, config.hd
        self.wqkv = nn.Linear(config.dim, (config.n_heads + 2 * config.n_kv_heads) * config.hd, bias=False)
        self.wo = nn.Linear(config.n_heads * config.hd, config.dim, bias=False)
        self.rotary = Rotary(config)

    def new_state(self, rows: int, max_len: int, device, dtype) -> KVState:
        return KVState(rows, self.n_kv_heads, self.hd, max_len, device, dtype)

    def forward(self, x: torch.Tensor, state: KVState | None = None, step: Step | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        nh, nkv, hs = self.n_heads, self.n_kv_heads, self.hd
        qkv = self.wqkv(x).view(B, T, nh + 2 * nkv, hs).transpose(1, 2)  # (B, nh+2nkv, T, hs)
        rope = step.rope(self.rotary, x.dtype) if step is not None else \
            self.rotary(torch.arange(T, device=x.device), x.dtype)
        qk = apply_rotary(qkv[:, :nh + nkv], *rope)  # rotate q and k in one go
        q, k, v = qk[:, :nh], qk[:, nh:], qkv[:, nh + nkv:]  # (B, nh|nkv|nkv, T, hs)
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
            mask = step.mask()
        causal = mask is None and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
        y = y.transpose(1, 2).reshape(B, T, nh * hs)  # (B, T, nh*hs)
        return self.wo(y)


@FFNS.register("swiglu")
class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ffn_dim = config.ffn_dim
        self.w_gate_up = nn.Linear(config.dim, 2 * config.ffn_dim, bias=False)
        self.w_down = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x):
        gate, up = self.w_gate_up(x).split(self.ffn_dim, dim=-1)
        return self.w_down(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + ffn(norm(x)).

    `block(x)` runs it on whole sequences with no state (calibration, GPTQ, pruning);
    `block(x, state, step)` appends to a decode state."""

    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.mixer = MIXERS[config.mixer_at(layer)](config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn = FFNS[config.ffn](config)

    def forward(self, x: torch.Tensor, state: MixerState | None = None, step: Step | None = None) -> torch.Tensor:
        x = x + self.mixer(self.attn_norm(x), state, step)
        return x + self.ffn(self.ffn_norm(x))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.rotary = Rotary(config)
        self.apply(self._init)

    def _init(self, m: nn.Module):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
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
        x = self.tok_emb(idx)  # (B, T, C)
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
        return self.lm_head(x).float()  # (B, T, V)


# Mixers and feed-forwards beyond attention and SwiGLU register themselves when their module is
# imported; importing them here means any code that can build a GPT knows every built-in name.
from lilliput.core import moe, ssm, xlstm  # noqa: E402,F401
