"""Rotary position embeddings: the plain form and the scalings the deployed families use.

`Rotary(dim, theta, scaling)` gives cos and sin tables (>= n, dim) for a sequence of n positions,
in the rotate-half convention of Hugging Face Llama, already multiplied by the scaling's
attention factor (YaRN, LongRoPE). `scaling` is the dict Hugging Face writes in
`rope_parameters` / `rope_scaling`, completed at load with what the formula needs
(`original_max_position_embeddings`, and for "dynamic" the model's `max_position_embeddings`):

- "linear": frequencies / factor;
- "dynamic" (NTK): past max_position_embeddings, the base grows with the sequence length;
- "yarn": frequencies blended between interpolation and extrapolation by a ramp over dimensions,
  cos and sin scaled by 0.1 ln(factor) + 1 (or the stated attention_factor);
- "longrope" (Phi-3): per-dimension short or long factors, chosen by whether the sequence exceeds
  the original context, cos and sin scaled by sqrt(1 + ln(factor) / ln(original));
- "llama3": low frequencies / factor, high ones kept, the band between smoothly interpolated.

Tables depend on n only for "dynamic" and "longrope" (as in transformers, which picks the
frequencies by the longest position of the forward). Instances are shared by every layer with the
same parameters (`Rotary.shared`).
"""

from __future__ import annotations

import math
from typing import Any

import torch


def _freeze(scaling: dict[str, Any] | None) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in (scaling or {}).items()))


class Rotary:
    _instances: dict[tuple, "Rotary"] = {}

    def __init__(self, dim: int, theta: float, scaling: dict[str, Any] | None = None):
        self.dim, self.theta = dim, float(theta)
        self.scaling = dict(scaling or {})
        self.kind = self.scaling.get("rope_type", "default")
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def shared(cls, dim: int, theta: float, scaling: dict[str, Any] | None = None) -> "Rotary":
        key = (dim, float(theta), _freeze(scaling))
        if key not in cls._instances:
            cls._instances[key] = cls(dim, theta, scaling)
        return cls._instances[key]

    @property
    def length_dependent(self) -> bool:
        """Whether the frequencies depend on the sequence length (each row then uses its own)."""
        return self.kind in ("dynamic", "longrope")

    @property
    def key(self) -> tuple:
        return (self.dim, self.theta, _freeze(self.scaling))

    def _base_freq(self, theta: float) -> torch.Tensor:
        return 1.0 / (theta ** (torch.arange(0, self.dim, 2, dtype=torch.int64).float() / self.dim))

    def regime(self, n: int) -> int:
        """Which set of frequencies a sequence of n positions uses (0 unless dynamic or longrope)."""
        s = self.scaling
        if self.kind == "longrope":
            return int(n > s["original_max_position_embeddings"])
        if self.kind == "dynamic":
            return max(n, s["max_position_embeddings"]) if n > s["max_position_embeddings"] else 0
        return 0

    def inv_freq(self, n: int) -> tuple[torch.Tensor, float]:
        """(dim / 2,) inverse frequencies for a sequence of n positions, and the attention factor."""
        s, kind = self.scaling, self.kind
        if kind == "default":
            return self._base_freq(self.theta), 1.0
        if kind == "linear":
            return self._base_freq(self.theta) / s["factor"], 1.0
        if kind == "dynamic":
            seq, top, factor = max(n, s["max_position_embeddings"]), s["max_position_embeddings"], s["factor"]
            base = self.theta * ((factor * seq / top) - (factor - 1)) ** (self.dim / (self.dim - 2))
            return self._base_freq(base), 1.0
        if kind == "llama3":
            return self._llama3(), 1.0
        if kind == "yarn":
            return self._yarn()
        if kind == "longrope":
            orig = s["original_max_position_embeddings"]
            factors = s["long_factor"] if n > orig else s["short_factor"]
            shape = torch.arange(0, self.dim, 2, dtype=torch.int64).float() / self.dim
            inv = 1.0 / (torch.tensor(factors, dtype=torch.float32) * self.theta ** shape)
            factor = s.get("factor") or 1.0
            att = s.get("attention_factor")
            if att is None:
                att = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
            return inv, float(att)
        raise ValueError(f"rope scaling {kind!r} is not supported")

    def _llama3(self) -> torch.Tensor:
        s = self.scaling
        inv = self._base_freq(self.theta)
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)

    def _yarn(self) -> tuple[torch.Tensor, float]:
        s, dim, base = self.scaling, self.dim, self.theta
        factor, orig = s["factor"], s["original_max_position_embeddings"]

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        att = s.get("attention_factor")
        if att is None:
            m, m_all = s.get("mscale"), s.get("mscale_all_dim")
            att = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
        fast, slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

        def correction_dim(rotations: float) -> float:
            return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(fast), correction_dim(slow)
        if s.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # a zero-width ramp
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
        extrapolation = 1 - ramp
        inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
        return inv, float(att)

    def tables(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (>= n, dim) fp32 for a sequence of n positions."""
        device = torch.device(device)
        regime = self.regime(n)
        key = (regime, device)
        cos = self._tables.get(key, (None,))[0]
        if cos is None or cos.shape[0] < n:
            m = n if self.kind == "dynamic" and regime else max(n, 256 if cos is None else 2 * cos.shape[0])
            inv, att = self.inv_freq(n)
            freqs = torch.arange(m, dtype=torch.int64).float()[:, None] * inv[None, :]  # (m, dim/2)
            emb = torch.cat((freqs, freqs), dim=-1).to(device)  # (m, dim)
            if self.kind == "dynamic" and regime:  # one table per length past the context: keep only the latest
                for old in [k for k in self._tables if k[0] and k[1] == device]:
                    del self._tables[old]
            self._tables[key] = (emb.cos() * att, emb.sin() * att)
        return self._tables[key]

    def __call__(self, pos: torch.Tensor, dtype: torch.dtype, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin at integer positions pos (T,) or (B, T): (T, dim) or (B, 1, T, dim); n is the
        sequence length that picks the frequencies (default: the largest position + 1)."""
        n = (int(pos.max()) + 1 if pos.numel() else 1) if n is None else n
        cos, sin = self.tables(n, pos.device)
        cos, sin = cos[pos].to(dtype), sin[pos].to(dtype)
        if cos.dim() == 3:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, dim): broadcast over heads
        return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, hs) rotated in the rotate-half convention over its first cos.shape[-1] values
    (all of them unless the rotary is partial)."""
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat((apply_rotary(x[..., :rot], cos, sin), x[..., rot:]), dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
