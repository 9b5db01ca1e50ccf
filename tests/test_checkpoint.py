import json
from pathlib import Path

import pytest
import torch

from lilliput.core import families
from lilliput.core.checkpoint import load_model, save_checkpoint, to_hf_state_dict, to_transformers
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


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_loaded_weights_are_in_memory_not_a_mapping_of_the_file(tiny_model, byte_tokenizer, tmp_path):
    """A mapped file's pages become resident as they are first read: a server's RSS grew with each new
    token id's embedding row (issue 22)."""
    out = save_checkpoint(tiny_model, byte_tokenizer, tmp_path / "ckpt")
    model, _ = load_model(str(out), device="cpu")
    weights = str((out / "model.safetensors").resolve())
    assert not [line for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith(weights)]
    assert model.tok_emb.weight.shape == tiny_model.tok_emb.weight.shape


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


def write_hf_folder(folder, model, config_changes=None, extra=None):
    """A Hugging Face folder (config.json + model.safetensors) of `model`, edited as asked."""
    from safetensors.torch import save_file

    folder.mkdir()
    config = {**families.hf_config(model.config), **(config_changes or {})}
    (folder / "config.json").write_text(json.dumps(config))
    weights = {k: v.clone() for k, v in to_hf_state_dict(model).items()}  # lm_head shares tok_emb
    save_file({**weights, **(extra or {})}, folder / "model.safetensors")
    return folder


def qkv_biases(config):
    q, kv = config.n_heads * config.hd, config.n_kv_heads * config.hd
    return {f"model.layers.{i}.self_attn.{n}_proj.bias": torch.randn(size)
            for i in range(config.n_layers) for n, size in (("q", q), ("k", kv), ("v", kv))}


@pytest.mark.parametrize("changes,extra,match", [
    # a Llama-typed folder whose weights carry biases its config.json does not announce
    ({}, "qkv", r"6 tensors lilliput cannot use \(model\.layers\.\*\.self_attn\.k_proj\.bias, "
                r"model\.layers\.\*\.self_attn\.q_proj\.bias, model\.layers\.\*\.self_attn\.v_proj\.bias\)"),
    ({}, {"model.layers.0.mlp.down_proj.bias": torch.zeros(32)}, r"1 tensors .*down_proj\.bias.*not a llama model"),
    # biases announced but missing from the weights
    ({"attention_bias": True}, None, r"lack model\.layers\.0\.self_attn\.q_proj\.bias"),
    ({"mlp_bias": True}, None, r"lack model\.layers\.0\.mlp\.gate_proj\.bias"),
])
def test_hugging_face_biases_are_refused_not_dropped(tiny_model, tmp_path, changes, extra, match):
    extra = qkv_biases(tiny_model.config) if extra == "qkv" else extra
    with pytest.raises(ValueError, match=match):
        load_model(str(write_hf_folder(tmp_path / "hf", tiny_model, changes, extra)))


def test_hugging_face_folder_tolerates_rope_buffers_and_a_tied_head_copy(tiny_model, byte_tokenizer, tmp_path):
    extra = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}  # older transformers saved these
    folder = write_hf_folder(tmp_path / "hf", tiny_model, extra=extra)  # lm_head.weight is in to_hf_state_dict
    byte_tokenizer.save(folder)
    model, _ = load_model(str(folder), device="cpu")
    idx = torch.randint(0, 256, (1, 6))
    torch.testing.assert_close(model(idx), tiny_model(idx))


def test_missing_hugging_face_tensor_is_one_clear_error(tiny_model, tmp_path):
    folder = tmp_path / "hf"
    write_hf_folder(folder, tiny_model)
    from safetensors.torch import load_file, save_file

    sd = load_file(folder / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"lack model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(str(folder))


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
