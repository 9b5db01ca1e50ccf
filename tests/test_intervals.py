import random

import pytest

from lilliput.eval.intervals import bootstrap_mean, paired_difference, seed_summary


def test_bootstrap_interval_holds_the_mean_and_shrinks_with_items():
    rng = random.Random(0)
    small = [float(rng.random() < 0.3) for _ in range(50)]
    large = [float(rng.random() < 0.3) for _ in range(2000)]
    a, b = bootstrap_mean(small, 2000), bootstrap_mean(large, 2000)
    assert a["ci_low"] <= a["mean"] <= a["ci_high"] and b["ci_low"] <= b["mean"] <= b["ci_high"]
    assert b["ci_high"] - b["ci_low"] < (a["ci_high"] - a["ci_low"]) / 3  # ~ 1 / sqrt(n)
    assert 0.25 < b["ci_low"] < 0.3 < b["ci_high"] < 0.35
    assert bootstrap_mean(small, 2000) == a  # seeded


def test_paired_difference_cancels_the_items_spread():
    rng = random.Random(1)
    base = [rng.gauss(0, 10) for _ in range(300)]
    better = [x + 0.5 + rng.gauss(0, 0.1) for x in base]
    d = paired_difference(better, base, 2000)
    assert 0.45 < d["ci_low"] < 0.5 < d["ci_high"] < 0.55  # unpaired, the spread of 10 would swamp 0.5
    with pytest.raises(ValueError, match="differ in length"):
        paired_difference([1.0], [1.0, 2.0])


def test_seed_summary_spread():
    s = seed_summary([1.0, 2.0, 3.0])
    assert (s["mean"], s["std"], s["min"], s["max"], s["values"]) == (2.0, 1.0, 1.0, 3.0, [1.0, 2.0, 3.0])
    assert seed_summary([4.0])["std"] == 0.0
    with pytest.raises(ValueError, match="at least one"):
        seed_summary([])
