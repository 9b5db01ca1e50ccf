"""The batched sampler: one draw for a batch equals each row drawn alone, the draw is exact, and
processors, greedy rows, drawers and dead rows keep their meaning inside a batch."""

import pytest
import torch

from lilliput.infer.sampler import draw, inverse_cdf, probabilities, sample, sample_batch, uniforms
from lilliput.infer.sampling import TokenDrawer
from lilliput.infer.sequence import GenerationConfig, Sequence

V = 50


def seq(seed=0, processors=(), **cfg) -> Sequence:
    s = Sequence(prompt=[1, 2, 3], cfg=GenerationConfig(seed=seed, **cfg), processors=list(processors))
    s.eos = {0}  # what the engine sets when the sequence is added
    return s


def test_inverse_cdf_draws_each_token_with_its_probability():
    torch.manual_seed(0)
    probs = torch.rand(V) ** 4
    probs[[3, 17, 40]] = 0.0  # never drawn
    probs /= probs.sum()
    n = 200_000
    got = inverse_cdf(probs.expand(n, V), torch.rand(n, dtype=torch.float64))
    freq = torch.bincount(got, minlength=V).double() / n
    assert freq[[3, 17, 40]].sum() == 0
    se = (probs.double() * (1 - probs.double()) / n).sqrt()
    assert ((freq - probs.double()).abs() <= 5 * se + 1e-9).all()  # every token within 5 standard errors
    assert inverse_cdf(probs[None], torch.tensor([0.0], dtype=torch.float64)).item() == int((probs > 0).nonzero()[0])
    assert inverse_cdf(probs[None], torch.tensor([1 - 2**-53], dtype=torch.float64)).item() == \
        int((probs > 0).nonzero()[-1])


def test_a_batch_draws_what_each_row_draws_alone():
    torch.manual_seed(1)
    logits = torch.randn(6, V) * 3
    cfgs = [dict(temperature=1.0), dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.8),
            dict(temperature=0.0), dict(temperature=1.0, logprobs=2), dict(temperature=0.7, top_k=5)]
    batch = [seq(seed=10 + i, **c) for i, c in enumerate(cfgs)]
    alone = [seq(seed=10 + i, **c) for i, c in enumerate(cfgs)]
    for _ in range(20):  # generators advance alike
        got = sample_batch(batch, logits)
        assert got == [sample(s, logits[i]) for i, s in enumerate(alone)]
    assert batch[3].logprobs == [] and batch[4].logprobs == alone[4].logprobs and len(batch[4].logprobs) == 20
    s = seq(seed=3, temperature=1.0)
    assert draw(s, probabilities(s.cfg, logits[0])) == sample(seq(seed=3, temperature=1.0), logits[0])


def test_logprobs_are_recorded_from_the_processed_logits():
    logits = torch.randn(2, V)
    a, b = seq(seed=1, temperature=1.0, logprobs=3), seq(seed=2, temperature=0.0, logprobs=1)
    toks = sample_batch([a, b], logits)
    lp = torch.log_softmax(logits, -1)
    assert a.logprobs[0]["token"] == toks[0] and a.logprobs[0]["logprob"] == pytest.approx(float(lp[0, toks[0]]))
    assert toks[1] == int(logits[1].argmax()) and len(b.logprobs[0]["top"]) == 1


class Ban:
    """Allows only the tokens in `keep` (None: nothing)."""

    def __init__(self, keep):
        self.keep = keep

    def __call__(self, ids, prompt_len, logits):
        out = torch.full_like(logits, float("-inf"))
        if self.keep is not None:
            out[self.keep] = logits[self.keep]
        return out


class Fixed(TokenDrawer):
    def draw(self, ids, prompt_len, probs, generator):
        assert probs.shape == (V,) and abs(float(probs.sum()) - 1) < 1e-5
        return 7


def test_processors_drawers_and_dead_rows_inside_a_batch():
    logits = torch.randn(4, V).expand(4, V)  # an expanded view, as the engine passes followers: left untouched
    before = logits.clone()
    rows = [seq(seed=1, temperature=1.0, processors=[Ban([4, 9])]), seq(seed=2, temperature=1.0),
            seq(seed=3, temperature=0.0, processors=[Ban(None)]), seq(seed=4, temperature=1.0, processors=[Fixed()])]
    for _ in range(10):
        got = sample_batch(rows, logits)
        assert got[0] in (4, 9) and got[1] is not None and got[2] is None and got[3] == 7
    assert torch.equal(logits, before)


def test_uniforms_come_from_each_sequences_generator():
    a, b = seq(seed=5), seq(seed=5)
    assert torch.equal(uniforms([a, seq(seed=6)])[:1], uniforms([b]))


def test_inverse_cdf_across_blocks_and_at_the_edges():
    from lilliput.infer.sampler import BLOCK

    V = 3 * BLOCK + 17  # padded to whole blocks
    probs = torch.zeros(2, V)
    probs[0, [5, BLOCK + 3, V - 1]] = torch.tensor([0.25, 0.5, 0.25])
    probs[1, 2 * BLOCK] = 1.0  # the rest 0: every u lands on it
    u = torch.tensor([0.1, 0.0], dtype=torch.float64)
    assert inverse_cdf(probs, u).tolist() == [5, 2 * BLOCK]
    assert inverse_cdf(probs, torch.tensor([0.5, 0.99], dtype=torch.float64)).tolist() == [BLOCK + 3, 2 * BLOCK]
    assert inverse_cdf(probs, torch.tensor([0.8, 1.0], dtype=torch.float64)).tolist() == [V - 1, 2 * BLOCK]
    tiny = torch.zeros(1, V)
    tiny[0, [0, V - 2]] = torch.tensor([1.0, 1e-30])  # a token far below float32's spacing at 1 still counts
    assert inverse_cdf(tiny, torch.tensor([1 - 1e-31], dtype=torch.float64)).item() in (0, V - 2)
