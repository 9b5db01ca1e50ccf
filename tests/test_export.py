"""Exports: GGUF (llama.cpp), Hugging Face folders (transformers), ONNX (ONNX Runtime).

Tiny models with a small byte-level BPE tokenizer (256 bytes, 4 merges, 2 special tokens) for the
formats' round trips; the embedded SmolLM2-135M for perplexity of real exports (slow)."""

import copy
import importlib.util
import json

import numpy as np
import pytest
import tokenizers
import torch
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

from lilliput.compress.quantize import RTNConfig, quantize_
from lilliput.core.checkpoint import load_model, read_gguf, save_checkpoint
from lilliput.core.gguf_file import GGUFFile
from lilliput.core.model import GPT
from lilliput.core.tokenizer import Tokenizer
from lilliput.export import export
from lilliput.export.gguf import export_gguf
from lilliput.export.target import ExportCheckError
from lilliput.export.vocab import bytes_to_unicode
from lilliput.export.weights import float_copy

CHAT = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXT = "the thin cat sat in the 123 huts <|im_end|>"


@pytest.fixture
def bpe():
    """SmolLM2-style byte-level BPE: digits split one by one, then the GPT-2 regex; ids 0-261."""
    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")])
    return Tokenizer(backend, bos_id=260, eos_id=261, chat_template=CHAT)


@pytest.fixture
def model(tiny_config, one_thread):
    torch.manual_seed(0)
    return GPT(tiny_config.replace(vocab_size=264, name="tiny-bpe")).eval()  # 2 ids past the tokenizer: padded


def logits(m, ids):
    with torch.inference_mode():
        return m(torch.tensor([ids]))[0]


def exact_logits(q, ids):
    """Logits of a quantized model's weights in float math (lilliput's C kernels round activations to int8)."""
    return logits(float_copy(q), ids)


# --- GGUF ---------------------------------------------------------------------------------------------

def test_gguf_f32_round_trip_is_exact(model, bpe, tmp_path):
    path = export_gguf(model, bpe, tmp_path / "m.gguf", "F32")
    back, tok = load_model(str(path), device="cpu")
    ids = bpe.encode(TEXT)
    torch.testing.assert_close(logits(back, ids), logits(model, ids), rtol=0, atol=1e-6)
    assert tok.encode(TEXT) == ids and tok.chat_template == CHAT and tok.eos_id == 261
    meta = GGUFFile(path).metadata
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.pre"] == "smollm"
    assert meta["llama.context_length"] == model.config.max_seq_len and meta["llama.attention.head_count_kv"] == 2
    assert meta["tokenizer.ggml.add_bos_token"] is False and meta["tokenizer.ggml.tokens"][-1] == "[PAD263]"
    assert not list(tmp_path.glob(".*")), "no temporary file left behind"


@pytest.mark.parametrize("type,kl", [("F16", 1e-5), ("BF16", 1e-4), ("Q8_0", 1e-4), ("Q4_0", 2e-3), ("Q4_1", 2e-3)])
def test_gguf_types_read_back_within_tolerance(model, bpe, tmp_path, type, kl):
    result = export(model, bpe, "gguf", tmp_path / f"m.{type}.gguf", type)
    f32 = export(model, bpe, "gguf", tmp_path / "m.F32.gguf", "F32")
    assert result.bytes < 0.6 * f32.bytes and result.check["mean_kl"] < kl
    assert set(result.written["tensor_types"]) == {"F32", type} | ({"Q8_0"} if type.startswith("Q4") else set())


def test_gguf_copies_int4_codes_into_q4_1_and_int8_codes_into_q8_0(model, bpe, tmp_path):
    q4 = quantize_(copy.deepcopy(model), RTNConfig(bits=4, group_size=64))  # groups of 64: two Q4_1 blocks each
    q8 = quantize_(copy.deepcopy(model), RTNConfig(bits=8))
    for q, type in ((q4, "Q4_1"), (q8, "Q8_0")):
        f = GGUFFile(export_gguf(q, bpe, tmp_path / f"{type}.gguf", type))
        layer = q.layers[1].ffn.w_down
        want = layer.dequantize()
        # Q4_1 stores m = -zero * scale in fp16 and Q8_0 the row scale in fp16: the codes are the same
        torch.testing.assert_close(f.tensor("blk.1.ffn_down.weight"), want, rtol=2e-3, atol=1e-4)
        assert "output.weight" in f.tensors  # lilliput's quantized output layer is its own copy: untied


