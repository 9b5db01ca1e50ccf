import math

import pytest
import torch
import torch.nn as nn

from lilliput.compress.prune import (
    MagnitudeConfig, SparseGPTConfig, WandaConfig, block_linears, prune_,
    sparsity_of,
)
from lilliput.compress.sparsegpt import magnitude_mask, n_m_mask, sparsegpt_prune, wanda_mask
from lilliput.compress.structured import StructuredConfig, structured_prune
from lilliput.core.config import ModelConfig
from lilliput.core.model import GPT
from lilliput.eval.efficiency import parameter_breakdown, parameter_count
from lilliput.jobs.prune import PruneJob, job_config, parse_n_m


def _copy(model: GPT) -> GPT:
    return GPT.from_state_dict(model.config, {k: v.clone() for k, v in model.state_dict().items()}).eval()


@pytest.fixture
def batches():
    return torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def gqa_model():
    """Tiny with group size 2 (6 query heads over 3 KV heads) so heads can go within groups."""
    torch.manual_seed(0)
    return GPT(ModelConfig(dim=48, n_heads=6, n_kv_heads=3, ffn_dim=64, n_layers=3, name="tiny-gqa")).eval()


def _correlated_inputs(n=2048, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 8, generator=g)
    mix = torch.randn(8, k, generator=g)
    scale = torch.logspace(-1, 1, k)[torch.randperm(k, generator=g)]  # uneven input norms
    return (base @ mix + 0.1 * torch.randn(n, k, generator=g)) * scale  # (n, k)


@pytest.mark.parametrize("cfg", [MagnitudeConfig(0.5), MagnitudeConfig(0.3), WandaConfig(0.5), WandaConfig(0.25),
                                 SparseGPTConfig(0.5), SparseGPTConfig(0.75)])
def test_exact_sparsity_per_layer(tiny_model, batches, cfg):
    prune_(tiny_model, cfg, batches=batches)
    got = sparsity_of(tiny_model)
    assert len(got) == 8
    for name, m in block_linears(tiny_model).items():
        if isinstance(cfg, WandaConfig):  # round(s * cols) per output row
            expect = round(cfg.sparsity * m.in_features) / m.in_features
        else:  # round(s * numel) per layer (SparseGPT: per block of 128 columns; these layers are one block)
            expect = round(cfg.sparsity * m.weight.numel()) / m.weight.numel()
        assert got[name] == pytest.approx(expect, abs=1e-6), name


@pytest.mark.parametrize("cfg", [MagnitudeConfig(n_m=(2, 4)), WandaConfig(n_m=(2, 4)), SparseGPTConfig(n_m=(2, 4))])
def test_two_four_pattern(tiny_model, batches, cfg):
    prune_(tiny_model, cfg, batches=batches)
    for name, m in block_linears(tiny_model).items():
        nonzero = (m.weight != 0).reshape(m.out_features, -1, 4).sum(-1)  # (rows, cols/4)
        assert torch.equal(nonzero, torch.full_like(nonzero, 2)), name


def test_embedding_and_head_untouched(tiny_model, batches):
    emb = tiny_model.tok_emb.weight.clone()
    prune_(tiny_model, SparseGPTConfig(0.5), batches=batches)
    assert torch.equal(tiny_model.tok_emb.weight, emb)
    assert tiny_model.lm_head.weight is tiny_model.tok_emb.weight


def test_wanda_and_sparsegpt_beat_magnitude_on_correlated_inputs():
    x = _correlated_inputs()
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    y = x @ w.T
    norm = x.pow(2).sum(0).sqrt()
    H = x.T @ x / x.shape[0]

    def mse(wp):
        return (x @ wp.T - y).pow(2).mean().item()

    for n_m in (None, (2, 4)):
        mag = mse(w.masked_fill(magnitude_mask(w, 0.5, n_m), 0))
        wanda = mse(w.masked_fill(wanda_mask(w, norm, 0.5, n_m), 0))
        sgpt = mse(sparsegpt_prune(w, H, 0.5, n_m, blocksize=32))
        assert wanda < 0.7 * mag, (n_m, wanda, mag)
        assert sgpt < 0.5 * wanda, (n_m, sgpt, wanda)


