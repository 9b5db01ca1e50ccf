"""The Kirchenbauer et al. (2023) soft watermark: a logits processor and its detector.

At each step a keyed hash of the previous `context_width` tokens splits the vocabulary into a
green list (each token green with probability `gamma`) and a red one, and `delta` is added to
the green tokens' logits. Text the model wrote this way holds more green tokens than chance;
the detector counts them, needing only the tokenizer and the key (no model):

    wm = Watermark("my key")                                   # WatermarkConfig() defaults
    engine.add(prompt, GenerationConfig(temperature=1.0), processors=[wm])
    Detector("my key").detect_text(text, tokenizer)            # -> Detection (z, p_value, ...)

Green membership is a pure function of (key, context, token): a 64-bit splitmix hash chain
mapped to [0, 1) and compared with gamma, so a detector scores one token in O(1) and the
processor marks the whole vocabulary with a few vectorized integer operations. (The paper
permutes the vocabulary and takes the first gamma*V tokens; a threshold on a hash gives a
green list of gamma*V tokens in expectation, and the same null distribution: under human
text each scored token is green with probability gamma, independently of the key.)

Statistics. With n tokens scored and g of them green, z = (g - gamma n) / sqrt(n gamma (1 - gamma))
as in the paper, and the p-value is the exact binomial tail P(Bin(n, gamma) >= g) (the normal
approximation behind z, which Hugging Face's detector reports as its p-value, understates p
for short texts: green counts are skewed right when gamma < 1/2). Repeated (context, token)
pairs are scored once (on by default: a repeated phrase would count its colour again and
again, inflating z), and the prompt is never scored.

The processor satisfies lilliput.infer's logits-processor protocol by duck typing
(`__call__(ids, prompt_len, logits (V,) fp32) -> logits`): data/ imports nothing from infer/.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
TOKEN_SALT = np.uint64(0xD6E8FEB86659FD93)


@dataclass(frozen=True)
class WatermarkConfig:
    gamma: float = 0.25
    """Fraction of the vocabulary on the green list."""
    delta: float = 2.0
    """Bias added to green tokens' logits (the watermark's strength)."""
    context_width: int = 1
    """Previous tokens hashed to seed each green list (1: the paper's LeftHash)."""
    z_threshold: float = 4.0
    """z-score at or above which a text is called watermarked."""
    min_tokens: int = 25
    """Fewer scored tokens than this is "insufficient evidence", never a verdict."""
    ignore_repeated: bool = True
    """Score each (context, token) pair once: repeats would inflate z."""

    def __post_init__(self):
        if not 0.0 < self.gamma < 1.0:
            raise ValueError(f"gamma must be in (0, 1), got {self.gamma}")
        if self.delta < 0:
            raise ValueError(f"delta must be >= 0, got {self.delta}")
        if self.context_width < 1:
            raise ValueError(f"context_width must be >= 1, got {self.context_width}")
        if self.min_tokens < 1:
            raise ValueError(f"min_tokens must be >= 1, got {self.min_tokens}")


def key_id(key: str) -> str:
    """A public id of a secret key (what the ledger records): sha256 prefix, never the key."""
    return hashlib.sha256(f"lilliput-watermark-id:{key}".encode("utf-8")).hexdigest()[:16]


def key_seed(key: str, domain: str = "lilliput-watermark") -> np.uint64:
    """64 secret bits of `key`; each scheme hashes it under its own `domain`, so one key string
    seeds unrelated hashes in two schemes."""
    if not key:
        raise ValueError("the watermark key is empty: pass a secret string")
    return np.frombuffer(hashlib.sha256(f"{domain}:{key}".encode("utf-8")).digest()[:8], np.uint64)[0]


def mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 arrays (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def context_seeds(key: np.uint64, contexts: np.ndarray) -> np.ndarray:
    """Hash chain over context tokens: (N, h) int -> (N,) uint64 seeds."""
    s = np.full(contexts.shape[0], key, dtype=np.uint64)
    for j in range(contexts.shape[1]):
        s = mix64(s ^ (contexts[:, j].astype(np.uint64) * _GOLDEN))
    return s


def _green(seeds: np.ndarray, tokens: np.ndarray, gamma: float) -> np.ndarray:
    """Elementwise green membership of tokens under seeds (broadcasting) -> bool."""
    u = mix64(seeds ^ (tokens.astype(np.uint64) * TOKEN_SALT)) >> np.uint64(11)  # 53 uniform bits
    return u < np.uint64(int(gamma * (1 << 53)))


class Watermark:
    """The logits processor: adds `delta` to the green list seeded by the previous tokens."""

    def __init__(self, key: str, cfg: WatermarkConfig = WatermarkConfig()):
        self.key, self.cfg, self._seed = key, cfg, key_seed(key)
        self._vocab: np.ndarray | None = None

    @property
    def key_id(self) -> str:
        return key_id(self.key)

    def green_mask(self, context: Sequence[int], vocab_size: int) -> torch.Tensor:
        """(V,) bool: the green list after `context` (its last context_width tokens are used)."""
        if self._vocab is None or self._vocab.shape[0] != vocab_size:
            self._vocab = np.arange(vocab_size, dtype=np.uint64)
        h = self.cfg.context_width
        seed = context_seeds(self._seed, np.asarray([list(context[-h:])], dtype=np.int64))
        return torch.from_numpy(_green(seed, self._vocab, self.cfg.gamma))

    def __call__(self, ids: list[int], prompt_len: int, logits: torch.Tensor) -> torch.Tensor:
        if len(ids) < self.cfg.context_width:
            return logits  # nothing to seed a green list with (an empty prompt)
        mask = self.green_mask(ids, logits.shape[-1]).to(logits.device)
        return logits + mask.to(logits.dtype) * self.cfg.delta


@dataclass(frozen=True)
class Detection:
    tokens: int
    """Tokens after the prompt (before dropping repeats and the first context_width without context)."""
    tokens_scored: int
    green: int
    green_fraction: float
    z: float
    p_value: float
    """Exact one-sided binomial tail P(Bin(tokens_scored, gamma) >= green)."""
    z_threshold: float
    fpr: float
    """False-positive rate the z threshold implies at this many scored tokens (exact binomial)."""
    watermarked: bool
    verdict: str
    """"watermarked", "not watermarked" or "insufficient evidence"."""
    gamma: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def binomial_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Bin(n, p), summed exactly in log space (no normal approximation)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    lp, lq = math.log(p), math.log1p(-p)
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
            for i in range(k, n + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * math.fsum(math.exp(x - top) for x in logs))


class Detector:
    """Scores token ids or text for the watermark of `key`; needs no model."""

    def __init__(self, key: str, cfg: WatermarkConfig = WatermarkConfig()):
        self.key, self.cfg, self._seed = key, cfg, key_seed(key)

    def green_flags(self, ids: Sequence[int], prompt_len: int = 0) -> np.ndarray:
        """(n,) bool green flag of each scored token (after the prompt, repeats dropped as configured)."""
        h = self.cfg.context_width
        ids = np.asarray(ids, dtype=np.int64)
        start = max(prompt_len, h)
        if ids.shape[0] <= start:
            return np.zeros(0, dtype=bool)
        pos = np.arange(start, ids.shape[0])
        contexts = np.stack([ids[pos - h + j] for j in range(h)], axis=1)  # (n, h)
        tokens = ids[pos]
        if self.cfg.ignore_repeated:
            grams = np.concatenate([contexts, tokens[:, None]], axis=1)
            _, first = np.unique(grams, axis=0, return_index=True)
            keep = np.sort(first)
            contexts, tokens = contexts[keep], tokens[keep]
        return _green(context_seeds(self._seed, contexts), tokens, self.cfg.gamma)

    def detect(self, ids: Sequence[int], prompt_len: int = 0) -> Detection:
        """Score token ids; the first `prompt_len` of them (the prompt) only give context."""
        flags = self.green_flags(ids, prompt_len)
        return self.score(int(flags.sum()), int(flags.shape[0]), tokens=max(0, len(ids) - prompt_len))

    def detect_text(self, text: str, tokenizer) -> Detection:
        """Score a text as the tokenizer splits it (no BOS)."""
        return self.detect(tokenizer.encode(text, bos=False))

    def score(self, green: int, n: int, tokens: int | None = None) -> Detection:
        """The statistics of `green` green tokens out of `n` scored."""
        cfg, gamma = self.cfg, self.cfg.gamma
        sd = math.sqrt(n * gamma * (1 - gamma)) if n else 0.0
        z = (green - gamma * n) / sd if n else 0.0
        k_threshold = math.ceil(gamma * n + cfg.z_threshold * sd - 1e-9)  # fewest green tokens called watermarked
        enough = n >= cfg.min_tokens
        watermarked = enough and z >= cfg.z_threshold
        verdict = "insufficient evidence" if not enough else ("watermarked" if watermarked else "not watermarked")
        return Detection(tokens=n if tokens is None else tokens, tokens_scored=n, green=green,
                         green_fraction=green / n if n else 0.0, z=z, p_value=binomial_sf(green, n, gamma),
                         z_threshold=cfg.z_threshold, fpr=binomial_sf(k_threshold, n, gamma) if n else 1.0,
                         watermarked=watermarked, verdict=verdict, gamma=gamma)
