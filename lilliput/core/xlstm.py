"""The mLSTM of xLSTM (Beck et al. 2024) as a sequence mixer, registered as "mlstm".

Per head (width d), with a scalar input gate i~ and forget gate f~ per head and token:

    C_t = f_t C_{t-1} + i_t k_t v_t^T      (d, d) matrix memory
    n_t = f_t n_{t-1} + i_t k_t            (d,) normaliser
    h_t = C_t^T q_t / max(|n_t . q_t|, 1)  (q scaled by d^-1/2)

with f_t = sigmoid(f~_t) and i_t = exp(i~_t). Exponential gating overflows, so every form carries
the max-state stabiliser m_t = max(log f_t + m_{t-1}, i~_t) and stores C, n scaled by exp(-m_t);
the 1 of the denominator becomes exp(-m_t). A fresh state has m = -inf (C = n = 0), which makes the
three forms below agree exactly, not only after a warm-up:

- `mlstm_parallel`: the whole (T, T) decay matrix at once, like attention: the reference for short T;
- `mlstm_chunkwise`: parallel inside chunks of `mlstm_chunk` tokens, recurrent over chunk states:
  training and prefill (memory linear in T);
- `mlstm_step` / `mlstm_sequential`: one token at a time: decoding.

The layer around it follows xLSTM-7B's mLSTM layer: one bias-free projection to q | k | v | o | i~ | f~
(gate biases are separate parameters: input gates start at 0 and forget gates between 3 and 6, as in
the xLSTM paper; xLSTM-7B starts input gates at -10, which at this scale leaves h below the norm's eps),
a per-head RMS norm of h, an output gate sigmoid(o), an output projection.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lilliput.core.config import ModelConfig
from lilliput.core.parts import MIXERS, Step
from lilliput.core.recurrent import RecurrentState
from lilliput.core.ssm import segsum


def fresh_state(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(C (b, nh, d, d), n (b, nh, d), m (b, nh)) of an empty sequence, for q (b, nh, T, d)."""
    b, nh, _, d = q.shape
    return q.new_zeros(b, nh, d, d), q.new_zeros(b, nh, d), q.new_full((b, nh), -math.inf)


def mlstm_parallel(q, k, v, i, f):
    """q, k, v (b, nh, T, d), gate pre-activations i, f (b, nh, T) -> h (b, nh, T, d), from no state."""
    d = q.shape[-1]
    log_d = segsum(F.logsigmoid(f)) + i[..., None, :]  # (b, nh, T, T): log f_{s+1..t} + i~_s, -inf for s > t
    m = log_d.amax(-1)  # (b, nh, T): the stabiliser of each query
    S = (q @ k.transpose(-1, -2)) * d ** -0.5 * torch.exp(log_d - m[..., None])  # (b, nh, T, T)
    den = torch.maximum(S.sum(-1).abs(), torch.exp(-m))
    return (S @ v) / den[..., None]


def mlstm_chunkwise(q, k, v, i, f, chunk: int, state=None):
    """Same arguments as `mlstm_parallel`, from `state` (C, n, m) or a fresh one -> h and the final state."""
    d = q.shape[-1]
    C, n, m = fresh_state(q) if state is None else state
    log_f = F.logsigmoid(f)
    out = []
    for s0 in range(0, q.shape[2], chunk):
        qc, kc, vc = (t[:, :, s0:s0 + chunk] for t in (q, k, v))  # (b, nh, Q, d)
        ic, lf = i[:, :, s0:s0 + chunk], log_f[:, :, s0:s0 + chunk]  # (b, nh, Q)
        cum = lf.cumsum(-1)  # log decay from the chunk's start through each token
        log_d = segsum(lf) + ic[..., None, :]  # (b, nh, Q, Q)
        inter = cum + m[..., None]  # log weight of the state entering the chunk
        m_t = torch.maximum(log_d.amax(-1), inter)  # (b, nh, Q)
        qs = qc * d ** -0.5
        S = (qs @ kc.transpose(-1, -2)) * torch.exp(log_d - m_t[..., None])
        w = torch.exp(inter - m_t)  # (b, nh, Q)
        num = S @ vc + w[..., None] * (qs @ C)  # (b, nh, Q, d)
        den = S.sum(-1) + w * (qs @ n[..., None])[..., 0]
        out.append(num / torch.maximum(den.abs(), torch.exp(-m_t))[..., None])
        m_new = m_t[..., -1]  # (b, nh)
        wk = torch.exp(cum[..., -1:] - cum + ic - m_new[..., None])  # weight of each token's k v^T at the end
        carry = torch.exp(cum[..., -1] + m - m_new)
        C = carry[..., None, None] * C + torch.einsum("bhs,bhsk,bhsv->bhkv", wk, kc, vc)
        n = carry[..., None] * n + torch.einsum("bhs,bhsk->bhk", wk, kc)
        m = m_new
    return torch.cat(out, dim=2), (C, n, m)


