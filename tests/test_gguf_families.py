"""GGUF for every family llama.cpp runs: lilliput exports each zoo specimen with llama.cpp's
architecture, keys and tensor names, reads it back to the same config and logits (F32 within 1e-5,
Q8_0 within a stated tolerance), and refuses in one line what llama.cpp would compute differently.

The zoo's specimens follow the public members, which llama.cpp runs; variants past what its archs
hard-code (Gemma 3's attention scale, SmolLM3's NoPE period, Qwen3-MoE's renormalised top-k) and
switches it lacks (dynamic NTK, Mistral's window) are the refusal cases."""

import numpy as np
import pytest
import torch

from lilliput.core.checkpoint import load_model
from lilliput.core.gguf import read_gguf
from lilliput.core.gguf_file import GGUFFile
from lilliput.core.model import GPT
from lilliput.core.tokenizer import Tokenizer
from lilliput.eval import zoo
from lilliput.export import export
from lilliput.export.weights import agreement

pytest.importorskip("transformers")

IDS = [3, 17, 250, 9, 101, 42, 7, 199, 64, 5, 88, 130, 12, 240, 33, 71, 2, 150, 98, 11]
"""20 positions: past the specimens' sliding window of 8 and Phi-3's original context of 32 is not needed
(LongRoPE's short factors) but its partial rotary is."""

VARIANTS = {
    # variants past what llama.cpp's archs hard-code (zoo's specimens follow the public members)
    "gemma3-scaled": ("Gemma3TextConfig", {**zoo.TINY["gemma3"][1], "query_pre_attn_scalar": 24}),
    "smollm3-nope2": ("SmolLM3Config", dict(no_rope_layer_interval=2, tie_word_embeddings=True)),
    "qwen3_moe-raw": ("Qwen3MoeConfig", {**zoo.TINY["qwen3_moe"][1], "norm_topk_prob": False}),
    "olmoe-gqa": ("OlmoeConfig", {**zoo.TINY["olmoe"][1], "num_key_value_heads": 2}),
}
TABLE = {**{k: (cls, {**zoo._BASE, **kw}) for k, (cls, kw) in zoo.TINY.items()},
         **{k: (cls, {**zoo._BASE, **kw}) for k, (cls, kw) in VARIANTS.items()}}

EXPORTED = ["llama3", "llama-yarn", "llama-linear", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "olmo2",
            "smollm3", "qwen3_moe", "olmoe"]
REFUSED = {
    "llama-dynamic": "dynamic rope scaling",
    "mistral": "a sliding window",
    "gemma3-scaled": "attention scale",
    "smollm3-nope2": "NoPE layers",
    "qwen3_moe-raw": "moe_norm_topk=False",
    "olmoe-gqa": "grouped-query attention",
}
ARCH = {"llama3": "llama", "llama-yarn": "llama", "llama-linear": "llama", "gemma3": "gemma3",
        "smollm3": "smollm3", "qwen3_moe": "qwen3moe"}
Q8_0_RELATIVE_ERROR, Q8_0_MEAN_KL = 0.08, 0.02
"""Q8_0 (blocks of 32, fp16 scales) on the specimens, whose large random weights amplify rounding through 4
layers: relative logit error measured 0.008 (Gemma) to 0.03 (dense) and 0.06 (MoE, where a routing choice
flips); mean KL at most 0.015 on dense ones, under the export check's own 0.02, and 0.0205 on OLMoE (MoE: twice)."""


@pytest.fixture(scope="module")
def bpe():
    return zoo.byte_bpe()


def specimen(name):
    # not named after its family: llama.cpp patches tokens by name in a model called "phi3" (see below)
    return zoo.to_lilliput(zoo.hf_model(name, table=TABLE), name="specimen")


def logits(model, ids=IDS):
    with torch.inference_mode():
        return model(torch.tensor([ids]))[0]


@pytest.mark.parametrize("name", EXPORTED)
def test_f32_export_reads_back_to_the_same_config_and_logits(name, bpe, tmp_path, one_thread):
    model = specimen(name)
    result = export(model, bpe, "gguf", tmp_path / "m.gguf", "F32")
    meta = GGUFFile(result.path).metadata
    assert meta["general.architecture"] == result.written["architecture"] == ARCH.get(name, name.replace("_", ""))
    back, tok = load_model(str(result.path), device="cpu")
    assert back.config == model.config.replace(name="m")
    assert (logits(back) - logits(model)).abs().max() <= 1e-5
    assert tok.encode("the thin <|im_end|>") == bpe.encode("the thin <|im_end|>")


