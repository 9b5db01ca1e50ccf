"""Test-time compute: sample several answers and choose one.

`sample_n` draws n continuations of one prompt that share a single prefill (`Engine.add_n`: the
prefilled row is copied n - 1 times and every sample draws its first token from the same logits). Choosing:

- `best_of_n`: the sample with the highest score: by default the model's own mean token
  log-probability, or any verifier `score(seq) -> float` (a program that checks answers);
- `majority_vote` (self-consistency, Wang et al. 2023): the most frequent extracted answer;
- `weighted_vote`: answers weighted by exp(mean log-probability) of the samples that gave them.

An `extract(text) -> answer | None` turns a sample into the thing voted on (a number, a letter).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Callable, Hashable, Sequence as Seq

from lilliput.infer.engine import Engine
from lilliput.infer.sequence import GenerationConfig, Sequence

METHODS = ("best_of_n", "vote", "weighted_vote")


@dataclass(frozen=True)
class SearchConfig:
    n: int = 8
    """Samples per prompt (they share one prefill)."""
    method: str = "best_of_n"
    """best_of_n (highest mean log-probability or verifier score), vote (majority of extracted
    answers) or weighted_vote (answers weighted by exp(mean log-probability))."""

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: pass one of {', '.join(METHODS)}")


def sample_n(engine: Engine, prompt: str | list[int], cfg: GenerationConfig, n: int,
             bos: bool | None = None) -> list[Sequence]:
    """n samples of one prompt sharing one prefill (needs n free rows); log-probabilities recorded."""
    if n > engine.cfg.max_batch:
        raise ValueError(f"{n} samples need an engine of at least {n} rows (max_batch), it has {engine.cfg.max_batch}")
    if cfg.logprobs is None:
        cfg = dataclasses.replace(cfg, logprobs=0)
    seqs = engine.add_n(prompt, cfg, n, bos=bos)
    while engine.has_work():
        engine.step()
    return seqs


def mean_logprob(seq: Sequence) -> float:
    """The model's mean log-probability of the sample's tokens (-inf for an empty sample)."""
    lps = [r["logprob"] for r in seq.logprobs[:len(seq.output)]]
    return sum(lps) / len(lps) if lps else -math.inf


def best_of_n(seqs: Seq[Sequence], score: Callable[[Sequence], float] = mean_logprob) -> Sequence:
    """The highest-scoring sample (the first among equals)."""
    return max(seqs, key=score)


def majority_vote(answers: Seq[Hashable | None]) -> Hashable | None:
    """The most frequent answer that is not None (ties: the one seen first)."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == top)


def weighted_vote(answers: Seq[Hashable | None], weights: Seq[float]) -> Hashable | None:
    """The answer with the largest total weight (ties: the one seen first)."""
    total: dict[Hashable, float] = defaultdict(float)
    for a, w in zip(answers, weights):
        if a is not None:
            total[a] += w
    if not total:
        return None
    top = max(total.values())
    return next(a for a in answers if a is not None and total[a] == top)


def choose(seqs: Seq[Sequence], method: str, extract: Callable[[str], Hashable | None] | None = None,
           score: Callable[[Sequence], float] = mean_logprob) -> Sequence:
    """The sample a method picks; for votes, the best-scoring sample that gave the winning answer."""
    if method == "best_of_n":
        return best_of_n(seqs, score)
    if extract is None:
        raise ValueError(f"{method} needs an extract(text) -> answer function")
    answers = [extract(s.text) for s in seqs]
    if method == "vote":
        win = majority_vote(answers)
    else:
        win = weighted_vote(answers, [math.exp(mean_logprob(s)) for s in seqs])
    pool = [s for s, a in zip(seqs, answers) if a == win] or list(seqs)
    return best_of_n(pool, score)
