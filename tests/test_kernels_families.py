"""The fused C step on every model family: tiny random specimens that transformers builds from its
own config classes (lilliput.eval.zoo), converted to lilliput, run by the C step and by the torch
modules over the same fp32 cache."""

import functools
import warnings

import pytest
import torch

from lilliput.core.config import ModelConfig
from lilliput.core.model import GPT
from lilliput.infer import kernels
from lilliput.infer.engine import Engine, EngineConfig
from lilliput.infer.fused import FusedStep, fast_path_reason
from lilliput.infer.sequence import GenerationConfig

pytest.importorskip("transformers")
zoo = pytest.importorskip("lilliput.eval.zoo")
pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C kernel on this machine")
FAMILIES = sorted(zoo.TINY)


@functools.cache
def specimen(name: str) -> GPT:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' notes about the specimens' rope parameters
        return zoo.to_lilliput(zoo.hf_model(name), name)


@pytest.fixture(autouse=True)
def single_torch_thread():
    """The kernels' pool owns the cores (as in the engine); torch's threads would only contend."""
    with kernels.decode_threads():
        yield


@pytest.mark.parametrize("name", FAMILIES)
@torch.inference_mode()
def test_fused_step_matches_torch_path(name):
    """3 prompt tokens, a 5-token chunk in one call, then one token per call up to 40 positions:
    longer than the sliding windows (8) and than Phi-3's original context (32, LongRoPE's switch)."""
    model = specimen(name)
    assert fast_path_reason(model) == ""
    step = FusedStep.for_model(model)
    L = min(40, model.config.max_seq_len)
    assert zoo.WINDOW < L
    idx = torch.randint(0, model.config.vocab_size, (1, L), generator=torch.Generator().manual_seed(1))
    ref_state, state = model.new_state(1, L, dtype=torch.float32), model.new_state(1, L, dtype=torch.float32)
    model(idx[:, :3], ref_state), model(idx[:, :3], state)
    worst = 0.0
    for chunk in [list(range(3, 8))] + [[t] for t in range(8, L)]:
        ref = model(idx[:, chunk], ref_state)[0]  # (T, V)
        got = step(state, idx[0, chunk].tolist(), [0] * len(chunk))
        worst = max(worst, (got - ref).abs().max().item())
    assert worst <= 1e-4, f"{name}: max |logits diff| {worst:.2e}"
    for a, b in zip(ref_state.layers, state.layers):  # the caches the two paths wrote agree too
        torch.testing.assert_close(b.k[:, :, :L], a.k[:, :, :L], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_tokens_identical_through_engine(name, byte_tokenizer, monkeypatch):
    model = specimen(name)
    cfg = GenerationConfig(max_new_tokens=32, ignore_eos=True)
    engine_cfg = EngineConfig(max_batch=2, kv_dtype="float32")
    prompts = ["A window", "x"]  # + 32 tokens: within the shortest specimen context (48)
    engine = Engine(model, byte_tokenizer, engine_cfg)
    assert engine.runner.fused is not None
    fast = [s.output for s in engine.generate(prompts, cfg)]
    monkeypatch.setattr(FusedStep, "for_model", classmethod(lambda cls, m: None))
    slow = [s.output for s in Engine(model, byte_tokenizer, engine_cfg).generate(prompts, cfg)]
    assert fast == slow and len(fast[0]) == 32


@pytest.mark.parametrize("name", ["gemma2", "qwen3_moe", "phi3", "llama-dynamic"])
@torch.inference_mode()
def test_a_batch_of_rows_equals_each_row_alone(name):
    """Rows of different lengths in one call (several tokens of one row among them) give each row
    what it gets alone: per row, the same arithmetic (MoE experts see a different set of tokens), and
    its own rotary frequencies where they depend on the length (the 31-token row passes Phi-3's
    original context of 32 and the dynamic specimen's 24; the others do not)."""
    model = specimen(name)
    step = FusedStep.for_model(model)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 256, (1, n), generator=g) for n in (3, 9, 31)]
    nxt = torch.randint(0, 256, (4,), generator=g).tolist()
    together = model.new_state(3, 40, dtype=torch.float32)
    for r, p in enumerate(prompts):
        model(p, together, rows=[r])
    got = step(together, [nxt[0], nxt[1], nxt[2], nxt[3]], [0, 1, 2, 2]).clone()
    for r, p in enumerate(prompts):
        alone = model.new_state(1, 40, dtype=torch.float32)
        model(p, alone)
        toks = [nxt[r]] if r < 2 else nxt[2:]
        want = step(alone, toks, [0] * len(toks))
        idx = [r] if r < 2 else [2, 3]
        torch.testing.assert_close(got[idx], want, atol=1e-5, rtol=1e-5)


def test_fast_path_reason_names_what_cannot_run(tiny_model):
    assert fast_path_reason(tiny_model) == ""
    hybrid = GPT(ModelConfig(vocab_size=256, dim=32, n_layers=2, n_heads=2, max_seq_len=64,
                             layer_mixers=("attention", "mamba")))
    assert fast_path_reason(hybrid) == ""
    hybrid.layers[1].mixer = torch.nn.Identity()  # not the Mamba the config names
    assert "Mamba" in fast_path_reason(hybrid) and FusedStep.for_model(hybrid) is None
    capped = GPT(ModelConfig(vocab_size=256, dim=32, n_layers=1, n_heads=2, max_seq_len=64, ffn="moe",
                             moe_experts=2, moe_top_k=1, moe_capacity=1.0))
    assert "capacity" in fast_path_reason(capped)
    tiny_model.layers[0].mixer.wo = torch.nn.Linear(32, 32).half()  # fp16: no descriptor
    assert "layers.0.mixer.wo" in fast_path_reason(tiny_model)


def test_runner_says_once_why_the_torch_modules_run(tiny_model):
    from lilliput.infer.runner import ModelRunner

    assert ModelRunner(tiny_model, 1, 16, torch.float32).fused_reason == ""
    assert "bfloat16" in ModelRunner(tiny_model, 1, 16, torch.bfloat16).fused_reason
    hybrid = GPT(ModelConfig(vocab_size=256, dim=32, n_layers=2, n_heads=2, max_seq_len=64,
                             layer_mixers=("attention", "mamba")))
    assert ModelRunner(hybrid, 1, 16).fused_reason == ""
    hybrid.layers[1].mixer.in_proj.half()  # fp16: no descriptor
    assert "layers.1.mixer.in_proj" in ModelRunner(hybrid, 1, 16).fused_reason
