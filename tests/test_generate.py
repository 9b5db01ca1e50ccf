import pytest
import torch

from lilliput.infer.generate import GenerationConfig, chat, generate
from lilliput.infer.sampling import RepetitionPenalty, top_k_filter, top_p_filter


def naive_greedy(model, ids, n):
    ids = list(ids)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[-n:]


def test_greedy_matches_uncached_argmax(tiny_model, byte_tokenizer):
    prompt = "hello world"
    g = generate(tiny_model, byte_tokenizer, [prompt], GenerationConfig(max_new_tokens=12))[0]
    assert g.tokens == naive_greedy(tiny_model, byte_tokenizer.encode(prompt), 12)
    assert g.finish_reason == "length" and g.prompt_tokens == len(prompt)


def test_batched_prompts_of_different_lengths_match_single(tiny_model, byte_tokenizer):
    prompts = ["a", "a much longer prompt here", "mid size"]
    cfg = GenerationConfig(max_new_tokens=8)
    batched = generate(tiny_model, byte_tokenizer, prompts, cfg)
    for p, g in zip(prompts, batched):
        assert g.tokens == generate(tiny_model, byte_tokenizer, [p], cfg)[0].tokens


def test_seeded_sampling_repeats_and_differs_across_seeds(tiny_model, byte_tokenizer):
    cfg = GenerationConfig(max_new_tokens=16, temperature=1.5, seed=1)
    a = generate(tiny_model, byte_tokenizer, "abc", cfg)[0].tokens
    assert a == generate(tiny_model, byte_tokenizer, "abc", cfg)[0].tokens
    others = {tuple(generate(tiny_model, byte_tokenizer, "abc", GenerationConfig(
        max_new_tokens=16, temperature=1.5, seed=s))[0].tokens) for s in range(2, 6)}
    assert others - {tuple(a)}


def test_top_k_one_and_tiny_top_p_are_greedy(tiny_model, byte_tokenizer):
    greedy = generate(tiny_model, byte_tokenizer, "xyz", GenerationConfig(max_new_tokens=10))[0].tokens
    for cfg in (GenerationConfig(max_new_tokens=10, temperature=1.0, top_k=1, seed=0),
                GenerationConfig(max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=0)):
        assert generate(tiny_model, byte_tokenizer, "xyz", cfg)[0].tokens == greedy


def test_stop_string_and_streaming(tiny_model, byte_tokenizer):
    full = generate(tiny_model, byte_tokenizer, "q", GenerationConfig(max_new_tokens=20))[0].text
    stop = full[5:7]
    pieces = []
    g = generate(tiny_model, byte_tokenizer, "q", GenerationConfig(max_new_tokens=20, stop=(stop,)),
                 on_text=lambda row, d: pieces.append(d))[0]
    assert g.text == full[:full.find(stop)] and g.finish_reason == "stop"
    assert "".join(pieces) == g.text


def test_eos_ends_generation(tiny_model, byte_tokenizer):
    first = generate(tiny_model, byte_tokenizer, "q", GenerationConfig(max_new_tokens=5))[0].tokens
    byte_tokenizer.eos_id = first[2]
    byte_tokenizer.eos_ids = {first[2]}
    g = generate(tiny_model, byte_tokenizer, "q", GenerationConfig(max_new_tokens=5))[0]
    assert g.tokens == first[:first.index(first[2])] and g.finish_reason == "stop"
    assert generate(tiny_model, byte_tokenizer, "q", GenerationConfig(max_new_tokens=5, ignore_eos=True))[0].tokens == first


def test_chat_uses_template(tiny_model, byte_tokenizer):
    g = chat(tiny_model, byte_tokenizer, [{"role": "user", "content": "hi"}], GenerationConfig(max_new_tokens=3))
    assert g.prompt_tokens == len(byte_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]).encode())


@pytest.mark.parametrize("bad", [dict(max_new_tokens=-1), dict(temperature=-1), dict(top_k=0), dict(top_p=0),
                                 dict(repetition_penalty=0)])
def test_bad_generation_config(bad):
    with pytest.raises(ValueError):
        GenerationConfig(**bad)


def test_context_overflow_and_empty_prompt(tiny_model, byte_tokenizer):
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate(tiny_model, byte_tokenizer, "x" * 250, GenerationConfig(max_new_tokens=10))
    with pytest.raises(ValueError, match="empty"):
        generate(tiny_model, byte_tokenizer, [""], GenerationConfig())


def test_repetition_penalty_is_ctrl_rule():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    out = RepetitionPenalty(2.0)([0, 1, 0], 2, logits)  # tokens 0 and 1 seen (prompt and output alike)
    torch.testing.assert_close(out, torch.tensor([1.0, -4.0, 1.0, 0.5]))


def test_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(top_k_filter(logits, 2)).tolist() == [[False, False, True, True]]
    # probabilities ~ [.64, .24, .09, .03]: p=0.8 keeps the first two
    assert torch.isinf(top_p_filter(logits, 0.8)).tolist() == [[False, False, True, True]]


@pytest.mark.gpu
def test_cuda_generation_matches_cpu(tiny_model, byte_tokenizer):
    cfg = GenerationConfig(max_new_tokens=10)
    cpu = generate(tiny_model, byte_tokenizer, ["gpu check", "b"], cfg)
    gpu = generate(tiny_model.to("cuda"), byte_tokenizer, ["gpu check", "b"], cfg)
    assert [g.tokens for g in gpu] == [g.tokens for g in cpu]
