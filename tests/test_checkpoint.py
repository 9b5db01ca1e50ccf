import json

import pytest
import torch

from lilliput.core.checkpoint import load_model, save_checkpoint, to_transformers
from lilliput.core.config import ModelConfig


def hf_twin(model):
    return to_transformers(model)


def test_tiny_parity_with_transformers(tiny_model, tiny_config):
    idx = torch.randint(0, tiny_config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(idx), hf_twin(tiny_model)(idx).logits, atol=1e-5, rtol=1e-5)


def test_lilliput_checkpoint_roundtrip(tiny_model, byte_tokenizer, tmp_path):
    out = save_checkpoint(tiny_model, byte_tokenizer, tmp_path / "ckpt")
    assert {"config.json", "model.safetensors", "run.json"} <= {p.name for p in out.iterdir()}
    model, tok = load_model(str(out), device="cpu")
    idx = torch.randint(0, 256, (1, 7))
    torch.testing.assert_close(model(idx), tiny_model(idx))
    assert tok.encode("héllo") == byte_tokenizer.encode("héllo")
    assert json.loads((out / "run.json").read_text())["lilliput"]


def test_save_over_existing_replaces_whole_folder(tiny_model, byte_tokenizer, tmp_path):
    out = tmp_path / "ckpt"
    save_checkpoint(tiny_model, byte_tokenizer, out)
    (out / "stale.txt").write_text("old")
    save_checkpoint(tiny_model, byte_tokenizer, out)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()


def test_hugging_face_folder_loads(tiny_model, byte_tokenizer, tmp_path):
    hf = hf_twin(tiny_model)
    hf.save_pretrained(tmp_path / "hf")
    byte_tokenizer.save(tmp_path / "hf")
    model, _ = load_model(str(tmp_path / "hf"), device="cpu")
    idx = torch.randint(0, 256, (1, 6))
    torch.testing.assert_close(model(idx), tiny_model(idx), atol=1e-5, rtol=1e-5)


def test_bfloat16_on_request(tiny_model, byte_tokenizer, tmp_path):
    save_checkpoint(tiny_model, byte_tokenizer, tmp_path / "c")
    model, _ = load_model(str(tmp_path / "c"), device="cpu", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("make,match", [
    (lambda p: p / "missing.gguf", "not found"),
    (lambda p: (p / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage") and p / "bad.gguf", "corrupt GGUF"),
    (lambda p: (p / "x.gguf").write_bytes(b"hello world, not a model") and p / "x.gguf", "not a GGUF"),
    (lambda p: (p / "w.bin").write_bytes(b"x") and p / "w.bin", "not a model"),
    (lambda p: p, "no config.json"),
])
def test_bad_model_paths_raise_one_clear_error(tmp_path, make, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load_model(str(make(tmp_path)))


def test_corrupt_checkpoint_weights(tiny_model, byte_tokenizer, tmp_path):
    out = save_checkpoint(tiny_model, byte_tokenizer, tmp_path / "c")
    (out / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="safetensors"):
        load_model(str(out))
    cfg = json.loads((out / "config.json").read_text())
    assert ModelConfig.from_dict(cfg["model"]) == tiny_model.config


@pytest.mark.slow
def test_smollm2_gguf_parity_with_transformers(smollm):
    model, tok = smollm
    assert model.config.n_layers == 30 and model.config.vocab_size == 49152
    ids = tok.encode("The quick brown fox jumps over the lazy dog. Paris is the capital of")
    idx = torch.tensor([ids])
    with torch.no_grad():
        ours, theirs = model(idx), hf_twin(model)(idx).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert tok.decode([int(ours[0, -1].argmax())]).strip() == "France"
