import pytest
import torch

from lilliput.infer.engine import Engine, EngineConfig
from lilliput.infer.sequence import GenerationConfig
from lilliput.infer.speculative import DraftModel, PromptLookup, SpeculationConfig, SpeculativeDecoder


def test_prompt_lookup_proposes_what_followed_the_last_ngram(tiny_model, byte_tokenizer):
    engine = Engine(tiny_model, byte_tokenizer)
    seq = engine.add("the cat sat. the cat", GenerationConfig(max_new_tokens=1))
    draft, q = PromptLookup(max_ngram=3).propose(seq, 4)
    assert byte_tokenizer.decode(draft) == " sat" and q is None
    assert PromptLookup().propose(engine.add("abcdef", GenerationConfig(max_new_tokens=1)), 4) == ([], None)


def test_prompt_lookup_index_proposes_what_a_scan_finds():
    """The n-gram index against the plain definition: the latest earlier occurrence of the longest tail."""
    import random

    def scan(ids, k, max_n=3):
        for n in range(min(max_n, len(ids) - 1), 0, -1):
            for start in range(len(ids) - n - 1, -1, -1):
                if ids[start:start + n] == ids[len(ids) - n:]:
                    return ids[start + n:start + n + k]
        return []

    class Seq:
        tokens: list

    rng = random.Random(0)
    for vocab in (3, 40, 5000):
        seq, lookup = Seq(), PromptLookup()
        seq.tokens = []
        for _ in range(300):
            seq.tokens.append(rng.randrange(vocab))
            assert lookup.propose(seq, 4) == (scan(seq.tokens, 4), None)
        seq.tokens = seq.tokens[:50] + [1, 2, 3]  # tokens that differ from those indexed: indexed again
        assert lookup.propose(seq, 2) == (scan(seq.tokens, 2), None)


@pytest.mark.parametrize("drafter", ["lookup", "draft"])
@pytest.mark.parametrize("adaptive", [True, False])
def test_greedy_speculation_is_token_identical(tiny_model, byte_tokenizer, one_thread, drafter, adaptive):
    prompts = ["abc abc abc abc", "the quick brown fox, the quick brown", "zq"]
    cfg = GenerationConfig(max_new_tokens=40, ignore_eos=True)
    plain = Engine(tiny_model, byte_tokenizer).generate(prompts, cfg)
    engine = Engine(tiny_model, byte_tokenizer)
    torch.manual_seed(1)
    from lilliput.core.model import GPT
    draft = PromptLookup() if drafter == "lookup" else DraftModel(GPT(tiny_model.config).eval(), engine)
    dec = SpeculativeDecoder(engine, draft, SpeculationConfig(k=3, adaptive=adaptive))
    for p, ref in zip(prompts, plain):
        assert dec.generate(p, cfg).output == ref.output
    assert dec.stats.verifications > 0


def test_self_draft_accepts_everything(tiny_model, byte_tokenizer, one_thread):
    """The target as its own drafter: every drafted token is accepted."""
    engine = Engine(tiny_model, byte_tokenizer)
    dec = SpeculativeDecoder(engine, DraftModel(tiny_model, engine), SpeculationConfig(k=4, adaptive=False))
    seq = dec.generate("hello", GenerationConfig(max_new_tokens=21, ignore_eos=True))
    assert len(seq.output) == 21 and dec.stats.acceptance_rate == 1.0
    assert dec.stats.mean_accepted_length == 5.0


def test_adaptive_counts_the_drafting_time(tiny_model, byte_tokenizer, one_thread):
    """A drafter that is always right but slower than the target's own steps never pays: the adaptive
    controller must see its cost (drafting + verifying) and decode plainly nearly all the time."""
    import time

    class Slow(DraftModel):
        def propose(self, seq, k):
            time.sleep(0.02 * k)  # a draft step far dearer than the tiny target's
            return super().propose(seq, k)

    engine = Engine(tiny_model, byte_tokenizer)
    dec = SpeculativeDecoder(engine, Slow(tiny_model, engine), SpeculationConfig(k=2, retry_every=50))
    dec.generate("hello", GenerationConfig(max_new_tokens=60, ignore_eos=True))
    assert dec.stats.plain_steps > 4 * dec.stats.verifications