def test_gguf_of_structurally_pruned_model_is_the_smaller_llama(model, bpe, tmp_path):
    from lilliput.compress.structured import StructuredConfig, structured_prune

    batches = torch.randint(0, 256, (4, 16))
    pruned = structured_prune(model, StructuredConfig(n_heads=2, ffn_dim=32, refit=False), batches=batches)
    assert pruned.config.hd != pruned.config.dim // pruned.config.n_heads  # head_dim stays 8 with 2 heads of 32
    path = export_gguf(pruned, bpe, tmp_path / "pruned.gguf", "F32")
    meta = GGUFFile(path).metadata
    assert meta["llama.attention.head_count"] == 2 and meta["llama.attention.key_length"] == 8
    _, config, _ = read_gguf(path)
    assert (config.n_heads, config.hd, config.ffn_dim) == (2, 8, 32)
    ids = bpe.encode(TEXT)
    back, _ = load_model(str(path), device="cpu")
    torch.testing.assert_close(logits(back, ids), logits(pruned, ids), rtol=0, atol=1e-6)
    hf = export(pruned, bpe, "hf", tmp_path / "hf")  # and the other formats take the smaller shape too
    assert json.loads((hf.path / "config.json").read_text())["head_dim"] == 8 and hf.check["max_abs_logit_diff"] < 1e-4
    if importlib.util.find_spec("onnxruntime"):
        assert export(pruned, bpe, "onnx", tmp_path / "onnx", "float32").check["max_abs_logit_diff"] < 1e-4


def test_gguf_runs_in_llama_cpp(model, bpe, tmp_path):
    pytest.importorskip("llama_cpp")
    from lilliput.export.runtimes import LlamaCppModel

    from lilliput.export.weights import agreement

    ids = bpe.encode(TEXT)
    for type, atol in (("F32", 1e-3), ("Q8_0", 0.05)):
        runner = LlamaCppModel(export_gguf(model, bpe, tmp_path / f"{type}.gguf", type), threads=1, n_ctx=256)
        assert runner.tokenize(TEXT) == ids  # llama.cpp's own tokenizer on our vocabulary, merges and specials
        torch.testing.assert_close(torch.from_numpy(runner.logits(ids)), logits(model, ids), rtol=0, atol=atol)
    q4 = quantize_(copy.deepcopy(model), RTNConfig(bits=4, group_size=32, lm_head_bits=4))  # every matrix int4
    runner = LlamaCppModel(export_gguf(q4, bpe, tmp_path / "q4.gguf", "Q4_1"), threads=1, n_ctx=256)
    # lilliput's codes in Q4_1 blocks; llama.cpp rounds activations to 8 bits, lilliput does not here
    assert agreement(exact_logits(q4, ids), torch.from_numpy(runner.logits(ids)))["relative_error"] < 0.015  # Q4_0: 0.039


def test_gguf_refuses_a_byte_tokenizer(model, byte_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="byte tokenizer: export it with --format hf"):
        export(model, byte_tokenizer, "gguf", tmp_path / "m.gguf", "F32")
    assert not list(tmp_path.iterdir())


# --- Hugging Face folder --------------------------------------------------------------------------------

def hf_load(path):
    import transformers

    return (transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32),
            transformers.AutoTokenizer.from_pretrained(path, local_files_only=True))


def test_hf_folder_loads_in_transformers_with_equal_logits_and_chat_prompt(model, bpe, tmp_path):
    from lilliput.export.hf import export_hf

    path = export_hf(model, bpe, tmp_path / "hf")
    hf, tok = hf_load(path)
    ids = bpe.encode(TEXT)
    with torch.inference_mode():
        torch.testing.assert_close(hf(torch.tensor([ids])).logits[0], logits(model, ids), rtol=0, atol=1e-4)
    assert tok(TEXT, add_special_tokens=False)["input_ids"] == ids
    chat = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == bpe.apply_chat_template(chat)
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == 261
    assert (path / "README.md").read_text().startswith("# tiny-bpe")


