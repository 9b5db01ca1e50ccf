"""GEMV kernel vs torch F.linear on SmolLM2-135M batch-1 decode shapes.

Per decode step: 30 layers of fused qkv (960x576), o (576x576), fused gate+up (3072x576),
down (576x1536), then the output layer (49152x576), with the torch elementwise ops of a
real step (rmsnorm, residual add, silu * up) between the products. Random weights, 30
layers' worth, so nothing stays in cache. Writes bench/results/gemv.json.

    .venv/bin/python bench/gemv.py [--rounds 7] [--steps 4]

The machine may be shared: torch and kernel rounds alternate and the best round of each
is reported (the least disturbed), the median beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lilliput.core.record import machine, run_record, write_json
from lilliput.eval.efficiency import interleave
from lilliput.infer import kernels

LAYERS = 30
DIM, HIDDEN, QKV, VOCAB = 576, 1536, 960, 49152
Linear = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class BenchConfig:
    rounds: int = 7
    """Alternating torch/kernel rounds; the best of each is reported."""
    steps: int = 4
    """Decode steps per round."""
    out: str = "bench/results/gemv.json"
    """Where the JSON goes."""


Weights = list[dict[str, torch.Tensor]]


def make_weights(dtype: torch.dtype, seed: int = 0) -> tuple[Weights, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def w(n: int, k: int) -> torch.Tensor:
        return (torch.randn(n, k, generator=g) * k**-0.5).to(dtype)

    layers = [{"qkv": w(QKV, DIM), "o": w(DIM, DIM), "gu": w(2 * HIDDEN, DIM), "down": w(DIM, HIDDEN)}
              for _ in range(LAYERS)]
    return layers, w(VOCAB, DIM)


def weight_bytes(layers: Weights, out_w: torch.Tensor) -> int:
    tensors = [t for lw in layers for t in lw.values()] + [out_w]
    return sum(t.numel() * t.element_size() for t in tensors)


def rmsnorm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5).to(x.dtype)


HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def decode_step(lin: Linear, x: torch.Tensor, layers: Weights, out_w: torch.Tensor,
                caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
    """One batch-1 decode step's products with the torch ops between them. x (1, DIM).

    Without caches the attention is an elementwise stand-in; with caches it is real SDPA
    over (1, HEADS, T, HEAD_DIM) keys/values, which torch may run on several threads.
    """
    for i, lw in enumerate(layers):
        qkv = lin(rmsnorm(x), lw["qkv"])  # (1, 960)
        if caches is None:
            attn = qkv[:, :DIM] * 0.5  # (1, 576)
        else:
            q = qkv[:, :DIM].view(1, HEADS, 1, HEAD_DIM)
            attn = F.scaled_dot_product_attention(q, *caches[i]).reshape(1, DIM)  # (1, 576)
        x = x + lin(attn, lw["o"])
        gu = lin(rmsnorm(x), lw["gu"])  # (1, 3072)
        h = F.silu(gu[:, :HIDDEN]) * gu[:, HIDDEN:]  # (1, 1536)
        x = x + lin(h, lw["down"])
    return lin(rmsnorm(x), out_w)  # (1, 49152)


def time_rounds(fns: dict[str, Callable[[], object]], cfg: BenchConfig) -> dict[str, list[float]]:
    """Seconds per call of each fn, one sample (mean of cfg.steps calls) per round, rounds interleaved
    across fns (`interleave`; a warm-up round pages in weights and starts thread pools)."""
    def per_call(fn: Callable[[], object]) -> Callable[[], float]:
        def run() -> float:
            t0 = time.perf_counter()
            for _ in range(cfg.steps):
                fn()
            return (time.perf_counter() - t0) / cfg.steps
        return run

    timed = interleave({name: per_call(fn) for name, fn in fns.items()}, cfg.rounds, warmup=1)
    return {name: s["values"] for name, s in timed.items()}


def with_threads(torch_threads: int, kernel_threads: int, fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        torch.set_num_threads(torch_threads)
        kernels.set_threads(kernel_threads)
        return fn()

    return run


def bench_dtype(dtype: torch.dtype, x_dtype: torch.dtype, cfg: BenchConfig) -> dict:
    layers, out_w = make_weights(dtype)
    nbytes = weight_bytes(layers, out_w)
    x = torch.randn(1, DIM).to(x_dtype)
    ncpu = len(os.sched_getaffinity(0))

    def step(lin: Linear) -> Callable[[], object]:
        return lambda: decode_step(lin, x, layers, out_w)

    fns: dict[str, Callable[[], object]] = {}
    if dtype == x_dtype:  # torch has no mixed-dtype linear; its peer is the same-dtype model
        fns[f"torch(t={ncpu})"] = with_threads(ncpu, 1, step(F.linear))
        fns["torch(t=1)"] = with_threads(1, 1, step(F.linear))
    fns[f"kernel(torch t=1, kernel t={ncpu})"] = with_threads(1, ncpu, step(kernels.linear))
    fns[f"kernel(torch t={ncpu}, kernel t={ncpu})"] = with_threads(ncpu, ncpu, step(kernels.linear))
    fns["kernel(torch t=1, kernel t=1)"] = with_threads(1, 1, step(kernels.linear))
    with torch.inference_mode():
        samples = time_rounds(fns, cfg)
    torch.set_num_threads(ncpu)
    kernels.set_threads(ncpu)
    table = {name: {"step_ms": min(s) * 1e3, "median_step_ms": statistics.median(s) * 1e3,
                    "gb_s": nbytes / min(s) / 1e9} for name, s in samples.items()}
    kernel_best = f"kernel(torch t=1, kernel t={ncpu})"  # the documented decode policy
    result = {"weight_dtype": str(dtype), "x_dtype": str(x_dtype), "weight_mb_per_step": nbytes / 1e6,
              "kernel_gb_s": table[kernel_best]["gb_s"], "kernel_step_ms": table[kernel_best]["step_ms"],
              "policies": table}
    if dtype == x_dtype:
        torch_best = min((n for n in table if n.startswith("torch")), key=lambda n: table[n]["step_ms"])
        result |= {"torch_gb_s": table[torch_best]["gb_s"], "torch_step_ms": table[torch_best]["step_ms"],
                   "torch_policy": torch_best,
                   "ratio": table[torch_best]["step_ms"] / table[kernel_best]["step_ms"]}
    result["per_shape"] = per_shape(layers, out_w, x, cfg)
    return result


def per_shape(layers: Weights, out_w: torch.Tensor, x: torch.Tensor, cfg: BenchConfig) -> dict:
    """GB/s of each product alone, back to back over the 30 layers' copies."""
    ncpu = len(os.sched_getaffinity(0))
    res = {}
    groups = {name: [lw[name] for lw in layers] for name in layers[0]} | {"out": [out_w]}
    for name, ws in groups.items():
        xs = torch.randn(1, ws[0].shape[1]).to(x.dtype)
        nbytes = sum(w.numel() * w.element_size() for w in ws)
        fns = {f"kernel(t={ncpu})": with_threads(1, ncpu, lambda: [kernels.linear(xs, w) for w in ws]),
               "kernel(t=1)": with_threads(1, 1, lambda: [kernels.linear(xs, w) for w in ws])}
        if ws[0].dtype == x.dtype:
            fns[f"torch(t={ncpu})"] = with_threads(ncpu, 1, lambda: [F.linear(xs, w) for w in ws])
            fns["torch(t=1)"] = with_threads(1, 1, lambda: [F.linear(xs, w) for w in ws])
        with torch.inference_mode():
            s = time_rounds(fns, BenchConfig(rounds=cfg.rounds, steps=2))
        res[f"{name} {tuple(ws[0].shape)}"] = {k: nbytes / min(v) / 1e9 for k, v in s.items()}
    torch.set_num_threads(ncpu)
    return res


