import base64
import json
import shutil
import subprocess

import pytest

from lilliput.eval.report import ReportConfig, make_report, markdown_table, pareto_front


def spread(median, lo=None, hi=None):
    return {"median": median, "p90": hi or median, "min": lo or median, "max": hi or median, "n": 3}


def bench_model(label, ppl, size, tok_s, acc=0.5, disk=None):
    return {"label": label, "spec": label, "engine": "lilliput", "size_on_disk_bytes": disk or size,
            "parameters": 134_515_008, "perplexity": {"perplexity": ppl}, "task_accuracy_mean": acc,
            "memory": {"rss_at_load_bytes": 3 * size, "peak_generation_bytes": 4 * size, "weights_bytes": size},
            "ttft_s": {"64": spread(0.05), "512": spread(0.4)}, "inter_token_latency_s": spread(0.02, 0.01, 0.03),
            "throughput": {"1": {"decode_tok_s": spread(tok_s, tok_s - 1, tok_s + 1),
                                 "end_to_end_tok_s": spread(0.8 * tok_s), "joules_per_token": spread(0.1)},
                           "4": {"decode_tok_s": spread(3 * tok_s), "end_to_end_tok_s": spread(2.5 * tok_s),
                                 "joules_per_token": spread(0.05)}},
            "energy_method": {"method": "cpu_time_estimate", "watts_per_core": 4.375, "source": "test", "note": "n"},
            "notes": ["prompt length 2048 skipped"]}


@pytest.fixture
def runs(tmp_path):
    bench = tmp_path / "bench"
    bench.mkdir()
    models = [bench_model("fp32", 20.0, 540_000_000, 40.0), bench_model("int8", 20.3, 140_000_000, 70.0),
              bench_model("int4", 22.0, 90_000_000, 60.0), bench_model("bad", 30.0, 200_000_000, 30.0)]
    models.append({"label": "llama.cpp x", "engine": "llama.cpp", "skipped": "llama-cpp-python is not installed"})
    (bench / "bench.json").write_text(json.dumps({"command": "bench", "created": "now", "machine": {"cpu": "T", "cores": 2},
                                                  "config": {"passages": 100, "ppl_window": 512}, "models": models}))
    stage = tmp_path / "quantized"
    stage.mkdir()
    (stage / "run.json").write_text(json.dumps({"command": "quantize", "metrics": {"ppl_before": 20.0, "ppl_after": 20.3}}))
    peer = tmp_path / "vs_llamacpp.json"
    peer.write_text(json.dumps({"int8_vs_q8_0": 0.9, "command": "bench/vs_llamacpp.py", "created": "2026-11-23T12:36:40Z",
                                "machine": {"cpu": "Other CPU", "cores": 64},
                                "rows": [{"engine": "llama.cpp", "model": "Q8_0", "decode_tok_s": 80.0}]}))
    return [str(bench), str(stage), str(peer)]


def test_pareto_front_hand_made_points():
    pts = [(1.0, 10.0), (2.0, 12.0), (3.0, 9.0), (0.5, 9.5), (3.0, 11.0)]
    # maximize x (speed), minimize y (perplexity): (3, 9) beats (2, 12), (1, 10) and (3, 11)
    assert pareto_front(pts, maximize_x=True, maximize_y=False) == [2]
    # minimize both (size, perplexity): (0.5, 9.5) and (3, 9)
    assert pareto_front(pts, maximize_x=False, maximize_y=False) == [3, 2]
    # ties are kept, order by x
    assert pareto_front([(1.0, 1.0), (1.0, 1.0), (0.0, 2.0)], maximize_x=False, maximize_y=False) == [2, 0, 1]


def test_markdown_table_escapes_pipes():
    assert markdown_table(["a", "b"], [["x|y", "1"]]) == "| a | b |\n|---|---|\n| x\\|y | 1 |"


def test_report_renders_html_with_images_and_markdown(runs, tmp_path):
    page = make_report(ReportConfig(runs=tuple(runs), out=str(tmp_path / "report")))
    text = page.read_text()
    assert text.count('src="data:image/png;base64,') == 2
    png = base64.b64decode(text.split('src="data:image/png;base64,')[1].split('"')[0])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "http://" not in text and "https://" not in text.replace("https://mlco2", "")  # nothing to fetch
    for png_name in ("quality_vs_speed.png", "quality_vs_size.png"):
        assert (tmp_path / "report" / png_name).stat().st_size > 5000
    md = (tmp_path / "report" / "report.md").read_text()
    lines = [l for l in md.splitlines() if l.startswith("| int8 ")]
    assert len(lines) == 1 and "| 20.3 |" in lines[0] and "70 [69-71]" in lines[0]
    assert "skipped: llama-cpp-python is not installed" in md
    assert "ppl_after=20.3" in md and "int8_vs_q8_0 = 0.9" in md
    assert "| TTFT 512 ms |" in md.splitlines()[4]
    assert "| perplexity (100 LAMBADA passages, window 512) |" in md.splitlines()[4]
    assert "| 134.5M |" in lines[0]  # parameters: one definition, the same for every model of one base


