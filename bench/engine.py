"""The engine's throughput: batched decode and continuous batching, beside transformers, one run.

1. Aggregate decode tokens/s at batch 1, 4, 8, 16 (128 new tokens after 64-token prompts) for
   SmolLM2-135M in fp32, int8 and int4 (RTN), and for transformers `generate` on the same fp32
   weights at the same batch sizes; runs interleaved (every configuration once per round).
   Decode-only tokens/s (`lilliput.eval.efficiency.engine_rates`, the loop `lilliput bench` uses):
   tokens after the first, over the time after every row's prefill.
2. Continuous batching: 32 requests of mixed prompt and output lengths arriving over ~2 s while
   earlier ones decode (seeded Poisson arrivals, faster than they are served, so requests/s is
   the engine's capacity, not the arrival rate) into one engine of 16 rows, vs the same requests served one at a
   time in arrival order: requests/s and time to first token (p50/p99; from the arrival).
3. int8 at batch 1 against the memory-bandwidth limit: bytes of every matrix read per token /
   read bandwidth over a buffer of at least 4x the last-level cache (`efficiency.memory_bandwidth`;
   the same read over a buffer of the int8 model's size, which the cache may partly hold, is a
   second, named field).
4. int8 batch 8 / batch 1 with the AVX2 kernels forced (`LILLIPUT_ISA=avx2`, in a child process:
   a process loads one build), the kernels an AVX2-only machine runs.
5. The arena's architectures (dense, MoE, Mamba-2, xLSTM, hybrid: the `*-arena` presets, randomly
   initialised: speed only) decoding at batch 1 and 16 from each of the arena's context lengths
   (256 .. 8192), each through the engine (its fused C step where it runs the model; one prefill
   per run, copied to the other rows), interleaved round by round: `arch_decode_tok_s`
   {arch: {"b1": {context: median tok/s}}}, `arch_vs_dense` (the same over dense's) and
   `mamba_vs_dense_batch1_min` (the least over contexts of Mamba / dense at batch 1; target >= 1).

Writes bench/results/engine.json with `int8_batch8_vs_batch1`, `int8_batch8_vs_batch1_avx2`,
`continuous_vs_sequential`, `int8_fraction_of_limit` and `mamba_vs_dense_batch1_min`, and the
instruction sets the kernels were built with. `--arch-only` runs part 5 alone (with
`--arch-contexts 64 --arch-batches 1 --arch-new 4 --repeats 1`: a smoke run of seconds).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from lilliput.compress.quantize import RTNConfig, quantize_
from lilliput.core.checkpoint import load_model, to_transformers
from lilliput.core.config import preset
from lilliput.core.record import run_record, write_json
from lilliput.core.tokenizer import ByteTokenizer
from lilliput.eval.efficiency import (decode_rate, engine_rates, interleave, linear_bytes, memory_bandwidth,
                                       parameter_count, percentile, read_bandwidth_gb_s, spread)
from lilliput.eval.serve_peer import mixed_requests
from lilliput.eval.tasks import lambada_passages
from lilliput.infer import kernels
from lilliput.infer.engine import Engine, EngineConfig
from lilliput.infer.fused import fast_path_reason
from lilliput.infer.sequence import GenerationConfig
from lilliput.jobs.arena import ARCHS, ArenaJob, arena_model

OUT = Path(__file__).parent / "results" / "engine.json"

def hf_decode_tok_s(hf, prompt: list[int], batch: int, new: int) -> float:
    """transformers generate: (batch * (new - 1)) tokens over generate(new) - generate(1) seconds."""
    ids = torch.tensor([prompt] * batch)
    mask = torch.ones_like(ids)

    def run(n: int) -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        pad_token_id=0)
        return time.perf_counter() - t

    first = run(1)
    return decode_rate(batch * (new - 1), run(new) - first)


def serve(model, tok, reqs: list, max_batch: int) -> dict:
    """Run the requests through one engine as they arrive (max_batch=1: one at a time)."""
    engine = Engine(model, tok, EngineConfig(max_batch=max_batch, max_len=512))
    pending, seqs = list(reqs), []
    t0 = time.perf_counter()
    while pending or engine.has_work():
        now = time.perf_counter() - t0
        while pending and pending[0].arrival <= now:
            r = pending.pop(0)
            s = engine.add(r.prompt, GenerationConfig(max_new_tokens=r.new, ignore_eos=True))
            s.arrival = t0 + r.arrival  # queueing before admission counts, as a client sees it
            seqs.append(s)
        if engine.has_work():
            engine.step()
        elif pending:
            time.sleep(max(0.0, pending[0].arrival - (time.perf_counter() - t0)))
    wall = time.perf_counter() - t0
    ttft = [s.first_token_at - s.arrival for s in seqs]
    tokens = sum(len(s.output) for s in seqs)
    return {"requests": len(seqs), "seconds": round(wall, 2), "requests_per_s": round(len(seqs) / wall, 3),
            "output_tokens_per_s": round(tokens / wall, 1),
            "ttft_p50_s": round(statistics.median(ttft), 3),
            "ttft_p99_s": round(percentile(ttft, 99), 3)}


def avx2_int8(args) -> dict:
    """int8 decode at batch 1 and 8 with the AVX2 kernels forced, in a child process (LILLIPUT_ISA=avx2)."""
    cmd = [sys.executable, __file__, "--int8-only", "--batches", "1,8", "--threads", str(args.threads),
           "--new", str(args.new), "--prompt", str(args.prompt), "--repeats", str(args.repeats)]
    print("decode: int8 b1, b8 with LILLIPUT_ISA=avx2", file=sys.stderr)
    out = subprocess.run(cmd, env={**os.environ, "LILLIPUT_ISA": "avx2"}, capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    med = {b: v["median"] for b, v in got["decode_tok_s"].items()}
    return {"kernels": got["kernels"], "ratio": round(med["b8"] / med["b1"], 3),
            "decode_tok_s": {b: {**{k: round(x, 2) for k, x in spread(v["values"]).items()},
                                 "values": [round(x, 1) for x in v["values"]]} for b, v in got["decode_tok_s"].items()}}


def arch_decode(args) -> dict:
    """Part 5: decode tok/s of the arena's architectures at each batch and context, through the engine."""
    archs = args.archs.split(",")
    unknown = sorted(set(archs) - set(ARCHS))
    if unknown:
        raise SystemExit(f"unknown architectures {unknown}; known: {', '.join(ARCHS)}")
    contexts = [int(c) for c in args.arch_contexts.split(",")]
    batches = [int(b) for b in args.arch_batches.split(",")]
    need = max(contexts) + args.arch_new
    models = {a: arena_model(a, 0, max_seq_len=need if need > preset(ARCHS[a]).max_seq_len else None) for a in archs}
    g = torch.Generator().manual_seed(0)
    prompts = {c: torch.randint(0, 256, (c,), generator=g).tolist() for c in contexts}
    tok = ByteTokenizer()

    def run(model, batch: int, context: int) -> float:
        return engine_rates(model, tok, prompts[context], batch, args.arch_new, share_prefill=True,
                            prefill_chunk=512)["decode_tok_s"]

    runs = {f"{a} b{b} @{c}": (lambda m=m, b=b, c=c: run(m, b, c)) for a, m in models.items() for b in batches
            for c in contexts}
    print(f"architectures: {len(runs)} configurations x {args.repeats} rounds", file=sys.stderr)
    got = interleave(runs, repeats=args.repeats, warmup=1)
    med = {k: v["median"] for k, v in got.items()}
    for k, v in med.items():
        print(f"  {k:<22} {v:9.1f} tok/s", file=sys.stderr)
    table = {a: {f"b{b}": {str(c): round(med[f"{a} b{b} @{c}"], 1) for c in contexts} for b in batches} for a in archs}
    vs_dense = {a: {f"b{b}": {str(c): round(med[f"{a} b{b} @{c}"] / med[f"dense b{b} @{c}"], 3) for c in contexts}
                    for b in batches} for a in archs if a != "dense"} if "dense" in archs else {}
    mamba_b1 = vs_dense.get("mamba", {}).get("b1")
    return {
        "arch_decode_tok_s": table,
        "arch_decode_values": {k: [round(x, 1) for x in v["values"]] for k, v in got.items()},
        "arch_vs_dense": vs_dense,
        "mamba_vs_dense_batch1_min": min(mamba_b1.values()) if mamba_b1 else None,
        "arch_fast_path": {a: fast_path_reason(m) or "fused C step" for a, m in models.items()},
        "arch_parameters": {a: parameter_count(m) for a, m in models.items()},
        "arch_setup": {"presets": {a: ARCHS[a] for a in archs}, "contexts": contexts, "batches": batches,
                       "new_tokens": args.arch_new, "init": "random (seed 0): speed only",
                       "prompt": "random bytes of the context's length, prefilled once in chunks of 512 and "
                                 "copied to every row (Engine.add_n)"},
    }