def test_sparsegpt_at_zero_is_identity():
    x = _correlated_inputs()
    w = torch.randn(16, 64)
    out = sparsegpt_prune(w, x.T @ x / x.shape[0], 0.0, blocksize=16)
    torch.testing.assert_close(out, w, rtol=0, atol=1e-6)


def test_n_m_mask_keeps_largest():
    score = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.1, 0.4, 0.3, 0.2]])
    assert n_m_mask(score, (2, 4)).tolist() == [[False, True, False, True, True, False, False, True]]


def test_pruned_model_still_generates(tiny_model, batches, byte_tokenizer):
    from lilliput.infer.generate import GenerationConfig, generate

    prune_(tiny_model, WandaConfig(0.5), batches=batches)
    out = generate(tiny_model, byte_tokenizer, "hello", GenerationConfig(max_new_tokens=5, ignore_eos=True))[0]
    assert len(out.tokens) == 5


@pytest.mark.parametrize("bad", [dict(sparsity=1.0), dict(sparsity=-0.1), dict(n_m=(4, 2)), dict(n_m=(0, 4))])
def test_bad_unstructured_configs(bad):
    for cls in (MagnitudeConfig, WandaConfig, SparseGPTConfig):
        with pytest.raises(ValueError):
            cls(**bad)
    with pytest.raises(ValueError, match="damp"):
        SparseGPTConfig(damp=0)


def test_calibration_needed_and_wrong_config(tiny_model):
    with pytest.raises(ValueError, match="tokenizer"):
        prune_(tiny_model, WandaConfig())
    with pytest.raises(ValueError, match="unknown pruning method"):
        prune_(tiny_model, object())
    with pytest.raises(ValueError, match="structured_prune"):
        prune_(tiny_model, StructuredConfig(ffn_dim=32))


# --- structured --------------------------------------------------------------------------------

def _zero_heads(model: GPT, layer: int, heads: list[int]):
    c = model.config
    for h in heads:
        model.layers[layer].mixer.wo.weight.data[:, h * c.hd:(h + 1) * c.hd] = 0


def _kept(full: torch.Tensor, part: torch.Tensor) -> list[int]:
    """Which rows of `full` survive in `part` (rows are copied unchanged)."""
    return [int((full == r).all(1).nonzero()[0]) for r in part]


