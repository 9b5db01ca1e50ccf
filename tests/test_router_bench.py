"""bench/router.py on tiny models: its JSON (means over calibration seeds, what it does not show), and
the same numbers when the large model is a second `lilliput serve` on loopback."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from lilliput.core.checkpoint import save_checkpoint
from lilliput.core.config import preset
from lilliput.core.model import GPT
from lilliput.core.tokenizer import ByteTokenizer
from lilliput.infer.engine import EngineConfig
from lilliput.serve.app import ServeConfig, Server

BENCH = Path(__file__).resolve().parent.parent / "bench"


def bench_router():
    spec = importlib.util.spec_from_file_location("bench_router", BENCH / "router.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def seeded(seed):
    torch.manual_seed(seed)
    return GPT(preset("tiny")).eval(), ByteTokenizer()


def test_tiny_run_reports_means_over_seeds_and_a_served_large_model_gives_the_same(tmp_path, one_thread):
    router = bench_router()
    args = ["--limit", "6", "--tasks", "arc_easy,piqa", "--threads", "1"]
    router.main(["--tiny", *args, "--out", str(tmp_path / "tiny.json")])
    r = json.loads((tmp_path / "tiny.json").read_text())
    assert r["small_model_from_recipe"] is False and r["seeds"] == [0, 1, 2] and len(r["per_seed"]) == 3
    for k in ("accuracy_retained", "escalated_fraction", "apgr"):
        per = [s[k] for s in r["per_seed"]]
        known = [v for v in per if v is not None]  # APGR is None on a split where the models tie
        assert r["spread"][k]["per_seed"] == per and r[k] == pytest.approx(sum(known) / len(known), abs=1e-4)
    assert r["signals_chosen"] == [s["signal"] for s in r["per_seed"]] and r["does_not_show"]

    small = save_checkpoint(*seeded(0), tmp_path / "small")
    s = Server(ServeConfig(port=0, engine=EngineConfig(max_batch=2), quantize=False), lambda: seeded(1), name="tiny-large").start(
        wait_loaded=True)
    try:
        router.main(["--small", str(small), "--large", s.url + "/v1", "--concurrency", "2", *args,
                     "--out", str(tmp_path / "served.json")])
    finally:
        s.stop()
    served = json.loads((tmp_path / "served.json").read_text())
    assert served["small_model_from_recipe"] is False and served["large_model"]["endpoint"] is True
    assert served["large"] == f"tiny-large @ {s.url}/v1" and served["compute_saved_vs_large"] is None
    assert served["tasks"] == r["tasks"]  # the same correct answers from the served large model
    assert [x["accuracy_retained"] for x in served["per_seed"]] == [x["accuracy_retained"] for x in r["per_seed"]]
