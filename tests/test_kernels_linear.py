"""Linear layers through their descriptors (lilliput.infer.kernels): every kind, with and without a
bias, against torch; the quantized modules keep a float bias through their kernels, their torch
path and their state dict."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lilliput.compress import qlinear as ql
from lilliput.infer import kernels
from lilliput.infer.kernels import Kind, descriptor, ops

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C kernel on this machine")


def biased(n=40, k=64, seed=0, dtype=torch.float32) -> nn.Linear:
    torch.manual_seed(seed)
    m = nn.Linear(k, n, bias=True).to(dtype)
    with torch.no_grad():
        m.bias.uniform_(-2, 2)
    return m


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 11])
def test_float_layers_with_bias_match_torch(dtype, rows):
    m = biased(dtype=dtype)
    desc = descriptor.for_module(m)
    assert desc.kind == (Kind.F32 if dtype == torch.float32 else Kind.BF16) and desc.bias
    x = torch.randn(rows, 64)
    ref = F.linear(x, m.weight.float(), m.bias.float())
    torch.testing.assert_close(ops.run(desc, x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", [ql.Int8Linear.from_linear, lambda m: ql.Int4Linear.from_linear(m, 32)],
                         ids=["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 5, 9])
def test_quantized_layers_keep_their_bias(make, rows):
    lin = biased()
    q = make(lin)
    assert q.bias is not None and q.bias.dtype == torch.float32 and q.spec()["bias"]
    torch.testing.assert_close(q.bias, lin.bias.detach())
    x = torch.randn(2, rows, 64)
    ref = F.linear(x, q.dequantize(), q.bias)  # the torch reference of these codes
    q.kernel_variant = "widen"  # float x: the kernel's only difference is the order of fp32 sums
    with torch.no_grad():
        torch.testing.assert_close(q(x), ref, atol=1e-4, rtol=1e-4)
        q.kernel_variant = "auto"  # int8 activations
        assert (q(x) - ref).abs().max() < 0.02 * ref.abs().max()
        many = torch.randn(ql.KERNEL_ROWS + 1, 64)  # the torch path: dequantize + F.linear, with the bias
        torch.testing.assert_close(q(many), F.linear(many, q.dequantize(), q.bias))
    # the checkpoint round trip: spec -> empty module -> state dict
    again = type(q).from_spec(q.spec())
    again.load_state_dict(q.state_dict())
    again.kernel_variant = "widen"
    with torch.no_grad():
        torch.testing.assert_close(again(x), ref, atol=1e-4, rtol=1e-4)


def test_bias_free_quantized_layer_has_no_bias_in_its_spec():
    lin = nn.Linear(64, 32, bias=False)
    q = ql.Int8Linear.from_linear(lin)
    assert q.bias is None and "bias" not in q.spec() and q.kernel_desc().bias is None


@pytest.mark.skipif(not ops.int8_batch_rows(), reason="no AVX2: no int8 batch layout in this build")
def test_int8_batch_layout_adds_the_bias():
    q = ql.Int8Linear.from_linear(biased(n=48, k=64))
    desc = q.kernel_desc()
    assert desc.kind == Kind.INT8_BATCH
    x = torch.randn(20, 64)
    ref = F.linear(x, q.dequantize(), q.bias)
    assert (ops.run(desc, x) - ref).abs().max() < 0.02 * ref.abs().max()


@torch.inference_mode()
def test_fused_step_runs_biased_quantized_layers():
    """A Qwen2 specimen (biased q|k|v) with int8 and int4 layers: the C step against the torch modules."""
    pytest.importorskip("transformers")
    from lilliput.eval import zoo
    from lilliput.infer.fused import FusedStep

    model = zoo.to_lilliput(zoo.hf_model("qwen2"), "qwen2")
    for i, blk in enumerate(model.layers):
        blk.mixer.wqkv = ql.Int8Linear.from_linear(blk.mixer.wqkv) if i % 2 else \
            ql.Int4Linear.from_linear(blk.mixer.wqkv, 32)
        blk.mixer.wqkv.kernel_variant = "widen"
        assert blk.mixer.wqkv.bias is not None
    step = FusedStep.for_model(model)
    assert step is not None
    idx = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with kernels.decode_threads():
        a, b = model.new_state(1, 16, dtype=torch.float32), model.new_state(1, 16, dtype=torch.float32)
        model(idx[:, :4], a), model(idx[:, :4], b)
        for t in range(4, 12):
            ref = model(idx[:, t:t + 1], a)[0]
            torch.testing.assert_close(step(b, [int(idx[0, t])], [0]), ref, atol=1e-4, rtol=1e-4)
