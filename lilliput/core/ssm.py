"""A Mamba-2 style selective state-space mixer, registered as "mamba".

Per head h (width hs) and token t, with a scalar decay per head and token (Mamba-2's "SSD"):

    h_t = exp(dt_t * A) h_{t-1} + dt_t x_t B_t^T      (hs, N): one state per head
    y_t = h_t C_t + D x_t

B_t, C_t (N,) are shared by the heads (one group), dt_t = softplus(. + dt_bias) > 0 and A < 0.
Three forms compute the same thing:

- `ssd_chunked`: the matrix-multiply form (Dao and Gu 2024, "ssd_minimal"): quadratic attention-like
  products inside chunks of `ssm_chunk` tokens, a recurrence over chunk states between them. Training
  and prefill use it: on CPU a handful of batched matmuls beat both a token loop and a parallel scan.
- `ssd_sequential`: the plain recurrence, one token at a time: the reference.
- `ssd_step`: one token from a state: decoding (O(1) per token).

The block around it is Mamba-2's: one input projection to z | x B C | dt, a causal depthwise
convolution and SiLU over x B C, the SSD, a gated RMSNorm (norm(y * silu(z))), an output projection.
Its two projections are plain `nn.Linear` layers (quantization and pruning apply to them); the
convolution, A_log, dt_bias, D and the norm are small parameters kept in float.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lilliput.core.config import ModelConfig
from lilliput.core.parts import MIXERS, Step
from lilliput.core.recurrent import RecurrentState


def segsum(a: torch.Tensor) -> torch.Tensor:
    """a (..., T) -> (..., T, T): out[i, j] = a[j+1] + ... + a[i] for j <= i, -inf above the diagonal."""
    T = a.shape[-1]
    x = a[..., None].expand(*a.shape, T)  # (..., T, T): x[i, j] = a[i]
    below = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)
    s = x.masked_fill(~below, 0).cumsum(-2)
    return s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=a.device).tril(), -math.inf)


def ssd_chunked(x, dt, A, B, C, chunk: int, h0: torch.Tensor | None = None):
    """x (b, T, nh, hs), dt (b, T, nh), A (nh,), B and C (b, T, N), h0 (b, nh, hs, N) or None
    -> y (b, T, nh, hs) without the D skip, and the final state (b, nh, hs, N)."""
    b, T, nh, hs = x.shape
    N, Q = B.shape[-1], chunk
    pad = (-T) % Q  # padded tokens have dt = 0: no decay, no input, so the final state is unchanged
    X = F.pad(x * dt[..., None], (0, 0, 0, 0, 0, pad))
    a = F.pad(dt * A, (0, 0, 0, pad))
    B, C = F.pad(B, (0, 0, 0, pad)), F.pad(C, (0, 0, 0, pad))
    c = X.shape[1] // Q
    X = X.view(b, c, Q, nh, hs)
    a = a.view(b, c, Q, nh).permute(0, 3, 1, 2)  # (b, nh, c, Q)
    B, C = B.view(b, c, Q, N), C.view(b, c, Q, N)
    a_cum = a.cumsum(-1)  # (b, nh, c, Q)
    # 1. inside each chunk: y_l = sum_{s<=l} C_l.B_s exp(a_{s+1} + ... + a_l) X_s
    L = torch.exp(segsum(a))  # (b, nh, c, Q, Q)
    y_diag = torch.einsum("bcln,bcsn,bhcls,bcshp->bclhp", C, B, L, X)
    # 2. each chunk's contribution to the state at its end
    decay = torch.exp(a_cum[..., -1:] - a_cum)  # (b, nh, c, Q)
    states = torch.einsum("bcln,bhcl,bclhp->bchpn", B, decay, X)  # (b, c, nh, hs, N)
    # 3. the state entering each chunk: a recurrence over chunks, written as one decay matrix
    init = x.new_zeros(b, 1, nh, hs, N) if h0 is None else h0[:, None].to(x.dtype)
    states = torch.cat([init, states], dim=1)  # (b, c+1, nh, hs, N)
    chunk_decay = torch.exp(segsum(F.pad(a_cum[..., -1], (1, 0))))  # (b, nh, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    entering, final = states[:, :-1], states[:, -1]
    # 4. what each entering state adds to the chunk's outputs
    y_off = torch.einsum("bcln,bchpn,bhcl->bclhp", C, entering, torch.exp(a_cum))
    y = (y_diag + y_off).reshape(b, c * Q, nh, hs)[:, :T]
    return y, final


def ssd_step(x, dt, A, B, C, h):
    """One token: x (b, nh, hs), dt (b, nh), B and C (b, N), h (b, nh, hs, N) -> y (b, nh, hs), h."""
    h = torch.exp(dt * A)[..., None, None] * h + (dt[..., None] * x)[..., None] * B[:, None, None, :]
    return torch.einsum("bhpn,bn->bhp", h, C), h


def ssd_sequential(x, dt, A, B, C, h0: torch.Tensor | None = None):
    """The recurrence token by token (same arguments as `ssd_chunked`) -> y (b, T, nh, hs) and the
    state after every token (b, T, nh, hs, N)."""
    b, T, nh, hs = x.shape
    h = x.new_zeros(b, nh, hs, B.shape[-1]) if h0 is None else h0.to(x.dtype)
    ys, hs_ = [], []
    for t in range(T):
        y, h = ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], h)
        ys.append(y)
        hs_.append(h)
    return torch.stack(ys, 1), torch.stack(hs_, 1)


@MIXERS.register("mamba")
class Mamba(nn.Module):
    """Mamba-2 mixer: in_proj -> causal conv + SiLU -> SSD -> gated RMSNorm -> out_proj.

    Decode state per row: the SSD state (nh, hs, N) and the convolution's last ssm_conv - 1 inputs
    (ssm_conv - 1, d_inner + 2N); see `RecurrentState` for what truncation and copies cost."""

    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.d_inner = config.ssm_expand * config.dim
        self.hs, self.N, self.K, self.chunk = config.ssm_head_dim, config.ssm_state, config.ssm_conv, config.ssm_chunk
        self.nh = self.d_inner // self.hs
        self.conv_dim = self.d_inner + 2 * self.N
        self.eps, self.max_len = config.norm_eps, config.max_seq_len
        self.in_proj = nn.Linear(config.dim, self.d_inner + self.conv_dim + self.nh, bias=False)  # z | x B C | dt
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, self.K).uniform_(-1, 1) / math.sqrt(self.K))
        self.conv_bias = nn.Parameter(torch.zeros(self.conv_dim))
        # dt = softplus(. + dt_bias) starts log-uniform in [1e-3, 1e-1]; A = -exp(A_log) in [-16, -1]
        dt = torch.exp(torch.rand(self.nh) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log = nn.Parameter(torch.log(torch.empty(self.nh).uniform_(1, 16)))
        self.D = nn.Parameter(torch.ones(self.nh))
        self.norm_weight = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, config.dim, bias=False)

    def new_state(self, rows: int, max_len: int, device, dtype) -> RecurrentState:
        shapes = {"ssm": (self.nh, self.hs, self.N), "conv": (self.K - 1, self.conv_dim)}
        return RecurrentState(shapes, rows, self.max_len, device, dtype, name="mamba")

    def conv(self, u: torch.Tensor) -> torch.Tensor:
        """u (B, K-1+T, conv_dim): T tokens after K-1 earlier inputs -> (B, T, conv_dim)."""
        windows = u.unfold(1, self.K, 1)  # (B, T, conv_dim, K)
        return torch.einsum("btck,ck->btc", windows, self.conv_weight.to(u.dtype)) + self.conv_bias.to(u.dtype)

    def forward(self, x: torch.Tensor, state: RecurrentState | None = None, step: Step | None = None) -> torch.Tensor:
        Bsz, T, _ = x.shape
        nh, hs, N, K = self.nh, self.hs, self.N, self.K
        z, xbc, dt = self.in_proj(x).split([self.d_inner, self.conv_dim, nh], dim=-1)
        if state is None:
            u = F.pad(xbc, (0, 0, K - 1, 0))  # (B, K-1+T, conv_dim): zeros before the sequence
        else:
            held = state.read(step)
            u = torch.cat([held["conv"].to(xbc.dtype), xbc], dim=1)
        xs, Bm, Cm = F.silu(self.conv(u)).split([self.d_inner, N, N], dim=-1)
        xs = xs.view(Bsz, T, nh, hs)
        dt = F.softplus(dt + self.dt_bias.to(dt.dtype))  # (B, T, nh)
        A = -torch.exp(self.A_log.to(dt.dtype))  # (nh,)
        if state is None:
            y, _ = ssd_chunked(xs, dt, A, Bm, Cm, self.chunk)
        else:  # chunked up to the last w tokens, then token by token to keep each of their states
            w = state.window(T)
            h = held["ssm"].to(xs.dtype)
            y1 = xs[:, :0]
            if T > w:
                y1, h = ssd_chunked(xs[:, :T - w], dt[:, :T - w], A, Bm[:, :T - w], Cm[:, :T - w], self.chunk, h)
            y2, tail = ssd_sequential(xs[:, T - w:], dt[:, T - w:], A, Bm[:, T - w:], Cm[:, T - w:], h)
            y = torch.cat([y1, y2], dim=1)
            convs = u.unfold(1, K - 1, 1).transpose(-1, -2) if K > 1 else u.new_zeros(Bsz, T + 1, 0, self.conv_dim)
            # convs[:, j] (B, K-1, conv_dim): the convolution's inputs held after j tokens
            state.write(step, {"ssm": h, "conv": convs[:, T - w]}, {"ssm": tail, "conv": convs[:, T - w + 1:]})
        y = y + xs * self.D.to(xs.dtype)[:, None]  # (B, T, nh, hs)
        y = y.reshape(Bsz, T, self.d_inner) * F.silu(z)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm_weight.to(y.dtype)
        return self.out_proj(y)
