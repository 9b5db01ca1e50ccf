"""lilliput's one measurement module: sizes, parameter counts, memory, energy, timing statistics,
speeds and latency runs. Every bench script, `lilliput bench`, the shrink job and the demo
measure through it, so one figure has one definition (held-out perplexity has one default too:
`lilliput.eval.perplexity.HELDOUT`).

Counts and sizes, one definition each:
- `parameter_count`: logical parameters (`active_parameter_count`: those one token uses, which
  differs for mixture-of-experts models). Each weight once: a tied embedding and output layer once,
  a packed int8/int4 layer as the N x K float weight it stands for, and an output layer tied to
  the embedding once even when quantization gave it its own int8 copy (the same logical weight).
  Quantizing a model leaves its parameter count unchanged.
- `model_bytes`: weights in memory, as stored (each tensor storage once), which is the basis
  on which models are compared for size; `size_on_disk` is the secondary figure.
- `linear_bytes`: bytes of the matrices a decode step reads (every linear layer, float or packed).

Speeds, two with two names (`DECODE_ONLY`, `END_TO_END`), both from one engine loop (`engine_rates`):
- `decode_rate`: decode-only tok/s, the tokens after each row's first over the time after every
  row's prefill; at batch b the rows' tokens together. The engine's speed, the one compared with
  the memory-bandwidth limit.
- `end_to_end_rate`: every generated token over the whole call, prefill included.

Memory is read from `/proc/self/status` (VmRSS = resident now, VmHWM = resident peak); the peak
is reset by writing "5" to `/proc/self/clear_refs`, so a bench worker can measure the peak of
generation alone. Energy comes from RAPL (`/sys/class/powercap/intel-rapl*/energy_uj`) where it
is readable; otherwise it is estimated from this process's CPU time times an assumed power per
core, which is CodeCarbon's CPU-load model (power = TDP x load, so energy = TDP / cores x CPU
seconds; https://mlco2.github.io/codecarbon/methodology.html). The assumption is part of every
figure it produces.
"""

from __future__ import annotations

import glob
import math
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn

from lilliput.core.layers import kind_of, weight_numel
from lilliput.infer.engine import Engine, EngineConfig
from lilliput.infer.generate import GenerationConfig, generate
from lilliput.infer.sequence import Status

# AMD EPYC 7763 (Zen 3, the family of the development machine): 280 W TDP over 64 cores
DEFAULT_WATTS_PER_CORE = 280.0 / 64
WATTS_SOURCE = ("CodeCarbon CPU-load model (energy = TDP/cores x CPU seconds), "
                "TDP of an AMD EPYC 7763: 280 W / 64 cores = 4.375 W per busy core; "
                "https://mlco2.github.io/codecarbon/methodology.html, "
                "https://www.amd.com/en/products/processors/server/epyc/7003-series/amd-epyc-7763.html")


# --- memory and size ------------------------------------------------------------------------------

def proc_status(path: str = "/proc/self/status") -> dict[str, int]:
    """The kB fields of /proc/self/status in bytes ({"VmRSS": ..., "VmHWM": ...}); {} off Linux."""
    out = {}
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                parts = value.split()
                if len(parts) == 2 and parts[1] == "kB":
                    out[key] = int(parts[0]) * 1024
    except OSError:
        pass
    return out


def rss_bytes() -> int:
    """Resident memory of this process now (0 where /proc is absent)."""
    return proc_status().get("VmRSS", 0)


