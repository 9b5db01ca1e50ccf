"""Planted duplicates: a corpus with exact and near copies at known Jaccard similarity, the ground
truth that deduplication is measured against (bench/curate.py, tests/test_curate.py).

    originals = passages(documents, 120)               # word windows of the corpus, as lines of prose
    planted = plant(originals, seed=0)                 # + one copy of each: exact or perturbed
    planted.docs, planted.truth(0.8)                   # documents; the (original, copy) pairs >= 0.8

A near copy replaces a share of its original's words with words that occur nowhere else; its
similarity is the Jaccard of the two texts' sets of lower-cased word 5-grams (`jaccard` of
lilliput.data.shingles: what curation's MinHash approximates and its check of candidates computes).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from lilliput.data.shingles import jaccard

PROSE = ("sotu/", "bible/", "austen/")
"""Sources written in sentences (verse has too few per line for C4's and Gopher's rules)."""
RATES = (0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.15)
"""Shares of words replaced in the copies (0.0: an exact copy), in turn: Jaccard ~1.0 .. ~0.4."""


def passages(documents, n: int, words: int = 200, per_line: int = 20, prose_only: bool = True) -> list[str]:
    """`n` passages of `words` words cut from `documents` (objects with .id and .text), in turn from each
    document, as lines of `per_line` words that end in a full stop. Raises when the corpus is too short."""
    sources = [d for d in documents if not prose_only or d.id.startswith(PROSE)]
    streams = [d.text.split() for d in sources]
    out: list[str] = []
    offset = 0
    while len(out) < n:
        progressed = False
        for toks in streams:
            chunk = toks[offset:offset + words]
            if len(chunk) < words:
                continue
            progressed = True
            lines = [" ".join(chunk[i:i + per_line]) for i in range(0, words, per_line)]
            out.append("\n".join(ln if ln.endswith((".", "!", "?")) else ln + "." for ln in lines))
            if len(out) == n:
                break
        if not progressed:
            raise ValueError(f"the corpus holds {len(out)} passages of {words} words, fewer than {n}")
        offset += words
    return out


def perturb(text: str, rate: float, rng: random.Random) -> str:
    """`text` with a share `rate` of its words replaced by unique ones (line breaks kept)."""
    if rate <= 0:
        return text
    lines = [ln.split(" ") for ln in text.split("\n")]
    where = [(i, j) for i, ln in enumerate(lines) for j in range(len(ln))]
    for i, j in rng.sample(where, max(1, round(rate * len(where)))):
        lines[i][j] = f"zq{rng.randrange(10**9)}"
    return "\n".join(" ".join(ln) for ln in lines)


@dataclass
class Planted:
    docs: list[dict]
    """{"id", "text"}: the originals ("o<k>") then one copy of each ("c<k>"), or shuffled when asked."""
    pairs: list[tuple[str, str, float]] = field(default_factory=list)
    """(original id, copy id, Jaccard similarity) of every planted copy."""

    def truth(self, threshold: float) -> set[tuple[str, str]]:
        """The planted pairs whose similarity reaches `threshold`: what a deduplicator should find."""
        return {(a, b) for a, b, s in self.pairs if s >= threshold}


def plant(originals: list[str], rates: tuple[float, ...] = RATES, seed: int = 0, shuffle: bool = False) -> Planted:
    """Each original, then a copy of each with `rates[k % len(rates)]` of its words replaced."""
    rng = random.Random(seed)
    docs = [{"id": f"o{k}", "text": t} for k, t in enumerate(originals)]
    pairs = []
    for k, text in enumerate(originals):
        copy = perturb(text, rates[k % len(rates)], rng)
        docs.append({"id": f"c{k}", "text": copy})
        pairs.append((f"o{k}", f"c{k}", jaccard(text, copy)))
    if shuffle:
        rng.shuffle(docs)
    return Planted(docs, pairs)


def score(found: set[tuple[str, str]], truth: set[tuple[str, str]]) -> dict:
    """Precision and recall of found pairs (order inside a pair ignored) against the truth."""
    norm = lambda pairs: {tuple(sorted(p)) for p in pairs}  # noqa: E731
    found, truth = norm(found), norm(truth)
    hit = len(found & truth)
    return {"found": len(found), "true": len(truth), "correct": hit,
            "precision": hit / len(found) if found else 1.0, "recall": hit / len(truth) if truth else 1.0}
