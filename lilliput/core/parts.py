"""The parts a block is assembled from, below the model: the `MIXERS` and `FFNS` registries, the
decode-state protocol every sequence mixer follows (`MixerState`, and `Step`: where one forward's
tokens go), RMSNorm and the gated feed-forward (SwiGLU/GeGLU, also what MoE experts are made of).

Mixers and feed-forwards register themselves here from above: attention in model.py, Mamba in
ssm.py, the mLSTM in xlstm.py, MoE in moe.py. model.py imports each of them once, so any code that
can build a GPT knows every built-in name; none of them imports model.py.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lilliput.core.config import ModelConfig
from lilliput.core.registry import Registry
from lilliput.core.rope import Rotary

MIXERS: Registry[type[nn.Module]] = Registry("sequence mixer")
FFNS: Registry[type[nn.Module]] = Registry("feed-forward")


class RMSNorm(nn.Module):
    """x / rms(x) * (offset + weight); offset 1 for Gemma, whose weights are stored around zero
    (and so initialised at zero here: the same function as a fresh Llama norm)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32 whatever the storage dtype, as Hugging Face's LlamaRMSNorm does
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        w = self.weight + self.offset if self.offset else self.weight
        return w * h.to(x.dtype)


def rms_norm(config: ModelConfig, dim: int | None = None) -> RMSNorm:
    """The model's RMSNorm over `dim` values (default: the residual width)."""
    return RMSNorm(config.dim if dim is None else dim, config.norm_eps, config.norm_offset)


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


class Step:
    """Where one forward's tokens go: rows (B,) of the state, each starting at its own position.

    idx (B, T) puts token t of batch row b at position start[b] + t of state row rows[b]."""

    def __init__(self, rows: torch.Tensor, start: torch.Tensor, T: int, device):
        self.rows, self.start, self.T = rows.to(device), start.to(device), T
        self.pos = self.start[:, None] + torch.arange(T, device=device)  # (B, T)
        self.span = int(start.max()) + T  # keys any query may see
        self.uniform = bool((start == start[0]).all())
        self._rope: dict = {}
        self._mask: dict = {}

    def rope(self, rotary: Rotary, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (rotary.key, dtype)
        if key not in self._rope:
            if self.uniform or not rotary.length_dependent:
                self._rope[key] = rotary(self.pos if not self.uniform else self.pos[0], dtype, n=self.span)
            else:  # each row's own length picks its frequencies (LongRoPE, dynamic NTK), as when it runs alone
                rows = [rotary(self.pos[b], dtype, n=int(self.start[b]) + self.T) for b in range(len(self.pos))]
                self._rope[key] = tuple(torch.stack(t)[:, None] for t in zip(*rows))  # (B, 1, T, rot) each
        return self._rope[key]

    def mask(self, window: int | None = None) -> torch.Tensor | None:
        """(B, 1, T, span) keys each query may attend to (the last `window` of them, itself included,
        in a sliding-window layer), or None when a causal slice suffices."""
        if self.uniform and self.T == 1 and (window is None or self.span <= window):
            return None
        if window not in self._mask:
            k = torch.arange(self.span, device=self.pos.device)[None, None, :]
            q = self.pos[:, :, None]
            seen = (k <= q) if window is None else (k <= q) & (k > q - window)
            self._mask[window] = seen[:, None]  # (B, 1, T, S)
        return self._mask[window]


# --- the feed-forward ------------------------------------------------------------------------------

_ACT = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


@FFNS.register("swiglu")
class SwiGLU(nn.Module):
    """The gated feed-forward: down(act(gate(x)) * up(x)), SiLU (SwiGLU) or tanh GELU (GeGLU)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ffn_dim = config.ffn_dim
        self.w_gate_up = nn.Linear(config.dim, 2 * config.ffn_dim, bias=config.mlp_bias)
        self.w_down = nn.Linear(config.ffn_dim, config.dim, bias=config.mlp_bias)
        self.act = _ACT[config.act]

    def forward(self, x):
        gate, up = self.w_gate_up(x).split(self.ffn_dim, dim=-1)
        return self.w_down(self.act(gate) * up)