def peak_rss_bytes() -> int:
    """Resident peak since start or since the last `reset_peak_rss()` (ru_maxrss off Linux)."""
    return proc_status().get("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _tensor_bytes(tensors, seen: set[int]) -> int:
    """Bytes of the storages under `tensors` not in `seen` (a storage shared by views or ties counts once)."""
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer as stored in memory, each storage once (a tied tensor once;
    an int8 copy of a tied output layer is a tensor of its own and counts)."""
    return _tensor_bytes(list(model.parameters()) + list(model.buffers()), set())


def decode_state_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of one sequence's fp32 decode state: `per_token` (attention keys and values, which grow
    with the sequence) and `per_sequence` (fixed-size recurrent states; while a verification is
    rewindable a recurrent layer also holds up to `core.recurrent.SNAPSHOTS` + 1 copies of its state)."""
    one, two = (model.new_state(1, n, dtype=torch.float32).nbytes() for n in (1, 2))
    return {"per_token": two - one, "per_sequence": 2 * one - two}


def state_bytes_at(model: nn.Module, tokens: int) -> int:
    """Bytes of one sequence's fp32 decode state after `tokens` tokens: `decode_state_bytes` at that
    length, except that a sliding-window attention layer counts at most its window of keys and values
    (lilliput's cache keeps them all; a decoder needs only the window)."""
    s = decode_state_bytes(model)
    total = s["per_sequence"] + s["per_token"] * tokens
    for block in getattr(model, "layers", ()):
        window = getattr(block.mixer, "window", None)
        if window is not None and tokens > window:
            one, two = (block.mixer.new_state(1, n, None, torch.float32).nbytes() for n in (1, 2))
            total -= (two - one) * (tokens - window)
    return total


def linear_bytes(model: nn.Module) -> int:
    """Bytes of every matrix a decoded token reads: the tensors of each nn.Linear and registered layer
    kind (packed int8/int4 codes, scales, zeros); the embedding is read one row at a time, so it is left out
    unless it is also the (tied) output layer."""
    seen: set[int] = set()
    return sum(_tensor_bytes(list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)), seen)
               for m in model.modules() if isinstance(m, nn.Linear) or kind_of(m))


def parameter_count(model: nn.Module) -> int:
    """Logical parameters (see the module docstring): float parameters once each, a registered layer
    kind as its float weight's N x K, an output layer tied to the embedding not again."""
    tied = getattr(getattr(model, "config", None), "tie_embeddings", False)
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    for name, m in model.named_modules():
        if kind_of(m) and not (tied and name == "lm_head"):  # packed weights are buffers: count them here
            total += weight_numel(m)
    return total


def active_parameter_count(model: nn.Module) -> int:
    """`parameter_count` less the experts a token does not use: a MoE layer with E experts and top-k
    routing counts k of them (equal to `parameter_count` for a dense model)."""
    from lilliput.core.moe import moe_layers

    idle = sum((m.E - m.k) * parameter_count(m.experts[0]) for m in moe_layers(model))
    return parameter_count(model) - idle


def parameter_breakdown(model: nn.Module) -> dict[str, int]:
    """`parameter_count` of a GPT by part: embedding, blocks, output layer (0 when tied), final norm, total."""
    tied = model.config.tie_embeddings
    parts = {"embedding": parameter_count(model.tok_emb), "blocks": parameter_count(model.layers),
             "lm_head_untied": 0 if tied else parameter_count(model.lm_head), "norm": parameter_count(model.norm)}
    return {**parts, "total": parameter_count(model)}


def size_on_disk(path: Path | str) -> int:
    """Bytes of a model file, or of every file under a model folder."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist: pass a model file or folder")
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --- statistics ---------------------------------------------------------------------------------

def spread(values: Sequence[float]) -> dict[str, float]:
    """{"median", "p90", "min", "max", "n"} of repeated measurements (p90 by linear interpolation)."""
    if not values:
        raise ValueError("no measurements to summarize")
    xs = sorted(values)
    pos = 0.9 * (len(xs) - 1)
    lo = math.floor(pos)
    p90 = xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (pos - lo)
    return {"median": statistics.median(xs), "p90": p90, "min": xs[0], "max": xs[-1], "n": len(xs)}


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between the nearest ranks (numpy's default)."""
    if not values:
        raise ValueError("no measurements to summarize")
    xs = sorted(values)
    pos = q / 100 * (len(xs) - 1)
    lo = math.floor(pos)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (pos - lo)


# --- energy -------------------------------------------------------------------------------------

def rapl_zones() -> list[Path]:
    """Readable top-level RAPL package zones (intel-rapl:N; sub-zones are parts of them)."""
    zones = []
    for p in sorted(glob.glob("/sys/class/powercap/intel-rapl*/energy_uj")):
        zone = Path(p).parent
        if zone.name.count(":") != 1:
            continue
        try:
            int(Path(p).read_text())
        except (OSError, ValueError):
            continue
        zones.append(zone)
    return zones


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return r.ru_utime + r.ru_stime


