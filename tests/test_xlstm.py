"""mLSTM: parallel = chunkwise = recurrent, in float64, values and gradients, with the stabiliser."""

import pytest
import torch

from lilliput.core.config import preset
from lilliput.core.model import GPT, Step
from lilliput.core.xlstm import MLSTM, mlstm_chunkwise, mlstm_parallel, mlstm_sequential


def inputs(b=2, nh=3, T=13, d=4, seed=0, gate_scale=3.0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, nh, T, d, generator=g, dtype=torch.float64) for _ in range(3))
    # large input gates: exp(i~) would overflow float32 without the stabiliser at 30
    i = torch.randn(b, nh, T, generator=g, dtype=torch.float64) * gate_scale
    f = torch.randn(b, nh, T, generator=g, dtype=torch.float64) * gate_scale
    return [t.requires_grad_() for t in (q, k, v, i, f)]


@pytest.mark.parametrize("chunk", [1, 3, 4, 13, 64])
def test_parallel_chunkwise_recurrent_agree_with_gradients(chunk):
    args = inputs()
    h_par = mlstm_parallel(*args)
    h_chunk, (C, n, m) = mlstm_chunkwise(*args, chunk)
    h_seq, (Cs, ns, ms) = mlstm_sequential(*args)
    torch.testing.assert_close(h_chunk, h_par, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(h_seq, h_par, rtol=1e-11, atol=1e-12)
    for a, b in zip((C, n, m), (Cs[:, -1], ns[:, -1], ms[:, -1])):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)
    w = torch.randn_like(h_par)
    g_par = torch.autograd.grad((h_par * w).sum(), args)
    for h in (h_chunk, h_seq):
        for a, b in zip(torch.autograd.grad((h * w).sum(), args), g_par):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_stabiliser_keeps_huge_gates_finite_in_float32():
    q, k, v, i, f = (t.detach().float() for t in inputs(gate_scale=1.0))
    i = i + 200.0  # exp(200) overflows float32
    h = mlstm_parallel(q, k, v, i, f)
    assert torch.isfinite(h).all()
    torch.testing.assert_close(mlstm_sequential(q, k, v, i, f)[0], h, rtol=1e-4, atol=1e-5)


def test_chunkwise_from_a_state_continues_the_sequence():
    q, k, v, i, f = inputs()
    h_all, _ = mlstm_chunkwise(q, k, v, i, f, 4)
    _, st = mlstm_chunkwise(q[:, :, :6], k[:, :, :6], v[:, :, :6], i[:, :, :6], f[:, :, :6], 4)
    h_rest, _ = mlstm_chunkwise(q[:, :, 6:], k[:, :, 6:], v[:, :, 6:], i[:, :, 6:], f[:, :, 6:], 3, st)
    torch.testing.assert_close(h_rest, h_all[:, :, 6:], rtol=1e-11, atol=1e-12)


def mlstm(chunk):
    torch.manual_seed(0)
    m = MLSTM(preset("xlstm-tiny").replace(mlstm_chunk=chunk)).double()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
        m.gate_bias.normal_(0, 2)
    return m


def steps(rows, start, T):
    return Step(torch.as_tensor(rows), torch.as_tensor(start), T, "cpu")


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_mixer_whole_sequence_equals_token_by_token_decode(chunk):
    m = mlstm(chunk)
    x = torch.randn(2, 11, 32, dtype=torch.float64, requires_grad=True)
    y = m(x)
    state = m.new_state(2, 64, "cpu", torch.float64)
    y_step = torch.cat([m(x[:, t:t + 1], state, steps([0, 1], [t, t], 1)) for t in range(11)], 1)
    torch.testing.assert_close(y, y_step, rtol=1e-10, atol=1e-12)
    w = torch.randn_like(y)
    params = [x] + list(m.parameters())
    for a, b in zip(torch.autograd.grad((y * w).sum(), params), torch.autograd.grad((y_step * w).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_truncate_and_copy_follow_the_sequence():
    m = mlstm(4)
    x = torch.randn(1, 30, 32, dtype=torch.float64)
    ref = m(x)
    state = m.new_state(2, 64, "cpu", torch.float64)
    m(x[:, :22], state, steps([0], [0], 22))  # 22 > 16 snapshots: chunkwise, then 16 steps
    m(x[:, 22:27], state, steps([0], [22], 5))
    state.truncate(0, 23)
    torch.testing.assert_close(m(x[:, 23:], state, steps([0], [23], 7)), ref[:, 23:], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="cannot rewind the mlstm state"):
        state.truncate(0, 22)
    state.copy_row(0, 1, 30)
    state.truncate(1, 28)
    torch.testing.assert_close(m(x[:, 28:], state, steps([1], [28], 2)), ref[:, 28:], rtol=1e-10, atol=1e-12)


def test_model_decode_state_matches_full_forward():
    torch.manual_seed(0)
    model = GPT(preset("xlstm-tiny")).double().eval()
    idx = torch.randint(0, 256, (3, 21))
    state = model.new_state(3, 32, dtype=torch.float64)
    out = torch.cat([model(idx[:, :9], state), model(idx[:, 9:10], state), model(idx[:, 10:], state)], 1)
    torch.testing.assert_close(out, model(idx), rtol=1e-9, atol=1e-9)
