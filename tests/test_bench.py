import json

import pytest
import torch

from lilliput.core.checkpoint import save_checkpoint
from lilliput.core.config import preset
from lilliput.core.model import GPT
from lilliput.core.tokenizer import ByteTokenizer
from lilliput.eval import efficiency as eff
from lilliput.eval.bench import BenchConfig, model_path, run_bench


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One tiny bench (a worker subprocess per model): every test reads the same record."""
    tmp = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    save_checkpoint(GPT(preset("tiny")).eval(), ByteTokenizer(), tmp / "tiny")
    cfg = BenchConfig(models=(str(tmp / "tiny"),), out=str(tmp / "out"), passages=2, ppl_window=128,
                      tasks=("piqa",), task_limit=2, prompt_lengths=(8, 32, 4096), batch_sizes=(1, 2),
                      throughput_prompt=8, new_tokens=6, warmup=1, repeats=2, threads=1,
                      profile=True, profile_steps=3)
    return run_bench(cfg), tmp


def check_spread(s):
    assert s["n"] >= 1 and s["min"] > 0
    assert s["min"] <= s["median"] <= s["max"] and s["min"] <= s["p90"] <= s["max"]


def test_bench_produces_every_field(bench_run):
    record, tmp = bench_run
    on_disk = json.loads((tmp / "out" / "bench.json").read_text())
    assert on_disk["command"] == "bench" and on_disk["config"]["batch_sizes"] == [1, 2]
    m = on_disk["models"][0]
    assert m["engine"] == "lilliput" and m["parameters"] == sum(p.numel() for p in GPT(preset("tiny")).parameters())
    assert m["size_on_disk_bytes"] == eff.size_on_disk(tmp / "tiny") > 4 * m["parameters"]
    mem = m["memory"]
    assert mem["rss_at_load_bytes"] > mem["weights_bytes"] > 0 and mem["peak_generation_bytes"] > 0
    assert mem["kv_bytes_per_token"] == 2 * 2 * 2 * 8 * 4  # K and V x layers x kv heads x head dim x fp32
    assert set(m["ttft_s"]) == {"8", "32"} and "prompt length 4096 skipped" in m["notes"][0]
    for s in m["ttft_s"].values():
        check_spread(s)
    check_spread(m["inter_token_latency_s"])
    for b in ("1", "2"):
        tp = m["throughput"][b]
        for key in ("decode_tok_s", "end_to_end_tok_s", "joules_per_token"):
            check_spread(tp[key])
    assert m["energy_method"]["method"] in ("rapl", "cpu_time_estimate")
    if m["energy_method"]["method"] == "cpu_time_estimate":
        assert m["energy_method"]["watts_per_core"] > 0 and "codecarbon" in m["energy_method"]["source"].lower()
    assert 1 < m["perplexity"]["perplexity"] < 1000 and m["perplexity"]["passages"] == 2
    assert m["tasks"]["piqa"]["n"] == 2 and 0 <= m["task_accuracy_mean"] <= 1


def test_profile_writes_trace_and_summary(bench_run):
    record, tmp = bench_run
    prof = record["profile"]
    torch_path = prof["paths"][-1]
    assert torch_path["path"] == "torch modules" and torch_path["ms_per_step"] > 0
    assert torch_path["ms_by_category_per_step"]["linear"] > 0 and "attention" in torch_path["share"]
    assert abs(sum(torch_path["share"].values()) - 1) < 1e-6
    trace = json.loads((tmp / "out" / "profile_torch.json").read_text())
    assert any(ev.get("name") == "lilliput::linear" for ev in trace["traceEvents"])
    assert "where decode time goes" in (tmp / "out" / "profile.txt").read_text()


def test_spread_and_energy_meter():
    s = eff.spread([3.0, 1.0, 2.0, 10.0])
    assert s == {"median": 2.5, "p90": pytest.approx(7.9), "min": 1.0, "max": 10.0, "n": 4}
    meter = eff.EnergyMeter(watts_per_core=10.0)
    with meter.measure() as m:
        sum(i * i for i in range(200_000))
    assert m.seconds > 0 and m.joules > 0
    if meter.method()["method"] == "cpu_time_estimate":
        assert m.joules == pytest.approx(10.0 * m.cpu_seconds)


def test_memory_readers():
    assert eff.rss_bytes() > 1_000_000
    assert eff.peak_rss_bytes() >= eff.rss_bytes() * 0.5


def test_bad_inputs_raise_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found: pass a .gguf file"):
        run_bench(BenchConfig(models=(str(tmp_path / "missing"),), out=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="not found"):
        model_path("./no/such/model")
    with pytest.raises(ValueError, match="no models"):
        BenchConfig(models=())
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        BenchConfig(repeats=0)
    assert not (tmp_path / "bench.json").exists()


def test_unloadable_model_error_comes_back_from_the_worker(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        run_bench(BenchConfig(models=(str(tmp_path / "empty"),), out=str(tmp_path / "out"), tasks=(), passages=None))