@dataclass(frozen=True)
class EnergyMeter:
    """Measures the energy of a block of code: `with meter.measure() as m: ...; m.joules`."""

    watts_per_core: float = DEFAULT_WATTS_PER_CORE
    """Power of one busy core, used when RAPL is not readable."""

    def method(self) -> dict:
        if rapl_zones():
            return {"method": "rapl", "zones": [str(z) for z in rapl_zones()],
                    "note": "package energy of the whole socket (other processes included)"}
        return {"method": "cpu_time_estimate", "watts_per_core": self.watts_per_core, "source": WATTS_SOURCE,
                "note": "RAPL (/sys/class/powercap) not readable here; CPU seconds of this process x "
                        "watts_per_core (idle, memory and uncore power are not counted)"}

    def measure(self) -> "_Measurement":
        return _Measurement(self, rapl_zones())


class _Measurement:
    def __init__(self, meter: EnergyMeter, zones: list[Path]):
        self.meter, self.zones = meter, zones
        self.joules = 0.0
        self.cpu_seconds = 0.0
        self.seconds = 0.0

    def _read(self) -> list[int]:
        return [int((z / "energy_uj").read_text()) for z in self.zones]

    def __enter__(self):
        self._e0 = self._read() if self.zones else []
        self._c0, self._t0 = _cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._t0
        self.cpu_seconds = _cpu_seconds() - self._c0
        if self.zones:
            total = 0
            for z, a, b in zip(self.zones, self._e0, self._read()):
                if b < a:  # the counter wrapped
                    b += int((z / "max_energy_range_uj").read_text())
                total += b - a
            self.joules = total / 1e6
        else:
            self.joules = self.cpu_seconds * self.meter.watts_per_core
        return False


# --- latency runs ------------------------------------------------------------------------------------

def repeat(fn: Callable[[], float | None], warmup: int, repeats: int) -> list[float]:
    """Run fn warmup + repeats times; the wall times (or fn's own figure when it returns one)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        got = fn()
        out.append(time.perf_counter() - t if got is None else got)
    return out


def interleave(runs: dict[str, Callable[[], float]], repeats: int, warmup: int = 1) -> dict[str, dict]:
    """Measure several things fairly on a machine whose speed drifts: each run once per round, round
    after round (warm-up rounds discarded). Each run returns its own figure (e.g. tokens/s);
    the result is `spread` of each run's figures plus the raw values."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    values: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            values[name].append(float(fn()))
    return {name: {**spread(v), "values": v} for name, v in values.items()}


# --- speeds: two of them, each with one name ------------------------------------------------------

DECODE_ONLY = "decode-only tok/s"
"""Label of `decode_rate`: tokens after the first, over the time after prefill (the engine's speed)."""
END_TO_END = "end-to-end tok/s (prefill included)"
"""Label of `end_to_end_rate`: every generated token over the whole call (what a user waits for)."""


def decode_rate(tokens_after_first: int, seconds: float) -> float:
    """Decode-only tokens/s: the tokens generated after each row's first, over the seconds after every
    row's prefill (0 when nothing was decoded)."""
    return tokens_after_first / seconds if tokens_after_first > 0 and seconds > 0 else 0.0


def end_to_end_rate(tokens: int, seconds: float) -> float:
    """End-to-end tokens/s: every generated token over the seconds of the whole call, prefill included."""
    return tokens / seconds if tokens > 0 and seconds > 0 else 0.0


def engine_rates(model, tokenizer, prompt: list[int], batch: int, new_tokens: int, share_prefill: bool = False,
                 prefill_chunk: int | None = None) -> dict[str, float]:
    """One run of `batch` copies of `prompt` through one engine, `new_tokens` each (greedy, eos ignored):
    {"decode_tok_s": decode-only, all rows together, "end_to_end_tok_s": prefill included, "seconds",
    "tokens"}. Every speed a user sees (bench/engine.py, `lilliput bench`, the shrink job, the demo)
    is measured by this loop. share_prefill: the rows are `Engine.add_n` samples of the prompt, which
    prefill it once and copy it (decode at a long context without `batch` prefills); prefill_chunk:
    prompt tokens per engine step (default: every row's at once)."""
    engine = Engine(model, tokenizer, EngineConfig(max_batch=batch, max_len=len(prompt) + new_tokens,
                                                   prefill_chunk=prefill_chunk or len(prompt) * batch))
    cfg = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    seqs = engine.add_n(prompt, cfg, batch) if share_prefill else [engine.add(prompt, cfg) for _ in range(batch)]
    while any(s.status is not Status.RUNNING for s in seqs) and engine.has_work():
        engine.step()
    before = sum(len(s.output) for s in seqs)
    t1 = time.perf_counter()
    engine.run()
    t2 = time.perf_counter()
    total = sum(len(s.output) for s in seqs)
    return {"decode_tok_s": decode_rate(total - before, t2 - t1), "end_to_end_tok_s": end_to_end_rate(total, t2 - t0),
            "seconds": t2 - t0, "tokens": total}


