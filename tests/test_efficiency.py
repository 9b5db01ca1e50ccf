import copy

import pytest
import torch

from lilliput.compress.quantize import RTNConfig, quantize_
from lilliput.core.config import preset
from lilliput.core.model import GPT
from lilliput.eval import efficiency as eff


def float_count(model: GPT) -> int:
    """Parameters of a float GPT by its shapes: the embedding, every block, the norm, the output layer if untied."""
    c = model.config
    qkv = (c.n_heads + 2 * c.n_kv_heads) * c.hd * c.dim
    block = qkv + c.n_heads * c.hd * c.dim + 3 * c.dim * c.ffn_dim + 2 * c.dim
    return c.vocab_size * c.dim * (1 if c.tie_embeddings else 2) + c.n_layers * block + c.dim


def test_tied_model_counts_the_shared_weight_once(tiny_model):
    assert tiny_model.config.tie_embeddings
    assert eff.parameter_count(tiny_model) == float_count(tiny_model)


def test_untied_model_counts_both(tiny_config):
    untied = GPT(tiny_config.replace(tie_embeddings=False))
    assert eff.parameter_count(untied) == float_count(untied)
    assert eff.parameter_count(untied) - float_count(GPT(tiny_config)) == tiny_config.vocab_size * tiny_config.dim


@pytest.mark.parametrize("cfg", [RTNConfig(bits=8), RTNConfig(bits=4, group_size=32, lm_head_bits=None),
                                 RTNConfig(bits=8, lm_head=False)])
def test_quantizing_leaves_the_parameter_count_alone(tiny_model, cfg):
    # the int8 copy of the tied output layer is the embedding's weight: it counts once, as before
    q = quantize_(copy.deepcopy(tiny_model), cfg)
    assert eff.parameter_count(q) == eff.parameter_count(tiny_model) == float_count(tiny_model)
    parts = eff.parameter_breakdown(q)
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total") and parts["lm_head_untied"] == 0


def test_model_bytes_counts_storage_as_held(tiny_model, tiny_config):
    c = tiny_config
    assert eff.model_bytes(tiny_model) == 4 * float_count(tiny_model)  # fp32, the tied weight once
    q = quantize_(copy.deepcopy(tiny_model), RTNConfig(bits=8))
    linears = sum(m.weight.numel() for n, m in tiny_model.named_modules()
                  if isinstance(m, torch.nn.Linear) and n != "lm_head")
    rows = sum(m.weight.shape[0] for n, m in tiny_model.named_modules()
               if isinstance(m, torch.nn.Linear) and n != "lm_head")
    floats = 4 * (c.vocab_size * c.dim + 2 * c.n_layers * c.dim + c.dim)  # embedding and norms stay fp32
    head = c.vocab_size * c.dim + 4 * c.vocab_size  # the output layer's own int8 copy and its scales
    assert eff.model_bytes(q) == linears + 4 * rows + floats + head
    assert eff.linear_bytes(q) == linears + 4 * rows + head  # what one decoded token reads
    assert eff.linear_bytes(tiny_model) == 4 * (linears + c.vocab_size * c.dim)


def test_decode_speeds_interleave(tiny_model, byte_tokenizer):
    calls = []
    got = eff.interleave({"a": lambda: calls.append("a") or 1.0, "b": lambda: calls.append("b") or 3.0},
                         repeats=2, warmup=1)
    assert calls == ["a", "b"] * 3 and got["a"]["values"] == [1.0, 1.0] and got["b"]["median"] == 3.0
    speeds = eff.decode_speeds({"x": (tiny_model, byte_tokenizer), "y": (tiny_model, byte_tokenizer)},
                               byte_tokenizer.encode("hello"), new_tokens=4, repeats=2)
    assert set(speeds) == {"x", "y"} and all(s["n"] == 2 and s["median"] > 0 for s in speeds.values())


@pytest.mark.parametrize("share", [False, True])
def test_engine_rates_decode_every_row(share, byte_tokenizer, one_thread):
    """The rows are copies of one prompt, prefilled once when shared (in chunks: a long context)."""
    torch.manual_seed(0)
    model = GPT(preset("mamba-tiny")).eval()
    got = eff.engine_rates(model, byte_tokenizer, list(range(40)), 3, 5, share_prefill=share,
                           prefill_chunk=16 if share else None)
    assert got["tokens"] == 15 and got["decode_tok_s"] > 0


def test_percentile_interpolates_like_numpy():
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert eff.percentile(xs, 50) == 3.0 and eff.percentile(xs, 0) == 1.0 and eff.percentile(xs, 100) == 5.0
    assert eff.percentile(xs, 90) == pytest.approx(4.6) and eff.percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        eff.percentile([], 50)


@pytest.mark.parametrize("name,per_token,per_sequence", [
    ("tiny", 2 * 2 * 2 * 8 * 4, 0),  # K and V x layers x kv heads x head dim x fp32
    ("mamba-tiny", 0, 2 * (4 * 16 * 16 + 3 * 96) * 4),  # layers x (heads x hs x N + (conv-1) x conv channels)
    ("xlstm-tiny", 0, 2 * 4 * (8 * 8 + 8 + 1) * 4),  # layers x heads x (C + n + m)
    ("hybrid-tiny", 2 * 2 * 8 * 4, 3 * (4 * 16 * 16 + 3 * 96) * 4),
])
def test_decode_state_bytes_split_growing_and_fixed_state(name, per_token, per_sequence):
    assert eff.decode_state_bytes(GPT(preset(name))) == {"per_token": per_token, "per_sequence": per_sequence}
