"""The serving comparison: workloads, statistics, server processes, `lilliput bench --peer` arguments.

Everything here runs without vLLM or llama.cpp (a tiny in-process `lilliput serve` plays the server);
the one test that needs vLLM's venv skips when it is not installed, and nothing here installs anything.
"""

import json
import os
import sys
import time

import pytest
import torch

from lilliput.cli import main
from lilliput.infer.sequence import common_prefix
from lilliput.core.config import preset
from lilliput.core.model import GPT
from lilliput.core.tokenizer import ByteTokenizer
from lilliput.eval import peers
from lilliput.eval import serve_peer as sp
from lilliput.infer.engine import EngineConfig
from lilliput.jobs import serve_peer as job

LAMBADA_LENGTHS, NEW = {16, 32, 64, 128, 256}, {16, 32, 64, 128}


# --- workloads -------------------------------------------------------------------------------------

def test_mixed_requests_are_engine_benchs_mix_seeded():
    tok = ByteTokenizer()
    reqs = sp.mixed_requests(tok, 32, rate=16.0, seed=0)
    assert len(reqs) == 32 and reqs == sp.mixed_requests(tok, 32, rate=16.0, seed=0)
    assert {len(r.prompt) for r in reqs} <= LAMBADA_LENGTHS and {r.new for r in reqs} <= NEW
    arrivals = [r.arrival for r in reqs]
    assert arrivals[0] == 0.0 and arrivals == sorted(arrivals)
    assert 0.5 < arrivals[-1] < 6  # 31 gaps of a 16/s Poisson process: ~1.9 s
    assert reqs != sp.mixed_requests(tok, 32, rate=16.0, seed=1)


def test_stream_requests_start_together_with_fixed_lengths():
    reqs = sp.stream_requests(ByteTokenizer(), 16, prompt_tokens=64, new=64)
    assert len(reqs) == 16 and all(len(r.prompt) == 64 and r.new == 64 and r.arrival == 0 for r in reqs)
    assert len({tuple(r.prompt) for r in reqs}) > 1
    with pytest.raises(ValueError, match="prompt_tokens"):
        sp.stream_requests(ByteTokenizer(), 1, prompt_tokens=10**9, new=4)


def test_bodies_are_greedy_with_exact_lengths():
    r = sp.Request([5, 6, 7], 9)
    assert sp.token_body(r) == {"prompt": [5, 6, 7], "max_tokens": 9, "temperature": 0,
                                "extra_body": {"ignore_eos": True}}
    tok = ByteTokenizer()
    body = sp.text_body(sp.Request(tok.encode("abc", bos=False), 4), tok, [2, 3])
    assert body["prompt"] == "abc" and body["logit_bias"] == {"2": -100, "3": -100} and body["temperature"] == 0


# --- statistics ------------------------------------------------------------------------------------

def test_summary_counts_tokens_over_wall_time_and_ttft_percentiles():
    results = [{"ttft": t, "out": 10} for t in (0.1, 0.2, 0.3, 0.4, 1.0)] + [{"error": "boom"}]
    s = sp.summarize(results, seconds=2.0)
    assert s["requests"] == 6 and s["errors"] == 1 and s["output_tokens"] == 50
    assert s["output_tok_s"] == 25.0
    assert s["ttft_p50_s"] == 0.3
    assert s["ttft_p99_s"] == pytest.approx(0.4 + 0.96 * 0.6, abs=1e-4)  # numpy's linear interpolation
    assert sp.summarize([{"error": "x"}], 1.0)["ttft_p50_s"] is None


def test_text_equality_over_requests_both_answered():
    assert sp.text_equality(["a", "b", "c", None], ["a", "x", "c", "d"]) == \
        {"compared": 3, "identical": 2, "fraction": 0.667, "differing_shared_prefix": 0.0}
    assert sp.text_equality(["abcd"], ["abxy"])["differing_shared_prefix"] == 0.5
    assert sp.text_equality([None], ["a"])["fraction"] is None
    with pytest.raises(ValueError, match="different request lists"):
        sp.text_equality(["a"], ["a", "b"])
    assert common_prefix("hello world", "hello there") == 6


