"""Every family against transformers on tiny random instances that transformers builds itself.

Each specimen (lilliput.eval.zoo.TINY) switches its family's quirks on: llama3/yarn/linear/dynamic
rope, Mistral's sliding window, Qwen2's biases, qk-norm, Gemma's four norms, GeGLU, local rope and
soft-caps, Phi-3's LongRoPE with partial rotary, OLMo 2's post-norms, SmolLM3's NoPE layers, MoE.
Sequences are longer than the sliding window (8) and than Phi-3's original context (32).
"""

import json
import warnings

import pytest
import torch

from lilliput.core import families
from lilliput.core.checkpoint import load_model, to_transformers
from lilliput.core.tokenizer import ByteTokenizer
from lilliput.eval import zoo
from lilliput.infer.generate import GenerationConfig, generate
from lilliput.infer.fused import FusedStep

SPECIMENS = list(zoo.TINY)
SEQ = 40


@pytest.fixture(scope="module", params=SPECIMENS)
def pair(request):
    warnings.filterwarnings("ignore")
    hf = zoo.hf_model(request.param)
    return request.param, hf, zoo.to_lilliput(hf, request.param)


@torch.no_grad()
def test_logits_match_transformers(pair):
    name, hf, ours = pair
    ids = zoo.prompt_ids(SEQ, batch=2)
    theirs = hf(ids).logits.float()
    assert (theirs - ours(ids)).abs().max().item() <= 1e-4
    peak = theirs.softmax(-1).max(-1).values.mean().item()
    assert peak > 0.3, f"{name}: next-token distributions too flat ({peak:.2f}) for a wrong layer to show"


@torch.no_grad()
def test_decode_state_matches_transformers_cache(pair):
    """Prefill then one token at a time through the decode state, against transformers' own cache
    (LongRoPE switches frequencies past the original context in both)."""
    name, hf, ours = pair
    ids = zoo.prompt_ids(SEQ)
    out = hf(ids[:, :20], use_cache=True)
    theirs, past = [out.logits], out.past_key_values
    for t in range(20, SEQ):
        out = hf(ids[:, t:t + 1], past_key_values=past, use_cache=True)
        theirs.append(out.logits)
        past = out.past_key_values
    state = ours.new_state(1, SEQ)
    mine = [ours(ids[:, :20], state)] + [ours(ids[:, t:t + 1], state) for t in range(20, SEQ)]
    assert (torch.cat(theirs, 1).float() - torch.cat(mine, 1)).abs().max().item() <= 1e-4


def _greedy(model, prompts, fused: bool, monkeypatch) -> list[list[int]]:
    with monkeypatch.context() as m:
        if not fused:
            m.setattr(FusedStep, "for_model", classmethod(lambda cls, model: None))
        cfg = GenerationConfig(max_new_tokens=32, ignore_eos=True)
        return [g.tokens for g in generate(model, ByteTokenizer(), prompts, cfg)]


@torch.no_grad()
def test_greedy_32_tokens_equal_transformers_and_batch_equals_alone(pair, monkeypatch):
    name, hf, ours = pair
    prompts = [zoo.prompt_ids(n, seed=n)[0].tolist() for n in (5, 12, 20)]
    alone = [_greedy(ours, [p], False, monkeypatch)[0] for p in prompts]
    for p, mine in zip(prompts, alone):
        assert mine == zoo.hf_greedy(hf, p, 32), f"{name}: greedy tokens differ from transformers"
    assert _greedy(ours, prompts, False, monkeypatch) == alone, f"{name}: a batch differs from its rows alone"


@torch.no_grad()
def test_fused_step_greedy_equals_torch_path(pair, monkeypatch):
    name, hf, ours = pair
    if FusedStep.for_model(ours) is None:
        pytest.skip(f"{name}: the fused C step does not run this family here")
    prompts = [zoo.prompt_ids(n, seed=n)[0].tolist() for n in (5, 20)]
    assert _greedy(ours, prompts, True, monkeypatch) == _greedy(ours, prompts, False, monkeypatch)


@torch.no_grad()
def test_hugging_face_folder_round_trip(pair, tmp_path):
    """save_pretrained (sharded) -> lilliput loads the folder -> the same logits; and lilliput's
    model back into transformers through the family's config class."""
    name, hf, ours = pair
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ByteTokenizer().save(tmp_path)
    loaded, _ = load_model(str(tmp_path), device="cpu")
    ids = zoo.prompt_ids(SEQ)
    assert (loaded(ids) - ours(ids)).abs().max().item() <= 1e-5
    assert loaded.config.replace(name="x") == ours.config.replace(name="x")
    back = to_transformers(ours)  # a fresh model: transformers' dynamic NTK keeps state between calls
    assert (back(ids).logits - ours(ids)).abs().max().item() <= 1e-4


def test_config_round_trip(pair):
    _, _, ours = pair
    c = ours.config
    assert families.config_from_hf(families.hf_config(c), name=c.name) == c


@pytest.mark.parametrize("hf,match", [
    ({"model_type": "gemma3"}, "image-text model"),
    ({"model_type": "falcon"}, "'falcon' is not a family lilliput can load"),
    ({"model_type": "qwen3_moe", "mlp_only_layers": [0]}, "mlp_only_layers"),
    ({"model_type": "llama", "rope_parameters": {"rope_type": "mrope", "rope_theta": 1e4}}, "rope scaling 'mrope'"),
    ({"model_type": "llama", "hidden_act": "relu"}, "activation 'relu'"),
    ({"model_type": "olmoe", "clip_qkv": 8.0}, "clip_qkv"),
])
def test_unsupported_variants_are_refused_by_name(hf, match):
    base = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2}
    with pytest.raises(ValueError, match=match):
        families.config_from_hf({**base, **hf})


def test_unsupported_family_folder_is_one_clear_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "falcon", "hidden_size": 8}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not a family lilliput can load"):
        load_model(str(tmp_path))


def test_dynamic_ntk_keeps_one_table_past_the_context():
    """Decoding past the context recomputes the frequencies at every length: only the latest table is kept."""
    from lilliput.core.rope import Rotary

    rot = Rotary(16, 10000.0, {"rope_type": "dynamic", "factor": 2.0, "max_position_embeddings": 32})
    for n in range(33, 80):
        cos, _ = rot.tables(n, "cpu")
        assert cos.shape[0] >= n
    assert len(rot._tables) == 1
    assert len([k for k in rot._tables if k[0]]) == 1 and rot.tables(10, "cpu")[0].shape[0] >= 10