def test_hf_dequantizes_a_quantized_model_and_unties_its_output_layer(model, bpe, tmp_path):
    from lilliput.export.hf import export_hf

    q = quantize_(copy.deepcopy(model), RTNConfig(bits=4, group_size=32))
    path = export_hf(q, bpe, tmp_path / "hf")
    assert json.loads((path / "config.json").read_text())["tie_word_embeddings"] is False
    hf, _ = hf_load(path)
    ids = bpe.encode(TEXT)
    with torch.inference_mode():
        torch.testing.assert_close(hf(torch.tensor([ids])).logits[0], exact_logits(q, ids), rtol=0, atol=1e-4)


def test_hf_byte_tokenizer_becomes_a_byte_level_bpe(tiny_model, byte_tokenizer, tmp_path, one_thread):
    path = export(tiny_model, byte_tokenizer, "hf", tmp_path / "hf").path
    _, tok = hf_load(path)
    assert tok("héllo", add_special_tokens=False)["input_ids"] == list("héllo".encode())


def test_hf_model_card_carries_the_shrink_record(model, bpe, tmp_path):
    from lilliput.core.record import run_record
    from lilliput.jobs.export import ExportJob, run_export

    stages = [{"stage": s, "seconds": 1.0, "perplexity": p, "tasks": {}, "bytes": b, "parameters": 1e6,
               "decode_tok_s": 50.0} for s, p, b in (("input", 20.0, 4e6), ("1. quantize rtn", 20.4, 1e6))]
    src = save_checkpoint(model, bpe, tmp_path / "shrunk", run_record("lilliput shrink", stages=stages))
    result = run_export(ExportJob(model=str(src), format="hf", out=str(tmp_path / "hf")))
    card = (result.path / "README.md").read_text()
    assert "| 1. quantize rtn | 20.4 (1.02x) |" in card and "vllm serve" in card


# --- ONNX ---------------------------------------------------------------------------------------------

@pytest.fixture
def gqa_model(tiny_config, one_thread):
    """4 query heads on 1 KV head and an MLP of 96 (three int4 groups of 32: an odd count of zero points)."""
    torch.manual_seed(1)
    return GPT(tiny_config.replace(vocab_size=264, n_kv_heads=1, ffn_dim=96)).eval()


def test_onnx_float32_graph_equals_lilliput_with_and_without_cache(gqa_model, bpe, tmp_path):
    pytest.importorskip("onnxruntime")
    from lilliput.export.onnx import export_onnx
    from lilliput.export.runtimes import OnnxModel

    runner = OnnxModel(export_onnx(gqa_model, bpe, tmp_path / "onnx", "float32"), threads=1)
    ids = bpe.encode(TEXT)
    full, _ = runner.run([ids])
    torch.testing.assert_close(torch.from_numpy(full[0]), logits(gqa_model, ids), rtol=0, atol=1e-5)
    _, past = runner.run([ids[:5]])
    for i in range(5, len(ids)):  # token by token through the cache
        step, past = runner.run([[ids[i]]], past)
        torch.testing.assert_close(torch.from_numpy(step[0, 0]), torch.from_numpy(full[0, i]), rtol=0, atol=1e-5)
    assert past["past_key_values.0.key"].shape == (1, 1, len(ids), 8)


@pytest.mark.parametrize("bits", [8, 4])
def test_onnx_matmul_nbits_holds_lilliputs_codes_exactly(gqa_model, bpe, tmp_path, monkeypatch, bits):
    pytest.importorskip("onnxruntime")
    import lilliput.export.onnx as lonnx
    from lilliput.export.runtimes import OnnxModel

    monkeypatch.setattr(lonnx, "ACCURACY_LEVEL", 0)  # fp32 activations: only the weights' mapping is tested
    q = quantize_(copy.deepcopy(gqa_model), RTNConfig(bits=bits, group_size=32))
    result = export(q, bpe, "onnx", tmp_path / "onnx", f"int{bits}")
    assert result.written["matmul_nbits"] == 2 * 4 + 1 and not result.written["requantized"]
    assert result.written["block_offsets"] == 0
    assert result.written["int4_grid"] == (None if bits == 8 else "the model's own")
    ids = bpe.encode(TEXT)
    got = OnnxModel(result.path, threads=1).run([ids])[0][0]
    torch.testing.assert_close(torch.from_numpy(got), exact_logits(q, ids), rtol=0, atol=1e-5)