# --- a real server in this process -----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_server():
    from lilliput.serve.app import ServeConfig, Server

    def load():
        torch.manual_seed(0)
        return GPT(preset("tiny")).eval(), ByteTokenizer()

    torch.set_num_threads(1)
    s = Server(ServeConfig(port=0, engine=EngineConfig(max_batch=4)), load, name=sp.SERVED_NAME).start(wait_loaded=True)
    yield s
    s.stop()


def test_workload_through_the_openai_endpoint(tiny_server):
    reqs = [sp.Request(list(b"the quick brown fox"), 6), sp.Request(list(b"jumps over"), 3, arrival=0.05)]
    got = sp.run_workload(tiny_server.url, reqs)
    assert got["errors"] == 0 and got["output_tokens"] == got["requested_tokens"] == 9 and got["output_tok_s"] > 0
    assert 0 < got["ttft_p50_s"] <= got["ttft_p99_s"] < got["seconds"]
    again = sp.repeat_workload(tiny_server.url, reqs, repeats=2)
    assert len(again["runs"]) == 2 and again["output_tokens"] == 9
    assert sp.text_equality(got["texts"], again["texts"])["fraction"] == 1.0  # greedy: the same text each run


def test_a_refused_request_is_an_error_of_the_run(tiny_server):
    got = sp.run_workload(tiny_server.url, [sp.Request([1, 2], 10**6)])
    assert got["errors"] == 1 and got["texts"] == [None] and got["error_examples"]


HEALTH_SERVER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_server_process_waits_for_health_and_stops():
    port = sp.free_port()
    with sp.ServerProcess([sys.executable, "-c", HEALTH_SERVER, str(port)], port, timeout=30) as srv:
        assert srv.ready_seconds is not None and srv.proc.poll() is None
    assert srv.proc.poll() is not None


def test_server_process_that_exits_reports_its_log():
    with pytest.raises(RuntimeError, match="exited with status 3"):
        with sp.ServerProcess([sys.executable, "-c", "print('no model here'); raise SystemExit(3)"], sp.free_port()):
            pass


FAILED_SERVER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b'{"status": "failed: no such model"}'
        self.send_response(503); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_server_process_that_cannot_load_its_model_fails_at_once_and_is_stopped():
    port = sp.free_port()
    srv = None
    with pytest.raises(RuntimeError, match="could not load its model .failed: no such model"):
        srv = sp.ServerProcess([sys.executable, "-c", FAILED_SERVER, str(port)], port, timeout=60)
        with srv:
            pass
    assert srv.proc.poll() is not None and time.perf_counter() - srv.started < 30  # not the whole timeout


# --- the job's config and `lilliput bench --peer` ---------------------------------------------------

def test_peer_config_validates():
    with pytest.raises(ValueError, match="unknown peer 'sglang'"):
        job.PeerBenchConfig(peer="sglang")
    with pytest.raises(ValueError, match="streams must be >= 1"):
        job.PeerBenchConfig(streams=0)
    with pytest.raises(ValueError, match="rate must be > 0"):
        job.PeerBenchConfig(rate=0)
    with pytest.raises(ValueError, match=r"unknown rows \['vLLM Q8_0'\]: pick from lilliput bf16, lilliput int8, "
                                         "vLLM bf16, vLLM fp32, vLLM int8"):
        job.PeerBenchConfig(rows=("vLLM bf16", "vLLM Q8_0"))
    assert job.PeerBenchConfig(peer="llama.cpp", rows=("llama.cpp Q8_0",)).rows == ("llama.cpp Q8_0",)


def fake_result(cfg) -> dict:
    k = job.PEERS[cfg.peer].key
    return {"peer_key": k, f"serve_bf16_vs_{k}_bf16": 2.0, f"serve_int8_vs_{k}_bf16": 4.0,
            f"serve_int8_vs_{k}_best": 3.0, f"{k}_best_format": "fp32",
            "greedy_identical_bf16": 0.5}


