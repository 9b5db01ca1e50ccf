"""Near-duplicate detection: MinHash signatures of word 5-gram shingles, banded LSH, then a check.

    sigs = minhash_signatures(texts, MinHashConfig())      # (N, num_perm) uint64
    groups = near_duplicates(sigs, MinHashConfig())        # [(i, j, jaccard estimate)], i < j

A signature's k-th value is the minimum over the text's shingles of the k-th hash function (a
splitmix64 finalizer of the shingle's 64-bit hash xor a per-function seed): two texts agree on
it with probability equal to the Jaccard similarity of their shingle sets. LSH cuts the
signature into `bands` of `rows` values; texts that agree on a whole band become candidates,
and a candidate pair is kept when its Jaccard similarity reaches the threshold: computed exactly
from the two shingle sets when the texts are at hand (what curation does), else estimated by
the share of agreeing signature values (whose noise, ~0.035 at 128 functions, blurs the edge). Bands and rows are chosen as datasketch does: to minimise the false-positive
plus false-negative probability mass around the threshold.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MAX = np.iinfo(np.uint64).max


@dataclass(frozen=True)
class MinHashConfig:
    threshold: float = 0.8
    """Jaccard similarity of shingle sets at and above which two documents are near-duplicates."""
    shingle: int = 5
    """Words per shingle."""
    num_perm: int = 128
    """Hash functions per signature (more: a sharper estimate, slower)."""
    seed: int = 1
    """Seed of the hash functions."""
    exact_fn_weight: float = 0.9
    """Weight of missed pairs against false candidates when choosing bands for exactly checked
    candidates (0.5 weighs them equally, as datasketch does)."""

    def __post_init__(self):
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.shingle < 1 or self.num_perm < 2:
            raise ValueError(f"shingle must be >= 1 and num_perm >= 2, got {self.shingle}, {self.num_perm}")


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def shingles(text: str, n: int = 5) -> set[str]:
    """Lower-cased word n-grams (the whole text as one shingle when it has fewer than n words)."""
    words = re.findall(r"\w+", text.lower())
    if len(words) < n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def minhash_signatures(texts: list[str], cfg: MinHashConfig = MinHashConfig()) -> np.ndarray:
    """(N, num_perm) uint64 MinHash signatures; an empty text gets all-max values."""
    seeds = _mix(np.arange(1, cfg.num_perm + 1, dtype=np.uint64) + np.uint64(cfg.seed) * np.uint64(0x9E3779B97F4A7C15))
    out = np.full((len(texts), cfg.num_perm), _MAX, dtype=np.uint64)
    for i, text in enumerate(texts):
        sh = shingles(text, cfg.shingle)
        if not sh:
            continue
        hv = np.frombuffer(b"".join(hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest() for s in sh),
                           dtype=np.uint64)
        for start in range(0, hv.shape[0], 4096):  # bound memory: (4096, num_perm) at a time
            block = _mix(hv[start:start + 4096, None] ^ seeds[None, :]).min(axis=0)
            np.minimum(out[i], block, out=out[i])
    return out


def _integrate(f, a: float, b: float, steps: int = 200) -> float:
    h = (b - a) / steps
    return sum(f(a + (k + 0.5) * h) for k in range(steps)) * h


@lru_cache(maxsize=None)
def lsh_params(threshold: float, num_perm: int, fn_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) minimising the weighted false-positive + false-negative probability mass
    (datasketch's choice; its default weights are 0.5 and 0.5)."""
    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = _integrate(lambda s: 1 - (1 - s ** r) ** b, 0.0, threshold)
            fn = _integrate(lambda s: (1 - s ** r) ** b, threshold, 1.0)
            err = (1 - fn_weight) * fp + fn_weight * fn
            if err < best_err:
                best, best_err = (b, r), err
    return best


def candidates(sigs: np.ndarray, cfg: MinHashConfig = MinHashConfig(), fn_weight: float = 0.5) -> set[tuple[int, int]]:
    """Pairs (i, j), i < j, that agree on at least one whole LSH band."""
    bands, rows = lsh_params(cfg.threshold, sigs.shape[1], fn_weight)
    empty = (sigs == _MAX).all(axis=1)
    pairs: set[tuple[int, int]] = set()
    for b in range(bands):
        buckets: dict[bytes, list[int]] = defaultdict(list)
        part = np.ascontiguousarray(sigs[:, b * rows:(b + 1) * rows])
        for i in range(sigs.shape[0]):
            if not empty[i]:
                buckets[part[i].tobytes()].append(i)
        for members in buckets.values():
            for x in range(len(members)):
                for y in range(x + 1, len(members)):
                    pairs.add((members[x], members[y]))
    return pairs


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def near_duplicates(sigs: np.ndarray, cfg: MinHashConfig = MinHashConfig(),
                    texts: list[str] | None = None) -> list[tuple[int, int, float]]:
    """LSH candidates (i, j, similarity), i < j, whose similarity reaches the threshold: the exact
    Jaccard of their shingle sets when `texts` are given, else the signatures' estimate."""
    sets: dict[int, set[str]] = {}
    pairs = []
    # an exact check removes false candidates, so the bands can favour recall
    for i, j in sorted(candidates(sigs, cfg, fn_weight=0.5 if texts is None else cfg.exact_fn_weight)):
        if texts is None:
            sim = float((sigs[i] == sigs[j]).mean())
        else:
            for k in (i, j):
                if k not in sets:
                    sets[k] = shingles(texts[k], cfg.shingle)
            sim = jaccard(sets[i], sets[j])
        if sim >= cfg.threshold:
            pairs.append((i, j, sim))
    return pairs
