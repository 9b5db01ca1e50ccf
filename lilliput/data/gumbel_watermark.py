"""A distortion-free watermark: Gumbel-max sampling keyed by the context (Aaronson 2022), and its detector.

At each step a keyed hash of the previous `context_width` tokens gives every token i a uniform
r_i in (0, 1), and the token is argmax_i r_i^(1/p_i) over the distribution p the sampler would
draw from. That is the Gumbel-max trick (-log r_i is Exp(1), and argmin_i -log(r_i) / p_i is
token i with probability p_i), so over the key each step is an exact sample from p: the text is
distributed as the model's, and its perplexity is the model's. The choice favours tokens with a
large r, which is what the detector looks for, needing only the tokenizer and the key:

    wm = GumbelWatermark("my key")                             # GumbelConfig() defaults
    engine.add(prompt, GenerationConfig(temperature=1.0), processors=[wm])
    GumbelDetector("my key").detect_text(text, tokenizer)      # -> GumbelDetection (p_value, ...)

Given the context, the choice is deterministic: the watermark replaces the sampler's draw
(lilliput.infer's token-drawer protocol, by duck typing: `draw(ids, prompt_len, probs, generator)`),
so it needs temperature > 0, and the top-k / top-p filters apply before it. Two samples of one
prompt with one key are the same text, except where a context repeats.

Repeated contexts. A context (the h previous tokens) already used at an earlier step of the same
output gives the same r vector again: the generator samples that step plainly (the sequence's own
torch generator) and the detector skips it. Each watermarked step then has a context never used
before, so (1) over the key the whole text, not just each step, is an exact sample from the model,
and (2) under H0 (text written without the key) the r of every scored token is a fresh uniform.

Statistics. A scored token's score is -log(1 - r_{x_t}), Exp(1) under H0; the sum s over n scored
tokens is Gamma(n, 1), and the p-value is its exact survival function
P(Gamma(n, 1) >= s) = e^{-s} sum_{k<n} s^k / k!, summed in log space (`gamma_sf`). Under the
watermark the chosen token's r is the largest of its competitors' in the race, so its score is
larger: about H_k (the k-th harmonic number, ~ln k + 0.58) when the model spreads its mass over k
tokens evenly; at a nearly certain token it is ~1, and no watermark can mark such a token.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch

from lilliput.data.watermark import TOKEN_SALT, context_seeds, key_id, key_seed, mix64

_DOMAIN = "lilliput-gumbel-watermark"
_TWO52 = float(1 << 52)


@dataclass(frozen=True)
class GumbelConfig:
    context_width: int = 1
    """Previous tokens hashed to seed each step's r vector (1: as the green list; wider repeats less
    within a text but one substituted token then spoils more scores)."""
    fpr: float = 1e-4
    """A text is called watermarked when its exact p-value is at or below this false-positive rate."""
    min_tokens: int = 25
    """Fewer scored tokens than this is "insufficient evidence", never a verdict."""

    def __post_init__(self):
        if self.context_width < 1:
            raise ValueError(f"context_width must be >= 1, got {self.context_width}")
        if not 0.0 < self.fpr < 1.0:
            raise ValueError(f"fpr must be in (0, 1), got {self.fpr}")
        if self.min_tokens < 1:
            raise ValueError(f"min_tokens must be >= 1, got {self.min_tokens}")


def _uniform_bits(seeds: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """52 uniform bits u per (seed, token) (broadcasting); r = (u + 1/2) / 2^52 is in (0, 1) and
    r and 1 - r are both exact in float64."""
    return (mix64(seeds ^ (tokens.astype(np.uint64) * TOKEN_SALT)) >> np.uint64(12)).astype(np.float64)


def scores_of(u: np.ndarray) -> np.ndarray:
    """-log(1 - r) of 52-bit draws u: Exp(1) when u is uniform."""
    return -np.log((_TWO52 - u - 0.5) / _TWO52)


def gamma_sf(n: int, s: float) -> float:
    """P(Gamma(n, 1) >= s) for an integer shape n >= 0: e^{-s} sum_{k<n} s^k / k! (the Poisson
    identity: fewer than n arrivals by time s), summed exactly in log space."""
    if n <= 0 or s <= 0:  # nothing scored: no evidence
        return 1.0
    logs = [k * math.log(s) - math.lgamma(k + 1) for k in range(n)]
    top = max(logs)
    return min(1.0, math.exp(top - s) * math.fsum(math.exp(x - top) for x in logs))


def repeated_context(ids: Sequence[int], prompt_len: int, h: int) -> bool:
    """Whether the context of the next position (the last h of ids) was already the context of a
    scored position (from max(prompt_len, h) on): such a step is neither watermarked nor scored."""
    ctx, last, n = list(ids[-h:]), ids[-1], len(ids)
    # scored position t had context ids[t-h:t], whose last token is ids[t-1]: compare only where that matches
    return any(ids[t - 1] == last and list(ids[t - h:t]) == ctx for t in range(max(prompt_len, h), n))


class GumbelWatermark:
    """The token drawer: argmax_i r_i^(1/p_i), r keyed by the previous tokens (see the module)."""

    def __init__(self, key: str, cfg: GumbelConfig = GumbelConfig()):
        self.key, self.cfg, self._seed = key, cfg, key_seed(key, _DOMAIN)
        self._vocab: np.ndarray | None = None

    @property
    def key_id(self) -> str:
        return key_id(self.key)

    def exponentials(self, context: Sequence[int], vocab_size: int) -> np.ndarray:
        """(V,) float64 -log r_i after `context` (its last context_width tokens): i.i.d. Exp(1) over keys."""
        if self._vocab is None or self._vocab.shape[0] != vocab_size:
            self._vocab = np.arange(vocab_size, dtype=np.uint64)
        return self.exponentials_at(context, self._vocab)

    def exponentials_at(self, context: Sequence[int], tokens: np.ndarray) -> np.ndarray:
        """-log r_i after `context` for the given token ids only (each the same as in `exponentials`)."""
        seed = context_seeds(self._seed, np.asarray([list(context[-self.cfg.context_width:])], dtype=np.int64))
        return -np.log((_uniform_bits(seed, tokens.astype(np.uint64)) + 0.5) / _TWO52)

    def __call__(self, ids: list[int], prompt_len: int, logits: torch.Tensor) -> torch.Tensor:
        return logits  # the watermark is in the draw, not in the logits

    def draw(self, ids: list[int], prompt_len: int, probs: torch.Tensor, generator: torch.Generator) -> int:
        """The token after ids from probabilities (V,): the keyed Gumbel-max choice, or a plain draw
        with `generator` when there is no full context yet or the context repeats."""
        h = self.cfg.context_width
        if len(ids) < h or repeated_context(ids, prompt_len, h):
            return int(torch.multinomial(probs, 1, generator=generator))
        probs = probs.detach().to("cpu")
        support = torch.nonzero(probs > 0).flatten()  # probability 0 never wins: under top-k, k keys, not V
        p, support = probs[support].double().numpy(), support.numpy()
        race = self.exponentials_at(ids, support) / p  # -log(r_i) / p_i: the smallest wins
        return int(support[np.argmin(race)])


@dataclass(frozen=True)
class GumbelDetection:
    tokens: int
    """Tokens after the prompt (before dropping repeated contexts and the first context_width)."""
    tokens_scored: int
    score: float
    """Sum of -log(1 - r) over the scored tokens: Gamma(tokens_scored, 1) without the watermark."""
    mean_score: float
    """score / tokens_scored: 1 in expectation without the watermark."""
    p_value: float
    """Exact P(Gamma(tokens_scored, 1) >= score)."""
    fpr: float
    """The p-value at or below which a text is called watermarked (its false-positive rate)."""
    watermarked: bool
    verdict: str
    """"watermarked", "not watermarked" or "insufficient evidence"."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class GumbelDetector:
    """Scores token ids or text for the Gumbel watermark of `key`; needs no model."""

    def __init__(self, key: str, cfg: GumbelConfig = GumbelConfig()):
        self.key, self.cfg, self._seed = key, cfg, key_seed(key, _DOMAIN)

    def token_scores(self, ids: Sequence[int], prompt_len: int = 0) -> np.ndarray:
        """(n,) -log(1 - r) of each scored token: after the prompt, first occurrence of each context."""
        h = self.cfg.context_width
        ids = np.asarray(ids, dtype=np.int64)
        start = max(prompt_len, h)
        if ids.shape[0] <= start:
            return np.zeros(0)
        pos = np.arange(start, ids.shape[0])
        contexts = np.stack([ids[pos - h + j] for j in range(h)], axis=1)  # (n, h)
        _, first = np.unique(contexts, axis=0, return_index=True)
        keep = np.sort(first)
        return scores_of(_uniform_bits(context_seeds(self._seed, contexts[keep]), ids[pos[keep]]))

    def detect(self, ids: Sequence[int], prompt_len: int = 0) -> GumbelDetection:
        """Score token ids; the first `prompt_len` of them (the prompt) only give context."""
        s = self.token_scores(ids, prompt_len)
        return self.score(float(s.sum()), int(s.shape[0]), tokens=max(0, len(ids) - prompt_len))

    def detect_text(self, text: str, tokenizer) -> GumbelDetection:
        """Score a text as the tokenizer splits it (no BOS)."""
        return self.detect(tokenizer.encode(text, bos=False))

    def score(self, total: float, n: int, tokens: int | None = None) -> GumbelDetection:
        """The statistics of a score sum `total` over `n` scored tokens."""
        cfg = self.cfg
        p = gamma_sf(n, total)
        enough = n >= cfg.min_tokens
        watermarked = enough and p <= cfg.fpr
        verdict = "insufficient evidence" if not enough else ("watermarked" if watermarked else "not watermarked")
        return GumbelDetection(tokens=n if tokens is None else tokens, tokens_scored=n, score=total,
                               mean_score=total / n if n else 0.0, p_value=p, fpr=cfg.fpr,
                               watermarked=watermarked, verdict=verdict)
