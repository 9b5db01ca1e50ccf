import math

import pytest
import torch

from lilliput.infer.engine import Engine, EngineConfig
from lilliput.infer.search import (SearchConfig, best_of_n, choose, majority_vote, mean_logprob, sample_n,
                                   weighted_vote)
from lilliput.infer.sequence import GenerationConfig


def test_votes():
    assert majority_vote(["7", None, "3", "7", "3", "7"]) == "7"
    assert majority_vote(["a", "b"]) == "a" and majority_vote([None, None]) is None
    assert weighted_vote(["a", "b", "b"], [0.9, 0.3, 0.3]) == "a"
    assert weighted_vote(["a", "b", "b"], [0.5, 0.3, 0.3]) == "b"
    with pytest.raises(ValueError, match="unknown method"):
        SearchConfig(method="beam")


def test_samples_share_one_prefill_and_score_themselves(tiny_model, byte_tokenizer, one_thread):
    engine = Engine(tiny_model, byte_tokenizer, EngineConfig(max_batch=6))
    cfg = GenerationConfig(max_new_tokens=8, temperature=1.0, seed=11, ignore_eos=True)
    seqs = sample_n(engine, "pick one", cfg, 6)
    assert len(seqs) == 6 and all(len(s.output) == 8 for s in seqs)
    assert len({tuple(s.output) for s in seqs}) > 1
    # the recorded log-probabilities are the model's own
    s = seqs[3]
    ids = s.prompt + s.output
    with torch.no_grad():
        lp = torch.log_softmax(tiny_model(torch.tensor([ids]))[0, len(s.prompt) - 1:-1], -1)
    want = float(lp[torch.arange(8), torch.tensor(s.output)].mean())
    assert mean_logprob(s) == pytest.approx(want, abs=1e-4)
    assert best_of_n(seqs) is max(seqs, key=mean_logprob)
    # a verifier picks what it likes
    target = seqs[2].output[0]
    assert choose(seqs, "best_of_n", score=lambda q: float(q.output[0] == target)).output[0] == target
    picked = choose(seqs, "vote", extract=lambda t: t[:1])
    assert [q.text[:1] for q in seqs].count(picked.text[:1]) == max(
        [q.text[:1] for q in seqs].count(x) for x in {q.text[:1] for q in seqs})
    assert mean_logprob(type(s)(prompt=[1], cfg=cfg)) == -math.inf


def test_too_many_samples_for_the_engine(tiny_model, byte_tokenizer):
    with pytest.raises(ValueError, match="max_batch"):
        sample_n(Engine(tiny_model, byte_tokenizer, EngineConfig(max_batch=2)), "x", GenerationConfig(), 3)
