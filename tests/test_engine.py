import pytest
import torch

from lilliput.compress import qlinear as ql
from lilliput.compress.quantize import Grid, RTNConfig, quantize_
from lilliput.infer import kernels
from lilliput.infer.engine import Engine, EngineConfig
from lilliput.infer.fused import FusedStep
from lilliput.infer.sampling import LogitsProcessor
from lilliput.infer.sequence import GenerationConfig, Status

needs_kernel = pytest.mark.skipif(not kernels.available(), reason="no C kernel on this machine")


def naive_greedy(model, ids, n):
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[-n:]


PROMPTS = ["a", "a much longer prompt than the others here", "mid size", "xyz xyz", "q", "another one!"]


def test_continuous_batching_gives_each_row_its_own_greedy_tokens(tiny_model, byte_tokenizer, one_thread):
    """More requests than rows, of mixed prompt and output lengths: each equals its greedy run alone."""
    engine = Engine(tiny_model, byte_tokenizer, EngineConfig(max_batch=3, prefill_chunk=8))
    mixed, calls = engine.runner.mixed, []
    engine.runner.mixed = lambda work: calls.append(len(work)) or mixed(work)
    seqs = [engine.add(p, GenerationConfig(max_new_tokens=4 + 3 * i, ignore_eos=True)) for i, p in enumerate(PROMPTS)]
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
        assert len(engine.scheduler.running) <= 3
    for i, (p, s) in enumerate(zip(PROMPTS, seqs)):
        assert s.output == naive_greedy(tiny_model, byte_tokenizer.encode(p), 4 + 3 * i), p
        assert s.finish_reason == "length" and s.status is Status.FINISHED
    assert steps < sum(4 + 3 * i for i in range(len(PROMPTS)))  # batched, not one after another
    assert bool(calls) == (engine.runner.fused is not None)  # decode and prompt chunks in one C call


def test_seeded_sampling_does_not_depend_on_the_batch(tiny_model, byte_tokenizer, one_thread):
    cfg = GenerationConfig(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=7, ignore_eos=True)
    alone = Engine(tiny_model, byte_tokenizer, EngineConfig(max_batch=1)).generate(["abc"], cfg)[0].output
    engine = Engine(tiny_model, byte_tokenizer, EngineConfig(max_batch=4))
    others = [engine.add(p, GenerationConfig(max_new_tokens=9, temperature=1.3, seed=i)) for i, p in
              enumerate(["zz", "long prompt first"])]
    engine.step()
    ours = engine.add("abc", cfg)  # joins while the others decode
    engine.add("late", GenerationConfig(max_new_tokens=3))
    engine.run()
    assert ours.output == alone and all(o.finished for o in others)


def test_prefill_chunks_bound_the_stall(tiny_model, byte_tokenizer, one_thread):
    engine = Engine(tiny_model, byte_tokenizer, EngineConfig(max_batch=2, prefill_chunk=5))
    short = engine.add("hi", GenerationConfig(max_new_tokens=30, ignore_eos=True))
    engine.step()  # short is prefilled and has its first token
    long_prompt = "a long prompt of many tokens " * 3
    long = engine.add(long_prompt, GenerationConfig(max_new_tokens=3, ignore_eos=True))
    n0 = len(short.output)
    for _ in range(4):  # the long prompt takes ceil(87 / 5) steps to prefill...
        engine.step()
    assert long.status is Status.PREFILL and long.computed == 20
    assert len(short.output) == n0 + 4  # ...while short decodes a token every step
    engine.run()
    assert long.output == naive_greedy(tiny_model, byte_tokenizer.encode(long_prompt), 3)


def test_logprobs_and_processors(tiny_model, byte_tokenizer, one_thread):
    class Ban(LogitsProcessor):
        def __init__(self, token):
            self.token = token

        def __call__(self, ids, prompt_len, logits):
            logits[self.token] = float("-inf")
            return logits

    prompt = byte_tokenizer.encode("xyz")
    free = naive_greedy(tiny_model, prompt, 6)
    engine = Engine(tiny_model, byte_tokenizer)
    seq = engine.add(prompt, GenerationConfig(max_new_tokens=6, logprobs=3, ignore_eos=True), [Ban(free[0])])
    engine.run()
    assert seq.output[0] != free[0] and free[0] not in seq.output
    ids = prompt + seq.output
    with torch.no_grad():
        logits = tiny_model(torch.tensor([ids]))[0, len(prompt) - 1:-1]  # (6, V): the step logits
    logits[:, free[0]] = float("-inf")
    lp = torch.log_softmax(logits, -1)
    for i, rec in enumerate(seq.logprobs):
        assert rec["token"] == seq.output[i]
        assert rec["logprob"] == pytest.approx(float(lp[i, seq.output[i]]), abs=1e-4)
        assert [t for t, _ in rec["top"]] == lp[i].topk(3).indices.tolist()