def test_summary_ratios_best_row_and_equality():
    from types import SimpleNamespace

    def row(engine, fmt, tok_s, texts):
        return {"engine": engine, "format": fmt,
                **{w: {"output_tok_s": tok_s, "texts": texts} for w in ("streams", "arrivals")}}

    measured = [row("lilliput", "bf16", 30.0, ["a", "b"]), row("lilliput", "int8", 90.0, ["a", "c"]),
                row("vLLM", "bf16", 10.0, ["a", "x"]), row("vLLM", "fp32", 20.0, ["a", "b"]),
                {"engine": "vLLM", "format": "int8", "error": "did not start"}]
    art = SimpleNamespace(label="tiny", folder="/x", made={})
    got = job.summary(job.PeerBenchConfig(), job.VllmPeer(), measured, {"install_seconds": 1.0}, art)
    assert got["serve_bf16_vs_vllm_bf16"] == 3.0 and got["serve_int8_vs_vllm_bf16"] == 9.0
    assert got["serve_int8_vs_vllm_best"] == 4.5 and got["vllm_best_format"] == "fp32"
    assert got["greedy_identical_bf16"] == 0.5  # 2 of 4 completions (both workloads) equal vLLM bf16's
    assert got["text_equality"]["lilliput bf16 vs vLLM fp32"]["streams"]["fraction"] == 1.0
    assert all("texts" not in r.get("streams", {}) for r in got["rows"]) and got["rows"][-1]["error"]


def test_bench_peer_flags_reach_the_job_and_write_one_record(monkeypatch, tmp_path, capsys):
    seen = []
    monkeypatch.setattr(job, "run_peer_bench", lambda cfg: seen.append(cfg) or fake_result(cfg))
    rc = main(["bench", "--peer", "llama.cpp", "--streams", "4", "--new-tokens", "16", "--requests", "8",
               "--repeats", "1", "--threads", "2", "--rows", "lilliput int8,llama.cpp Q8_0", "--no-install",
               "--out", str(tmp_path)])
    assert rc == 0
    cfg = seen[0]
    assert (cfg.peer, cfg.streams, cfg.new_tokens, cfg.requests, cfg.repeats, cfg.threads, cfg.install) == \
        ("llama.cpp", 4, 16, 8, 1, 2, False)
    assert cfg.rows == ("lilliput int8", "llama.cpp Q8_0") and cfg.model is None
    assert cfg.prompt_tokens == job.PeerBenchConfig.prompt_tokens  # untouched flags keep the config's defaults
    record = json.loads((tmp_path / "vs_llamacpp.json").read_text())
    assert record["serve_bf16_vs_llamacpp_bf16"] == 2.0 and record["command"].startswith("lilliput ")
    assert "serve_int8_vs_llamacpp_best 3.0 (best fp32)" in capsys.readouterr().out


