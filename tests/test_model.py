import pytest
import torch

from lilliput.core import families
from lilliput.core.config import ModelConfig, preset
from lilliput.core.model import FFNS, GPT, MIXERS


def test_forward_shapes(tiny_model, tiny_config):
    idx = torch.randint(0, tiny_config.vocab_size, (3, 7))
    assert tiny_model(idx).shape == (3, 7, tiny_config.vocab_size)
    assert tiny_model(idx, last_only=True).shape == (3, 1, tiny_config.vocab_size)


def test_cached_decode_matches_full_forward(tiny_model, tiny_config):
    idx = torch.randint(0, tiny_config.vocab_size, (2, 12))
    full = tiny_model(idx)
    state = tiny_model.new_state(2, 8)  # grows on demand
    parts = [tiny_model(idx[:, :5], state)] + [tiny_model(idx[:, t:t + 1], state) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    assert state.lengths == [12, 12] and state.max_len >= 12


def test_rows_at_their_own_positions_match_alone(tiny_model, tiny_config):
    """A batch of rows at different lengths (no shared padding) gives each row's own logits."""
    idx = torch.randint(0, tiny_config.vocab_size, (3, 10))
    full = tiny_model(idx)
    state = tiny_model.new_state(4, 16)
    for row, src, n in ((3, 2, 7), (0, 0, 2), (1, 1, 5)):  # rows in any order, any lengths
        tiny_model(idx[[src], :n], state, rows=[row])
    step = torch.stack([idx[2, 7], idx[0, 2], idx[1, 5]])[:, None]
    out = tiny_model(step, state, rows=[3, 0, 1])[:, -1]
    torch.testing.assert_close(out, full[[2, 0, 1], [7, 2, 5]], atol=1e-5, rtol=1e-5)
    assert state.lengths == [3, 6, 0, 8]


def test_state_truncate_copy_free(tiny_model, tiny_config):
    idx = torch.randint(0, tiny_config.vocab_size, (1, 9))
    full = tiny_model(idx)[0]
    state = tiny_model.new_state(2, 16)
    tiny_model(idx, state, rows=[0])
    state.truncate(0, 4)  # forget 5 tokens: the next token goes to position 4
    torch.testing.assert_close(tiny_model(idx[:, 4:6], state, rows=[0])[0], full[4:6], atol=1e-5, rtol=1e-5)
    state.copy(0, 1)  # row 1 continues from row 0's 6 tokens
    assert state.lengths == [6, 6]
    torch.testing.assert_close(tiny_model(idx[:, 6:7], state, rows=[1])[0, 0], full[6], atol=1e-5, rtol=1e-5)
    state.free(1)
    assert state.lengths == [6, 0]
    with pytest.raises(ValueError, match="cannot truncate"):
        state.truncate(0, 7)
    with pytest.raises(ValueError, match="context"):
        state.ensure(tiny_config.max_seq_len + 1)


@pytest.mark.parametrize("name", ["tiny", "mamba-tiny"])
def test_state_grown_during_inference_can_be_copied_outside_it(name):
    # the engine grows rows inside a forward (inference mode) and copies a cached prefix outside it
    from lilliput.core.config import preset
    from lilliput.core.model import GPT

    model = GPT(preset(name)).eval()
    idx = torch.randint(0, 256, (1, 12))
    state = model.new_state(2, 4)
    with torch.inference_mode():
        state.ensure(12)
        model(idx, state, rows=[0])
    state.copy(0, 1)
    state.truncate(1, 10) if state.can_truncate(1, 10) else None
    state.free(0)
    assert state.lengths[0] == 0 and state.lengths[1] in (10, 12)


def test_block_runs_without_state(tiny_model, tiny_config):
    from lilliput.core.model import Step

    x = torch.randn(2, 6, tiny_config.dim)
    y = tiny_model.layers[0](x)
    assert y.shape == x.shape
    state = tiny_model.new_state(2, 8)  # the same block appending to a fresh state agrees
    step = Step(torch.arange(2), torch.zeros(2, dtype=torch.long), 6, "cpu")
    torch.testing.assert_close(tiny_model.layers[0](x, state.layers[0], step), y, atol=1e-5, rtol=1e-5)


def test_layer_pattern_is_config(tiny_config):
    if "test-zero" not in MIXERS:
        @MIXERS.register("test-zero")
        class Zero(torch.nn.Module):
            def __init__(self, config, layer=0):
                super().__init__()

            def forward(self, x, state=None, step=None):
                return torch.zeros_like(x)

    cfg = tiny_config.replace(n_layers=4, layer_mixers=("test-zero", "attention"))
    model = GPT(cfg)
    assert [type(b.mixer).__name__ for b in model.layers] == ["Zero", "Attention"] * 2
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="only attention"):
        families.hf_config(cfg)


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
    assert families.config_from_hf(families.hf_config(c), name=c.name) == c