def test_a_draft_model_reads_the_prompt_before_the_first_token_and_keeps_it_as_a_prefix(tiny_model, byte_tokenizer,
                                                                                         one_thread):
    seen = []

    class Watched(DraftModel):
        def sync(self, seq):
            seen.append((seq.first_token_at, len(seq.tokens), self.behind(seq)))
            super().sync(seq)

        def propose(self, seq, k):
            if len(seq.output) > 6:
                raise RuntimeError("drafter broke")
            return super().propose(seq, k)

    engine = Engine(tiny_model, byte_tokenizer)
    drafter = Watched(tiny_model, engine)
    dec = SpeculativeDecoder(engine, drafter, SpeculationConfig(k=2, adaptive=False))
    prompt = byte_tokenizer.encode("hello there")
    seq = dec.generate(prompt, GenerationConfig(max_new_tokens=4, ignore_eos=True))
    assert seen[0] == (None, len(prompt), len(prompt) - 1)  # the whole prompt (but its last token), up front
    assert len(seq.output) == 4 and drafter.rows == {}
    seen.clear()
    again = dec.generate(prompt + byte_tokenizer.encode("!"), GenerationConfig(max_new_tokens=4, ignore_eos=True))
    assert seen[0] == (None, len(prompt) + 1, 0) and again.output  # the row kept the prompt: nothing more to read
    with pytest.raises(RuntimeError, match="drafter broke"):
        dec.generate("hello", GenerationConfig(max_new_tokens=20, ignore_eos=True))
    assert drafter.rows == {}  # its row is free again
    for row, known in drafter.known.items():  # and what the draft says it holds is what its state holds
        assert drafter.runner.state.lengths[row] == len(known)


def controller(**kw) -> SpeculativeDecoder:
    """A decoder whose measured costs are set by hand: t_step 10 ms a plain token; drafting and verifying
    k tokens 10 ms + 2 ms a drafted token."""
    dec = SpeculativeDecoder.__new__(SpeculativeDecoder)
    SpeculativeDecoder.__init__(dec, None, PromptLookup(), SpeculationConfig(k=2, retry_every=10, **kw))
    dec.t_step, dec.t_verify, dec.alpha = 0.010, {1: 0.012, 8: 0.026}, 0.6
    return dec


def test_a_retry_must_pay_for_catching_the_drafter_up():
    dec = controller()
    dec.t_catch_up = 0.001  # 1 ms a token left behind
    assert dec._choose(behind=0) > 0  # k=2: ~1.4x plain at alpha 0.6
    assert dec._choose(behind=20) > 0  # 20 ms of catching up: the next 10 tokens still gain more
    dec.t_catch_up = 0.005
    assert dec._choose(behind=20) == 0  # 100 ms of catching up outweighs the ~30 ms gained over the next 10 tokens


def test_the_first_verification_drafts_one_token_with_a_model_and_k_with_a_free_drafter(tiny_model, byte_tokenizer,
                                                                                         one_thread):
    asked = []

    class Watched(DraftModel):
        def propose(self, seq, k):
            asked.append(k)
            return super().propose(seq, k)

    class WatchedLookup(PromptLookup):
        def propose(self, seq, k):
            asked.append(k)
            return super().propose(seq, k)

    engine = Engine(tiny_model, byte_tokenizer)
    cfg = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    SpeculativeDecoder(engine, Watched(tiny_model, engine), SpeculationConfig(k=4)).generate("hello", cfg)
    assert asked[0] == 1  # a model's cost is measured on one drafted token
    asked.clear()
    SpeculativeDecoder(engine, WatchedLookup(), SpeculationConfig(k=4)).generate("ab ab ab ab ab", cfg)
    assert asked[0] == 4


