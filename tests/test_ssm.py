"""Mamba-2 SSD: chunked = sequential = the step unrolled, in float64, values and gradients."""

import pytest
import torch

from lilliput.core.config import preset
from lilliput.core.model import GPT, Step
from lilliput.core.ssm import Mamba, segsum, ssd_chunked, ssd_sequential


def ssd_inputs(b=2, T=13, nh=3, hs=4, N=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, T, nh, hs, generator=g, dtype=torch.float64)
    dt = torch.nn.functional.softplus(torch.randn(b, T, nh, generator=g, dtype=torch.float64))
    A = -torch.rand(nh, generator=g, dtype=torch.float64) * 4 - 0.5
    B = torch.randn(b, T, N, generator=g, dtype=torch.float64)
    C = torch.randn(b, T, N, generator=g, dtype=torch.float64)
    h0 = torch.randn(b, nh, hs, N, generator=g, dtype=torch.float64)
    return [t.requires_grad_() for t in (x, dt, A, B, C, h0)]


def test_segsum_is_sums_between_positions():
    a = torch.tensor([1.0, 2.0, 4.0])
    s = segsum(a)
    assert s[2, 0] == 6 and s[2, 1] == 4 and s[1, 1] == 0 and s[0, 1] == float("-inf")


@pytest.mark.parametrize("chunk", [1, 3, 4, 13, 64])
@pytest.mark.parametrize("with_h0", [False, True])
def test_chunked_equals_sequential_values_and_gradients(chunk, with_h0):
    x, dt, A, B, C, h0 = ssd_inputs()
    h0_ = h0 if with_h0 else None
    y_ref, hs = ssd_sequential(x, dt, A, B, C, h0_)
    y, h_end = ssd_chunked(x, dt, A, B, C, chunk, h0_)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_end, hs[:, -1], rtol=1e-12, atol=1e-12)
    w = torch.randn_like(y_ref)
    inputs = [x, dt, A, B, C] + ([h0] if with_h0 else [])
    g_ref = torch.autograd.grad((y_ref * w).sum() + hs[:, -1].sum(), inputs)
    g = torch.autograd.grad((y * w).sum() + h_end.sum(), inputs)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def mamba(chunk: int) -> Mamba:
    torch.manual_seed(0)
    cfg = preset("mamba-tiny").replace(ssm_chunk=chunk)
    m = Mamba(cfg).double()
    with torch.no_grad():  # larger weights than the 0.02 init, so that every part matters
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
        m.dt_bias.normal_(0, 1)
    return m


def steps(rows, start, T):
    return Step(torch.as_tensor(rows), torch.as_tensor(start), T, "cpu")


@pytest.mark.parametrize("chunk", [1, 4, 5, 64])
def test_mixer_whole_sequence_equals_token_by_token_decode(chunk):
    """The chunked training form = the O(1) step unrolled over the same tokens, with gradients."""
    m = mamba(chunk)
    x = torch.randn(2, 11, 32, dtype=torch.float64, requires_grad=True)
    y = m(x)
    state = m.new_state(2, 64, "cpu", torch.float64)
    ys = [m(x[:, t:t + 1], state, steps([0, 1], [t, t], 1)) for t in range(11)]
    y_step = torch.cat(ys, 1)
    torch.testing.assert_close(y, y_step, rtol=1e-10, atol=1e-12)
    w = torch.randn_like(y)
    params = [x] + list(m.parameters())
    g = torch.autograd.grad((y * w).sum(), params)
    g_step = torch.autograd.grad((y_step * w).sum(), params)
    for a, b in zip(g, g_step):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_prefill_in_pieces_longer_than_snapshots_equals_whole():
    m = mamba(4)
    x = torch.randn(1, 40, 32, dtype=torch.float64)
    state = m.new_state(1, 64, "cpu", torch.float64)
    y = torch.cat([m(x[:, :23], state, steps([0], [0], 23)), m(x[:, 23:], state, steps([0], [23], 17))], 1)
    torch.testing.assert_close(y, m(x), rtol=1e-10, atol=1e-12)


def test_truncate_rewinds_to_any_position_of_the_last_forward_and_refuses_further():
    m = mamba(4)
    x = torch.randn(1, 30, 32, dtype=torch.float64)
    ref = m(x)
    for n in (26, 24, 21, 20):
        state = m.new_state(2, 64, "cpu", torch.float64)
        m(x[:, :20], state, steps([0], [0], 20))
        m(x[:, 20:26], state, steps([0], [20], 6))  # e.g. a pending token + 5 drafts
        state.truncate(0, n)
        y = m(x[:, n:30], state, steps([0], [n], 30 - n))
        torch.testing.assert_close(y, ref[:, n:30], rtol=1e-10, atol=1e-12)
    state.truncate(0, 27)  # within the last forward (24..30)
    with pytest.raises(ValueError, match="cannot rewind the mamba state of row 0 from 27 to 19"):
        state.truncate(0, 19)
    state.copy_row(0, 1, 26)  # a copy (rewound to 26) continues like the original
    torch.testing.assert_close(m(x[:, 26:], state, steps([1], [26], 4)), ref[:, 26:], rtol=1e-10, atol=1e-12)
    state.reset(0)
    torch.testing.assert_close(m(x[:, :5], state, steps([0], [0], 5)), ref[:, :5], rtol=1e-10, atol=1e-12)


def test_model_decode_state_matches_full_forward():
    torch.manual_seed(0)
    model = GPT(preset("mamba-tiny")).double().eval()
    idx = torch.randint(0, 256, (3, 21))
    state = model.new_state(3, 32, dtype=torch.float64)
    out = torch.cat([model(idx[:, :9], state), model(idx[:, 9:10], state), model(idx[:, 10:], state)], 1)
    torch.testing.assert_close(out, model(idx), rtol=1e-9, atol=1e-9)
    assert state.nbytes() > 0 and state.max_len == model.config.max_seq_len