def test_verify_and_commit_rewind_to_accepted_tokens(tiny_model, byte_tokenizer, one_thread):
    prompt = byte_tokenizer.encode("verify me")
    ref = naive_greedy(tiny_model, prompt, 12)
    engine = Engine(tiny_model, byte_tokenizer)
    seq = engine.add(prompt, GenerationConfig(max_new_tokens=12, ignore_eos=True))
    engine.step()  # prefill + first token
    draft = ref[1:4] + [0, 0]  # three right, then two wrong
    logits = engine.verify(seq, draft)
    assert logits.shape == (6, tiny_model.config.vocab_size)
    greedy = logits.argmax(-1).tolist()
    assert greedy[:4] == ref[1:5]  # one forward gives the next token after each drafted prefix
    engine.commit(seq, draft[:3] + [greedy[3]])  # accept 3 drafts + the model's 4th
    assert engine.state.lengths[seq.row] == len(seq.tokens) - 1 == seq.computed
    engine.run()
    assert seq.output == ref


def test_fork_shares_one_prefill(tiny_model, byte_tokenizer, one_thread):
    prompt = byte_tokenizer.encode("fork this prompt")
    engine = Engine(tiny_model, byte_tokenizer, EngineConfig(max_batch=4))
    cfg = GenerationConfig(max_new_tokens=8, temperature=1.0, seed=3, ignore_eos=True)
    seq = engine.add(prompt, cfg)
    engine.step()
    forks = engine.fork(seq, 3)
    engine.run()
    outs = [s.output for s in [seq, *forks]]
    assert len({tuple(o) for o in outs}) > 1  # different seeds, different samples
    # a fork's tokens are what its own seed gives alone
    alone = Engine(tiny_model, byte_tokenizer).generate([prompt], GenerationConfig(
        max_new_tokens=8, temperature=1.0, seed=4, ignore_eos=True))[0].output
    assert forks[0].output == alone


def test_abort_frees_the_row(tiny_model, byte_tokenizer, one_thread):
    engine = Engine(tiny_model, byte_tokenizer, EngineConfig(max_batch=1))
    first = engine.add("one", GenerationConfig(max_new_tokens=50, ignore_eos=True))
    second = engine.add("two", GenerationConfig(max_new_tokens=2, ignore_eos=True))
    engine.step()
    engine.abort(first)
    engine.run()
    assert first.finish_reason == "abort" and second.output and second.finish_reason == "length"


def test_requests_past_the_context_are_refused(tiny_model, byte_tokenizer):
    engine = Engine(tiny_model, byte_tokenizer, EngineConfig(max_len=32))
    with pytest.raises(ValueError, match="exceeds the model's context of 32"):
        engine.add("x" * 30, GenerationConfig(max_new_tokens=5))
    with pytest.raises(ValueError, match="max_batch"):
        EngineConfig(max_batch=0)
    with pytest.raises(ValueError, match="kv_dtype must be"):
        EngineConfig(kv_dtype="int8")


@pytest.mark.parametrize("kv", ["float32", "float16"])
def test_cache_dtype_is_the_configured_one(tiny_model, byte_tokenizer, kv):
    engine = Engine(tiny_model, byte_tokenizer, EngineConfig(kv_dtype=kv))
    assert engine.state.layers[0].k.dtype == getattr(torch, kv)
    out = engine.generate(["kv cache"], GenerationConfig(max_new_tokens=6, ignore_eos=True))[0]
    assert len(out.output) == 6


@needs_kernel
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_rows_do_not_depend_on_the_batch(bits):
    """qlinear_run_rows: B rows in one weight pass give exactly what each row gives alone."""
    torch.manual_seed(0)
    w = torch.randn(48, 256)
    layer = Grid.fit(w, bits, 256 if bits == 8 else 64).module(w)
    x = torch.randn(8, 256)
    together = layer(x)  # one pass over the weights
    alone = torch.cat([layer(x[i:i + 1]) for i in range(8)])
    assert torch.equal(together, alone)
    ref = x[:8] @ layer.dequantize().T
    assert (together - ref).abs().max() < 0.02 * ref.abs().max()


@needs_kernel
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_fused_batch_matches_torch_path(tiny_model, byte_tokenizer, bits, one_thread, monkeypatch):
    model = quantize_(tiny_model, RTNConfig(bits=bits, group_size=32)) if bits else tiny_model
    if bits:
        for m in model.modules():
            if isinstance(m, ql.QuantLinear):
                m.kernel_variant = "widen"  # float x: compare with the torch modules tightly
    assert FusedStep.for_model(model) is not None
    cfg = GenerationConfig(max_new_tokens=10, ignore_eos=True)
    fast = [s.output for s in Engine(model, byte_tokenizer, EngineConfig(max_batch=4)).generate(PROMPTS[:4], cfg)]
    monkeypatch.setattr(FusedStep, "for_model", classmethod(lambda cls, m: None))
    slow = [s.output for s in Engine(model, byte_tokenizer, EngineConfig(max_batch=4)).generate(PROMPTS[:4], cfg)]
    assert fast == slow