def test_sizes_are_weights_in_memory_and_the_peer_says_where_it_ran(tmp_path):
    bench = tmp_path / "bench.json"
    # the demo's case: a 98 MB Q4_1 GGUF dequantized to 540 MB of floats, and its int8 child (170 MB, 252 MB on disk)
    models = [bench_model("SmolLM2-135M-Instruct", 44.0, 540_000_000, 40.0, disk=98_000_000),
              bench_model("SmolLM2-135M-Instruct + int8 RTN", 44.2, 170_000_000, 70.0, disk=252_000_000)]
    bench.write_text(json.dumps({"command": "bench", "machine": {"cpu": "Here CPU", "cores": 2},
                                 "config": {"passages": 100, "ppl_window": 512}, "models": models}))
    peer = tmp_path / "vs_llamacpp.json"
    peer.write_text(json.dumps({"command": "bench/vs_llamacpp.py", "created": "2026-11-23T12:36:40Z", "git_sha": "b43eb1b",
                                "machine": {"cpu": "AMD EPYC", "cores": 2}, "int8_vs_q8_0": 1.131,
                                "rows": [{"engine": "llama.cpp", "model": "Q8_0", "decode_tok_s": 90.7}]}))
    page = make_report(ReportConfig(runs=(str(bench), str(peer)), out=str(tmp_path / "r"))).read_text()
    md = (tmp_path / "r" / "report.md").read_text()
    head = next(l for l in md.splitlines() if l.startswith("| model |")).split(" | ")
    rows = {l.split(" | ")[0][2:]: l.split(" | ") for l in md.splitlines() if l.startswith("| SmolLM2")}
    col, disk = head.index("weights MB (memory)"), head.index("disk MB")
    assert (rows["SmolLM2-135M-Instruct"][col], rows["SmolLM2-135M-Instruct + int8 RTN"][col]) == ("540", "170")
    assert (rows["SmolLM2-135M-Instruct"][disk], rows["SmolLM2-135M-Instruct + int8 RTN"][disk]) == ("98", "252")
    assert "Not measured in this run" in md and "2026-11-23" in md and "AMD EPYC, 2 cores" in md
    assert "That is not this machine (Here CPU, 2 cores)" in page
    assert "different held-out settings" not in page


def test_two_heldout_settings_on_one_page_are_called_out(runs, tmp_path):
    shrink = tmp_path / "model"
    shrink.mkdir()
    stages = [{"stage": "input", "perplexity": 44.0, "tasks": {}, "bytes": 5e8, "parameters": 1.3e8}]
    (shrink / "run.json").write_text(json.dumps({"label": "x + int8 RTN", "heldout": {"passages": 100, "window": 1024},
                                                 "stages": stages}))
    make_report(ReportConfig(runs=(runs[0], str(shrink)), out=str(tmp_path / "r")))
    md = (tmp_path / "r" / "report.md").read_text()
    assert "different held-out settings" in md and "100 passages, window 1024; 100 passages, window 512" in md
    assert "| x + int8 RTN | input |" in md


def test_bad_runs_raise_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_report(ReportConfig(runs=(str(tmp_path / "nope"),), out=str(tmp_path / "r")))
    with pytest.raises(FileNotFoundError, match="no bench.json or run.json"):
        make_report(ReportConfig(runs=(str(tmp_path),), out=str(tmp_path / "r")))
    with pytest.raises(ValueError, match="no runs given"):
        make_report(ReportConfig(runs=(), out=str(tmp_path / "r")))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        make_report(ReportConfig(runs=(str(bad),), out=str(tmp_path / "r")))


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or (
        "/usr/bin/chromium" if shutil.os.path.exists("/usr/bin/chromium") else None)


@pytest.mark.skipif(_chromium() is None, reason="Chromium is not installed")
def test_report_in_headless_chromium(runs, tmp_path):
    page = make_report(ReportConfig(runs=tuple(runs), out=str(tmp_path / "report")))
    shot = tmp_path / "shot.png"
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,900",
                    page.resolve().as_uri()], capture_output=True, timeout=60)
    assert shot.is_file()
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a blank page compresses to ~ 5 kB


def test_shrink_run_renders_one_row_per_stage():
    from lilliput.eval.report import stage_table

    stages = [{"stage": "input", "perplexity": 40.0, "tasks": {"piqa": 0.7}, "bytes": 2**21, "parameters": 2e6,
               "decode_tok_s": 10.0},
              {"stage": "1. quantize rtn", "perplexity": 41.0, "tasks": {"piqa": 0.68}, "bytes": 2**20,
               "parameters": 2e6, "decode_tok_s": 25.0}]
    head, cells = stage_table([("model", {"recipe": {"name": "int8"}, "stages": stages})])
    assert head[:3] == ["run", "stage", "perplexity"] and len(cells) == 2
    assert cells[1][:2] == ["int8", "1. quantize rtn"]
    assert "(2.50x)" in cells[1][head.index("decode-only tok/s b1")] and "(0.50x)" in cells[1][head.index("weights MB (memory)")]
