"""The fused C step over recurrent mixers (Mamba-2, mLSTM) and hybrids: parity with the torch modules."""

import pytest
import torch

from lilliput.compress.quantize import RTNConfig, quantize_
from lilliput.core.config import preset
from lilliput.core.model import GPT
from lilliput.core.recurrent import SNAPSHOTS
from lilliput.infer import kernels
from lilliput.infer.engine import Engine, EngineConfig
from lilliput.infer.fused import FusedStep, fast_path_reason
from lilliput.infer.sequence import GenerationConfig

needs_kernel = pytest.mark.skipif(not kernels.available(), reason="no C kernel on this machine")

MODELS = {
    "mamba": preset("mamba-tiny"),
    "mlstm": preset("xlstm-tiny"),
    "hybrid": preset("hybrid-tiny"),  # mamba, mamba, mamba, attention
    "mlstm-hybrid-moe": preset("moe-tiny").replace(n_layers=3, layer_mixers=("mlstm", "attention", "mamba"),
                                                    ssm_chunk=8, mlstm_chunk=8),
    # odd widths: the scalar tails of the state update (state 12, head width 8, a convolution of 2)
    "mamba-odd": preset("mamba-tiny").replace(ssm_state=12, ssm_head_dim=8, ssm_conv=2),
}


def model_of(name: str) -> GPT:
    torch.manual_seed(0)
    model = GPT(MODELS[name]).eval()
    for p in model.parameters():  # weights larger than the init's, so the logits differ visibly
        p.data.mul_(3.0) if p.dim() > 1 else None
    return model


PROMPTS = [[5, 17, 99, 3, 250], [7, 7, 1, 200, 31, 64, 128, 9, 11], [42, 43]]  # rows of different lengths


def prompt_and_decode(model, prompts, steps=16, seed=0):
    """Every row's prompt through one fused call (rows grouped, each in position order), then `steps`
    decode calls of one token per row; beside the same through the torch modules over a second state.
    Returns the fused logits, the torch logits (lists per call) and both states."""
    g = torch.Generator().manual_seed(seed)
    B, fused = len(prompts), FusedStep.for_model(model)
    a, b = model.new_state(B, 64), model.new_state(B, 64)
    flat = [(r, t) for r, p in enumerate(prompts) for t in p]
    got = [fused(a, [t for _, t in flat], [r for r, _ in flat]).clone()]
    want = [torch.cat([model(torch.tensor([p]), b, rows=[r])[0] for r, p in enumerate(prompts)])]
    for _ in range(steps):
        toks = torch.randint(0, model.config.vocab_size, (B,), generator=g)
        got.append(fused(a, toks.tolist(), list(range(B))).clone())
        want.append(model(toks[:, None], b, rows=list(range(B)))[:, -1])
    return got, want, a, b


def assert_states_close(a, b, atol=1e-5):
    assert a.lengths == b.lengths
    for sa, sb in zip(a.layers, b.layers):
        if hasattr(sa, "tensors"):
            assert sa.lengths == sb.lengths
            for k in sa.tensors:
                torch.testing.assert_close(sa.tensors[k], sb.tensors[k], atol=atol, rtol=1e-4)


@needs_kernel
@pytest.mark.parametrize("name", list(MODELS))
@torch.inference_mode()
def test_fused_step_matches_torch_over_prompt_and_decode(name, one_thread):
    model = model_of(name)
    assert fast_path_reason(model) == ""
    got, want, a, b = prompt_and_decode(model, PROMPTS)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    assert_states_close(a, b)
    # and the torch modules without a state (the chunked SSD / chunkwise mLSTM): each row's whole sequence
    seqs = [list(p) for p in PROMPTS]
    g = torch.Generator().manual_seed(0)
    for _ in range(16):
        for s, t in zip(seqs, torch.randint(0, model.config.vocab_size, (3,), generator=g).tolist()):
            s.append(t)
    for r, s in enumerate(seqs):
        ref = model(torch.tensor([s]))[0]  # (T, V)
        first = sum(map(len, PROMPTS[:r]))
        mine = torch.cat([got[0][first:first + len(PROMPTS[r])]] + [c[r:r + 1] for c in got[1:]])
        torch.testing.assert_close(mine, ref, atol=1e-4, rtol=1e-4)


