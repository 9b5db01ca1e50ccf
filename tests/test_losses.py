import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from lilliput.train.losses import (
    TopK, cross_entropy, divergence, forward_kl, generalized_jsd, reverse_kl, total_variation,
)


def _logits(seed, shape=(2, 3, 7)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd", "tvd"])
def test_identical_logits_give_zero(name):
    x = _logits(0)
    assert divergence(name, x, x.clone(), temperature=2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_hand_computed_two_outcomes():
    # P = (0.75, 0.25), Q = (0.5, 0.5)
    p = torch.log(torch.tensor([[[0.75, 0.25]]]))
    q = torch.zeros(1, 1, 2)
    fkl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    rkl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    m = (0.625, 0.375)
    jsd = 0.5 * (0.75 * math.log(0.75 / m[0]) + 0.25 * math.log(0.25 / m[1])) \
        + 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1]))
    assert forward_kl(q, p).item() == pytest.approx(fkl, rel=1e-5)
    assert reverse_kl(q, p).item() == pytest.approx(rkl, rel=1e-5)
    assert generalized_jsd(q, p, beta=0.5).item() == pytest.approx(jsd, rel=1e-5)
    assert total_variation(q, p).item() == pytest.approx(0.25, rel=1e-5)
    # beta = 0.9: M = 0.9 P + 0.1 Q
    m9 = (0.9 * 0.75 + 0.05, 0.9 * 0.25 + 0.05)
    j9 = 0.9 * (0.75 * math.log(0.75 / m9[0]) + 0.25 * math.log(0.25 / m9[1])) \
        + 0.1 * (0.5 * math.log(0.5 / m9[0]) + 0.5 * math.log(0.5 / m9[1]))
    assert generalized_jsd(q, p, beta=0.9).item() == pytest.approx(j9, rel=1e-5)


def test_jsd_endpoints_and_symmetry():
    s, t = _logits(1), _logits(2)
    assert_close(generalized_jsd(s, t, beta=0.0), forward_kl(s, t))
    assert_close(generalized_jsd(s, t, beta=1.0), reverse_kl(s, t))
    assert_close(generalized_jsd(s, t, beta=0.5), generalized_jsd(t, s, beta=0.5))
    # near the ends the mixture formula approaches beta * FKL and (1 - beta) * RKL
    assert generalized_jsd(s, t, beta=1e-4).item() / 1e-4 == pytest.approx(forward_kl(s, t).item(), rel=1e-2)
    assert generalized_jsd(s, t, beta=1 - 1e-4).item() / 1e-4 == pytest.approx(reverse_kl(s, t).item(), rel=1e-2)
    assert 0 <= generalized_jsd(s, t, beta=0.5).item() <= math.log(2)


def test_matches_torch_kl_div_and_temperature_scaling():
    s, t = _logits(3), _logits(4)
    ref = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="none").sum(-1).mean()
    assert_close(forward_kl(s, t, temperature=2.0), 4 * ref)


def test_mask_selects_positions():
    s, t = _logits(5), _logits(6)
    mask = torch.tensor([[1, 0, 0], [0, 0, 1]], dtype=torch.bool)
    per = [forward_kl(s[b:b + 1, i:i + 1], t[b:b + 1, i:i + 1]) for b, i in ((0, 0), (1, 2))]
    assert_close(forward_kl(s, t, mask), (per[0] + per[1]) / 2)


def test_cross_entropy_matches_torch():
    x = _logits(7)
    y = torch.randint(0, 7, (2, 3), generator=torch.Generator().manual_seed(0))
    assert_close(cross_entropy(x, y), F.cross_entropy(x.view(-1, 7), y.view(-1)))
    # uniform logits: log V
    assert cross_entropy(torch.zeros(1, 4, 7), torch.zeros(1, 4, dtype=torch.long)).item() == pytest.approx(math.log(7))


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd", "tvd"])
def test_gradients_finite(name):
    s = _logits(8).requires_grad_()
    t = _logits(9) * 10  # peaked teacher
    divergence(name, s, t, temperature=0.5, beta=0.3).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def _topk(t, k):
    lp = F.log_softmax(t, -1)
    v, i = lp.topk(k, -1)
    return TopK(i, v)


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd", "tvd"])
def test_topk_teacher(name):
    t = _logits(10)
    # identical model: zero; full k (+ an empty rest bucket): equals the dense divergence
    assert divergence(name, t, _topk(t, 3)).item() == pytest.approx(0.0, abs=1e-5)
    s = _logits(11)
    assert divergence(name, s, _topk(t, 7)).item() == pytest.approx(divergence(name, s, t).item(), abs=1e-4)
    # coarse-graining never exceeds the full divergence (data-processing inequality)
    assert divergence(name, s, _topk(t, 3)).item() <= divergence(name, s, t).item() + 1e-6


def test_topk_rest_bucket_constrains_tail():
    # teacher puts 0.9 on token 0; a student that moves its mass outside the top-1 is penalised
    t = torch.log(torch.tensor([[[0.9, 0.05, 0.05]]]))
    k1 = _topk(t, 1)
    good = t.clone()
    bad = torch.log(torch.tensor([[[0.1, 0.45, 0.45]]]))
    assert forward_kl(good, k1).item() == pytest.approx(0.0, abs=1e-6)
    expected = 0.9 * math.log(0.9 / 0.1) + 0.1 * math.log(0.1 / 0.9)
    assert forward_kl(bad, k1).item() == pytest.approx(expected, rel=1e-4)


def test_bad_arguments():
    x = _logits(0)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(x, x, beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        forward_kl(x, x, temperature=0)
    with pytest.raises(ValueError, match="unknown distillation loss"):
        divergence("kl", x, x)
    with pytest.raises(ValueError, match="shape"):
        forward_kl(x, x[..., :5])
