"""The holistic benchmark: quality, size, memory, latency, throughput and energy of each model.

`run_bench(BenchConfig(models=(...)))` measures every model in a fresh subprocess
(`python -m lilliput.eval.bench --worker SPEC.json OUT.json`) so one model's memory never
pollutes another's, then writes one self-describing record, `<out>/bench.json`. A model spec is
what `load_model` takes (None or "" = the embedded SmolLM2-135M-Instruct), or `llamacpp:PATH.gguf`
(`llamacpp:` alone = the embedded GGUF) to run a GGUF through llama.cpp as a peer when
`llama-cpp-python` is importable (skipped with a note otherwise).

Order inside a worker: load (RSS at load), reset the resident peak, all timings (TTFT per prompt
length, inter-token latency, throughput per batch with energy), read the peak (weights + KV
cache + activations of generation), then quality (held-out perplexity, tasks).
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lilliput.core.record import run_record, write_json
from lilliput.eval.perplexity import HELDOUT

LLAMACPP = "llamacpp:"


@dataclass(frozen=True)
class BenchConfig:
    models: tuple[str | None, ...] = (None,)
    """Model specs as load_model takes them (None or "" = embedded model), or llamacpp:PATH.gguf."""
    out: str = "bench"
    """Output folder; bench.json (and the profile, when asked) go there."""
    passages: int | None = HELDOUT.passages
    """LAMBADA passages for held-out perplexity (None or 0 skips perplexity)."""
    ppl_window: int = HELDOUT.window
    """Perplexity window in tokens (capped at the model's context)."""
    tasks: tuple[str, ...] = ("piqa", "arc_easy")
    """Zero-shot tasks (keys of lilliput.eval.tasks.TASKS); empty skips them."""
    task_limit: int | None = 200
    """Items per task (None: all)."""
    prompt_lengths: tuple[int, ...] = (64, 512, 2048)
    """Prompt lengths for time to first token (lengths past a model's context are skipped with a note)."""
    batch_sizes: tuple[int, ...] = (1, 4, 16)
    """Batch sizes for throughput: decode-only and end-to-end tok/s at each (lilliput.eval.efficiency)."""
    throughput_prompt: int = 64
    """Prompt tokens of each row in the throughput and inter-token runs."""
    new_tokens: int = 64
    """Generated tokens per row in the throughput and inter-token runs."""
    warmup: int = 1
    """Untimed runs before each timed series."""
    repeats: int = 3
    """Timed runs per figure (median and min-max spread are reported)."""
    threads: int | None = None
    """CPU threads for torch and the decode kernel (None: all cores)."""
    watts_per_core: float | None = None
    """Assumed power of a busy core for the energy estimate when RAPL is unreadable (None: the default, stated in the JSON)."""
    profile: bool = False
    """Also write a torch profiler trace and a summary of decode time for the first model."""
    profile_steps: int = 16
    """Decode steps to profile."""

    def __post_init__(self):
        if not self.models:
            raise ValueError("no models to benchmark: pass at least one --model (omit the value for the embedded model)")
        for name in ("repeats", "new_tokens", "throughput_prompt", "profile_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.new_tokens < 2:
            raise ValueError(f"new_tokens must be >= 2 to time inter-token latency, got {self.new_tokens}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if any(n < 1 for n in self.prompt_lengths) or any(b < 1 for b in self.batch_sizes):
            raise ValueError("prompt lengths and batch sizes must be >= 1")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 (or None for all cores), got {self.threads}")


# --- model specs -----------------------------------------------------------------------------------

def model_path(spec: str | None) -> Path | None:
    """The file or folder a spec names (the embedded GGUF for None/""); None for a hub id."""
    from lilliput.core.checkpoint import _looks_like_hub_id, embedded_model_path

    if spec and spec.startswith(LLAMACPP):
        spec = spec[len(LLAMACPP):]
    if not spec:
        return embedded_model_path()
    path = Path(spec)
    if path.exists():
        return path
    if _looks_like_hub_id(spec):
        return None
    raise FileNotFoundError(f"model {spec!r} not found: pass a .gguf file, a model folder, a hub id, "
                            f"or {LLAMACPP}FILE.gguf")


EMBEDDED_LABEL = "SmolLM2-135M-Instruct"


def model_label(spec: str | None) -> str:
    """What a model is, for tables and plots: base model + what was done to it.

    The embedded model is "SmolLM2-135M-Instruct"; a checkpoint folder is the `label` its run.json
    records (the jobs write "<input's label> + <method>", e.g. "SmolLM2-135M-Instruct + int8 RTN"),
    else its config.json's model name (+ the quantization method recorded there), else its folder name.
    """
    if spec and spec.startswith(LLAMACPP):
        return "llama.cpp " + model_label(spec[len(LLAMACPP):] or None)
    if not spec:
        return EMBEDDED_LABEL
    p = Path(spec)
    if p.suffix == ".gguf":
        return p.stem
    if p.is_dir():
        run, cfg = _read_json(p / "run.json"), _read_json(p / "config.json")
        if isinstance(run.get("label"), str):
            return run["label"]
        name = (cfg.get("model") or {}).get("name") if cfg.get("format") == "lilliput" else None
        if isinstance(name, str) and name:
            q = cfg.get("quantization") or {}
            bits = (q.get("config") or {}).get("bits")
            return name + (f" + int{bits} {str(q.get('method', '')).upper()}".rstrip() if bits else "")
    return p.name or spec


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# --- one model, inside a worker process --------------------------------------------------------------

def _prompt(tokenizer, n: int) -> list[int]:
    """n token ids of real text (LAMBADA passages repeated as needed)."""
    from lilliput.eval.tasks import lambada_passages

    ids: list[int] = []
    passages = lambada_passages(64)
    while len(ids) < n:
        ids += tokenizer.encode("\n\n".join(passages), bos=False)
    return ids[:n]


def measure_model(spec: str | None, cfg: BenchConfig) -> dict[str, Any]:
    """Every figure for one lilliput model, measured in this process (run it in a fresh one)."""
    import torch

    from lilliput.core.checkpoint import load_model
    from lilliput.eval import efficiency as eff
    from lilliput.infer import kernels

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
        kernels.set_threads(cfg.threads)
    meter = eff.EnergyMeter(cfg.watts_per_core or eff.DEFAULT_WATTS_PER_CORE)
    rss_before = eff.rss_bytes()
    model, tok = load_model(spec or None, device="cpu")
    gc.collect()
    c = model.config
    path = model_path(spec)
    result: dict[str, Any] = {
        "spec": spec, "label": model_label(spec), "engine": "lilliput", "config": c.to_dict(),
        "parameters": eff.parameter_count(model),
        "size_on_disk_bytes": eff.size_on_disk(path) if path else None,
        "load_seconds": getattr(model, "load_seconds", None),
        "quantization": getattr(model, "quantization", None),
        "threads": {"torch": torch.get_num_threads(), "kernel": kernels.get_threads(),
                    "kernel_unavailable": kernels.unavailable_reason() or None},
        "energy_method": meter.method(), "notes": [],
    }
    if path and str(path).endswith(".gguf"):
        result["notes"].append(f"size on disk is the GGUF file it loads from ({path.name}); in memory its "
                               "weights are dequantized to float (memory.weights_bytes)")
    state = eff.decode_state_bytes(model)  # fp32 K and V of attention layers; recurrent states per sequence
    result["memory"] = {"rss_before_load_bytes": rss_before, "rss_at_load_bytes": eff.rss_bytes(),
                        "weights_bytes": eff.model_bytes(model), "kv_bytes_per_token": state["per_token"],
                        "state_bytes_per_sequence": state["per_sequence"]}
    can_reset = eff.reset_peak_rss()

    # time to first token, one figure per prompt length
    ttft = {}
    for n in cfg.prompt_lengths:
        if n + 1 > c.max_seq_len:
            result["notes"].append(f"prompt length {n} skipped: the model's context is {c.max_seq_len}")
            continue
        ttft[str(n)] = eff.spread(eff.time_to_first_token(model, tok, _prompt(tok, n), cfg.warmup, cfg.repeats))
    result["ttft_s"] = ttft

    plen = min(cfg.throughput_prompt, c.max_seq_len - cfg.new_tokens)
    if plen < 1:
        raise ValueError(f"new_tokens={cfg.new_tokens} leaves no room for a prompt in the context of {c.max_seq_len}")
    prompt = _prompt(tok, plen)
    gaps: list[float] = []
    for i in range(cfg.warmup + cfg.repeats):
        run = eff.inter_token_latencies(model, tok, prompt, cfg.new_tokens)
        if i >= cfg.warmup:
            gaps += run
    result["inter_token_latency_s"] = eff.spread(gaps)
    result["throughput"] = {str(b): eff.throughput(model, tok, prompt, b, cfg.new_tokens, cfg.warmup, cfg.repeats, meter)
                            for b in cfg.batch_sizes}
    result["throughput_prompt_tokens"], result["new_tokens"] = plen, cfg.new_tokens
    longest = max([int(n) for n in ttft] + [plen + cfg.new_tokens])
    result["memory"].update({
        "peak_generation_bytes": eff.peak_rss_bytes(),
        "peak_is_generation_only": can_reset,
        "kv_cache_bytes_largest_run": state["per_token"] * max(longest, (plen + cfg.new_tokens) * max(cfg.batch_sizes)),
    })

    # quality
    if cfg.passages:
        from lilliput.eval.perplexity import HeldoutConfig, heldout

        t = time.perf_counter()
        ppl = heldout(model, tok, HeldoutConfig(passages=cfg.passages, window=cfg.ppl_window))
        result["perplexity"] = {**ppl, "seconds": time.perf_counter() - t}
    if cfg.tasks:
        from lilliput.eval.tasks import TaskConfig, evaluate_tasks

        tasks = evaluate_tasks(model, tok, TaskConfig(tasks=cfg.tasks, limit=cfg.task_limit))
        result["tasks"] = tasks
        result["task_accuracy_mean"] = sum(r["acc"] for r in tasks.values()) / len(tasks)
    return result


def measure_llamacpp(spec: str, cfg: BenchConfig) -> dict[str, Any]:
    """Speed and memory of a GGUF through llama.cpp (llama-cpp-python), in this process."""
    from lilliput.eval import efficiency as eff
    from lilliput.eval.tasks import lambada_passages

    path = model_path(spec)
    result: dict[str, Any] = {"spec": spec, "label": model_label(spec), "engine": "llama.cpp", "notes": []}
    if importlib.util.find_spec("llama_cpp") is None:
        result["skipped"] = ("llama-cpp-python is not installed: `pip install llama-cpp-python` "
                             "(bench/vs_llamacpp.py installs it on demand) to run GGUF models through llama.cpp")
        return result
    import os

    import llama_cpp

    threads = cfg.threads or os.cpu_count() or 1
    meter = eff.EnergyMeter(cfg.watts_per_core or eff.DEFAULT_WATTS_PER_CORE)
    n_ctx = max(list(cfg.prompt_lengths) + [cfg.throughput_prompt + cfg.new_tokens, cfg.ppl_window]) + 8
    rss_before = eff.rss_bytes()
    t = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                          n_batch=512, logits_all=False, verbose=False)
    result.update({"llama_cpp": llama_cpp.__version__, "size_on_disk_bytes": eff.size_on_disk(path),
                   "load_seconds": time.perf_counter() - t, "threads": {"llama.cpp": threads},
                   "energy_method": meter.method(), "config": {"max_seq_len": llm.n_ctx()}})
    result["memory"] = {"rss_before_load_bytes": rss_before, "rss_at_load_bytes": eff.rss_bytes()}
    can_reset = eff.reset_peak_rss()
    text = "\n\n".join(lambada_passages(64))
    ids = llm.tokenize(text.encode(), add_bos=False) * 8

    def first_token(n: int) -> None:
        llm.reset()
        llm.eval(ids[:n])
        llm.sample(temp=0.0)

    result["ttft_s"] = {str(n): eff.spread(eff.repeat(lambda: first_token(n), cfg.warmup, cfg.repeats))
                        for n in cfg.prompt_lengths}
    prompt = ids[:cfg.throughput_prompt]
    gaps: list[float] = []
    decode, e2e, joules = [], [], []
    for i in range(cfg.warmup + cfg.repeats):
        llm.reset()
        with meter.measure() as m:
            llm.eval(prompt)
            stamps = []
            for _ in range(cfg.new_tokens):
                tokn = llm.sample(temp=0.0)
                stamps.append(time.perf_counter())
                llm.eval([tokn])
            end = time.perf_counter()
        if i >= cfg.warmup:
            gaps += [b - a for a, b in zip(stamps, stamps[1:])]
            decode.append(eff.decode_rate(cfg.new_tokens - 1, end - stamps[0]))
            e2e.append(eff.end_to_end_rate(cfg.new_tokens, m.seconds))
            joules.append(m.joules / cfg.new_tokens)
    result["inter_token_latency_s"] = eff.spread(gaps)
    result["throughput"] = {"1": {"batch": 1, "decode_tok_s": eff.spread(decode), "end_to_end_tok_s": eff.spread(e2e),
                                  "joules_per_token": eff.spread(joules)}}
    result["notes"].append("llama.cpp runs batch 1 only here (llama-cpp-python has no batched generate); "
                           "perplexity and tasks are measured on the lilliput side")
    result["throughput_prompt_tokens"], result["new_tokens"] = len(prompt), cfg.new_tokens
    result["memory"].update({"peak_generation_bytes": eff.peak_rss_bytes(), "peak_is_generation_only": can_reset})
    return result


def _worker(spec_file: str, out_file: str) -> int:
    job = json.loads(Path(spec_file).read_text())
    cfg = BenchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in job["config"].items()})
    spec = job["spec"]
    try:
        fn = measure_llamacpp if spec and spec.startswith(LLAMACPP) else measure_model
        result = fn(spec, cfg)
    except (ValueError, FileNotFoundError) as e:
        result = {"error": str(e), "error_type": type(e).__name__}
    write_json(out_file, result)
    return 0


