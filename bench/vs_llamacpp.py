"""SmolLM2-135M decode and prompt-processing speed: lilliput vs llama.cpp, same cores, same run.

llama.cpp runs through llama-cpp-python, built on demand for this CPU's instruction sets with
AMX off (`lilliput.eval.peers`; the options are recorded): the shipped Q4_1 GGUF, and Q8_0 and
Q4_0 GGUFs written by lilliput's own exporter where it is present (`lilliput.export`), else by
llama.cpp's quantizer (recorded per row). lilliput runs the same weights in fp32, int8 and int4
(RTN). Every engine runs in its own worker process, so a crash (llama.cpp's AMX path died with
SIGILL on an Intel Xeon) is reported as that row's error and the other rows are still measured.
Workers take turns, round by round (interleaved), one at a time: batch-1 decode tok/s after a
64-token prompt, and prompt tok/s of a 512-token prompt; medians with min-max. The
memory-bandwidth limit of each row is bytes read per token / measured read bandwidth.

Writes bench/results/vs_llamacpp.json with `int8_vs_q8_0` and `int4_vs_q4_0` (lilliput decode
tok/s / llama.cpp's), `int4_prefill_vs_q4_0` (prompt tok/s), each row's fraction of its limit, and
the instruction sets used (`LILLIPUT_ISA=avx2` forces lilliput's AVX2 kernels). Spreads,
bytes per token and bandwidth come from the measurement module, `lilliput.eval.efficiency`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from lilliput.core.record import run_record, write_json

OUT = Path(__file__).parent / "results" / "vs_llamacpp.json"
FTYPES = {"Q8_0": 7, "Q4_0": 2}  # llama_ftype: LLAMA_FTYPE_MOSTLY_Q8_0, LLAMA_FTYPE_MOSTLY_Q4_0
ROWS = ("llama.cpp Q4_1", "llama.cpp Q8_0", "llama.cpp Q4_0", "lilliput fp32", "lilliput int8", "lilliput int4")


# --- the worker: one engine, one model, measured on request ----------------------------------------------

def prompt_ids(tok_fn, n: int) -> list[int]:
    from lilliput.eval.tasks import lambada_passages

    return tok_fn("\n\n".join(lambada_passages(64)))[:n]


def gguf_for(kind: str, threads: int) -> tuple[Path, str]:
    """The GGUF file of a llama.cpp row and who wrote it."""
    from lilliput.core.checkpoint import embedded_model_path
    from lilliput.infer import kernels

    src = embedded_model_path()
    if kind == "Q4_1":
        return src, "shipped"
    folder = kernels.build.cache_dir() / "gguf"
    try:
        from lilliput.core.checkpoint import load_model
        from lilliput.export.gguf import export_gguf

        path = folder / f"{src.stem}.{kind}.lilliput.gguf"
        if not path.is_file():
            model, tok = load_model(None, device="cpu")
            export_gguf(model, tok, path, kind)
        return path, "lilliput export"
    except ImportError:
        from lilliput.eval.peers import ensure_llama_cpp

        llama_cpp = ensure_llama_cpp()
        path = folder / f"{src.stem}.{kind}.llamacpp.gguf"
        if not path.is_file():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.allow_requantize, params.nthread = FTYPES[kind], True, threads
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params) != 0:
                raise RuntimeError(f"llama_model_quantize to {kind} failed")
            os.replace(tmp, path)
        return path, "llama.cpp quantizer"


def llama_worker(kind: str, args) -> tuple[dict, object]:
    from lilliput.eval.peers import ensure_llama_cpp, llama_cpp_build_options

    llama_cpp = ensure_llama_cpp()
    path, source = gguf_for(kind, args.threads)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=args.pp + args.prompt + args.new + 16, n_threads=args.threads,
                          n_threads_batch=args.threads, n_batch=512, verbose=False)
    ids = prompt_ids(lambda t: llm.tokenize(t.encode(), add_bos=False), args.pp)

    def measure(new: int) -> dict:
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        pp = len(ids) / (time.perf_counter() - t)
        llm.reset()
        llm.eval(ids[:args.prompt])
        tok = llm.sample(temp=0.0)
        t = time.perf_counter()
        for _ in range(new - 1):
            llm.eval([tok])
            tok = llm.sample(temp=0.0)
        return {"decode": (new - 1) / (time.perf_counter() - t), "pp": pp}

    info = {"file": str(path), "gguf_source": source, "bytes_per_token": path.stat().st_size,
            "llama_cpp": llama_cpp.__version__, "build_options": llama_cpp_build_options(llama_cpp),
            "prompt_head": ids[:8]}
    return info, measure


def lilliput_worker(kind: str, args) -> tuple[dict, object]:
    import torch

    from lilliput.compress.quantize import RTNConfig, quantize_
    from lilliput.core.checkpoint import load_model
    from lilliput.infer import kernels
    from lilliput.infer.generate import GenerationConfig, generate

    from lilliput.eval.efficiency import linear_bytes

    torch.set_num_threads(args.threads)
    kernels.set_threads(args.threads)
    model, tok = load_model(None, device="cpu")
    cfg = {"int8": RTNConfig(bits=8), "int4": RTNConfig(bits=4, group_size=128)}.get(kind)
    if cfg:
        model = quantize_(model, cfg)
    ids = prompt_ids(lambda t: tok.encode(t, bos=False), args.pp)

    def measure(new: int) -> dict:
        t = time.perf_counter()
        generate(model, tok, [ids], GenerationConfig(max_new_tokens=1, ignore_eos=True))
        pp = len(ids) / (time.perf_counter() - t)
        g = generate(model, tok, [ids[:args.prompt]], GenerationConfig(max_new_tokens=new, ignore_eos=True))[0]
        return {"decode": g.timings["decode_tok_s"], "pp": pp}

    info = {"bytes_per_token": linear_bytes(model), "prompt_head": ids[:8],
            "quantization": {"method": "rtn", "bits": cfg.bits, "group_size": cfg.group_size} if cfg else None,
            "kernels": kernels.describe()}
    return info, measure


def worker(name: str, args) -> int:
    engine, kind = name.split()
    info, measure = (llama_worker if engine == "llama.cpp" else lilliput_worker)(kind, args)
    measure(8)  # warm-up
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        print(json.dumps(measure(args.new)), flush=True)
    return 0


# --- the driver: one process per engine, taking turns -----------------------------------------------------

class Worker:
    def __init__(self, name: str, args, argv: list[str]):
        self.name, self.error, self.info = name, None, {}
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", name, *argv], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            err = self.proc.stderr.read().strip().splitlines()
            rc = self.proc.returncode
            self.error = (f"worker died with signal {-rc}" if rc < 0 else f"worker exited with {rc}") + \
                (f": {err[-1]}" if err else "")
            return {}
        return json.loads(line)

    def run(self) -> dict | None:
        if self.error:
            return None
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        got = self._read()
        return got or None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new", type=int, default=128, help="decoded tokens per run")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens before decoding")
    ap.add_argument("--pp", type=int, default=512, help="prompt-processing length")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows to measure")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    passthrough = [a for a in ("--threads", str(args.threads), "--new", str(args.new), "--prompt", str(args.prompt),
                               "--pp", str(args.pp))]
    if args.worker:
        return worker(args.worker, args)

    from lilliput.eval.efficiency import read_bandwidth_gb_s
    from lilliput.eval.peers import ensure_llama_cpp, llama_cpp_cmake_args

    t0 = time.perf_counter()
    try:
        ensure_llama_cpp()
    except RuntimeError as e:
        print(f"llama.cpp unavailable: {e}", file=sys.stderr)
    install_s = time.perf_counter() - t0
    workers = []
    for name in args.rows.split(","):
        w = Worker(name, args, passthrough)
        print(f"{name}: {'ready' if not w.error else w.error}", file=sys.stderr)
        workers.append(w)
    decode = {w.name: [] for w in workers}
    pp = {w.name: [] for w in workers}
    for i in range(args.repeats):
        for w in workers:
            got = w.run()
            if got:
                decode[w.name].append(got["decode"])
                pp[w.name].append(got["pp"])
        print(f"round {i + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in decode.items() if v),
              file=sys.stderr)
    for w in workers:
        w.close()

    bw = read_bandwidth_gb_s()
    rows, med = [], {}
    for w in workers:
        row = {"engine": w.name.split()[0], "model": w.name.split()[1], **w.info}
        if w.error or not decode[w.name]:
            row["error"] = w.error or "no measurement"
        else:
            d = med[w.name] = statistics.median(decode[w.name])
            limit = bw * 1e9 / w.info["bytes_per_token"]
            row.update(decode_tok_s=round(d, 1), decode_range=[round(min(decode[w.name]), 1), round(max(decode[w.name]), 1)],
                       prompt_tok_s=round(statistics.median(pp[w.name]), 1),
                       prompt_range=[round(min(pp[w.name]), 1), round(max(pp[w.name]), 1)],
                       limit_tok_s=round(limit, 1), fraction_of_limit=round(d / limit, 3))
        rows.append(row)
    pmed = {k: statistics.median(v) for k, v in pp.items() if v}

    def ratio(a: str, b: str, m=med):
        return round(m[a] / m[b], 3) if a in m and b in m else None

    heads = {w.name.split()[0]: w.info.get("prompt_head") for w in workers if w.info}
    result = {
        "threads": args.threads, "new_tokens": args.new, "prompt_tokens": args.prompt, "pp_tokens": args.pp,
        "repeats": args.repeats, "llama_cpp_install_seconds": round(install_s, 1),
        "llama_cpp_cmake_args_for_this_cpu": " ".join(llama_cpp_cmake_args()),
        "same_prompt_tokens": heads.get("lilliput") == heads.get("llama.cpp") if len(heads) == 2 else None,
        "read_bandwidth_gb_s": round(bw, 2),
        "int8_vs_q8_0": ratio("lilliput int8", "llama.cpp Q8_0"),
        "int4_vs_q4_0": ratio("lilliput int4", "llama.cpp Q4_0"),
        "int4_vs_q4_1": ratio("lilliput int4", "llama.cpp Q4_1"),
        "fp32_vs_q8_0": ratio("lilliput fp32", "llama.cpp Q8_0"),
        "prompt_int8_vs_q8_0": ratio("lilliput int8", "llama.cpp Q8_0", pmed),
        "int4_prefill_vs_q4_0": ratio("lilliput int4", "llama.cpp Q4_0", pmed),
        "kernels_isa": os.environ.get("LILLIPUT_ISA") or "native",
        "rows": rows,
        "note": "decode: batch 1, greedy, tokens/s after the first token; prompt: one forward of pp_tokens "
                "(lilliput's figure includes sampling one token). limit = read bandwidth / bytes per token "
                "(all matrices; KV cache ignored). Each engine in its own process, taking turns. "
                "Targets: int8_vs_q8_0 >= 2.0, int4_vs_q4_0 >= 1.5, int4_prefill_vs_q4_0 >= 1.5 (prompt tok/s). "
                "kernels_isa: LILLIPUT_ISA of the lilliput workers (native, or avx2 forced).",
    }
    write_json(args.out, run_record("bench/vs_llamacpp.py " + " ".join(argv), **result))
    for row in rows:
        if "error" in row:
            print(f"{row['engine']:>9} {row['model']:<5} ERROR {row['error']}", file=sys.stderr)
        else:
            print(f"{row['engine']:>9} {row['model']:<5} decode {row['decode_tok_s']:7.1f} tok/s  "
                  f"prompt {row['prompt_tok_s']:7.1f} tok/s  limit {row['limit_tok_s']:7.1f}", file=sys.stderr)
    print(f"int8_vs_q8_0 {result['int8_vs_q8_0']}, int4_vs_q4_0 {result['int4_vs_q4_0']}; wrote {args.out}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
