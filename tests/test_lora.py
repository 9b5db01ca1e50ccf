"""LoRA and QLoRA (train/lora.py, compress/qlora.py), fine-tuning examples (train/examples.py) and
`lilliput finetune`, on tiny models."""

import json

import pytest
import torch

from lilliput.cli import main
from lilliput.compress.quantize import RTNConfig, quantize_
from lilliput.core.checkpoint import load_model, save_checkpoint
from lilliput.core.model import GPT
from lilliput.train.examples import ExampleBatches, chat_example, make_examples, read_records
from lilliput.train.lora import (LoRAConfig, LoRALinear, add_lora_, base_fingerprint, lora_layers, load_adapters_,
                                 merge_lora_, save_adapters, trainable_parameters)
from lilliput.train.loop import LanguageModeling, TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = LoRAConfig(rank=4, alpha=8.0)


def idx(n=2, t=12, seed=1):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def randomize_(model):
    """Non-zero B everywhere, as after training."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)
    return model


def train_steps(model, steps=3):
    batches = lambda i: {"idx": idx(2, 13, seed=100 + i)}  # noqa: E731
    Trainer(LanguageModeling(model), batches, TrainConfig(lr=1e-2, max_steps=steps, warmup_steps=0,
                                                          progress=False)).fit()


def test_adapters_start_as_identity_and_wrap_the_targets(tiny_model):
    x = idx()
    ref = tiny_model(x)
    add_lora_(tiny_model, CFG)
    layers = lora_layers(tiny_model)
    assert sorted(layers) == sorted(f"layers.{i}.{n}" for i in range(2)
                                    for n in ("mixer.wqkv", "mixer.wo", "ffn.w_gate_up", "ffn.w_down"))
    assert all(float(m.lora_B.detach().abs().sum()) == 0 and float(m.lora_A.detach().abs().sum()) > 0 for m in layers.values())
    torch.testing.assert_close(tiny_model(x), ref, rtol=0, atol=0)
    # r * (in + out) per layer: wqkv 32->64, wo 32->32, gate_up 32->128, down 64->32
    assert trainable_parameters(tiny_model) == 2 * 4 * ((32 + 64) + (32 + 32) + (32 + 128) + (64 + 32))


def test_only_adapters_get_gradients(tiny_model):
    add_lora_(tiny_model, CFG)
    loss, _ = LanguageModeling(tiny_model)({"idx": idx(2, 13)})
    loss.backward()
    with_grad = {n for n, p in tiny_model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, _ in tiny_model.named_parameters() if n.endswith((".lora_A", ".lora_B"))}
    assert all(float(tiny_model.get_parameter(n).grad.abs().sum()) > 0 for n in with_grad if n.endswith("lora_B"))


def test_merged_output_equals_adapter_output(tiny_model):
    x = idx()
    with torch.no_grad():
        plain = tiny_model(x)
    randomize_(add_lora_(tiny_model, CFG))
    with torch.no_grad():
        adapted = tiny_model(x)
        merge_lora_(tiny_model)
        merged = tiny_model(x)
    assert not lora_layers(tiny_model) and type(tiny_model.layers[0].mixer.wqkv) is torch.nn.Linear
    assert tiny_model.lora_merge["max_abs_error"] == 0.0
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5)
    assert float((adapted - plain).abs().max()) > 1e-3  # the adapters do change the output


def test_bad_targets_and_tied_head_are_refused(tiny_model):
    with pytest.raises(ValueError, match="name no layer.*wqkv"):
        add_lora_(tiny_model, LoRAConfig(targets=("q_proj",)))
    with pytest.raises(ValueError, match="tied embeddings"):
        add_lora_(tiny_model, LoRAConfig(targets=("lm_head",)))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoRAConfig(rank=0)


def test_save_load_adapters_round_trip_exactly(tiny_model, tiny_config, tmp_path):
    base = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    fp = base_fingerprint(tiny_model)
    randomize_(add_lora_(tiny_model, CFG))
    assert base_fingerprint(tiny_model) == fp  # adapters are not part of the base
    save_adapters(tiny_model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["base_model"] == fp and cfg["lora"]["rank"] == 4 and len(cfg["layers"]) == 8
    other = GPT.from_state_dict(tiny_config, base)
    load_adapters_(other, tmp_path / "a")
    x = idx()
    with torch.no_grad():
        torch.testing.assert_close(other(x), tiny_model(x), rtol=0, atol=0)
    for n, m in lora_layers(other).items():
        assert torch.equal(m.lora_B, lora_layers(tiny_model)[n].lora_B)
    torch.manual_seed(5)
    with pytest.raises(ValueError, match="were trained on base"):
        load_adapters_(GPT(tiny_config), tmp_path / "a")


def test_qlora_on_int8_base_trains_adapters_only(tiny_model):
    quantize_(tiny_model, RTNConfig(bits=8))
    buffers = {n for n, _ in tiny_model.named_buffers()}  # compared as saved (int8 may be repacked in memory)
    codes = {n: b.clone() for n, b in tiny_model.state_dict().items() if n in buffers}
    floats = {n: p.clone() for n, p in tiny_model.named_parameters()}
    add_lora_(tiny_model, CFG)
    assert isinstance(tiny_model.layers[0].mixer.wqkv, LoRALinear)
    before = {n: p.clone() for n, p in tiny_model.named_parameters() if p.requires_grad}
    train_steps(tiny_model)
    after = tiny_model.state_dict()
    for n, b in codes.items():  # int8 codes and scales: the same bytes
        assert torch.equal(after[n.replace("wqkv.", "wqkv.base.").replace("wo.", "wo.base.")
                                 .replace("w_gate_up.", "w_gate_up.base.").replace("w_down.", "w_down.base.")], b)
    params = dict(tiny_model.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in floats.items())  # embedding and norms frozen
    assert all(not torch.equal(params[n], p) for n, p in before.items() if n.endswith("lora_B"))


@pytest.mark.parametrize("bits", [8, 4])
def test_merging_into_a_quantized_base_rounds_and_says_how_much(tiny_model, bits):
    quantize_(tiny_model, RTNConfig(bits=bits, group_size=32))
    randomize_(add_lora_(tiny_model, CFG))
    x = idx()
    with torch.no_grad():
        adapted = tiny_model(x)
        merge_lora_(tiny_model)
        merged = tiny_model(x)
    report = tiny_model.lora_merge
    assert type(tiny_model.layers[0].ffn.w_down).__name__ == f"Int{bits}Linear"
    # the re-quantized weights deviate from W + BA by up to half a grid step
    assert 1e-4 < report["max_abs_error"] < (0.01 if bits == 8 else 0.05)
    assert 0 < report["relative_error"] < (0.2 if bits == 8 else 1.5)
    assert 0 < float((merged - adapted).abs().max()) < 0.1


def test_merge_dequantize_is_exact(tiny_model):
    quantize_(tiny_model, RTNConfig(bits=8))
    for m in tiny_model.modules():
        if hasattr(m, "kernel_variant"):
            m.kernel_variant = "widen"  # fp32 activations: the "dot" kernel rounds x to int8
    randomize_(add_lora_(tiny_model, CFG))
    x = idx()
    with torch.no_grad():
        adapted = tiny_model(x)
        merge_lora_(tiny_model, dequantize=True)
        merged = tiny_model(x)
    assert type(tiny_model.layers[0].ffn.w_down) is torch.nn.Linear
    assert tiny_model.lora_merge["max_abs_error"] == 0.0
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5)


# --- examples ---------------------------------------------------------------------------------------

CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo!"},
        {"role": "user", "content": "and?"}, {"role": "assistant", "content": "ok"}]


def test_chat_example_masks_the_assistant_turns(byte_tokenizer):
    ex = chat_example(byte_tokenizer, CHAT)
    text = byte_tokenizer.decode(ex.ids)
    assert text == byte_tokenizer.apply_chat_template(CHAT, add_generation_prompt=False)
    target = bytes(i for i, m in zip(ex.ids, ex.mask) if m).decode()
    assert "yo!" in target and "ok" in target and "hi" not in target and "and?" not in target


def test_examples_batches_pad_and_mask(byte_tokenizer, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"messages": CHAT}) + "\n\n" + json.dumps({"text": "abcdefghij" * 3}) + "\n")
    records = read_records(f)
    assert [list(r) for r in records] == [["messages"], ["text"]]
    batches = ExampleBatches(make_examples(byte_tokenizer, records), batch_size=4, seq_len=16, seed=0)
    assert len(batches.chunks) >= 3  # the 30-byte text is cut into 16-token chunks
    b = batches(0)
    assert b["idx"].shape[0] == 4 and b["mask"].shape == (4, b["idx"].shape[1] - 1)
    assert torch.equal(batches(0)["idx"], b["idx"])  # a pure function of the index
    assert b["tokens"] == int((b["idx"] != 0).sum()) or b["tokens"] <= b["idx"].numel()


@pytest.mark.parametrize("line,match", [("nope", "not JSON"), ('{"x": 1}', "expected"),
                                        ('{"messages": [{"role": "user", "content": "q"}]}', "no assistant")])
def test_bad_data_gets_one_clear_line(tmp_path, line, match):
    f = tmp_path / "bad.jsonl"
    f.write_text(line + "\n")
    with pytest.raises(ValueError, match=f"bad.jsonl:1: .*{match}"):
        read_records(f)
    with pytest.raises(FileNotFoundError, match="not found"):
        read_records(tmp_path / "missing.jsonl")


# --- the job ----------------------------------------------------------------------------------------

def test_finetune_job_writes_adapters_and_a_merged_checkpoint(tiny_model, byte_tokenizer, tmp_path, capsys):
    ckpt = save_checkpoint(tiny_model, byte_tokenizer, tmp_path / "tiny")
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"messages": CHAT}) for _ in range(3)) + "\n")
    out = tmp_path / "ft"
    assert main(["finetune", "--model", str(ckpt), "--data", str(data), "--lora-rank", "2", "--out", str(out),
                 "--steps", "2", "--seq-len", "32", "--batch-size", "2", "--eval-passages", "2", "--merge",
                 "--device", "cpu", "--no-progress"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"saved {out}"
    run = json.loads((out / "run.json").read_text())
    assert run["train"]["steps"] == 2 and run["trainable_params"] == 2 * 2 * (96 + 64 + 160 + 96)
    assert run["merge"]["max_abs_error"] == 0.0 and run["heldout_perplexity"]["after"] > 1
    base, _ = load_model(str(ckpt), device="cpu")
    load_adapters_(base, out)
    merged, _ = load_model(str(out / "merged"), device="cpu")
    x = idx()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), base(x), rtol=0, atol=1e-5)
    assert main(["generate", "hi", "--model", str(out / "merged"), "--max-new-tokens", "3", "--no-stream"]) == 0


def test_finetune_job_qlora_and_bad_input(tiny_model, byte_tokenizer, tmp_path, capsys):
    ckpt = save_checkpoint(tiny_model, byte_tokenizer, tmp_path / "tiny")
    data = tmp_path / "t.txt"
    data.write_text("the cat sat on the mat. " * 20)
    out = tmp_path / "q"
    assert main(["finetune", "--model", str(ckpt), "--data", str(data), "--bits", "8", "--out", str(out),
                 "--steps", "1", "--seq-len", "32", "--batch-size", "2", "--eval-passages", "2", "--merge",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "re-quantized" in printed
    run = json.loads((out / "run.json").read_text())
    assert run["label"] == "tiny + int8 RTN + LoRA r8" and run["merge"]["max_abs_error"] > 0
    merged, _ = load_model(str(out / "merged"), device="cpu")
    assert merged.quantization["method"] == "rtn"
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["finetune", "--data", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip() == (f"lilliput: error: {bad}: pass a .jsonl file (chat messages or "
                                               "text), a .txt file or a folder of them")
