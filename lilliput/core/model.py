"""A Llama-style decoder in plain PyTorch: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Blocks look up their sequence mixer and feed-forward by name in `MIXERS` and `FFNS`, so MoE
feed-forwards or Mamba/xLSTM mixers register themselves without touching this file's core.
Projections are stored fused (q|k|v and gate|up): one matrix-vector product each at decode.
"""

from __future__ import annotations

import math

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


class KVCache:
    """Preallocated keys and values of every layer, for B sequences left-padded to a common length.

    `pad[b]` is the number of padding slots at the front of row b: their keys are masked out and
    positions (for RoPE) count from the first real token.
    """

    def __init__(self, config: ModelConfig, batch: int, max_len: int, device, dtype, pad: torch.Tensor | None = None):
        shape = (batch, config.n_kv_heads, max_len, config.hd)  # (B, nkv, L, hs)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.max_len = max_len
        self.pad = pad.to(device) if pad is not None else None

    def mask(self, start: int, T: int) -> torch.Tensor | None:
        """Boolean attention mask (B, 1, T, start+T), or None when causal slicing alone suffices."""
        if self.pad is None and T == 1:
            return None
        q = torch.arange(start, start + T, device=self.k[0].device)[:, None]  # (T, 1)
        k = torch.arange(start + T, device=q.device)[None, :]  # (1, S)
        m = (k <= q)[None, None]  # (1, 1, T, S)
        if self.pad is not None:
            m = m & (k >= self.pad[:, None])[:, None, None, :]  # (B, 1, T, S)
        return m


class Rotary(nn.Module):
    """Rotary position embedding in the rotate-half convention of Hugging Face Llama."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.hd, self.theta = config.hd, config.rope_theta
        self._cos = self._sin = None  # (n, hs) tables, built on first use on the input's device

    def tables(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos is None or self._cos.shape[0] < n or self._cos.device != device:
            n = max(n, 256 if self._cos is None else 2 * self._cos.shape[0])
            inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.hd, 2, dtype=torch.float32) / self.hd))
            t = torch.arange(n, dtype=torch.float32)
            freqs = torch.outer(t, inv_freq).to(device)
            emb = torch.cat((freqs, freqs), dim=-1)  # (n, hs)
            self._cos, self._sin = emb.cos(), emb.sin()
        return self._cos, self._sin

    def forward(self, pos: torch.Tensor, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin at integer positions pos (T,) or (B, T), all < n: (T, hs) or (B, 1, T, hs)."""
        cos, sin = self.tables(n, pos.device)
        cos, sin = cos[pos].to(dtype), sin[pos].to(dtype)
        if cos.dim() == 3:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hs): broadcast over heads
        return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, hs) rotated in the rotate-half convention."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@MIXERS.register("attention")
class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.hd = config.n_heads, config.n_kv_heads, config.hd
        self.wqkv = nn.Linear(config.dim, (config.n_heads + 2 * config.n_kv_heads) * config.hd, bias=False)
        self.wo = nn.Linear(config.n_heads * config.hd, config.dim, bias=False)

    def forward(self, x, rope, cache: KVCache | None, layer: int, start: int, mask):
        B, T, _ = x.shape
        nh, nkv, hs = self.n_heads, self.n_kv_heads, self.hd
        qkv = self.wqkv(x).view(B, T, nh + 2 * nkv, hs).transpose(1, 2)  # (B, nh+2nkv, T, hs)
        qk = apply_rotary(qkv[:, :nh + nkv], *rope)  # rotate q and k in one go
        q, k, v = qk[:, :nh], qk[:, nh:], qkv[:, nh + nkv:]  # (B, nh|nkv|nkv, T, hs)
        if cache is not None:
            cache.k[layer][:, :, start:start + T] = k
            cache.v[layer][:, :, start:start + T] = v
            k, v = cache.k[layer][:, :, :start + T], cache.v[layer][:, :, :start + T]  # (B, nkv, S, hs)
            k, v = k.to(q.dtype), v.to(q.dtype)  # the fused decode path keeps an fp32 cache
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
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.mixer = MIXERS[config.mixer](config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn = FFNS[config.ffn](config)

    def forward(self, x, rope, cache, layer, start, mask):
        x = x + self.mixer(self.attn_norm(x), rope, cache, layer, start, mask)
        return x + self.ffn(self.ffn_norm(x))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
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

    def features(self, idx: torch.Tensor, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        """Final-normed hidden states (B, T, C): `lm_head` of them are the logits. Scoring a few
        positions of long sequences (evaluation) then costs a few rows of the output layer."""
        B, T = idx.shape
        pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        mask = None
        if cache is not None:
            mask = cache.mask(start, T)
            if cache.pad is not None:
                pos = (pos[None, :] - cache.pad[:, None]).clamp_(min=0)  # (B, T)
        x = self.tok_emb(idx)  # (B, T, C)
        rope = self.rotary(pos, start + T, x.dtype)
        for i, block in enumerate(self.layers):
            x = block(x, rope, cache, i, start, mask)
        return self.norm(x)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, start: int = 0,
                last_only: bool = False) -> torch.Tensor:
        """idx (B, T) token ids at cache slots [start, start+T) -> logits (B, T, V) (T=1 if last_only)."""
        x = self.features(idx, cache, start)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(x).float()  # (B, T, V)
