"""Mamba, mLSTM, MoE and hybrid models through the rest of lilliput: the engine (batched greedy,
verify + commit), checkpoints, quantization."""

import pytest
import torch

from lilliput.core import families
from lilliput.compress.quantize import RTNConfig, quantize_
from lilliput.core.checkpoint import load_folder, save_checkpoint
from lilliput.core.config import ModelConfig, preset
from lilliput.core.model import GPT
from lilliput.infer.engine import Engine, EngineConfig
from lilliput.infer.generate import GenerationConfig, generate

ARCHS = ["mamba-tiny", "xlstm-tiny", "moe-tiny", "hybrid-tiny"]


def model_of(name):
    torch.manual_seed(0)
    model = GPT(preset(name)).eval()
    with torch.no_grad():  # larger than the 0.02 init, so greedy tokens depend on the context
        for n, p in model.named_parameters():
            if p.dim() == 2 and "router" not in n:
                p.normal_(0, 0.2)
    return model


def naive_greedy(model, ids, n):
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[-n:]


@pytest.mark.parametrize("name", ARCHS)
def test_config_round_trips_and_refuses_llama_export(name):
    cfg = preset(name)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="only attention|does not fit the llama family"):
        families.hf_config(cfg)


def test_hybrid_puts_attention_every_fourth_layer():
    model = GPT(preset("hybrid-tiny"))
    assert [type(b.mixer).__name__ for b in model.layers] == ["Mamba", "Mamba", "Mamba", "Attention"]


@pytest.mark.parametrize("name", ARCHS)
def test_batched_generation_equals_naive_greedy(name, byte_tokenizer, one_thread):
    model = model_of(name)
    prompts = ["a", "a much longer prompt here, over sixteen tokens", "mid size"]
    cfg = GenerationConfig(max_new_tokens=6, ignore_eos=True)
    out = generate(model, byte_tokenizer, prompts, cfg)
    for p, g in zip(prompts, out):
        assert g.tokens == naive_greedy(model, byte_tokenizer.encode(p), 6)


@pytest.mark.parametrize("name", ["mamba-tiny", "xlstm-tiny", "hybrid-tiny"])
def test_verify_and_commit_rewind_a_recurrent_state(name, byte_tokenizer, one_thread):
    model = model_of(name)
    prompt = byte_tokenizer.encode("verify me")
    ref = naive_greedy(model, prompt, 10)
    engine = Engine(model, byte_tokenizer)
    seq = engine.add(prompt, GenerationConfig(max_new_tokens=10, ignore_eos=True))
    engine.step()
    draft = ref[1:4] + [(ref[4] + 1) % 256, 0]  # three right, then two wrong
    greedy = engine.verify(seq, draft).argmax(-1).tolist()
    assert greedy[:4] == ref[1:5]
    engine.commit(seq, draft[:3] + [greedy[3]])
    assert engine.state.lengths[seq.row] == len(seq.tokens) - 1 == seq.computed
    engine.run()
    assert seq.output == ref


@pytest.mark.parametrize("name", ["mamba-tiny", "xlstm-tiny"])
def test_continuous_batching_reuses_rows_of_a_recurrent_model(name, byte_tokenizer, one_thread):
    """More requests than rows, prompts sharing prefixes with what freed rows held."""
    model = model_of(name)
    prompts = ["a", "a much longer prompt", "abc", "a much longer prompt than that", "q"]
    engine = Engine(model, byte_tokenizer, EngineConfig(max_batch=2, prefill_chunk=8))
    seqs = [engine.add(p, GenerationConfig(max_new_tokens=3 + i, ignore_eos=True)) for i, p in enumerate(prompts)]
    engine.run()
    for p, s in zip(prompts, seqs):
        assert s.output == naive_greedy(model, byte_tokenizer.encode(p), len(s.output))


@pytest.mark.parametrize("name", ARCHS)
def test_checkpoint_round_trip(name, byte_tokenizer, tmp_path):
    model = model_of(name)
    folder = save_checkpoint(model, byte_tokenizer, tmp_path / name)
    loaded, _ = load_folder(folder)
    assert loaded.config == model.config
    idx = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), model(idx), rtol=0, atol=0)