def test_bench_peer_user_errors_are_one_line(monkeypatch, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--peer", "sglang"])
    assert e.value.code == 2 and "invalid choice: 'sglang'" in capsys.readouterr().err
    assert main(["bench", "--peer", "vllm", "--model", "a", "--model", "b"]) == 2
    assert "one model" in capsys.readouterr().err
    monkeypatch.setenv("LILLIPUT_CACHE", str(tmp_path))  # no vLLM venv there, and --no-install: nothing installs
    assert main(["bench", "--peer", "vllm", "--no-install", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "vLLM is not installed" in err and len(err.strip().splitlines()) == 1


def test_bench_without_peer_still_builds_a_bench_config(monkeypatch, tmp_path):
    from lilliput.eval import bench

    seen = []
    monkeypatch.setattr(bench, "run_bench", lambda cfg: seen.append(cfg))
    assert main(["bench", "--repeats", "2", "--out", str(tmp_path)]) == 0
    assert seen[0].repeats == 2 and seen[0].models == (None,)


# --- vLLM itself (its own venv) --------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(peers.vllm_install_note() is None, reason="vLLM is not installed (python -m lilliput.eval.peers vllm)")
def test_vllm_venv_imports_the_pinned_build():
    import subprocess

    python = peers.ensure_vllm(install=False)
    note = peers.vllm_install_note()
    got = subprocess.run([str(python), "-c", "import vllm, transformers; print(vllm.__version__)"],
                         capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr[-2000:]
    assert got.stdout.strip().splitlines()[-1] == note["vllm"] == peers.VLLM_PIN.split("==")[1]
    assert note["install_seconds"] > 0


def test_w8a8_folder_carries_lilliputs_int8_codes_and_scales(tiny_model, byte_tokenizer, tmp_path, one_thread):
    from safetensors.torch import load_file

    from lilliput.compress.quantize import RTNConfig, quantize_
    from lilliput.export.weights import hf_weights

    q = quantize_(tiny_model, RTNConfig(bits=8))
    job.write_w8a8(q, byte_tokenizer, tmp_path / "w8a8")
    state = load_file(tmp_path / "w8a8" / "model.safetensors")
    cfg = json.loads((tmp_path / "w8a8" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["ignore"] == ["lm_head"]
    group = cfg["config_groups"]["group_0"]
    assert group["weights"]["strategy"] == "channel" and group["input_activations"]["dynamic"] is True
    layers = [n for n, w in hf_weights(q).items() if n.startswith("model.layers.") and not isinstance(w, torch.Tensor)]
    assert layers and all(state[n].dtype == torch.int8 for n in layers)
    for name in layers:
        w = hf_weights(q)[name]
        scale = state[name.removesuffix("weight") + "weight_scale"]
        assert scale.shape == (w.shape[0], 1)
        torch.testing.assert_close(state[name].float() * scale.float(), w.dequantize(), rtol=1e-2, atol=1e-3)
    assert state["lm_head.weight"].dtype == torch.bfloat16  # the output layer stays float (vLLM ignores it)


def test_rows_and_their_server_flags(tmp_path):
    from types import SimpleNamespace

    art = SimpleNamespace(spec=None, int8=lambda: tmp_path / "int8", int8_w8a8=lambda: tmp_path / "w8a8",
                          export=lambda fmt, type: tmp_path / f"{fmt}-{type}", tokenizer=ByteTokenizer())
    built = {}
    for name in job.PEERS:
        cfg = job.PeerBenchConfig(peer=name, threads=2, max_batch=16)
        peer = job.PEERS[name]()
        peer.python = tmp_path / "venv" / "bin" / "python"
        rows = job.lilliput_rows(cfg, art) + peer.rows(cfg, art)
        assert [r.name for r in rows] == job.row_names(name)
        built.update({r.name: r for r in rows})
        cmds = {r.name: r.command(1234) for r in rows}
        # lilliput: explicit flags only, so a changed default of `lilliput serve` cannot change a row
        assert cmds["lilliput bf16"][-3:] == ["--dtype", "bfloat16", "--no-quantize"]  # bf16 as loaded, not int8
        assert "--model" not in cmds["lilliput bf16"]
        assert cmds["lilliput int8"][-2:] == ["--model", str(tmp_path / "int8")]
        assert all(c[c.index("--port") + 1] == "1234" for c in cmds.values())

    from lilliput.cli import build_parser
    from lilliput.core.options import config_from_args
    from lilliput.jobs.serve import ServeJob

    def serve_job(row: str) -> ServeJob:
        cmd = built[row].command(1)
        return config_from_args(ServeJob, build_parser().parse_args(cmd[cmd.index("serve"):]))

    bf16, int8 = serve_job("lilliput bf16"), serve_job("lilliput int8")
    assert (bf16.load.dtype, bf16.config.quantize) == ("bfloat16", False)
    assert int8.load.model == str(tmp_path / "int8")  # an int8 checkpoint: served as it is

    def flag(row: str, name: str) -> str:
        cmd = built[row].command(1)
        return cmd[cmd.index(name) + 1]

    assert flag("vLLM fp32", "--dtype") == "float32" and flag("vLLM int8", "--model") == str(tmp_path / "w8a8")
    assert flag("vLLM bf16", "--max-num-seqs") == "16" and flag("llama.cpp Q8_0", "--interrupt_requests") == "False"
    cores = ",".join(map(str, sorted(os.sched_getaffinity(0))[:2]))
    assert built["vLLM bf16"].env["VLLM_CPU_OMP_THREADS_BIND"] == cores  # lilliput's cores, none reserved