def test_prefix_cache_reuses_a_shared_prompt_prefix(tiny_model, byte_tokenizer, one_thread):
    system = "You are a terse assistant. Answer in one word. "
    cfg = GenerationConfig(max_new_tokens=5, ignore_eos=True)
    engine = Engine(tiny_model, byte_tokenizer, EngineConfig(max_batch=2))
    first = engine.generate([system + "Q: sky?"], cfg)[0]
    assert first.cached_tokens == 0
    again = engine.add(system + "Q: grass?", cfg)  # the freed row still holds the system prompt
    running = engine.add(system + "Q: sea?", cfg)  # copies the prefix from the running row
    engine.run()
    assert again.cached_tokens == len(system) + 3 and running.cached_tokens >= len(system)
    for s in (first, again, running):
        assert s.output == naive_greedy(tiny_model, s.prompt, 5)
    off = Engine(tiny_model, byte_tokenizer, EngineConfig(max_batch=2, prefix_cache=False))
    off.generate([system + "x"], cfg)
    assert off.generate([system + "y"], cfg)[0].cached_tokens == 0


def test_add_n_shares_one_prefill_and_the_first_logits(tiny_model, byte_tokenizer, one_thread, monkeypatch):
    prompt = "n samples of one prompt"
    cfg = GenerationConfig(max_new_tokens=6, temperature=1.0, seed=20, ignore_eos=True)
    engine = Engine(tiny_model, byte_tokenizer, EngineConfig(max_batch=4, prefix_cache=False))
    prefilled = []
    extend = engine.runner.extend
    monkeypatch.setattr(engine.runner, "extend", lambda row, toks, logits="last": prefilled.append(len(toks))
                        or extend(row, toks, logits))
    seqs = engine.add_n(prompt, cfg, 4)
    engine.run()
    assert prefilled == [len(prompt)]  # one prefill for the four samples, no token run twice
    for i, s in enumerate(seqs):
        alone = Engine(tiny_model, byte_tokenizer).generate([prompt], GenerationConfig(
            max_new_tokens=6, temperature=1.0, seed=20 + i, ignore_eos=True))[0]
        assert s.output == alone.output
    with pytest.raises(ValueError, match="max_batch"):
        engine.add_n(prompt, cfg, 5)


def test_a_processor_that_allows_nothing_ends_the_sequence(tiny_model, byte_tokenizer):
    class StopAfter(LogitsProcessor):
        def __call__(self, ids, prompt_len, logits):
            return torch.full_like(logits, float("-inf")) if len(ids) - prompt_len >= 3 else logits

    engine = Engine(tiny_model, byte_tokenizer)
    seq = engine.add("abc", GenerationConfig(max_new_tokens=10, logprobs=1, ignore_eos=True), [StopAfter()])
    engine.run()
    assert len(seq.output) == 3 and seq.finish_reason == "stop" and len(seq.logprobs) == 3


def test_stats_and_the_row_pool_follow_the_requests(tiny_model, byte_tokenizer, one_thread):
    """The statistics are public; a finished row remembers its tokens and gives them to the next
    prompt that starts the same (the pool, owned by the scheduler)."""
    engine = Engine(tiny_model, byte_tokenizer, EngineConfig(max_batch=2))
    cfg = GenerationConfig(max_new_tokens=3, ignore_eos=True)
    first = [engine.add(p, cfg) for p in ("shared prefix, one", "other", "third")]
    s = engine.stats()
    assert (s.waiting, s.running, s.decoding) == (3, 0, 0)
    engine.step()
    s = engine.stats()
    assert (s.waiting, s.running, s.decoding) == (1, 2, 2)
    engine.run()
    assert engine.stats().running == 0 and sorted(engine.scheduler.pool.free) == [0, 1]
    again = engine.add("shared prefix, two", cfg)
    engine.run()
    assert again.cached_tokens == len("shared prefix, ") and again.row == first[0].row


def test_bf16_prompt_chunks_run_in_the_c_step_where_the_cpu_has_no_bf16_arithmetic():
    """torch's bf16 products are ~15x slower than the C step on AVX2 CPUs: long chunks stay in C there."""
    from lilliput.infer import kernels
    from lilliput.infer.runner import FUSED_EXTEND_MAX, ModelRunner

    torch.manual_seed(0)
    from lilliput.core.config import preset
    from lilliput.core.model import GPT

    runner = ModelRunner(GPT(preset("tiny")).eval().to(torch.bfloat16), rows=2, max_len=128)
    if runner.fused is None:
        pytest.skip(runner.fused_reason)
    native_bf16 = kernels.cpu_has("avx512_bf16", "amx_bf16")
    assert runner.bf16_in_c is not native_bf16
    assert runner.can_mix(FUSED_EXTEND_MAX * 4) is not native_bf16
    fp32 = ModelRunner(GPT(preset("tiny")).eval(), rows=2, max_len=128)
    assert not fp32.bf16_in_c and fp32.can_mix(FUSED_EXTEND_MAX * 4) is fp32.fused.one_pass