def _run_worker(spec: str | None, cfg: BenchConfig) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="lilliput-bench-") as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "result.json"
        write_json(job, {"spec": spec, "config": dataclasses.asdict(cfg)})
        proc = subprocess.run([sys.executable, "-m", "lilliput.eval.bench", "--worker", str(job), str(out)],
                              capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
            raise RuntimeError(f"benchmark worker for {model_label(spec)} failed (exit {proc.returncode}):\n{tail}")
        result = json.loads(out.read_text())
    if "error" in result:
        raise {"FileNotFoundError": FileNotFoundError}.get(result["error_type"], ValueError)(result["error"])
    return result


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Measure every model of `cfg` (each in its own process), write `<out>/bench.json`, return the record."""
    for spec in cfg.models:
        model_path(spec)  # fail on a missing model before measuring anything
    out = Path(cfg.out)
    t0 = time.perf_counter()
    models = []
    for spec in cfg.models:
        print(f"bench: {model_label(spec)}", file=sys.stderr)
        models.append(_run_worker(spec, cfg))
    record = run_record("bench", config=dataclasses.asdict(cfg), models=models,
                        seconds=time.perf_counter() - t0)
    if cfg.profile:
        from lilliput.eval.profile import profile_decode

        spec = next((s for s in cfg.models if not (s and s.startswith(LLAMACPP))), None)
        record["profile"] = profile_decode(spec, out, steps=cfg.profile_steps, threads=cfg.threads)
    write_json(out / "bench.json", record)
    return record


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.exit(_worker(sys.argv[2], sys.argv[3]))
    print("usage: python -m lilliput.eval.bench --worker JOB.json OUT.json (internal; use `lilliput bench`)",
          file=sys.stderr)
    sys.exit(2)
