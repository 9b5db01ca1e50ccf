import copy
import dataclasses
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lilliput.compress import qlinear as ql
from lilliput.compress.gptq import gptq_quantize
from lilliput.compress.quantize import AWQConfig, GPTQConfig, Grid, RTNConfig, layer_group, quantize_
from lilliput.core.checkpoint import load_folder, quantization_section, save_checkpoint
from lilliput.eval.efficiency import model_bytes
from lilliput.infer import kernels
from lilliput.infer.fused import FusedStep
from lilliput.infer.generate import GenerationConfig, generate
from lilliput.jobs.quantize import QuantizeJob

needs_kernel = pytest.mark.skipif(not kernels.available(), reason="no C compiler")


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    return (10 * torch.log10(ref.pow(2).mean() / (out - ref).pow(2).mean())).item()


@pytest.fixture
def calib():
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))


# --- formats -------------------------------------------------------------------------------------

def test_int4_pack_unpack_round_trip():
    q = torch.randint(0, 16, (5, 96), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    packed = ql.pack_int4(q)
    assert packed.shape == (5, 48) and packed.dtype == torch.uint8
    assert torch.equal(ql.unpack_int4(packed), q)
    assert packed[0, 0] == q[0, 0] | (q[0, 16] << 4)  # byte j = column j | column j + 16


def test_int8_batch_layout_round_trip_and_state():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (32, 64), generator=g).to(torch.int8)
    packed = ql.pack_int8(q, 16)
    assert packed.shape == (2, 16, 16, 4) and packed.dtype == torch.uint8
    assert packed[1, 2, 3, 1] == q[16 + 3, 2 * 4 + 1].item() + 128  # group 1, columns 8..11, row 3
    assert torch.equal(ql.unpack_int8(packed, 16), q)
    m = ql.Int8Linear.from_codes(q, torch.rand(32, generator=g))
    dense = m.dequantize()
    m.pack_(16)
    assert m.packed == 16 and torch.equal(m.dequantize(), dense) and torch.equal(m.codes(), q)
    saved = m.state_dict()
    assert torch.equal(saved["qweight"], q)  # checkpoints hold row-major codes whatever the layout
    other = ql.Int8Linear(64, 32).pack_(16)
    other.load_state_dict(saved)  # row-major codes into a packed module: repacked
    assert other.packed == 16 and torch.equal(other.codes(), q)
    assert torch.equal(other.pack_(0).qweight, q)


def test_int4_batch_layout_round_trip_and_state():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (16, 64), generator=g).to(torch.uint8)
    packed = ql.pack_int4_batch(q)
    assert packed.shape == (2, 2, 4, 32) and packed.dtype == torch.uint8
    # group 1, block 1, chunk 2: columns 32 + 16..19 (low nibbles) and 32 + 20..23 (high), row 3 at bytes 12..15
    assert packed[1, 1, 2, 12 + 1] == q[8 + 3, 32 + 16 + 1] | (q[8 + 3, 32 + 20 + 1] << 4)
    assert torch.equal(ql.unpack_int4_batch(packed), q)
    scale, zero = torch.rand(16, 2, generator=g) + 0.1, torch.randint(0, 16, (16, 2), generator=g)
    m = ql.Int4Linear.from_codes(q, scale, zero, 32)
    dense, row_major = m.dequantize(), {k: v.clone() for k, v in m.state_dict().items()}
    m.pack_(8)
    assert m.packed == 8 and m.scale.shape == (2, 2, 8) and torch.equal(m.dequantize(), dense)
    assert torch.equal(m.codes(), q) and torch.equal(m.zeros(), zero.to(torch.uint8))
    saved = m.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in row_major.items())  # checkpoints hold row-major buffers
    other = ql.Int4Linear(64, 16, 32).pack_(8)
    other.load_state_dict(saved)  # row-major buffers into a packed module: repacked
    assert other.packed == 8 and torch.equal(other.dequantize(), dense)
    assert all(torch.equal(getattr(other.pack_(0), k), v) for k, v in row_major.items())


