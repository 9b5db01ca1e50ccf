"""The recall lab (train/recall_lab.py, bench/recall.py): MQAR batches at the lab's scale, its loss and
scoring, state bytes, and a smoke run end to end."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from lilliput.core.config import ModelConfig
from lilliput.core.model import GPT
from lilliput.eval.efficiency import decode_state_bytes, state_bytes_at
from lilliput.train.loop import LanguageModeling
from lilliput.train.recall import QueriedValues, RecallConfig, RecallMixture, recall_accuracy, recall_batch, recall_hits
from lilliput.train.recall_lab import RecallLabConfig, lab_model, quick_config, recall_lab

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_batches_at_vocab_1024_and_64_pairs_are_well_formed():
    cfg = RecallConfig(vocab_size=1024, seq_len=256, n_pairs=64, batch_size=3)
    b = recall_batch(cfg, seed=5, index=2)
    idx, mask = b["idx"], b["mask"]
    assert idx.shape == (3, 257) and mask.shape == (3, 256) and idx.dtype == torch.long
    for row in range(3):
        keys, values = idx[row, 0:128:2].tolist(), idx[row, 1:128:2].tolist()
        assert len(set(keys)) == 64 and len(set(values)) == 64
        assert all(1 <= k < 512 for k in keys) and all(512 <= v < 1024 for v in values)
        at = mask[row].nonzero().flatten().tolist()
        assert len(at) == 64 and min(at) >= 128  # every key queried once, after the pairs
        assert sorted(idx[row, at].tolist()) == sorted(keys)
        pairs = dict(zip(keys, values))
        assert [idx[row, t + 1].item() for t in at] == [pairs[idx[row, t].item()] for t in at]


def test_mixture_warms_up_on_the_first_config_then_takes_each_in_turn():
    small, large = RecallConfig(64, 16, 4, 8), RecallConfig(64, 32, 8, 4)
    data = RecallMixture([small, large], seed=1, warm_steps=3)
    shapes = [tuple(data(i)["idx"].shape) for i in range(6)]
    assert shapes == [(8, 17), (8, 17), (8, 17), (4, 33), (8, 17), (4, 33)]
    assert torch.equal(data(4)["idx"], recall_batch(small, 1, 4)["idx"])  # a pure function of the index
    with pytest.raises(ValueError, match="at least one"):
        RecallMixture([])


def test_queried_values_is_the_masked_loss_and_hits_the_accuracy(one_thread):
    cfg = RecallConfig(vocab_size=64, seq_len=32, n_pairs=8, batch_size=4)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, dim=32, max_seq_len=32))
    batch = recall_batch(cfg, 0, 0)
    loss, _ = QueriedValues(model)(batch)
    full, _ = LanguageModeling(model)(batch)
    torch.testing.assert_close(loss, full, rtol=1e-5, atol=1e-5)
    hits = recall_hits(model, cfg, sequences=6, seed=7)
    assert len(hits) == 6 and all(0.0 <= h <= 1.0 for h in hits)
    eight = recall_hits(model, cfg, sequences=8, seed=7)  # every sequence has n_pairs queries: mean = overall share
    assert sum(eight) / 8 == pytest.approx(recall_accuracy(model, cfg, batches=2, seed=7))


def test_state_bytes_count_a_sliding_window_for_its_window_only():
    model = GPT(ModelConfig(dim=32, n_layers=2, sliding_window=2, sliding_layers=(0,)))
    per_layer = decode_state_bytes(model)["per_token"] // 2  # two attention layers alike
    assert state_bytes_at(model, 100) == 100 * per_layer + 2 * per_layer
    assert state_bytes_at(model, 1) == 2 * per_layer


def test_lab_models_share_a_shift_layer_and_fixed_states_stay_fixed():
    cfg = RecallLabConfig(widths=(32,), pairs=(8, 64))
    mixers = {a: [lab_model(a, 32, cfg).config.mixer_at(i) for i in range(lab_model(a, 32, cfg).config.n_layers)]
              for a in cfg.archs}
    assert mixers == {"attention": ["attention", "attention"], "mamba": ["attention", "mamba"],
                      "xlstm": ["attention", "mlstm"], "hybrid": ["attention", "mamba", "attention"]}
    for arch in ("mamba", "xlstm"):
        m = lab_model(arch, 32, cfg)
        assert state_bytes_at(m, 256) == state_bytes_at(m, 32)  # the shift layer's two tokens, whatever the length
    attention = lab_model("attention", 32, cfg)
    assert state_bytes_at(attention, 256) > 7 * state_bytes_at(attention, 32)
    with pytest.raises(ValueError, match="archs"):
        RecallLabConfig(archs=("transformer",))
    with pytest.raises(ValueError, match="must hold a sequence"):
        RecallLabConfig(batch_tokens=128)


def test_the_lab_runs_end_to_end_and_writes_its_fields(tmp_path, one_thread):
    spec = importlib.util.spec_from_file_location("bench_recall", BENCH / "recall.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    out = tmp_path / "recall.json"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    for key in ("command", "git_sha", "machine", "config", "what_was_run", "what_it_shows", "archs", "lr_sweep",
                "runs", "estimate", "attention_worst_accuracy", "accuracy_at_most_pairs"):
        assert key in r, key
    cfg = quick_config()
    assert r["quick"] and set(r["archs"]) == set(cfg.archs)
    assert len(r["lr_sweep"]) == len(cfg.archs) * len(cfg.lrs)
    assert len(r["runs"]) == len(cfg.archs) * len(cfg.widths) * cfg.seeds
    for arch, a in r["archs"].items():
        assert a["lr"] in cfg.lrs
        x = a["by_width"]["16"]
        assert set(x["accuracy"]) == set(x["state_bytes_at_seq_len"]) == {"4", "8"}
        for acc in x["accuracy"].values():
            assert len(acc["values"]) == cfg.seeds and acc["ci_low"] <= acc["mean"] <= acc["ci_high"]
    assert r["archs"]["attention"]["by_width"]["16"]["state_bytes_at_seq_len"]["8"] > \
        r["archs"]["attention"]["by_width"]["16"]["state_bytes_at_seq_len"]["4"]
    if r["plots"]:
        assert (tmp_path / "recall.png").is_file()


def test_a_run_in_worker_processes_gives_what_it_gives_here(one_thread):
    cfg = quick_config(archs=("xlstm", "hybrid"), lrs=(3e-3,), seeds=1, workers=2)
    here = recall_lab(quick_config(archs=("xlstm", "hybrid"), lrs=(3e-3,), seeds=1), log=lambda m: None)
    there = recall_lab(cfg, log=lambda m: None)
    for a in ("xlstm", "hybrid"):
        assert there["archs"][a]["by_width"]["16"]["accuracy"] == here["archs"][a]["by_width"]["16"]["accuracy"]