def test_one_measured_k_extrapolates_from_a_plain_step():
    dec = controller()
    dec.t_verify = {1: 0.014}  # a plain step (10 ms) and 4 ms per drafted token beyond it
    for k, seconds in [(2, 0.018), (4, 0.026), (8, 0.042)]:
        assert dec._expected_rate(k) == pytest.approx((1 - 0.6 ** (k + 1)) / 0.4 / seconds)
    dec.t_verify = {3: 0.008}  # measured below a plain step: that cost for every k
    assert dec._expected_rate(6) == pytest.approx((1 - 0.6 ** 7) / 0.4 / 0.008)


def test_the_acceptance_rate_is_learnt_in_a_few_verifications(tiny_model, byte_tokenizer, one_thread):
    """A drafter that is always wrong: the optimistic prior (0.7) weighs as one verification, so three
    rejections bring the running rate below 0.2 (an EMA of weight 0.1 alone would still be near 0.5)."""

    class Wrong(PromptLookup):
        def propose(self, seq, k):
            return [(seq.tokens[-1] + 1) % 256] * k, None  # not what the tiny model says (accepted == 0 below)

    engine = Engine(tiny_model, byte_tokenizer)
    dec = SpeculativeDecoder(engine, Wrong(), SpeculationConfig(k=2, retry_every=1000))
    dec.t_step, dec.t_verify = 1.0, {1: 0.1, 2: 0.1}  # speculation looks cheap: it keeps trying while alpha is high
    dec.generate("hello", GenerationConfig(max_new_tokens=4, ignore_eos=True))
    assert dec.stats.accepted == 0 and dec.stats.verifications == 3
    assert dec.alpha < 0.2


def test_retries_that_do_not_pay_back_off():
    dec = controller()
    dec.alpha, dec.t_verify = 0.0, {1: 0.05}  # nothing accepted, and drafting is dear: plain decoding pays
    stretches = []
    for _ in range(5):
        assert dec._choose() == 0
        stretches.append(dec._off_for)
        while dec._off_for:
            assert dec._choose() == 0
        dec.alpha = 0.0  # the retry failed again
    assert stretches == [10, 20, 40, 80, 80]


def first_token_counts(model, tok, speculate: bool, n: int, prompt="ab") -> torch.Tensor:
    """Empirical distribution of the 2nd generated token (the first one that can be drafted)."""
    from lilliput.core.model import GPT

    counts = torch.zeros(model.config.vocab_size)
    engine = Engine(model, tok)
    torch.manual_seed(5)
    dec = SpeculativeDecoder(engine, DraftModel(GPT(model.config).eval(), engine),
                             SpeculationConfig(k=2, adaptive=False))
    for s in range(n):
        cfg = GenerationConfig(max_new_tokens=2, temperature=1.0, seed=s, ignore_eos=True)
        out = dec.generate(prompt, cfg).output if speculate else engine.generate([prompt], cfg)[0].output
        counts[out[1]] += 1
    return counts