def minmax_reference(w):
    """numpy dequantization of w (N, K) on the min/max int4 grid of blocks of 32, zero points in float."""
    g = w.double().numpy().reshape(w.shape[0], -1, 32)
    lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
    scale = (hi - lo) / 15
    codes = np.clip(np.round((g - lo) / scale), 0, 15)
    return torch.from_numpy(((codes - (-lo / scale)) * scale).reshape(w.shape)).float()


def with_weights(model, fn):
    """A copy of `model` whose block matrices are fn(weight)."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, lin in m.named_modules():
            if isinstance(lin, torch.nn.Linear) and name.startswith("layers."):
                lin.weight.copy_(fn(lin.weight))
    return m


@pytest.fixture
def exact_matmuls(monkeypatch):
    """fp32 activations inside MatMulNBits: only the weights' mapping is tested."""
    import lilliput.export.onnx as lonnx

    monkeypatch.setattr(lonnx, "ACCURACY_LEVEL", 0)


def test_onnx_int4_of_a_float_model_is_its_min_max_grid_with_float_zero_points(gqa_model, bpe, tmp_path,
                                                                              exact_matmuls):
    pytest.importorskip("onnxruntime")
    from lilliput.export.runtimes import OnnxModel
    from lilliput.export.weights import blockwise_int8

    result = export(gqa_model, bpe, "onnx", tmp_path / "onnx", "int4")
    w = result.written
    assert (w["matmul_nbits"], w["block_offsets"], w["matmul_float"]) == (9, 8, 0)  # output layer: int8 blocks
    assert w["requantized"] and w["int4_grid"] == "min/max, float zero points" and w["int4_block_sizes"] == [32]
    ids = bpe.encode(TEXT)
    got = torch.from_numpy(OnnxModel(result.path, threads=1).run([ids])[0][0])
    ref = with_weights(gqa_model, minmax_reference)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    ref = GPT.from_state_dict(ref.config.replace(tie_embeddings=False), state)
    with torch.no_grad():
        ref.lm_head.weight.copy_(blockwise_int8(ref.lm_head.weight, 32).dequantize())
    torch.testing.assert_close(got, logits(ref, ids), rtol=0, atol=2e-5)
    assert torch.equal(gqa_model.lm_head.weight, gqa_model.tok_emb.weight)  # the source is untouched