def bench_attention(cfg: BenchConfig, context: int = 512) -> dict:
    """fp32 decode steps with real SDPA over a `context`-token cache between the products:
    torch ops that may go parallel, to compare the thread policies under interference."""
    layers, out_w = make_weights(torch.float32)
    nbytes = weight_bytes(layers, out_w)
    g = torch.Generator().manual_seed(1)
    shape = (1, HEADS, context, HEAD_DIM)
    caches = [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(LAYERS)]
    x = torch.randn(1, DIM)
    ncpu = len(os.sched_getaffinity(0))

    def step(lin: Linear) -> Callable[[], object]:
        return lambda: decode_step(lin, x, layers, out_w, caches)

    fns = {f"torch(t={ncpu})": with_threads(ncpu, 1, step(F.linear)),
           "torch(t=1)": with_threads(1, 1, step(F.linear)),
           f"kernel(torch t=1, kernel t={ncpu})": with_threads(1, ncpu, step(kernels.linear)),
           f"kernel(torch t={ncpu}, kernel t={ncpu})": with_threads(ncpu, ncpu, step(kernels.linear)),
           "kernel(torch t=1, kernel t=1)": with_threads(1, 1, step(kernels.linear))}
    with torch.inference_mode():
        samples = time_rounds(fns, cfg)
    torch.set_num_threads(ncpu)
    kernels.set_threads(ncpu)
    return {"context": context, "note": "step_ms includes attention; gb_s counts weight bytes only",
            "policies": {name: {"step_ms": min(v) * 1e3, "median_step_ms": statistics.median(v) * 1e3,
                                "gb_s": nbytes / min(v) / 1e9} for name, v in samples.items()}}


