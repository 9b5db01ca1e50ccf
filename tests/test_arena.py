import json

import pytest
import torch

from lilliput.core.config import preset
from lilliput.core.model import GPT
from lilliput.eval.efficiency import ContextDecode, active_parameter_count, decode_ms_by_context, parameter_count
from lilliput.jobs.arena import ARCHS, ArenaJob, growth, quick_job, recall_model
from lilliput.train.recall import RecallConfig, recall_accuracy, recall_batch


def test_arena_presets_match_parameters():
    counts = {arch: GPT(preset(name)) for arch, name in ARCHS.items()}
    dense = parameter_count(counts["dense"])
    for arch in ("moe", "mamba", "xlstm", "hybrid"):
        assert abs(parameter_count(counts[arch]) / dense - 1) <= 0.05, arch
    assert abs(active_parameter_count(counts["moe-active"]) / dense - 1) <= 0.05
    assert active_parameter_count(counts["moe"]) < 0.7 * dense  # matched total: fewer active
    for arch, model in counts.items():
        assert model.config.vocab_size == 256 and model.config.max_seq_len >= 8192 + 64, arch
    assert [preset("hybrid-arena").mixer_at(i) for i in range(4)] == ["mamba", "mamba", "mamba", "attention"]


def test_recall_answers_are_the_values_of_the_queried_keys():
    cfg = RecallConfig(vocab_size=64, seq_len=48, n_pairs=6, batch_size=5)
    b = recall_batch(cfg, seed=3, index=7)
    idx, mask = b["idx"], b["mask"]
    assert idx.shape == (5, 49) and mask.shape == (5, 48)
    for row in range(5):
        keys, values = idx[row, 0:12:2].tolist(), idx[row, 1:12:2].tolist()
        assert len(set(keys)) == 6 and all(1 <= k < 32 for k in keys) and all(32 <= v < 64 for v in values)
        pairs = dict(zip(keys, values))
        at = mask[row].nonzero().flatten().tolist()
        assert len(at) == 6 and min(at) >= 12  # every key queried once, after the pairs
        assert sorted(idx[row, at].tolist()) == sorted(keys)
        assert [idx[row, t + 1].item() for t in at] == [pairs[idx[row, t].item()] for t in at]
    assert torch.equal(recall_batch(cfg, 3, 7)["idx"], idx)  # a pure function of (config, seed, index)
    assert not torch.equal(recall_batch(cfg, 3, 8)["idx"], idx)


def test_recall_config_needs_room_for_the_queries():
    with pytest.raises(ValueError, match="seq_len >= 64"):
        RecallConfig(seq_len=32, n_pairs=16)
    with pytest.raises(ValueError, match="distinct keys"):
        RecallConfig(vocab_size=16, seq_len=64, n_pairs=10)


def test_recall_accuracy_of_an_oracle_and_of_a_recall_model():
    cfg = RecallConfig(vocab_size=32, seq_len=16, n_pairs=4, batch_size=4)

    class Oracle(torch.nn.Module):  # copies the value paired with the key it reads
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, idx):
            logits = torch.zeros(*idx.shape, cfg.vocab_size)
            for b in range(idx.shape[0]):
                pairs = dict(zip(idx[b, 0:8:2].tolist(), idx[b, 1:8:2].tolist()))
                for t in range(idx.shape[1]):
                    logits[b, t, pairs.get(int(idx[b, t]), 0)] = 1.0
            return logits

    assert recall_accuracy(Oracle(), cfg, batches=2) == 1.0
    model = recall_model("hybrid", 16, ArenaJob(recall_vocab=32, recall_seq_len=16, recall_pairs=4))
    assert model.config.dim == 16 and [model.config.mixer_at(i) for i in range(2)] == ["mamba", "attention"]
    assert 0.0 <= recall_accuracy(model, cfg, batches=1) <= 1.0


def test_context_decode_starts_every_run_at_its_context(one_thread):
    torch.manual_seed(0)
    model = GPT(preset("hybrid-tiny"))
    run = ContextDecode(model, context=40, batch=2, new_tokens=3)
    assert run() > 0 and run() > 0
    assert run.state.lengths == [40, 43, 43]  # the source row, then rows decoded from it
    per_token = 2 * 1 * 2 * 16 * 4  # one attention layer of 4: keys and values of 2 kv heads of width 8, fp32
    assert run.state_bytes() - ContextDecode(model, 20, 1, 1).state_bytes() == 20 * per_token // 2
    with pytest.raises(ValueError, match="max_seq_len >= 300"):
        ContextDecode(model, context=299, new_tokens=1)
    got = decode_ms_by_context({"a": model}, [8, 16], batch=1, new_tokens=2, repeats=2, warmup=0)
    assert set(got["a"]) == {8, 16} and got["a"][16]["n"] == 2
    assert growth({256: {"median": 2.0}, 8192: {"median": 3.0}}) == 1.5


def test_quick_arena_through_the_cli(tmp_path, one_thread):
    from lilliput.cli import main

    assert main(["arena", "--quick", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "arena.json").read_text())
    assert r["quick"] is True and r["archs_trained"] == len(ARCHS) >= 5
    assert r["ssm_decode_growth"] > 0 and r["attention_decode_growth"] > 0
    for arch in ARCHS:
        a = r["archs"][arch]
        assert a["heldout_perplexity"]["min"] <= a["heldout_perplexity"]["mean"] <= a["heldout_perplexity"]["max"]
        assert a["heldout_bits_per_byte"]["mean"] > 0 and a["train_tokens_per_s"]["mean"] > 0
        assert set(a["decode_ms"]) == {"256", "1024"}
    assert r["archs"]["mamba"]["decode_state_bytes"]["per_token"] == 0
    assert r["archs"]["dense"]["decode_state_bytes"]["by_context"]["1024"] == 1024 * 2048
    assert set(r["recall"]["accuracy"]) == {"dense", "moe", "mamba", "xlstm", "hybrid"}
    assert sorted(p.name for p in tmp_path.glob("arena_*.png")) == ["arena_decode.png", "arena_ppl.png",
                                                                     "arena_recall.png"]
    assert quick_job().quick and not ArenaJob().quick