def decode_tok_s(model, tokenizer, prompt: list[int], new_tokens: int) -> float:
    """Decode-only tokens/s of one greedy batch-1 run of `new_tokens` after `prompt` (`engine_rates`)."""
    return engine_rates(model, tokenizer, prompt, 1, new_tokens)["decode_tok_s"]


def decode_speeds(models: dict[str, tuple], prompt: list[int], new_tokens: int, repeats: int = 3,
                  warmup: int = 1) -> dict[str, dict]:
    """Decode-only tokens/s of several (model, tokenizer) pairs at batch 1, interleaved round by round so
    that a machine whose speed drifts slows them alike: {name: spread + values}."""
    return interleave({name: (lambda m=m, t=t: decode_tok_s(m, t, prompt, new_tokens)) for name, (m, t) in models.items()},
                      repeats, warmup)


def time_to_first_token(model, tokenizer, prompt: list[int], warmup: int, repeats: int) -> list[float]:
    """Seconds from a prompt of token ids to its first generated token (wall time of a 1-token generate)."""
    cfg = GenerationConfig(max_new_tokens=1, ignore_eos=True)

    def run() -> None:
        generate(model, tokenizer, [prompt], cfg)

    return repeat(run, warmup, repeats)


def inter_token_latencies(model, tokenizer, prompt: list[int], new_tokens: int) -> list[float]:
    """Gaps between streamed text chunks at batch 1 (what a streaming client sees), in seconds.
    A token whose text is held back (an incomplete UTF-8 character) merges with the next gap."""
    stamps: list[float] = []
    generate(model, tokenizer, [prompt], GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True),
             on_text=lambda row, text: stamps.append(time.perf_counter()))
    return [b - a for a, b in zip(stamps, stamps[1:])]


def throughput(model, tokenizer, prompt: list[int], batch: int, new_tokens: int, warmup: int, repeats: int,
               meter: EnergyMeter) -> dict:
    """Both speeds of `batch` copies of a prompt (`engine_rates`), and energy per generated token:
    {"batch", "decode_tok_s", "end_to_end_tok_s", "joules_per_token"}, each a `spread` over `repeats` runs."""
    for _ in range(warmup):
        engine_rates(model, tokenizer, prompt, batch, new_tokens)
    decode, e2e, joules = [], [], []
    for _ in range(repeats):
        with meter.measure() as m:
            r = engine_rates(model, tokenizer, prompt, batch, new_tokens)
        decode.append(r["decode_tok_s"])
        e2e.append(r["end_to_end_tok_s"])
        joules.append(m.joules / r["tokens"])
    return {"batch": batch, "decode_tok_s": spread(decode), "end_to_end_tok_s": spread(e2e),
            "joules_per_token": spread(joules)}


