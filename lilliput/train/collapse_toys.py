"""The collapse lab's two toy scales (seconds, no neural network).

- `gaussian_chain`: fit a Gaussian (maximum likelihood), sample, refit. Under replace the fitted
  variance drifts to zero (E[var_g] = ((n-1)/n)^g); under accumulate it stays near 1. Numbers,
  not documents: this one does not touch the ledger.
- `BigramLearner`: a count-based word bigram model. It samples from its maximum-likelihood
  counts (a word it never saw, it never writes) and scores held-out text with interpolated
  smoothing over the fixed vocabulary of the human training set, so a rare word lost in one
  generation is gone for good under replace. It runs through the lab's loop (collapse.run_lab).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from typing import Any

import numpy as np

from lilliput.train.collapse import POLICIES, Sampling, band, words


# --- the Gaussian -------------------------------------------------------------------------------

def gaussian_chain(policy: str, samples: int, generations: int, seed: int, human_fraction: float = 0.5) -> list[float]:
    """Fitted variance of each generation (generation 0 fits `samples` draws of N(0, 1))."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if samples < 2 or generations < 1:
        raise ValueError(f"need samples >= 2 and generations >= 1, got {samples} and {generations}")
    rng = np.random.default_rng(seed)
    human = rng.standard_normal(samples)
    synthetic: list[np.ndarray] = []
    data, out = human, []
    for _ in range(generations):
        mu, var = float(data.mean()), float(data.var())  # maximum likelihood (ddof=0), as a refit would
        out.append(var)
        synthetic.append(rng.normal(mu, math.sqrt(var), samples))
        if policy == "replace":
            data = synthetic[-1]
        elif policy == "accumulate":
            data = np.concatenate([human, *synthetic])
        else:  # the human share fixed: all human draws and a random subset of the synthetic ones
            pool = np.concatenate(synthetic)
            keep = min(len(pool), round(samples * (1 - human_fraction) / human_fraction))
            data = np.concatenate([human, rng.choice(pool, keep, replace=False)])
    return out


def gaussian_study(samples: int = 50, generations: int = 50, seeds: int = 20,
                   policies: tuple[str, ...] = POLICIES, human_fraction: float = 0.5) -> dict[str, Any]:
    """Fitted variance per generation, with its spread over seeds, for each policy."""
    out: dict[str, Any] = {"samples": samples, "generations": generations, "seeds": seeds}
    for p in policies:
        runs = [gaussian_chain(p, samples, generations, s, human_fraction) for s in range(seeds)]
        curve = [band([r[g] for r in runs]) for g in range(generations)]
        out[p] = {"variance_mean": [c["mean"] for c in curve], "variance_median": [c["median"] for c in curve],
                  "variance_min": [c["min"] for c in curve], "variance_max": [c["max"] for c in curve]}
    return out


# --- the word bigram model ------------------------------------------------------------------------

class Bigram:
    """Word-bigram counts over a fixed vocabulary (ids); samples from its maximum-likelihood counts."""

    def __init__(self, vocab_size: int, docs: list[list[int]]):
        self.V = vocab_size
        self.unigram = np.zeros(vocab_size, dtype=np.int64)
        pairs: Counter = Counter()
        for d in docs:
            self.unigram += np.bincount(d, minlength=vocab_size)
            pairs.update(zip(d, d[1:]))
        self.pairs = pairs
        self.context = Counter()
        self._next: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for (a, _), c in pairs.items():
            self.context[a] += c
        nxt: dict[int, list[tuple[int, int]]] = {}
        for (a, b), c in pairs.items():
            nxt.setdefault(a, []).append((c, b))
        for a, lst in nxt.items():
            lst.sort(reverse=True)  # most frequent first: top-p keeps a prefix
            self._next[a] = (np.array([b for _, b in lst]), np.array([c for c, _ in lst], dtype=np.float64))
        self.total = int(self.unigram.sum())
        order = np.argsort(-self.unigram, kind="stable")
        order = order[self.unigram[order] > 0]
        self._uni = (order, self.unigram[order].astype(np.float64))

    def choices(self, prev: int | None) -> tuple[np.ndarray, np.ndarray]:
        """(next ids, counts), most frequent first: the bigram row of `prev`, else the unigram counts."""
        return self._next.get(prev, self._uni) if prev is not None else self._uni

    def logprob(self, prev: int, word: int, lam: float, alpha: float) -> float:
        """log P(word | prev): lam * bigram + (1 - lam) * add-alpha unigram (the unigram alone for an unseen prev)."""
        uni = (self.unigram[word] + alpha) / (self.total + alpha * self.V)
        c = self.context.get(prev, 0)
        p = lam * self.pairs.get((prev, word), 0) / c + (1 - lam) * uni if c else uni
        return math.log(p)


class BigramLearner:
    """The lab's n-gram scale: fit = count, sample = draw from the counts, perplexity on held-out words."""

    def __init__(self, human_texts: list[str], heldout: list[str], doc_words: int = 40, lam: float = 0.8,
                 alpha: float = 0.1):
        vocab = sorted({w for t in human_texts for w in words(t)})
        self.index = {w: i for i, w in enumerate(vocab)}
        self.vocab = vocab + ["<unk>"]  # held-out words the human training text never had
        self.unk = len(vocab)
        self.doc_words, self.lam, self.alpha = doc_words, lam, alpha
        self.heldout = [self.ids(t) for t in heldout]

    def ids(self, text: str) -> list[int]:
        return [self.index.get(w, self.unk) for w in words(text)]

    def fit(self, texts: list[str], seed: int) -> Bigram:
        return Bigram(len(self.vocab), [self.ids(t) for t in texts])

    def perplexity(self, model: Bigram) -> float:
        nll = [-model.logprob(a, b, self.lam, self.alpha) for d in self.heldout for a, b in zip(d, d[1:])]
        return math.exp(statistics.fmean(nll))

    def fingerprint(self, model: Bigram) -> str:
        return f"bigram:{len(model.pairs)}-pairs:{model.total}-words"

    def sample(self, model: Bigram, prompts: list[str], sampling: Sampling, seeds: list[int]) -> list[str]:
        """One document of `doc_words` words per prompt, continuing the prompt's first word."""
        out = []
        for prompt, seed in zip(prompts, seeds):
            rng = np.random.default_rng(seed)
            p = self.ids(prompt)[:1]
            prev = p[0] if p and p[0] != self.unk else None
            doc = []
            for _ in range(self.doc_words):
                ids, counts = model.choices(prev)
                if sampling.top_p is not None:  # the nucleus: the most frequent words holding top_p of the mass
                    cum = np.cumsum(counts)
                    k = int(np.searchsorted(cum, sampling.top_p * cum[-1])) + 1
                    ids, counts = ids[:k], counts[:k]
                cum = np.cumsum(counts)
                prev = int(ids[min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), len(ids) - 1)])
                doc.append(self.vocab[prev])
            out.append(" ".join(doc))
        return out
