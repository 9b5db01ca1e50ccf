"""The hybrid router: uncertainty signals, calibration, routing curves and their summaries."""

import math
import random

import pytest
import torch

from lilliput.core.config import preset
from lilliput.core.model import GPT
from lilliput.infer.engine import Engine
from lilliput.infer.router import (EntropyMeter, RoutedEngine, RouterConfig, apgr, call_performance_threshold,
                                   choice_uncertainty, oracle_curve, random_curve, routed_accuracy, routing_curve,
                                   threshold_for_quality, threshold_for_share)
from lilliput.infer.sequence import GenerationConfig


def items(n=200, seed=0):
    """Small right 60%, large right 80%; the small model is less sure where it is wrong."""
    rng = random.Random(seed)
    small = [rng.random() < 0.6 for _ in range(n)]
    large = [s or rng.random() < 0.5 for s in small]
    u = [rng.random() + (0.0 if s else 0.6) for s in small]
    return u, small, large


def test_curve_runs_from_small_to_large_and_oracle_bounds_it():
    u, small, large = items()
    curve, oracle = routing_curve(u, small, large), oracle_curve(small, large)
    a, b = sum(small) / len(small), sum(large) / len(large)
    assert curve[0] == (0.0, pytest.approx(a)) and curve[-1] == (1.0, pytest.approx(b))
    assert all(o[1] >= c[1] - 1e-12 for o, c in zip(oracle, curve))
    assert apgr(random_curve(small, large), a, b) == pytest.approx(0.5)
    assert 0.5 < apgr(curve, a, b) <= apgr(oracle, a, b)
    assert call_performance_threshold(random_curve(small, large), a, b, 0.5) == pytest.approx(0.5)
    # the oracle recovers the whole gap by escalating exactly the items it fixes
    fixable = sum(lc and not sc for sc, lc in zip(small, large)) / len(small)
    assert call_performance_threshold(oracle, a, b, 1.0) == pytest.approx(fixable)


def test_thresholds_hit_their_share_and_quality():
    u, small, large = items()
    for share in (0.0, 0.1, 0.3, 0.5, 1.0):
        assert routed_accuracy(u, small, large, threshold_for_share(u, share))[1] == pytest.approx(share)
    t = threshold_for_quality(u, small, large, retain=0.95)
    acc, share = routed_accuracy(u, small, large, t)
    assert acc >= 0.95 * sum(large) / len(large) and share < 1
    assert routed_accuracy(u, small, large, threshold_for_quality(u, small, large, 0.0))[1] == 0


def test_choice_uncertainty_orders_confident_below_unsure():
    sure, unsure = choice_uncertainty([-0.1, -5.0, -6.0]), choice_uncertainty([-1.0, -1.01, -3.0])
    assert all(sure[k] < unsure[k] for k in ("margin", "entropy", "mean_logprob"))
    with pytest.raises(ValueError):
        choice_uncertainty([0.0])


def test_entropy_meter_leaves_logits_and_measures_uniform():
    m, logits = EntropyMeter(), torch.zeros(256)
    assert m([1], 1, logits) is logits and m.entropies[0] == pytest.approx(math.log(256))


def test_router_escalates_by_threshold(byte_tokenizer, one_thread):
    torch.manual_seed(0)
    small = GPT(preset("tiny")).eval()
    torch.manual_seed(1)
    large = GPT(preset("tiny")).eval()
    cfg = GenerationConfig(max_new_tokens=6)
    want_large = Engine(large, byte_tokenizer).generate(["hello"], cfg)[0].text
    want_small = Engine(small, byte_tokenizer).generate(["hello"], cfg)[0].text
    never = RoutedEngine(Engine(small, byte_tokenizer), Engine(large, byte_tokenizer), RouterConfig(threshold=math.inf))
    always = RoutedEngine(Engine(small, byte_tokenizer), Engine(large, byte_tokenizer), RouterConfig(threshold=-math.inf))
    a, b = never.generate("hello", cfg), always.generate("hello", cfg)
    assert (a.model, a.text) == ("small", want_small) and (b.model, b.text) == ("large", want_large)
    assert set(a.uncertainty) == {"mean_logprob", "min_logprob", "entropy"}
    assert a.uncertainty["min_logprob"] >= a.uncertainty["mean_logprob"] > 0
    with pytest.raises(ValueError, match="signal"):
        RouterConfig(signal="vibes")


