import pytest
import torch

from lilliput.core.checkpoint import to_transformers
from lilliput.infer import kernels
from lilliput.infer.fastpath import accelerate_
from lilliput.infer.fused import FusedStep
from lilliput.infer.generate import GenerationConfig, generate

needs_kernel = pytest.mark.skipif(not kernels.available(), reason="no C kernel on this machine")


def fused_vs_torch(model, steps=6, prompt_len=5, kv=torch.float32):
    c = model.config
    idx = torch.randint(0, c.vocab_size, (1, prompt_len + steps))
    ref = model(idx)[0].float()  # (T, V) uncached forward
    state = model.new_state(1, 32, dtype=kv)
    model(idx[:, :prompt_len], state)
    step = FusedStep.for_model(model)
    got = [step(state, [int(idx[0, t])], [0]).clone()[0] for t in range(prompt_len, prompt_len + steps)]
    return torch.stack(got), ref[prompt_len:]


@needs_kernel
@torch.inference_mode()
def test_fused_step_matches_model_fp32(tiny_model):
    got, ref = fused_vs_torch(tiny_model)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@needs_kernel
@torch.inference_mode()
def test_fused_step_fp16_cache(tiny_model):
    step = FusedStep.for_model(tiny_model)
    if not step.kv_f16:
        pytest.skip("no F16C in this build")
    got, ref = fused_vs_torch(tiny_model, steps=12, kv=torch.float16)
    assert (got - ref).abs().max() < 2e-3 * ref.abs().max()  # keys and values rounded to fp16 only
    # the torch modules over the same fp16 cache agree with the step to float rounding
    idx = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(3))
    a, b = tiny_model.new_state(1, 16, dtype=torch.float16), tiny_model.new_state(1, 16, dtype=torch.float16)
    tiny_model(idx[:, :4], a), tiny_model(idx[:, :4], b)
    for t in range(4, 9):
        torch.testing.assert_close(step(a, [int(idx[0, t])], [0]).clone(), tiny_model(idx[:, t:t + 1], b)[:, -1],
                                   atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(a.layers[0].k.float(), b.layers[0].k.float(), atol=1e-3, rtol=1e-3)  # <= 1 ulp


@needs_kernel
@torch.inference_mode()
def test_fused_step_bf16_weights(tiny_model):
    got, ref = fused_vs_torch(tiny_model.to(torch.bfloat16))
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()


@needs_kernel
def test_fused_step_declines_what_it_cannot_run(tiny_model):
    assert FusedStep.for_model(tiny_model) is not None
    tiny_model.layers[0].ffn.w_down = torch.nn.Sequential(tiny_model.layers[0].ffn.w_down)
    assert FusedStep.for_model(tiny_model) is None


def test_generation_identical_without_kernels(tiny_model, byte_tokenizer, monkeypatch):
    cfg = GenerationConfig(max_new_tokens=12)
    fast = generate(tiny_model, byte_tokenizer, ["kernel check"], cfg)[0].tokens
    monkeypatch.setattr(kernels.build, "load", lambda: "disabled for the test")
    assert FusedStep.for_model(tiny_model) is None
    assert generate(tiny_model, byte_tokenizer, ["kernel check"], cfg)[0].tokens == fast


@needs_kernel
@torch.inference_mode()
def test_rmsnorm_kernel_matches_module(tiny_model):
    norm = tiny_model.layers[0].attn_norm
    norm.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(3, 1, tiny_model.config.dim)
    expected = norm(x)
    accelerate_(tiny_model)
    torch.testing.assert_close(norm(x), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_smollm2_greedy_tokens_match_transformers(smollm):
    model, tok = smollm
    prompt = tok.encode("It is a truth universally acknowledged, that a single man in possession")
    ours = generate(model, tok, [prompt], GenerationConfig(max_new_tokens=24, ignore_eos=True))[0].tokens
    hf = to_transformers(model)
    hf.generation_config.eos_token_id = None
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        theirs = hf.generate(ids, max_new_tokens=24, do_sample=False, attention_mask=torch.ones_like(ids),
                             pad_token_id=tok.eos_id)[0, len(prompt):].tolist()
    assert ours == theirs