def test_onnx_int4_reproduces_a_model_on_q4_1_and_q8_0_grids_which_integer_zero_points_cannot(gqa_model, bpe, tmp_path,
                                                                                      exact_matmuls):
    pytest.importorskip("onnxruntime")
    from lilliput.export.runtimes import OnnxModel
    from lilliput.export.weights import minmax_int4

    gen = torch.Generator().manual_seed(0)

    def q4_1(w):  # GGUF Q4_1 blocks of 32: w = d * q + m, fp16 d and m, both ends of 0..15 used
        n, k = w.shape
        d = torch.empty(n, k // 32, 1).uniform_(0.01, 0.05, generator=gen).half().float()
        m = (-torch.empty(n, k // 32, 1).uniform_(2, 13, generator=gen) * d).half().float()
        q = torch.randint(0, 16, (n, k // 32, 32), generator=gen).float()
        q[..., 0], q[..., 1] = 0, 15
        return (d * q + m).reshape(n, k)

    src = with_weights(gqa_model, q4_1)
    with torch.no_grad():  # the tied embedding on a Q8_0 grid (SmolLM2's): the int8 output layer holds it exactly
        e = src.tok_emb.weight.view(-1, 32)
        d = (e.abs().amax(1, keepdim=True) / 127).half().float()
        e.copy_((e / d).round().clamp(-127, 127) * d)
    w = src.layers[0].ffn.w_down.weight
    grid = minmax_int4(w, 32)
    assert (grid.dequantize() - w).abs().max() < 1e-6 and not torch.equal(grid.zero, grid.zero.round())
    rtn = quantize_(copy.deepcopy(src), RTNConfig(bits=4, group_size=32)).layers[0].ffn.w_down.dequantize()
    assert (rtn - w).abs().max() > 2e-3  # lilliput's integer zero points: off by up to d / 2 per block
    ids = bpe.encode(TEXT)
    result = export(src, bpe, "onnx", tmp_path / "onnx", "int4")
    got = torch.from_numpy(OnnxModel(result.path, threads=1).run([ids])[0][0])
    torch.testing.assert_close(got, logits(src, ids), rtol=0, atol=2e-5)


def test_onnx_int4_of_a_float_model_at_accuracy_level_4_passes_its_check_and_is_smaller(gqa_model, bpe, tmp_path):
    pytest.importorskip("onnxruntime")
    result = export(gqa_model, bpe, "onnx", tmp_path / "onnx", "int4")  # int8 activations inside MatMulNBits
    assert result.check["mean_kl"] < 1e-3 and result.check["top1_agreement"] == 1.0
    assert result.bytes < export(gqa_model, bpe, "onnx", tmp_path / "f32", "float32").bytes


def test_onnx_int4_blocks_of_64_and_an_untied_output_layer_as_int8(gqa_model, bpe, tmp_path, exact_matmuls):
    pytest.importorskip("onnxruntime")
    from lilliput.export.onnx import export_onnx, prepared

    untied = GPT(gqa_model.config.replace(tie_embeddings=False, ffn_dim=128)).eval()
    ref, grids = prepared(untied, "int4", group=64)
    assert grids["lm_head"].bits == 8 and grids["layers.0.ffn.w_down"].group == 64  # K 128
    assert grids["layers.0.mixer.wqkv"].group == 32  # K 32: the largest block that divides it
    path = export_onnx(untied, bpe, tmp_path / "onnx", "int4", group=64)
    from lilliput.export.runtimes import OnnxModel

    ids = bpe.encode(TEXT)
    got = torch.from_numpy(OnnxModel(path, threads=1).run([ids])[0][0])
    torch.testing.assert_close(got, logits(ref, ids), rtol=0, atol=2e-5)


# --- the command and its errors ---------------------------------------------------------------------------

@pytest.fixture
def ckpt(model, bpe, tmp_path):
    return str(save_checkpoint(model, bpe, tmp_path / "ckpt"))


def test_cli_exports_and_reports_the_check(ckpt, tmp_path, capsys):
    from lilliput.cli import main

    out = tmp_path / "m.gguf"
    assert main(["export", "--model", ckpt, "--format", "gguf", "--type", "q8_0", "--out", str(out)]) == 0
    assert "exported gguf Q8_0" in capsys.readouterr().out and out.is_file()
    assert main(["export", "--model", ckpt, "--format", "gguf", "--out", str(out), "--force"]) == 0  # F32: the model's own
    assert GGUFFile(out).metadata["general.file_type"] == 0


def test_cli_onnx_int4_group_sets_the_matmul_nbits_blocks(ckpt, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    import onnx

    from lilliput.cli import main

    out = tmp_path / "onnx"
    argv = ["export", "--model", ckpt, "--format", "onnx", "--type", "int4", "--group", "16", "--out", str(out)]
    assert main(argv) == 0
    assert "exported onnx int4" in capsys.readouterr().out
    nodes = [n for n in onnx.load(str(out / "model.onnx")).graph.node if n.op_type == "MatMulNBits"]
    blocks = [{a.name: a.i for a in n.attribute} for n in nodes]
    assert sorted((b["bits"], b["block_size"]) for b in blocks) == [(4, 16)] * 8 + [(8, 32)]  # output layer: Q8_0's


@pytest.mark.parametrize("argv,match", [
    (["--format", "tflite"], "unknown export format 'tflite'; known: gguf, hf, onnx"),
    (["--format", "gguf", "--type", "Q2_K"], "unknown gguf type 'Q2_K': pass one of F32, F16, BF16, Q8_0, Q4_0, Q4_1"),
    (["--format", "hf", "--type", "int4"], "unknown hf type 'int4'"),
    (["--format", "onnx", "--type", "int4", "--group", "48"], "--group) must be one of 16, 32, 64, 128, 256, got 48"),
    (["--format", "gguf", "--group", "32"], "gguf has none: drop --group"),
    (["--format", "onnx", "--type", "int8", "--group", "32"], "a int8 export has none: drop --group"),
])
def test_cli_bad_format_or_type_is_one_line_exit_2(ckpt, tmp_path, capsys, argv, match):
    from lilliput.cli import main

    assert main(["export", "--model", ckpt, "--out", str(tmp_path / "x"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lilliput: error:") and match in err and "\n" not in err
    assert not (tmp_path / "x").exists()


def test_cli_existing_or_unwritable_output_is_refused(ckpt, tmp_path, capsys):
    from lilliput.cli import main

    existing = tmp_path / "m.gguf"
    existing.write_text("keep me")
    assert main(["export", "--model", ckpt, "--out", str(existing)]) == 2
    assert "already exists: pass --force" in capsys.readouterr().err and existing.read_text() == "keep me"
    assert main(["export", "--model", ckpt, "--out", str(existing / "sub" / "m.gguf")]) == 2
    assert "is not a writable folder" in capsys.readouterr().err


def test_a_mixer_the_format_cannot_express_names_the_layer(model, bpe, tmp_path):
    class Mamba(torch.nn.Module):
        def forward(self, x, *args):
            return x

    model.layers[1].mixer = Mamba()
    with pytest.raises(ValueError, match="layer 1 has mixer Mamba"):
        export(model, bpe, "onnx", tmp_path / "m", "float32")
    assert not list(tmp_path.iterdir())


def test_a_failed_check_leaves_nothing_and_keeps_the_old_output(model, bpe, tmp_path, monkeypatch):
    import lilliput.export.gguf as lgguf

    out = export_gguf(model, bpe, tmp_path / "m.gguf", "F32")
    before = out.read_bytes()
    monkeypatch.setitem(lgguf.TOLERANCE, "Q4_0", -1.0)  # no export can pass
    with pytest.raises(ExportCheckError, match="the export was not kept"):
        export_gguf(model, bpe, out, "Q4_0", force=True)
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


# --- the embedded SmolLM2-135M ------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_q8_0_gguf_reads_back_within_1_percent_perplexity(smollm, tmp_path):
    from lilliput.eval.perplexity import HeldoutConfig, heldout_perplexity

    model, tok = smollm
    back, back_tok = load_model(str(export_gguf(model, tok, tmp_path / "q8.gguf", "Q8_0")), device="cpu")
    assert back_tok.encode(TEXT) == tok.encode(TEXT) and back_tok.chat_template == tok.chat_template
    heldout = HeldoutConfig(passages=6, window=256)
    assert abs(heldout_perplexity(back, tok, heldout) / heldout_perplexity(model, tok, heldout) - 1) < 0.01


@pytest.mark.slow
def test_smollm2_hf_folder_matches_within_1e_4(smollm, tmp_path):
    result = export(smollm[0], smollm[1], "hf", tmp_path / "hf", "float32")
    assert result.check["max_abs_logit_diff"] < 1e-4 and result.check["chat_template_same"]


def test_runtimes_score_perplexity_on_the_same_windows_as_lilliput(model, bpe, tmp_path):
    from lilliput.eval.perplexity import PerplexityConfig, perplexity
    from lilliput.export.runtimes import OnnxModel, TransformersModel

    text = "the thin cat sat in the hut; the hut was thin. " * 6
    cfg = PerplexityConfig(window=32, stride=16)
    want = perplexity(model, bpe, text, cfg)
    runners = [TransformersModel(export(model, bpe, "hf", tmp_path / "hf").path)]
    if importlib.util.find_spec("onnxruntime"):
        runners.append(OnnxModel(export(model, bpe, "onnx", tmp_path / "onnx", "float32").path, threads=1))
    if importlib.util.find_spec("llama_cpp"):
        from lilliput.export.runtimes import LlamaCppModel

        runners.append(LlamaCppModel(export_gguf(model, bpe, tmp_path / "m.gguf", "F32"), threads=1, n_ctx=64))
    for runner in runners:
        got = perplexity(runner, bpe, text, cfg)
        assert got["tokens"] == want["tokens"] and got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-4)