@pytest.mark.parametrize("name", EXPORTED)
def test_q8_0_export_reads_back_within_tolerance(name, bpe, tmp_path, one_thread):
    model = specimen(name)
    moe = model.config.ffn == "moe"  # a routing choice flips under rounding: the export's own check is for dense
    result = export(model, bpe, "gguf", tmp_path / "m.gguf", "Q8_0", check=not moe)
    _, config, sd = read_gguf(result.path)
    back = GPT.from_state_dict(config, sd).eval()
    got = agreement(logits(model), logits(back))
    assert got["relative_error"] <= Q8_0_RELATIVE_ERROR and got["mean_kl"] <= Q8_0_MEAN_KL * (2 if moe else 1)
    assert config == model.config.replace(name="m") and result.written["tensor_types"]["Q8_0"] > 0


@pytest.mark.parametrize("name,why", REFUSED.items())
def test_what_llama_cpp_cannot_express_is_refused_in_one_line(name, why, bpe, tmp_path):
    with pytest.raises(ValueError, match=why) as e:
        export(specimen(name), bpe, "gguf", tmp_path / "m.gguf", "F32")
    assert "\n" not in str(e.value) and "--format hf" in str(e.value)
    assert not list(tmp_path.iterdir())


CONVENTIONS = {
    "gemma2": lambda f, m: torch.equal(f.tensor("blk.0.attn_norm.weight"), m.layers[0].attn_norm.weight + 1),
    "llama-linear": lambda f, m: not torch.equal(f.tensor("blk.0.attn_q.weight"), m.layers[0].mixer.wqkv.weight[:64]),
    "qwen3": lambda f, m: torch.equal(f.tensor("blk.0.attn_q.weight"), m.layers[0].mixer.wqkv.weight[:128]),
    "phi3": lambda f, m: torch.equal(f.tensor("blk.0.ffn_up.weight"), m.layers[0].ffn.w_gate_up.weight)
    and "blk.0.attn_qkv.weight" in f.tensors and "rope_factors_long.weight" in f.tensors,
    "olmoe": lambda f, m: f.tensors["blk.1.ffn_down_exps.weight"].shape == (4, 64, 64)
    and torch.equal(f.tensor("blk.1.ffn_down_exps.weight")[3], m.layers[1].ffn.experts[3].w_down.weight),
    "llama3": lambda f, m: "rope_freqs.weight" in f.tensors,
}
"""Gemma's norms are stored as 1 + w; llama permutes q rows, qwen3 does not; phi3 fuses q|k|v and gate|up and
stores its LongRoPE factors; MoE experts are stacked (E, N, K); Llama 3's rope is a rope_freqs tensor."""


@pytest.mark.parametrize("name", CONVENTIONS)
def test_family_conventions_in_the_file(name, bpe, tmp_path, one_thread):
    model = specimen(name)
    path = export(model, bpe, "gguf", tmp_path / "m.gguf", "F32", check=False).path
    assert CONVENTIONS[name](GGUFFile(path), model)


def test_an_unknown_architecture_is_refused_in_one_line(tmp_path):
    import gguf

    w = gguf.GGUFWriter(tmp_path / "m.gguf", "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="GGUF architecture 'mamba' is not supported; lilliput reads llama, ") as e:
        load_model(str(tmp_path / "m.gguf"), device="cpu")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", EXPORTED)
def test_llama_cpp_gives_the_same_greedy_tokens(name, bpe, tmp_path):
    pytest.importorskip("llama_cpp")
    from lilliput.export.runtimes import LlamaCppModel

    model = specimen(name)
    path = export(model, bpe, "gguf", tmp_path / "m.gguf", "F32").path
    runner = LlamaCppModel(path, threads=1, n_ctx=64)
    # 40 tokens: past Phi-3's original context of 32, where transformers and lilliput switch to LongRoPE's
    # long factors; llama.cpp picks them by its context size, which it pads to 256, so always here
    ids = (list(IDS) * 2)[:40]
    ours, theirs = list(ids), list(ids)
    for _ in range(8):
        ours.append(int(logits(model, ours)[-1].argmax()))
        theirs.append(int(np.argmax(runner.logits(theirs)[-1])))
    assert theirs == ours


def test_a_phi3_named_model_needs_the_tokens_llama_cpp_patches_by_name(bpe, tmp_path):
    model = zoo.to_lilliput(zoo.hf_model("phi3", table=TABLE), name="tiny-phi3")
    with pytest.raises(ValueError, match=r"will not load a model named 'tiny-phi3' whose vocabulary lacks"):
        export(model, bpe, "gguf", tmp_path / "m.gguf", "F32")
    assert not list(tmp_path.iterdir())