@needs_kernel
@pytest.mark.skipif(not (kernels.available() and kernels.build.load().lib.qgemv_int4_pack()), reason="no AVX2")
@pytest.mark.parametrize("n,k,group", [(8, 64, 32), (48, 192, 64), (96, 1536, 128)])
def test_int4_batch_kernel_matches_row_major_and_is_batch_independent(n, k, group):
    g = torch.Generator().manual_seed(n)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g))
    m = ql.Int4Linear.from_linear(lin, group)
    x = torch.randn(21, k, generator=g)
    m.kernel_variant = "dot"  # row-major, int8 x in blocks of 32: the same arithmetic up to float order
    ref = m(x)
    m.kernel_variant = "auto"
    got = m(x)
    assert m.packed == kernels.build.load().lib.qgemv_int4_pack()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    for b in (1, 3, 4, 5, 9):  # a row's result does not depend on the rows beside it
        assert torch.equal(m(x[:b]), got[:b])
    assert sqnr_db(F.linear(x, m.dequantize(), m.bias), got) > 35


@needs_kernel
@pytest.mark.skipif(not (kernels.available() and kernels.build.load().lib.qgemv_int8_pack()), reason="no AVX2")
@pytest.mark.parametrize("n,k", [(32, 64), (48, 96), (96, 1536)])
def test_int8_batch_kernel_matches_row_major_and_is_batch_independent(n, k):
    g = torch.Generator().manual_seed(n)
    m = ql.Int8Linear.from_codes(torch.randint(-127, 128, (n, k), generator=g), torch.rand(n, generator=g) / 50)
    x = torch.randn(21, k, generator=g)
    m.kernel_variant = "dot"  # row-major, int8 x in blocks of 32: the same arithmetic up to float order
    ref = m(x)
    m.kernel_variant = "auto"
    got = m(x)
    assert m.packed == kernels.build.load().lib.qgemv_int8_pack()  # 16 with AVX-512 VNNI, 8 with AVX2
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for b in (1, 3, 8, 9):  # a row's result does not depend on the rows beside it
        assert torch.equal(m(x[:b]), got[:b])
    assert sqnr_db(x @ m.dequantize().T, got) > 35


@pytest.mark.parametrize("bits,group,min_db", [(8, 0, 38.0), (4, 32, 17.0), (4, 128, 15.0)])
def test_rtn_layer_sqnr(bits, group, min_db):
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    m = Grid.fit(w, bits, group or 256).module(w)
    assert sqnr_db(w, m.dequantize()) > min_db
    assert isinstance(m, ql.Int8Linear if bits == 8 else ql.Int4Linear)


def test_dtype_cast_keeps_scales():
    w = torch.randn(8, 32)
    for m in (Grid.fit(w, 8, 32).module(w), Grid.fit(w, 4, 32).module(w)):
        before = m.dequantize()
        m.to(torch.bfloat16)
        assert torch.equal(m.dequantize(), before)


@needs_kernel
@pytest.mark.parametrize("n,k", [(48, 32), (77, 96), (300, 576), (5, 40), (33, 640)])
@pytest.mark.parametrize("variant", ["widen", "dot"])
def test_kernel_matches_torch(n, k, variant):
    g = torch.Generator().manual_seed(n)
    w, x = torch.randn(n, k, generator=g), torch.randn(3, k, generator=g)
    layers = [Grid.fit(w, 8, k).module(w)]
    layers += [Grid.fit(w, 4, grp).module(w) for grp in (32, 64, 128) if k % grp == 0]
    for m in layers:
        ref = F.linear(x, m.dequantize())
        m.kernel_variant = variant
        with torch.no_grad():
            y = m(x)
        # widen is exact up to fp32 rounding; dot quantizes x to int8 per 32 values (~0.5%)
        tol = 1e-5 if variant == "widen" or k % 32 else 1.5e-2
        assert (y - ref).norm() / ref.norm() < tol, (type(m).__name__, variant)


def test_torch_fallback_for_long_batches():
    w = torch.randn(40, 64)
    m = Grid.fit(w, 4, 32).module(w)
    x = torch.randn(2, ql.KERNEL_ROWS, 64)  # more rows than the kernels take: dequantize + F.linear
    torch.testing.assert_close(m(x), F.linear(x, m.dequantize()))
    few = x[:, :9]  # 18 rows: the kernel, 8 rows per pass, int8 activations
    ref = F.linear(few, m.dequantize())
    assert (m(few) - ref).abs().max() < 0.02 * ref.abs().max()


