"""Intervals for results over many items: the percentile bootstrap of a mean, and of a paired difference.

One run over many items (questions, prompts, texts) has no seeds to repeat, but its items are a
sample: resampling them with replacement says how much the mean would move with other items. A
paired difference (method A and method B on the same items) resamples the items once for both, so
the spread of the items themselves cancels out.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence


def bootstrap_mean(values: Sequence[float], resamples: int = 10_000, level: float = 0.95,
                   seed: int = 0) -> dict[str, float]:
    """{"mean", "ci_low", "ci_high", "n", "level", "resamples"}: the mean of `values` and its percentile
    bootstrap interval (the same seed gives the same interval)."""
    n = len(values)
    if n == 0:
        raise ValueError("bootstrap_mean needs at least one value")
    rng = random.Random(seed)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    lo = means[int((1 - level) / 2 * resamples)]
    hi = means[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return {"mean": sum(values) / n, "ci_low": lo, "ci_high": hi, "n": n, "level": level, "resamples": resamples}


def paired_difference(a: Sequence[float], b: Sequence[float], resamples: int = 10_000, level: float = 0.95,
                      seed: int = 0) -> dict[str, float]:
    """Mean of a - b over the same items, with its bootstrap interval (items resampled in pairs)."""
    if len(a) != len(b):
        raise ValueError(f"paired values differ in length: {len(a)} and {len(b)}")
    return bootstrap_mean([x - y for x, y in zip(a, b)], resamples, level, seed)


def seed_summary(values: Sequence[float]) -> dict:
    """One figure over seeds: mean, std (sample; 0 for one value), min, max and the values."""
    if not values:
        raise ValueError("seed_summary needs at least one value")
    values = list(values)
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "values": values}