def test_removing_heads_equals_zeroing_them(gqa_model, batches):
    c = gqa_model.config
    pruned = structured_prune(gqa_model, StructuredConfig(n_heads=3, refit=False), batches=batches)  # 1 of 2 per group
    assert (pruned.config.n_heads, pruned.config.n_kv_heads, pruned.config.head_dim) == (3, 3, 8)
    masked = _copy(gqa_model)
    for i in range(c.n_layers):
        q_rows = gqa_model.layers[i].mixer.wqkv.weight[:c.n_heads * c.hd].view(c.n_heads, -1)
        kept_q = _kept(q_rows, pruned.layers[i].mixer.wqkv.weight[:3 * c.hd].view(3, -1))
        assert [h // 2 for h in kept_q] == [0, 1, 2]  # one query head kept in every group
        _zero_heads(masked, i, [h for h in range(c.n_heads) if h not in kept_q])
    torch.testing.assert_close(pruned(batches), masked(batches), rtol=1e-4, atol=1e-4)


def test_removing_kv_groups_equals_zeroing_them(gqa_model, batches):
    pruned = structured_prune(gqa_model, StructuredConfig(n_kv_heads=2, refit=False), batches=batches)
    assert (pruned.config.n_heads, pruned.config.n_kv_heads) == (4, 2)
    c, masked = gqa_model.config, _copy(gqa_model)
    for i in range(c.n_layers):
        k_rows = gqa_model.layers[i].mixer.wqkv.weight[c.n_heads * c.hd:(c.n_heads + 3) * c.hd].view(3, -1)
        kept = _kept(k_rows, pruned.layers[i].mixer.wqkv.weight[4 * c.hd:6 * c.hd].view(2, -1))
        gone = [g for g in range(3) if g not in kept][0]
        _zero_heads(masked, i, [2 * gone, 2 * gone + 1])
    torch.testing.assert_close(pruned(batches), masked(batches), rtol=1e-4, atol=1e-4)


def test_removing_channels_and_layers_equals_masking(gqa_model, batches):
    pruned = structured_prune(gqa_model, StructuredConfig(ffn_dim=40, n_layers=2, refit=False), batches=batches)
    assert (pruned.config.ffn_dim, pruned.config.n_layers) == (40, 2)
    masked = _copy(gqa_model)
    kept_layers = [next(i for i in range(3) if torch.equal(gqa_model.layers[i].attn_norm.weight, blk.attn_norm.weight)
                        and torch.equal(gqa_model.layers[i].mixer.wo.weight, blk.mixer.wo.weight))
                   for blk in pruned.layers]
    for j, i in enumerate(kept_layers):
        gate = gqa_model.layers[i].ffn.w_gate_up.weight[:64]
        kept = _kept(gate, pruned.layers[j].ffn.w_gate_up.weight[:40])
        masked.layers[i].ffn.w_down.weight.data[:, [k for k in range(64) if k not in kept]] = 0
    masked.layers = nn.ModuleList(masked.layers[i] for i in kept_layers)  # a dropped block is the identity
    torch.testing.assert_close(pruned(batches), masked(batches), rtol=1e-4, atol=1e-4)


def test_removing_width_equals_zeroing_channels(gqa_model, batches):
    pruned = structured_prune(gqa_model, StructuredConfig(dim=40, refit=False), batches=batches)
    assert pruned.config.dim == 40 and pruned.config.head_dim == 8
    masked = _copy(gqa_model)
    emb = gqa_model.tok_emb.weight
    kept = [int((emb.T == col).all(1).nonzero()[0]) for col in pruned.tok_emb.weight.T]
    gone = [k for k in range(48) if k not in kept]
    masked.tok_emb.weight.data[:, gone] = 0  # tied: the output layer ignores them too
    for blk in masked.layers:
        blk.mixer.wo.weight.data[gone] = 0
        blk.ffn.w_down.weight.data[gone] = 0
    torch.testing.assert_close(pruned(batches), masked(batches), rtol=1e-3, atol=1e-4)


def test_refit_reduces_error(gqa_model, batches):
    ref = gqa_model(batches)
    plain = structured_prune(gqa_model, StructuredConfig(ffn_dim=24, n_heads=3, refit=False), batches=batches)
    refit = structured_prune(gqa_model, StructuredConfig(ffn_dim=24, n_heads=3, refit=True), batches=batches)
    err = lambda m: (m(batches) - ref).pow(2).mean().item()  # noqa: E731
    assert err(refit) < err(plain)


def test_structured_shrinks_saves_loads_generates(gqa_model, batches, byte_tokenizer, tmp_path):
    from lilliput.core.checkpoint import load_model, save_checkpoint
    from lilliput.infer.fused import FusedStep
    from lilliput.infer.generate import GenerationConfig, generate

    cfg = StructuredConfig(n_layers=2, dim=40, n_heads=2, n_kv_heads=2, ffn_dim=32)
    pruned = structured_prune(gqa_model, cfg, batches=batches)
    before, after = parameter_breakdown(gqa_model), parameter_breakdown(pruned)
    assert after["total"] == parameter_count(pruned) < before["total"]
    assert after["total"] == sum(v for k, v in after.items() if k != "total")
    assert (pruned.config.n_layers, pruned.config.dim, pruned.config.ffn_dim) == (2, 40, 32)
    save_checkpoint(pruned, byte_tokenizer, tmp_path / "small")
    loaded, tok = load_model(tmp_path / "small", device="cpu")
    assert loaded.config == pruned.config
    torch.testing.assert_close(loaded(batches), pruned(batches))
    gcfg = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    out = generate(loaded, tok, [[1, 2, 3]], gcfg)[0].tokens
    # the same greedy tokens as plain forwards (the fused C step, where it applies, agrees)
    ids = [1, 2, 3]
    for _ in range(8):
        ids.append(int(pruned(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[3:]
    from lilliput.infer import kernels
    if isinstance(kernels.build.load(), kernels.Kernel):
        assert FusedStep.for_model(loaded) is not None


@pytest.mark.parametrize("bad, match", [(dict(n_heads=4), "multiple"), (dict(n_heads=6, n_kv_heads=1), "group size"),
                                        (dict(ffn_dim=0), "ffn_dim"), (dict(dim=100), "dim"),
                                        (dict(n_layers=5), "n_layers")])
def test_bad_structured_configs(gqa_model, batches, bad, match):
    with pytest.raises(ValueError, match=match):
        structured_prune(gqa_model, StructuredConfig(**bad), batches=batches)


def test_prune_job_configs():
    c = ModelConfig(dim=576, n_heads=9, n_kv_heads=3, ffn_dim=1536, n_layers=30)
    assert job_config(PruneJob(method="heads", sparsity=0.34), c).n_heads == 6
    assert job_config(PruneJob(method="channels", sparsity=0.25), c).ffn_dim == 1152
    assert job_config(PruneJob(method="layers", sparsity=0.2), c).n_layers == 24
    assert job_config(PruneJob(method="wanda", n_m="2:4"), c).n_m == (2, 4)
    assert parse_n_m("2:4") == (2, 4)
    for bad in (dict(method="random"), dict(sparsity=1.5), dict(method="heads", n_m="2:4"), dict(n_m="4:2")):
        with pytest.raises(ValueError):
            PruneJob(**bad)


def test_run_prune_writes_record(tmp_path, monkeypatch, gqa_model, byte_tokenizer):
    import json

    from lilliput.compress import prune as prune_mod
    from lilliput.jobs import prune as job_mod

    monkeypatch.setattr(job_mod, "load_model", lambda spec, device=None, dtype=None: (_copy(gqa_model), byte_tokenizer))
    monkeypatch.setattr(job_mod, "heldout_perplexity", lambda m, t, cfg: 2.0 + m.config.ffn_dim)
    monkeypatch.setattr(prune_mod, "calibration_batches", lambda tok, cfg: torch.randint(0, 256, (4, 16)))
    monkeypatch.setattr("lilliput.compress.structured.calibration_batches", lambda tok, cfg: torch.randint(0, 256, (4, 16)))
    for method in ("wanda", "channels"):
        out = job_mod.run_prune(PruneJob(method=method, sparsity=0.5, out=str(tmp_path / method), samples=4, seq_len=16))
        rec = json.loads((out / "run.json").read_text())
        assert rec["params"]["total_before"] == parameter_count(gqa_model)
        assert rec["label"].endswith(f" + {method} 50%")  # the input's label, then what the job did
        assert math.isfinite(rec["perplexity"]["after"]) and rec["perplexity"]["before"] > 0
    assert rec["model_config"]["ffn_dim"] == 32


@pytest.mark.slow
def test_wanda_beats_magnitude_on_smollm(smollm):
    from lilliput.compress.calibration import CalibrationConfig, calibration_batches
    from lilliput.eval.perplexity import PerplexityConfig, perplexity
    from lilliput.eval.task_sets import lambada_passages

    model, tok = smollm
    text = "\n\n".join(lambada_passages(20))
    pcfg = PerplexityConfig(window=256, max_tokens=256)
    batches = calibration_batches(tok, CalibrationConfig(samples=4, seq_len=64, full_corpus=False))
    base = perplexity(model, tok, text, pcfg)["perplexity"]
    wanda = perplexity(prune_(_copy(model), WandaConfig(0.5), batches=batches), tok, text, pcfg)["perplexity"]
    mag = perplexity(prune_(_copy(model), MagnitudeConfig(0.5)), tok, text, pcfg)["perplexity"]
    assert math.isfinite(wanda) and base < wanda < mag