@needs_kernel
@pytest.mark.parametrize("name", ["mamba", "mlstm", "hybrid"])
@torch.inference_mode()
def test_fused_step_matches_torch_int8(name, one_thread):
    model = quantize_(model_of(name), RTNConfig(bits=8))
    assert fast_path_reason(model) == ""
    fused = FusedStep.for_model(model)
    g = torch.Generator().manual_seed(1)
    a, b = model.new_state(3, 64), model.new_state(3, 64)
    for r, p in enumerate(PROMPTS):  # the same prompts through torch into both states
        model(torch.tensor([p]), a, rows=[r]), model(torch.tensor([p]), b, rows=[r])
    for _ in range(16):  # one token per row: the same int8 kernels on both paths
        toks = torch.randint(0, 256, (3,), generator=g)
        torch.testing.assert_close(fused(a, toks.tolist(), [0, 1, 2]), model(toks[:, None], b, rows=[0, 1, 2])[:, -1],
                                   atol=1e-4, rtol=1e-4)
    assert_states_close(a, b, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("name", ["mamba", "mlstm"])
@torch.inference_mode()
def test_fused_snapshots_rewind_and_fork(name, one_thread):
    """A verification-sized call, a rewind into it, a fork (copy then rewind one token) and a call
    longer than the snapshots: the states and logits after each as torch's."""
    model = model_of(name)
    fused = FusedStep.for_model(model)
    a, b = model.new_state(3, 64), model.new_state(3, 64)
    long = list(range(3, 3 + SNAPSHOTS + 5))  # more tokens of one row than the snapshots keep
    fused(a, long, [0] * len(long)), model(torch.tensor([long]), b, rows=[0])
    draft = [9, 8, 7, 6, 5]
    fused(a, draft, [0] * 5), model(torch.tensor([draft]), b, rows=[0])
    for s in (a, b):
        s.truncate(0, len(long) + 2)  # two of the five accepted
        s.copy(0, 1)
        s.truncate(1, len(long) + 1)  # the fork rewinds one more
    assert_states_close(a, b)
    assert not a.can_truncate(0, len(long) - SNAPSHOTS)
    torch.testing.assert_close(fused(a, [11, 12], [0, 1]), model(torch.tensor([[11], [12]]), b, rows=[0, 1])[:, -1],
                               atol=1e-4, rtol=1e-4)
    assert_states_close(a, b)


@needs_kernel
def test_fused_step_refuses_a_row_whose_tokens_skip_a_position():
    model = model_of("mamba")
    fused, state = FusedStep.for_model(model), model.new_state(2, 16)
    fused.bind(state)
    fused.args.n_tok, fused.args.n_out = 2, 0
    fused.meta[0, :2], fused.meta[1, :2] = torch.tensor([0, 0]), torch.tensor([3, 5])
    assert fused.fn(fused._ref) == -2  # a state advances one position per token


@needs_kernel
@pytest.mark.parametrize("name", ["mamba", "mlstm", "hybrid"])
def test_engine_greedy_tokens_identical_with_and_without_the_fused_step(name, byte_tokenizer, monkeypatch, one_thread):
    model = model_of(name)
    prompts = ["recurrent", "mixers on the fast path, decoding together", "C"]  # the first prefills in C
    cfg = GenerationConfig(max_new_tokens=20, ignore_eos=True)

    def run():
        engine = Engine(model, byte_tokenizer, EngineConfig(max_batch=4, max_len=128, prefill_chunk=24))
        seqs = [engine.add(p, cfg) for p in prompts]
        while not all(s.status.value == "running" for s in seqs[:1]):
            engine.step()
        fused = engine.runner.fused is not None
        if fused:  # the prefill ran in C: the fork rewinds from the step's snapshot slots
            assert engine.state.layers[0].snaps[seqs[0].row][1] is None
        forks = engine.fork(seqs[0], 1)  # a copy of row 0 rewound by one token
        engine.run()
        return fused, [s.output for s in seqs + forks]

    fused_on, fast = run()
    monkeypatch.setattr(FusedStep, "for_model", classmethod(lambda cls, m: None))
    fused_off, slow = run()
    assert fused_on and not fused_off
    assert fast == slow