def mlstm_step(q, k, v, i, f, C, n, m):
    """One token: q, k, v (b, nh, d), i, f (b, nh), state C (b, nh, d, d), n (b, nh, d), m (b, nh)."""
    d = q.shape[-1]
    log_f = F.logsigmoid(f)
    m_new = torch.maximum(log_f + m, i)
    fg, ig = torch.exp(log_f + m - m_new), torch.exp(i - m_new)
    C = fg[..., None, None] * C + ig[..., None, None] * k[..., :, None] * v[..., None, :]
    n = fg[..., None] * n + ig[..., None] * k
    qs = q * d ** -0.5
    num = torch.einsum("bhk,bhkv->bhv", qs, C)
    den = torch.maximum((qs * n).sum(-1).abs(), torch.exp(-m_new))
    return num / den[..., None], C, n, m_new


def mlstm_sequential(q, k, v, i, f, state=None):
    """Token by token -> h (b, nh, T, d) and the states after every token: C (b, T, nh, d, d),
    n (b, T, nh, d), m (b, T, nh)."""
    C, n, m = fresh_state(q) if state is None else state
    hs, Cs, ns, ms = [], [], [], []
    for t in range(q.shape[2]):
        h, C, n, m = mlstm_step(q[:, :, t], k[:, :, t], v[:, :, t], i[:, :, t], f[:, :, t], C, n, m)
        hs.append(h), Cs.append(C), ns.append(n), ms.append(m)
    return torch.stack(hs, 2), (torch.stack(Cs, 1), torch.stack(ns, 1), torch.stack(ms, 1))


@MIXERS.register("mlstm")
class MLSTM(nn.Module):
    """mLSTM mixer with n_heads heads of width head_dim.

    Decode state per row: C (nh, d, d), n (nh, d), m (nh); see `RecurrentState` for what
    truncation and copies cost."""

    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.nh, self.d, self.chunk = config.n_heads, config.hd, config.mlstm_chunk
        self.eps, self.max_len = config.norm_eps, config.max_seq_len
        width = self.nh * self.d
        self.w_in = nn.Linear(config.dim, 4 * width + 2 * self.nh, bias=False)  # q | k | v | o | i~ | f~
        self.gate_bias = nn.Parameter(torch.cat([torch.zeros(self.nh), torch.linspace(3.0, 6.0, self.nh)]))
        self.norm_weight = nn.Parameter(torch.ones(width))
        self.w_out = nn.Linear(width, config.dim, bias=False)

    def new_state(self, rows: int, max_len: int, device, dtype) -> RecurrentState:
        nh, d = self.nh, self.d
        return RecurrentState({"C": (nh, d, d), "n": (nh, d), "m": (nh,)}, rows, self.max_len, device, dtype,
                              fills={"m": -math.inf}, name="mlstm")

    def forward(self, x: torch.Tensor, state: RecurrentState | None = None, step: Step | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        nh, d = self.nh, self.d
        proj = self.w_in(x)
        q, k, v, o = proj[..., :4 * nh * d].view(B, T, 4, nh, d).permute(2, 0, 3, 1, 4)  # each (B, nh, T, d)
        i, f = (proj[..., 4 * nh * d:] + self.gate_bias.to(x.dtype)).view(B, T, 2, nh).permute(2, 0, 3, 1)  # (B, nh, T)
        if state is None:
            h, _ = mlstm_chunkwise(q, k, v, i, f, self.chunk)
        else:  # chunkwise up to the last w tokens, then token by token to keep each of their states
            held = state.read(step)
            w = state.window(T)
            mid = tuple(held[key].to(x.dtype) for key in ("C", "n", "m"))
            h1 = q[:, :, :0]
            if T > w:
                h1, mid = mlstm_chunkwise(q[:, :, :T - w], k[:, :, :T - w], v[:, :, :T - w], i[:, :, :T - w],
                                          f[:, :, :T - w], self.chunk, mid)
            s = slice(T - w, T)
            h2, tail = mlstm_sequential(q[:, :, s], k[:, :, s], v[:, :, s], i[:, :, s], f[:, :, s], mid)
            h = torch.cat([h1, h2], dim=2)
            state.write(step, dict(zip("Cnm", mid)), dict(zip("Cnm", tail)))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)  # per-head RMS norm
        h = h.transpose(1, 2).reshape(B, T, nh * d) * self.norm_weight.to(h.dtype)
        return self.w_out(h * torch.sigmoid(o.transpose(1, 2).reshape(B, T, nh * d)))