def call_overhead_us() -> dict[str, float]:
    """Microseconds per call on a 16x16 weight, where the arithmetic is negligible."""
    x, w, out = torch.randn(1, 16), torch.randn(16, 16), torch.empty(1, 16)
    fns = {"kernel": lambda: kernels.linear(x, w), "kernel_out": lambda: kernels.linear(x, w, out=out),
           "torch": lambda: F.linear(x, w)}
    res = {}
    with torch.inference_mode():
        for name, fn in fns.items():
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(20000):
                    fn()
                best = min(best, (time.perf_counter() - t0) / 20000)
            res[name] = best * 1e6
    return res


def fresh_build_s() -> float:
    """Seconds to compile the kernel from scratch (into a throwaway cache)."""
    compiler = kernels.build.find_compiler()
    if compiler is None:
        return float("nan")
    with tempfile.TemporaryDirectory() as d:
        return kernels.build.build(compiler, Path(d) / "gemv.so")


def cpu_details() -> dict:
    """What the kernel's speed depends on, beyond run_record's machine: vector extensions, affinity, load."""
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "unknown")
    flags = next((ln for ln in lines if ln.startswith("flags")), "")
    return {**machine(), "cpu": model, "nproc": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
            "avx512f": " avx512f" in flags, "avx2": " avx2" in flags,
            "loadavg_1m_at_start": os.getloadavg()[0], "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in ("rounds", "steps", "out"):
        default = getattr(BenchConfig, f)
        parser.add_argument(f"--{f}", type=type(default), default=default)
    cfg = BenchConfig(**vars(parser.parse_args(argv)))
    if not kernels.available():
        raise SystemExit(f"kernel unavailable: {kernels.unavailable_reason()}")
    kernel = kernels.build.load()
    record = run_record("bench/gemv.py " + " ".join(sys.argv[1:] if argv is None else argv), config=asdict(cfg),
                        machine=cpu_details(), kernel_lanes=kernel.lanes, build_s=fresh_build_s(), call_overhead_us=call_overhead_us())
    cases = [("fp32", torch.float32, torch.float32), ("bf16", torch.bfloat16, torch.bfloat16),
             ("bf16w_fp32x", torch.bfloat16, torch.float32)]
    for name, wdt, xdt in cases:
        record[name] = bench_dtype(wdt, xdt, cfg)
        r = record[name]
        print(f"{name:12s} kernel {r['kernel_gb_s']:5.1f} GB/s {r['kernel_step_ms']:6.1f} ms/step"
              + (f" | torch {r['torch_gb_s']:5.1f} GB/s {r['torch_step_ms']:6.1f} ms/step | x{r['ratio']:.2f}"
                 if "ratio" in r else ""), flush=True)
    record["fp32_with_attention"] = bench_attention(cfg)
    for name, r in record["fp32_with_attention"]["policies"].items():
        print(f"fp32+sdpa    {name:32s} {r['step_ms']:6.1f} ms/step", flush=True)
    record["machine"]["loadavg_1m_at_end"] = os.getloadavg()[0]
    write_json(cfg.out, record)
    print(json.dumps({k: record[k] for k in ("machine", "build_s", "call_overhead_us")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