# --- configs -------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda: RTNConfig(bits=3), lambda: GPTQConfig(bits=4, group_size=48),
                                  lambda: AWQConfig(group_size=256), lambda: GPTQConfig(damp=1.5),
                                  lambda: RTNConfig(lm_head_bits=6), lambda: QuantizeJob(method="smooth").config()])
def test_bad_configs_raise(make):
    with pytest.raises(ValueError):
        make()


def test_group_fallback_is_recorded(tiny_model):
    assert layer_group(576, 128) == 64 and layer_group(1536, 128) == 128 and layer_group(96, 64) == 32
    with pytest.raises(ValueError, match="bits=8"):
        layer_group(40, 32)
    m = quantize_(tiny_model, RTNConfig(bits=4, group_size=128))  # tiny: widths 32 and 64
    layers = quantization_section(m)["layers"]
    assert layers["layers.0.mixer.wqkv"]["group_size"] == 32
    assert layers["layers.0.ffn.w_down"]["group_size"] == 64
    assert len(layers) == 9  # 4 per block + the output layer: nothing skipped
    assert layers["lm_head"]["bits"] == 8  # the output layer stays int8 unless lm_head_bits says otherwise


def test_lm_head_bits(tiny_model):
    m = quantize_(copy.deepcopy(tiny_model), RTNConfig(bits=4, group_size=32, lm_head_bits=None))
    assert isinstance(m.lm_head, ql.Int4Linear)
    m = quantize_(copy.deepcopy(tiny_model), RTNConfig(bits=4, group_size=32, lm_head=False))
    assert type(m.lm_head) is torch.nn.Linear and m.lm_head.weight is m.tok_emb.weight  # still tied


def test_calibrated_method_needs_data(tiny_model):
    with pytest.raises(ValueError, match="calibration"):
        quantize_(tiny_model, GPTQConfig())


# --- methods ---------------------------------------------------------------------------------------

def test_gptq_beats_rtn_on_correlated_inputs():
    g = torch.Generator().manual_seed(0)
    k = 64
    mix = torch.randn(k, k, generator=g) / k**0.5
    x = torch.randn(2048, k, generator=g) @ (mix + torch.eye(k))  # correlated features
    w = torch.randn(32, k, generator=g)
    H = 2 * x.T @ x / len(x)
    grid = Grid.fit(w, 4, 32)
    err_rtn = (x @ (grid.fake(w) - w).T).pow(2).mean()
    err_gptq = (x @ (gptq_quantize(w, H, grid) - w).T).pow(2).mean()
    assert err_gptq < 0.8 * err_rtn
    assert torch.allclose(grid.fake(gptq_quantize(w, H, grid)), gptq_quantize(w, H, grid), atol=1e-5)  # on grid


@pytest.mark.parametrize("cfg,min_db", [
    (RTNConfig(bits=8), 35.0), (RTNConfig(bits=4, group_size=32), 15.0),
    (GPTQConfig(bits=8, calibration=None), 35.0), (GPTQConfig(bits=4, group_size=32, calibration=None), 15.0),
    (AWQConfig(bits=4, group_size=32, grid=5, calibration=None), 15.0), (AWQConfig(bits=8, grid=3, calibration=None), 35.0),
])
def test_every_method_on_tiny(tiny_model, calib, cfg, min_db):
    ref = tiny_model(calib)
    q = quantize_(copy.deepcopy(tiny_model), cfg, calibration=calib)
    assert sqnr_db(ref, q(calib)) > min_db
    assert model_bytes(q) < model_bytes(tiny_model)