def test_rolling_threshold_escalates_its_share_of_a_stream():
    from lilliput.infer.router import RollingThreshold

    rng = random.Random(1)
    rule = RollingThreshold(RouterConfig(escalate=0.25, window=100))
    hits = [rule.escalates(rng.random()) for _ in range(2000)]
    assert 0.2 < sum(hits[100:]) / 1900 < 0.3
    fixed = RollingThreshold(RouterConfig(threshold=0.5))
    assert fixed.escalates(0.6) and not fixed.escalates(0.4)
    with pytest.raises(ValueError, match="not both"):
        RouterConfig(threshold=1.0, escalate=0.3)


def test_learned_signal_finds_the_informative_feature():
    from lilliput.infer.router import fit_signal

    g = torch.Generator().manual_seed(0)
    n = 400
    margin = torch.randn(n, generator=g)
    noise = torch.randn(n, generator=g)
    wrong = (margin + 0.3 * torch.randn(n, generator=g)) > 0  # the small answer is wrong when margin is high
    rows = [{"margin": float(m), "entropy": float(e), "mean_logprob": 0.0} for m, e in zip(margin, noise)]
    sig = fit_signal(rows, [not w for w in wrong.tolist()])
    assert sig.weights[0] > 1.0 and abs(sig.weights[1]) < 0.5 * sig.weights[0]
    u = [sig(r) for r in rows]
    assert all(0 < x < 1 for x in u)
    # it ranks the wrong answers first: their mean uncertainty is far above the right ones'
    wrong_u = [x for x, w in zip(u, wrong.tolist()) if w]
    right_u = [x for x, w in zip(u, wrong.tolist()) if not w]
    assert sum(wrong_u) / len(wrong_u) > sum(right_u) / len(right_u) + 0.5


def _pair(byte_tokenizer, threshold):
    torch.manual_seed(0)
    small = GPT(preset("tiny")).eval()
    torch.manual_seed(1)
    large = GPT(preset("tiny")).eval()
    return RoutedEngine(Engine(small, byte_tokenizer), Engine(large, byte_tokenizer), RouterConfig(threshold=threshold))


@pytest.mark.parametrize("threshold, model", [(math.inf, "small"), (-math.inf, "large")])
def test_routed_engine_streams_only_the_answer_that_stands(byte_tokenizer, one_thread, threshold, model):
    """A small answer's text waits for its verdict; each delta arrives with the log-probabilities of
    the tokens it covers, as when streamed live."""
    routed = _pair(byte_tokenizer, threshold)
    deltas = []
    cfg = GenerationConfig(max_new_tokens=8, ignore_eos=True, logprobs=0)
    [seq] = routed.add_n("route me", cfg, 1, on_text=lambda s, t: deltas.append((s, t, s.streamed)))
    answers = []
    while routed.has_work():
        answers += routed.step()
        if not answers:
            assert all(s is not seq for s, _, _ in deltas)  # the small answer's text waits for its verdict
    [answer] = answers
    assert (answer is seq) == (model == "small") and (answer.origin is seq) == (model == "large")
    assert all(s is answer for s, _, _ in deltas) and "".join(t for _, t, _ in deltas) == answer.text
    assert [n for _, _, n in deltas] == sorted(n for _, _, n in deltas) and deltas[-1][2] == len(answer.output)
    assert routed.stats().running == 0 and not routed._pending and not routed._asked


def test_routed_engine_abort_reaches_the_large_answer(byte_tokenizer, one_thread):
    routed = _pair(byte_tokenizer, -math.inf)
    seq = routed.add("route me", GenerationConfig(max_new_tokens=4))
    while not routed._asked:
        routed.step()
    routed.abort(seq)
    routed.step()
    assert not routed.has_work() and not routed._asked
