"""Diversity of generated text, and how much of a reference distribution's tail it still covers.

Pure functions over token sequences (lists or 1-D tensors of ids; any hashable items work). The
model-collapse lab and the textbook study use them on every generation:

    distinct_n(samples, 2)                   # unique bigrams / all bigrams over the samples
    unigram_entropy(tokens)                  # bits
    unigram_kl(human, generated)             # KL(human || generated) in bits, add-alpha smoothed
    tail_coverage(generated, human, n=1)     # share of the human text's rare n-grams that appear
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Hashable, Iterable, Sequence

Tokens = Sequence[Hashable]


def _ids(tokens) -> list:
    return tokens.tolist() if hasattr(tokens, "tolist") else list(tokens)


def ngrams(tokens: Tokens, n: int) -> list[tuple]:
    """The n-grams of one sequence, in order."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    t = _ids(tokens)
    return [tuple(t[i:i + n]) for i in range(len(t) - n + 1)]


def ngram_counts(samples: Iterable[Tokens], n: int) -> Counter:
    """n-gram counts over several sequences (n-grams never cross a sequence boundary)."""
    counts: Counter = Counter()
    for s in samples:
        counts.update(ngrams(s, n))
    return counts


def distinct_n(samples: Iterable[Tokens], n: int) -> float:
    """Unique n-grams / all n-grams over the samples (Li et al. 2016); 0.0 when there are none."""
    counts = ngram_counts(samples, n)
    total = sum(counts.values())
    return len(counts) / total if total else 0.0


def unigram_entropy(tokens: Tokens | Counter) -> float:
    """Entropy in bits of the empirical unigram distribution."""
    counts = tokens if isinstance(tokens, Counter) else Counter(_ids(tokens))
    total = sum(counts.values())
    if total == 0:
        return 0.0
    return -sum(c / total * math.log2(c / total) for c in counts.values())


def unigram_kl(reference: Tokens | Counter, generated: Tokens | Counter, alpha: float = 0.5) -> float:
    """KL(reference || generated) in bits between unigram distributions.

    Both are smoothed by adding `alpha` to every item seen in either (a token the generated text
    never produces would otherwise make the divergence infinite)."""
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    p = reference if isinstance(reference, Counter) else Counter(_ids(reference))
    q = generated if isinstance(generated, Counter) else Counter(_ids(generated))
    support = set(p) | set(q)
    if not support:
        return 0.0
    p_total = sum(p.values()) + alpha * len(support)
    q_total = sum(q.values()) + alpha * len(support)
    kl = 0.0
    for item in support:
        pi = (p[item] + alpha) / p_total
        qi = (q[item] + alpha) / q_total
        kl += pi * math.log2(pi / qi)
    return kl


def tail_coverage(generated: Iterable[Tokens], reference: Iterable[Tokens], n: int = 1,
                  tail: float = 0.5) -> float:
    """Share of the reference's rare n-grams that appear at least once in the generated text.

    The rare n-grams are the least frequent ones of the reference that together make up the
    rarest `tail` fraction of its distinct n-grams (ties broken by the n-gram itself, so the
    set is deterministic). Collapse shows up here first: a model trained on its predecessors'
    output stops producing the tail (Shumailov et al. 2024)."""
    if not 0 < tail <= 1:
        raise ValueError(f"tail must be in (0, 1], got {tail}")
    ref = ngram_counts(reference, n)
    if not ref:
        return 0.0
    ordered = sorted(ref.items(), key=lambda kv: (kv[1], repr(kv[0])))
    rare = {g for g, _ in ordered[:max(1, int(len(ordered) * tail))]}
    seen = set(ngram_counts(generated, n))
    return len(rare & seen) / len(rare)