def last_level_cache_bytes() -> int | None:
    """Size of the largest CPU cache (sysfs, then lscpu's L3/L2), or None where neither says."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * mult)
        except ValueError:
            pass
    if sizes:
        return max(sizes)
    import subprocess

    try:
        out = subprocess.run(["lscpu", "-B"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if line.startswith(("L3 cache", "L2 cache")):
            try:
                return int(line.split(":")[1].split()[0])
            except (IndexError, ValueError):
                continue
    return None


def memory_bandwidth() -> dict[str, float | int | None]:
    """The memory-read limit: bandwidth summing a buffer of at least 4x the last-level cache (and 1 GiB),
    so no figure measured against it can exceed it from cache hits. Returns the bandwidth, the buffer
    and cache sizes and their ratio, for the results file."""
    llc = last_level_cache_bytes()
    buffer = max(2**30, 4 * llc) if llc else 2**30
    bw = read_bandwidth_gb_s(gib=buffer / 2**30)
    return {"read_bandwidth_gb_s": round(bw, 2), "bandwidth_buffer_bytes": buffer, "last_level_cache_bytes": llc,
            "bandwidth_buffer_vs_llc": round(buffer / llc, 2) if llc else None}


def read_bandwidth_gb_s(gib: float = 1.0, repeats: int = 5) -> float:
    """Plain memory-read bandwidth: summing a buffer of `gib` GiB (best of `repeats`). Use
    `memory_bandwidth()` for the limit: a buffer smaller than the caches measures the caches."""
    x = torch.ones(int(gib * 2**30) // 4)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / min(times) / 1e9


# --- decode cost against context ----------------------------------------------------------------

class ContextDecode:
    """One model decoding `batch` rows whose decode state already holds `context` tokens: the cost of
    a decode step as the context grows (attention reads every cached key; a recurrent state is the
    same size whatever the context).

    Row 0 of the state is prefilled once with `context` random tokens; before each timed run rows 1..batch
    are copied from it (not timed), so every run decodes from exactly `context` tokens. The step is
    the model's torch forward over a `DecodeState` (`model(idx, state, rows)`), the path the engine's
    runner takes for every mixer the fused C step does not cover: the same path for every architecture.
    """

    def __init__(self, model: nn.Module, context: int, batch: int = 4, new_tokens: int = 8, seed: int = 0):
        if context < 1 or batch < 1 or new_tokens < 1:
            raise ValueError(f"context, batch and new_tokens must be >= 1, got {context}, {batch}, {new_tokens}")
        need = context + new_tokens
        if need > model.config.max_seq_len:
            raise ValueError(f"context {context} + {new_tokens} new tokens exceed the model's max_seq_len "
                             f"{model.config.max_seq_len}: build it with max_seq_len >= {need}")
        self.model, self.context, self.batch, self.new_tokens = model.eval(), context, batch, new_tokens
        device = next(model.parameters()).device
        g = torch.Generator().manual_seed(seed)
        prompt = torch.randint(0, model.config.vocab_size, (1, context), generator=g).to(device)
        self.tokens = torch.randint(0, model.config.vocab_size, (batch, new_tokens), generator=g).to(device)
        self.rows = list(range(1, batch + 1))
        with torch.inference_mode():
            self.state = model.new_state(batch + 1, need)
            for i in range(0, context, 512):  # prefill in chunks, as the engine does: bounded attention scores
                model(prompt[:, i:i + 512], self.state, rows=[0], last_only=True)

    def __call__(self) -> float:
        """Milliseconds per decode step (one new token in each of the `batch` rows), mean of `new_tokens` steps."""
        with torch.inference_mode():
            for r in self.rows:
                self.state.copy(0, r)
            t = time.perf_counter()
            for i in range(self.new_tokens):
                self.model(self.tokens[:, i:i + 1], self.state, rows=self.rows, last_only=True)
            return (time.perf_counter() - t) * 1000 / self.new_tokens

    def state_bytes(self) -> int:
        """Bytes of one row's decode state at `context` tokens (fp32; see `decode_state_bytes`)."""
        b = decode_state_bytes(self.model)
        return b["per_sequence"] + b["per_token"] * self.context


def decode_ms_by_context(models: dict[str, nn.Module], contexts: Sequence[int], batch: int = 4,
                         new_tokens: int = 8, repeats: int = 3, warmup: int = 1) -> dict[str, dict[int, dict]]:
    """ms per decode step of each model at each context ({name: {context: spread + values}}). Every
    (model, context) pair is prefilled first, then all are interleaved round by round (`interleave`), so a
    machine whose speed drifts slows every point of every curve alike (at the cost of holding every state)."""
    runs = {f"{name}@{c}": ContextDecode(m, c, batch, new_tokens) for name, m in models.items() for c in contexts}
    got = interleave(runs, repeats, warmup)
    return {name: {c: got[f"{name}@{c}"] for c in contexts} for name in models}
