import math
from collections import Counter

import pytest
import torch

from lilliput.eval.diversity import distinct_n, ngrams, tail_coverage, unigram_entropy, unigram_kl


def test_distinct_n_counts_unique_over_all():
    assert distinct_n([[1, 2, 1, 2]], 1) == 2 / 4
    assert distinct_n([[1, 2, 1, 2]], 2) == 2 / 3  # (1,2) (2,1) (1,2)
    assert distinct_n([[1, 2], [2, 1]], 2) == 1.0  # n-grams never cross samples
    assert distinct_n([[1]], 2) == 0.0
    assert distinct_n([torch.tensor([5, 5, 5])], 1) == 1 / 3


def test_entropy_of_uniform_and_constant():
    assert unigram_entropy([0, 1, 2, 3]) == pytest.approx(2.0)
    assert unigram_entropy([7, 7, 7]) == 0.0
    assert unigram_entropy(Counter({0: 1, 1: 1})) == pytest.approx(1.0)


def test_kl_zero_for_equal_distributions_and_positive_otherwise():
    assert unigram_kl([0, 1, 2, 0], [2, 1, 0, 0]) == pytest.approx(0.0, abs=1e-12)
    # with alpha smoothing: p = (2.5, 0.5)/3, q = (0.5, 2.5)/3
    p, q = [2.5 / 3, 0.5 / 3], [0.5 / 3, 2.5 / 3]
    expected = sum(a * math.log2(a / b) for a, b in zip(p, q))
    assert unigram_kl([0, 0], [1, 1]) == pytest.approx(expected)
    with pytest.raises(ValueError, match="alpha"):
        unigram_kl([0], [0], alpha=0)


def test_tail_coverage_sees_only_the_rare_half():
    reference = [[1] * 10 + [2] * 5 + [3, 4]]  # distinct: 3 and 4 are the rare half
    assert tail_coverage([[1, 2]], reference) == 0.0
    assert tail_coverage([[3]], reference) == 0.5
    assert tail_coverage([[3, 4, 1]], reference) == 1.0
    assert tail_coverage([[1, 2, 3, 4]], reference, tail=1.0) == 1.0
    assert ngrams([1, 2, 3], 2) == [(1, 2), (2, 3)]