def test_speculative_sampling_follows_the_target_distribution(one_thread):
    """Rejection sampling with a bad drafter: the 2nd token's histogram matches the target's exact
    distribution within a chi-square bound (the distribution is computed, not sampled)."""
    from lilliput.core.config import ModelConfig
    from lilliput.core.model import GPT
    from lilliput.core.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=64)
    model = GPT(cfg).eval()
    with torch.no_grad():  # a peaked, low-entropy target over a handful of tokens
        model.lm_head.weight.mul_(40)
    tok = ByteTokenizer()
    n = 1500
    spec = first_token_counts(model, tok, True, n)
    # exact target distribution of token 2 given token 1 ~ p(.|prompt): sum over token 1
    ids = tok.encode("ab")
    with torch.no_grad():
        p1 = model(torch.tensor([ids]))[0, -1].softmax(-1)
        top1 = p1.topk(20)
        p2 = torch.zeros(cfg.vocab_size)
        for pr, t in zip(top1.values, top1.indices):
            p2 += pr * model(torch.tensor([ids + [int(t)]]))[0, -1].softmax(-1)
        p2 /= top1.values.sum()
    keep = p2 * n >= 5  # chi-square over cells with enough expected counts, the rest pooled
    exp = torch.cat([p2[keep] * n, (p2[~keep].sum() * n)[None]])
    obs = torch.cat([spec[keep], spec[~keep].sum()[None]])
    chi2 = float(((obs - exp) ** 2 / exp.clamp(min=1e-9)).sum())
    dof = int(keep.sum())
    assert chi2 < dof + 4 * (2 * dof) ** 0.5 + 10, (chi2, dof)  # ~4 sigma above the mean


def test_bad_configs_and_busy_engine(tiny_model, byte_tokenizer):
    with pytest.raises(ValueError, match="k_max"):
        SpeculationConfig(k=9, k_max=8)
    engine = Engine(tiny_model, byte_tokenizer, EngineConfig(max_batch=2))
    engine.add("busy", GenerationConfig(max_new_tokens=3))
    with pytest.raises(ValueError, match="one sequence at a time"):
        SpeculativeDecoder(engine, PromptLookup()).generate("x", GenerationConfig(max_new_tokens=3))
    from lilliput.core.config import preset
    from lilliput.core.model import GPT
    with pytest.raises(ValueError, match="vocabulary"):
        DraftModel(GPT(preset("tiny").replace(vocab_size=300)), engine)


@pytest.mark.slow
def test_smollm2_greedy_speculation_is_token_identical(smollm):
    """The real model, prompts of several kinds, both drafters: the target's own greedy tokens."""
    import copy

    from lilliput.compress.quantize import RTNConfig, quantize_

    model, tok = smollm
    prompts = [tok.apply_chat_template([{"role": "user", "content": "Give me three tips for sleeping well."}]),
               "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
               "Text: The river Thames flows through London and into the North Sea.\n"
               "Rewrite the text in the past tense: The river Thames"]
    cfg = GenerationConfig(max_new_tokens=40, ignore_eos=True)
    plain = [Engine(model, tok).generate([p], cfg, bos=False)[0].output for p in prompts]
    engine = Engine(model, tok)
    draft = quantize_(copy.deepcopy(model), RTNConfig(bits=4, group_size=64))
    for drafter in (PromptLookup(), DraftModel(draft, engine)):
        dec = SpeculativeDecoder(engine, drafter, SpeculationConfig(k=4, adaptive=False))
        assert [dec.generate(p, cfg, bos=False).output for p in prompts] == plain
        assert dec.stats.accepted > 0


def test_speculation_records_the_engines_log_probabilities(tiny_model, byte_tokenizer, one_thread):
    """Verification samples and records through the engine's sampler: the same tokens, the same
    log-probabilities, one record per output token."""
    cfg = GenerationConfig(max_new_tokens=24, ignore_eos=True, logprobs=2)
    [plain] = Engine(tiny_model, byte_tokenizer).generate(["abc abc abc abc"], cfg)
    seq = SpeculativeDecoder(Engine(tiny_model, byte_tokenizer), PromptLookup(),
                             SpeculationConfig(k=3, adaptive=False)).generate("abc abc abc abc", cfg)
    assert seq.output == plain.output and len(seq.logprobs) >= len(seq.output)
    for a, b in zip(seq.logprobs[:len(seq.output)], plain.logprobs):
        assert a["token"] == b["token"] and a["logprob"] == pytest.approx(b["logprob"], abs=1e-4)
        assert [t for t, _ in a["top"]] == [t for t, _ in b["top"]]