def test_awq_folding_keeps_function_before_rounding(tiny_model, calib):
    from lilliput.compress.awq import search_scale

    x = torch.randn(256, 32) * torch.linspace(0.1, 5, 32)  # a few loud channels
    w = torch.randn(16, 32)
    s = search_scale(w, x, 4, 32, grid=11)
    torch.testing.assert_close((x / s) @ (w * s).T, x @ w.T, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(s, torch.ones_like(s))


# --- checkpoints and the engine ------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [RTNConfig(bits=8), RTNConfig(bits=4, group_size=32)])
def test_save_load_generate(tiny_model, byte_tokenizer, tmp_path, cfg):
    q = quantize_(tiny_model, cfg)
    save_checkpoint(q, byte_tokenizer, tmp_path / "q")
    meta = json.loads((tmp_path / "q" / "config.json").read_text())
    assert meta["quantization"]["method"] == "rtn" and len(meta["quantization"]["layers"]) == 9
    back, tok = load_folder(tmp_path / "q", device="cpu")
    idx = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(back(idx), q(idx))
    assert model_bytes(back) == model_bytes(q)
    a = generate(q, byte_tokenizer, "hello", GenerationConfig(max_new_tokens=8, ignore_eos=True))[0]
    b = generate(back, tok, "hello", GenerationConfig(max_new_tokens=8, ignore_eos=True))[0]
    assert a.tokens == b.tokens and len(a.tokens) == 8


@needs_kernel
@pytest.mark.parametrize("bits", [8, 4])
def test_fused_step_runs_quantized_layers(tiny_model, bits):
    q = quantize_(tiny_model, RTNConfig(bits=bits, group_size=32))
    for m in q.modules():
        if isinstance(m, ql.QuantLinear):
            m.kernel_variant = "widen"  # exact: compare against the torch modules tightly
    step = FusedStep.for_model(q)
    assert step is not None
    prompt = torch.tensor([[5, 17, 42, 99]])
    state_f, state_t = q.new_state(1, 16), q.new_state(1, 16)
    with torch.no_grad():
        q(prompt, state_f)
        q(prompt, state_t)
        for tok in [7, 8, 9]:
            fused = step(state_f, [tok], [0]).clone()
            ref = q(torch.tensor([[tok]]), state_t)[:, -1]
            torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-4)


def test_quantize_job_validates():
    job = QuantizeJob(method="gptq", bits=4, group_size=64, samples=4, seq_len=64)
    cfg = job.config()
    assert isinstance(cfg, GPTQConfig) and cfg.calibration.samples == 4
    assert dataclasses.replace(job, bits=8).config().bits == 8


# --- the real model --------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_int8_perplexity_and_int4_generation(smollm):
    from lilliput.eval.perplexity import PerplexityConfig, perplexity
    from lilliput.eval.tasks import lambada_passages

    model, tok = smollm
    text = "\n\n".join(lambada_passages(8))
    pcfg = PerplexityConfig(window=256, max_tokens=512)
    base = perplexity(model, tok, text, pcfg)["perplexity"]
    q8 = quantize_(copy.deepcopy(model), RTNConfig(bits=8))
    assert perplexity(q8, tok, text, pcfg)["perplexity"] / base < 1.01
    q4 = quantize_(copy.deepcopy(model), RTNConfig(bits=4, group_size=128))
    groups = {s["group_size"] for s in quantization_section(q4)["layers"].values() if s["bits"] == 4}
    assert groups == {64, 128}  # 576-wide layers fall back to 64, 1536-wide keep 128
    out = generate(q4, tok, "The capital of France is", GenerationConfig(max_new_tokens=8, ignore_eos=True))[0]
    assert len(out.tokens) == 8


@needs_kernel
@pytest.mark.skipif(not (kernels.available() and kernels.build.load().lib.qgemv_int8_pack()), reason="no AVX2")
def test_int8_prompt_chunks_run_in_the_fused_step(tiny_model):
    from lilliput.infer.runner import ModelRunner

    q = quantize_(tiny_model, RTNConfig(bits=8))
    runner = ModelRunner(q, rows=1, max_len=200, kv_dtype=torch.float32)
    assert runner.fused.one_pass and runner.fused.max_tokens < 150
    ids = torch.randint(0, 256, (150,), generator=torch.Generator().manual_seed(0)).tolist()
    got = runner.extend(0, ids, "all")  # pieces of max_tokens, each one pass over the weights
    assert got.shape == (150, 256) and runner.state.lengths[0] == 150
    with torch.no_grad():
        ref = q(torch.tensor([ids]))[0]
    assert sqnr_db(ref, got) > 30  # int8 activations in the step, float ones in torch
    runner.state.free(0)
    torch.testing.assert_close(runner.extend(0, ids, "last"), got[-1])