def write(args, argv, result: dict) -> None:
    write_json(args.out, run_record("bench/engine.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                                    **result))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,4,8,16")
    ap.add_argument("--new", type=int, default=128, help="decoded tokens per sequence")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--requests", type=int, default=32, help="requests in the continuous-batching run")
    ap.add_argument("--rate", type=float, default=16.0,
                    help="arrivals per second: faster than either way serves them, so requests/s measures capacity")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--no-avx2", action="store_true", help="skip the AVX2-forced int8 batch ratio")
    ap.add_argument("--int8-only", action="store_true", help=argparse.SUPPRESS)  # the AVX2 child: int8 decode, JSON out
    ap.add_argument("--arch-only", action="store_true", help="run part 5 (the arena's architectures) alone")
    ap.add_argument("--archs", default=",".join(ARCHS), help="arena architectures of part 5")
    ap.add_argument("--arch-batches", default="1,16", help="batch sizes of part 5")
    ap.add_argument("--arch-contexts", default=",".join(map(str, ArenaJob().contexts)),
                    help="context lengths of part 5 (default: the arena's)")
    ap.add_argument("--arch-new", type=int, default=64, help="decoded tokens per sequence in part 5")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    kernels.set_threads(args.threads)
    if args.arch_only:
        result = {"threads": args.threads, "repeats": args.repeats, **arch_decode(args), "kernels": kernels.describe()}
        write(args, argv, result)
        print(f"mamba_vs_dense_batch1_min {result['mamba_vs_dense_batch1_min']}; wrote {args.out}", file=sys.stderr)
        return 0
    batches = [int(b) for b in args.batches.split(",")]

    model, tok = load_model(None, device="cpu")
    prompt = tok.encode("\n\n".join(lambada_passages(8)), bos=False)[:args.prompt]
    if args.int8_only:
        int8 = quantize_(model, RTNConfig(bits=8))
        got = interleave({f"b{b}": (lambda b=b: engine_rates(int8, tok, prompt, b, args.new)["decode_tok_s"])
                          for b in batches}, repeats=args.repeats, warmup=1)
        print(json.dumps({"kernels": kernels.describe(), "decode_tok_s": got}))
        return 0
    models = {"fp32": model, "int8": quantize_(copy.deepcopy(model), RTNConfig(bits=8)),
              "int4": quantize_(copy.deepcopy(model), RTNConfig(bits=4, group_size=128))}
    runs = {f"lilliput {k} b{b}": (lambda m=m, b=b: engine_rates(m, tok, prompt, b, args.new)["decode_tok_s"])
            for k, m in models.items() for b in batches}
    if not args.no_hf:
        hf = to_transformers(model)
        runs.update({f"transformers fp32 b{b}": (lambda b=b: hf_decode_tok_s(hf, prompt, b, args.new))
                     for b in batches})
    print(f"decode: {len(runs)} configurations x {args.repeats} rounds", file=sys.stderr)
    decode = interleave(runs, repeats=args.repeats, warmup=1)
    for k, v in decode.items():
        print(f"  {k:<26} {v['median']:8.1f} tok/s", file=sys.stderr)

    reqs = mixed_requests(tok, args.requests, args.rate, seed=0)
    serving = {"int8 continuous (16 rows)": serve(models["int8"], tok, reqs, 16),
               "int8 one at a time": serve(models["int8"], tok, reqs, 1)}
    for k, v in serving.items():
        print(f"  {k:<26} {v}", file=sys.stderr)

    avx2 = None if args.no_avx2 else avx2_int8(args)
    limit = memory_bandwidth()
    bw = limit["read_bandwidth_gb_s"]
    # the same read over a buffer of the int8 model's size: where the last-level cache holds a model
    # of that size (the Xeon VM reports 480 MB of L3), this, not DRAM, bounds its decode
    bw_int8 = read_bandwidth_gb_s(gib=linear_bytes(models["int8"]) / 2**30, repeats=20)
    med = {k: v["median"] for k, v in decode.items()}
    limits = {k: bw * 1e9 / linear_bytes(m) for k, m in models.items()}

    def ratio(a, b):
        return round(med[a] / med[b], 3) if a in med and b in med else None

    archs = arch_decode(args)
    result = {
        "threads": args.threads, "new_tokens": args.new, "prompt_tokens": args.prompt, "repeats": args.repeats,
        "int8_batch8_vs_batch1": ratio("lilliput int8 b8", "lilliput int8 b1"),
        "int8_batch8_vs_batch1_avx2": avx2["ratio"] if avx2 else None,
        "avx2_forced": avx2,
        "continuous_vs_sequential": round(serving["int8 continuous (16 rows)"]["requests_per_s"]
                                          / serving["int8 one at a time"]["requests_per_s"], 3),
        "int8_fraction_of_limit": round(med["lilliput int8 b1"] / limits["int8"], 3) if "lilliput int8 b1" in med else None,
        "fp32_fraction_of_limit": round(med["lilliput fp32 b1"] / limits["fp32"], 3) if "lilliput fp32 b1" in med else None,
        "int4_fraction_of_limit": round(med["lilliput int4 b1"] / limits["int4"], 3) if "lilliput int4 b1" in med else None,
        "vs_transformers": {f"{k} b{b}": ratio(f"lilliput {k} b{b}", f"transformers fp32 b{b}")
                            for k in models for b in batches if not args.no_hf},
        **limit,
        "read_bandwidth_int8_size_gb_s": round(bw_int8, 2),
        "int8_fraction_of_int8_size_read": round(med["lilliput int8 b1"] * linear_bytes(models["int8"]) / (bw_int8 * 1e9), 3)
        if "lilliput int8 b1" in med else None,
        "bytes_per_token": {k: linear_bytes(m) for k, m in models.items()},
        "limit_tok_s": {k: round(v, 1) for k, v in limits.items()},
        "decode_tok_s": {k: {**{s: round(x, 2) for s, x in spread(v["values"]).items()},
                             "values": [round(x, 1) for x in v["values"]]} for k, v in decode.items()},
        "serving": serving,
        "serving_requests": {"n": len(reqs), "rate_per_s": args.rate, "prompt_tokens": [len(r.prompt) for r in reqs],
                             "new_tokens": [r.new for r in reqs]},
        **archs,
        "kernels": kernels.describe(),
        "note": "decode tok/s: tokens after the first, over the time after every row's prefill; lilliput and "
                "transformers on the same fp32 weights (int8/int4: RTN per channel / g128). limit = read "
                "bandwidth / bytes of every matrix per token (the KV cache ignored).",
    }
    write(args, argv, result)
    print(f"int8_batch8_vs_batch1 {result['int8_batch8_vs_batch1']} (AVX2 forced: "
          f"{result['int8_batch8_vs_batch1_avx2']}), continuous_vs_sequential "
          f"{result['continuous_vs_sequential']}, int8_fraction_of_limit {result['int8_fraction_of_limit']}, "
          f"mamba_vs_dense_batch1_min {result['mamba_vs_dense_batch1_min']}; wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