def test_rtn_int8_quantizes_the_linear_layers_of_a_mamba_model(byte_tokenizer, tmp_path):
    model = model_of("mamba-tiny")
    idx = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        ref = model(idx)
    quantize_(model, RTNConfig(bits=8))
    mixer = model.layers[0].mixer
    assert not isinstance(mixer.in_proj, torch.nn.Linear) and not isinstance(mixer.out_proj, torch.nn.Linear)
    assert isinstance(mixer.A_log, torch.nn.Parameter)  # the SSD's own parameters stay float
    with torch.no_grad():
        out = model(idx)
        sqnr = 10 * torch.log10(ref.pow(2).mean() / (out - ref).pow(2).mean())
    assert sqnr > 25
    loaded, _ = load_folder(save_checkpoint(model, byte_tokenizer, tmp_path / "q8"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ARCHS)
def test_a_few_steps_of_training_lower_the_loss(name):
    from lilliput.core.moe import moe_aux_loss

    torch.manual_seed(0)
    model = GPT(preset(name))
    idx = torch.randint(0, 256, (2, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        logits = model(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
        losses.append(loss.item())
        opt.zero_grad()
        (loss + moe_aux_loss(model)).backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
    assert losses[-1] < losses[0] - 0.1


@pytest.mark.parametrize("name", ARCHS)
def test_perplexity_with_sliding_windows_is_finite(name, byte_tokenizer):
    from lilliput.eval.perplexity import PerplexityConfig, perplexity

    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune."
    out = perplexity(model_of(name), byte_tokenizer, text, PerplexityConfig(window=32, stride=16, batch_size=2))
    assert out["tokens"] == len(text) - 1 and 1 < out["perplexity"] < float("inf")


@pytest.mark.parametrize("name", ARCHS)
def test_cli_info_generate_and_eval_on_a_saved_model(name, byte_tokenizer, tmp_path, monkeypatch, capsys):
    import json

    from lilliput.cli import main
    from lilliput.eval.task_sets import Item
    from lilliput.eval.tasks import TASKS, Task

    ckpt = str(save_checkpoint(model_of(name), byte_tokenizer, tmp_path / name))
    assert main(["info", "--model", ckpt, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["name"] == name
    assert (info["active_parameters"] < info["parameters"]) == (name == "moe-tiny")
    assert main(["generate", "hello", "--model", ckpt, "--max-new-tokens", "4"]) == 0
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat. " * 6)
    capsys.readouterr()
    assert main(["eval", "ppl", str(text), "--model", ckpt, "--window", "32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] > 1
    monkeypatch.setitem(TASKS, "toy", Task(lambda n: [Item("Q:", ("yes", "no"), 0)] * (n or 2)))
    assert main(["eval", "tasks", "--tasks", "toy", "--model", ckpt, "--batch-size", "2", "--limit", "2"]) == 0


def test_quantized_moe_keeps_its_total_and_active_parameter_counts():
    from lilliput.eval.efficiency import active_parameter_count, parameter_count

    model = model_of("moe-tiny")
    before = parameter_count(model), active_parameter_count(model)
    quantize_(model, RTNConfig(bits=8))
    assert not isinstance(model.layers[0].ffn.experts[0].w_down, torch.nn.Linear)
    assert (parameter_count(model), active_parameter_count(model)) == before


def test_fork_of_a_recurrent_model_equals_its_seed_alone(byte_tokenizer, one_thread):
    model = model_of("mamba-tiny")
    prompt = byte_tokenizer.encode("fork this prompt")
    engine = Engine(model, byte_tokenizer, EngineConfig(max_batch=3))
    cfg = GenerationConfig(max_new_tokens=6, temperature=1.0, seed=3, ignore_eos=True)
    seq = engine.add(prompt, cfg)
    engine.step()
    forks = engine.fork(seq, 2)
    engine.run()
    alone = Engine(model, byte_tokenizer).generate([prompt], GenerationConfig(
        max_new_tokens=6, temperature=1.0, seed=4, ignore_eos=True))[0].output
    assert forks[0].output == alone


def test_decode_state_says_which_lengths_a_recurrent_row_can_rewind_to():
    model = model_of("hybrid-tiny")
    state = model.new_state(1, 64)
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 30)), state)  # keeps positions 14..30
        model(torch.randint(0, 256, (1, 1)), state)  # keeps 30..31
    assert [state.can_truncate(0, n) for n in (0, 14, 29, 30, 31, 32)] == [True, False, False, True, True, False]
    with pytest.raises(ValueError, match="cannot rewind the mamba state of row 0 from 31 to 29"):
        state.truncate(0, 29)


def test_bench_measures_a_hybrid_model(byte_tokenizer, tmp_path):
    from lilliput.eval.bench import BenchConfig, run_bench

    save_checkpoint(model_of("hybrid-tiny"), byte_tokenizer, tmp_path / "hybrid")
    cfg = BenchConfig(models=(str(tmp_path / "hybrid"),), out=str(tmp_path / "out"), passages=1, ppl_window=64,
                      tasks=("piqa",), task_limit=1, prompt_lengths=(8,), batch_sizes=(2,), throughput_prompt=8,
                      new_tokens=3, warmup=0, repeats=1, threads=1)
    m = run_bench(cfg)["models"][0]
    assert m["memory"]["kv_bytes_per_token"] == 2 * 2 * 8 * 4  # the one attention layer
    assert m["memory"]["state_bytes_per_sequence"] == 3 * (4 * 16 * 16 + 3 * 96) * 4  # three mamba layers
    assert m["perplexity"]["perplexity"] > 1 and m["tasks"]["piqa"]["n"] == 1
