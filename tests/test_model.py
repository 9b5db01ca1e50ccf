import pytest
import torch

from lilliput.core.config import ModelConfig, preset
from lilliput.core.model import FFNS, GPT, MIXERS, KVCache


def test_forward_shapes(tiny_model, tiny_config):
    idx = torch.randint(0, tiny_config.vocab_size, (3, 7))
    assert tiny_model(idx).shape == (3, 7, tiny_config.vocab_size)
    assert tiny_model(idx, last_only=True).shape == (3, 1, tiny_config.vocab_size)


def test_cached_decode_matches_full_forward(tiny_model, tiny_config):
    idx = torch.randint(0, tiny_config.vocab_size, (2, 12))
    full = tiny_model(idx)
    cache = KVCache(tiny_config, 2, 16, "cpu", torch.float32)
    parts = [tiny_model(idx[:, :5], cache, 0)] + [tiny_model(idx[:, t:t + 1], cache, t) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_left_padding_matches_unpadded(tiny_model, tiny_config):
    seq = torch.randint(1, tiny_config.vocab_size, (1, 6))
    alone = tiny_model(seq)[:, -1]
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), seq], 1)
    cache = KVCache(tiny_config, 1, 12, "cpu", torch.float32, pad=torch.tensor([3]))
    torch.testing.assert_close(tiny_model(padded, cache, 0)[:, -1], alone, atol=1e-5, rtol=1e-5)


def test_tied_embeddings_share_storage(tiny_model):
    assert tiny_model.lm_head.weight is tiny_model.tok_emb.weight
    untied = GPT(preset("tiny").replace(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.tok_emb.weight


def test_from_state_dict_roundtrip(tiny_model, tiny_config):
    clone = GPT.from_state_dict(tiny_config, tiny_model.state_dict())
    idx = torch.randint(0, tiny_config.vocab_size, (1, 5))
    torch.testing.assert_close(clone(idx), tiny_model(idx))
    assert clone.lm_head.weight is clone.tok_emb.weight


def test_registries_hold_builtin_parts():
    assert "attention" in MIXERS and "swiglu" in FFNS
    with pytest.raises(ValueError, match="unknown sequence mixer"):
        GPT(preset("tiny").replace(mixer="nope"))


@pytest.mark.parametrize("bad", [dict(n_kv_heads=3), dict(dim=30), dict(n_layers=0)])
def test_bad_config_raises_clear_error(bad):
    with pytest.raises(ValueError):
        ModelConfig(**bad)


def test_config_dict_roundtrip_and_unknown_field():
    c = preset("smollm2-135m")
    assert ModelConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown model config fields"):
        ModelConfig.from_dict({**c.to_dict(), "bogus": 1})
    assert ModelConfig.from_hf(c.to_hf(), name=c.name) == c
