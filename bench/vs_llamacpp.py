"""SmolLM2-135M decode and prompt-processing speed: lilliput vs llama.cpp, same cores, same run.

llama.cpp runs through llama-cpp-python (installed on demand into this interpreter's
environment: a CPU build from source, ~9 minutes on 2 cores): the shipped Q4_1 GGUF, and a Q8_0
and a Q4_0 made from it by llama.cpp's own quantizer (`llama_model_quantize`, requantization
allowed). lilliput runs the same weights in fp32, int8 and int4 (`lilliput.compress.quantize`,
RTN; rows are recorded as missing with the reason where it is not available). Batch 1 decode
tok/s after a 64-token prompt, and prompt processing tok/s of a 512-token prompt; runs are
interleaved (model by model, repeat by repeat) and medians reported with min-max. The
memory-bandwidth limit of each row is bytes read per token / measured read bandwidth.
Writes bench/results/vs_llamacpp.json with `int8_vs_q8_0` and `int4_vs_q4` (lilliput decode
tok/s / llama.cpp's). Timing, spreads and bytes per token come from `lilliput.eval.efficiency`.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from lilliput.core.checkpoint import embedded_model_path, load_model
from lilliput.core.record import machine, run_record, write_json
from lilliput.eval.efficiency import interleave, linear_bytes, read_bandwidth_gb_s
from lilliput.eval.tasks import lambada_passages
from lilliput.infer import gemv
from lilliput.infer.generate import GenerationConfig, generate

OUT = Path(__file__).parent / "results" / "vs_llamacpp.json"
LLAMA_CPP_PIN = "llama-cpp-python==0.3.36"
CMAKE_ARGS = (
    "-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF")
FTYPES = {"Q8_0": 7, "Q4_0": 2}  # llama_ftype: LLAMA_FTYPE_MOSTLY_Q8_0, LLAMA_FTYPE_MOSTLY_Q4_0


def ensure_llama_cpp(install: bool = True):
    """Import llama_cpp, building and installing the pinned llama-cpp-python first when absent."""
    if importlib.util.find_spec("llama_cpp") is None:
        if not install:
            raise RuntimeError("llama-cpp-python is not installed (--no-install given)")
        print(f"installing {LLAMA_CPP_PIN} (CPU build from source, several minutes)", file=sys.stderr)
        env = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
        proc = subprocess.run([sys.executable, "-m", "pip", "install", LLAMA_CPP_PIN], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"installing {LLAMA_CPP_PIN} failed:\n" + "\n".join(proc.stderr.splitlines()[-15:]))
        importlib.invalidate_caches()
    return importlib.import_module("llama_cpp")


def requantize(llama_cpp, src: Path, kind: str, threads: int) -> Path:
    """A GGUF of `src` requantized to `kind` by llama.cpp itself (cached beside lilliput's kernels)."""
    dest = gemv.cache_dir() / "gguf" / f"{src.stem}.{kind}.gguf"
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[kind]
    params.allow_requantize = True
    params.nthread = threads
    tmp = dest.with_name(dest.name + ".tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize to {kind} failed (code {rc})")
    os.replace(tmp, dest)
    return dest


class LlamaCppRunner:
    def __init__(self, llama_cpp, path: Path, threads: int, ctx: int):
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=ctx, n_threads=threads, n_threads_batch=threads,
                                   n_batch=512, verbose=False)
        self.bytes_per_token = path.stat().st_size  # tied SmolLM2: the embedding is also the output layer

    def tokens(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False)

    def prompt_tok_s(self, ids: list[int]) -> float:
        self.llm.reset()
        t = time.perf_counter()
        self.llm.eval(ids)
        return len(ids) / (time.perf_counter() - t)

    def decode_tok_s(self, ids: list[int], new: int) -> float:
        self.llm.reset()
        self.llm.eval(ids)
        tok = self.llm.sample(temp=0.0)
        t = time.perf_counter()
        for _ in range(new - 1):
            self.llm.eval([tok])
            tok = self.llm.sample(temp=0.0)
        return (new - 1) / (time.perf_counter() - t)


class LilliputRunner:
    def __init__(self, model, tok):
        self.model, self.tok = model, tok
        self.bytes_per_token = linear_bytes(model)

    def prompt_tok_s(self, ids: list[int]) -> float:
        t = time.perf_counter()
        generate(self.model, self.tok, [ids], GenerationConfig(max_new_tokens=1, ignore_eos=True))
        return len(ids) / (time.perf_counter() - t)

    def decode_tok_s(self, ids: list[int], new: int) -> float:
        g = generate(self.model, self.tok, [ids], GenerationConfig(max_new_tokens=new, ignore_eos=True))[0]
        return g.timings["decode_tok_s"]


def lilliput_models(threads: int) -> tuple[dict, dict, object]:
    """{"lilliput fp32": runner, ...} and {name: reason} for the rows that could not be built."""
    torch.set_num_threads(threads)
    gemv.set_threads(threads)
    model, tok = load_model(None, device="cpu")
    runners, missing = {"lilliput fp32": LilliputRunner(model, tok)}, {}
    try:
        from lilliput.compress.quantize import RTNConfig, quantize_
    except Exception as e:  # another engineer's module, still in progress
        reason = f"lilliput.compress.quantize unavailable ({type(e).__name__}: {e})"
        return runners, {"lilliput int8": reason, "lilliput int4": reason}, tok
    for name, cfg in (("lilliput int8", RTNConfig(bits=8)), ("lilliput int4", RTNConfig(bits=4, group_size=128))):
        try:
            q = quantize_(copy.deepcopy(model), cfg)
            runners[name] = LilliputRunner(q, tok)
            runners[name].config = {"method": "rtn", "bits": cfg.bits, "group_size": cfg.group_size}
        except Exception as e:
            missing[name] = f"{type(e).__name__}: {e}"
    return runners, missing, tok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new", type=int, default=128, help="decoded tokens per run")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens before decoding")
    ap.add_argument("--pp", type=int, default=512, help="prompt-processing length")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--no-install", action="store_true", help="do not build llama-cpp-python when it is missing")
    args = ap.parse_args(argv)

    t_install = time.perf_counter()
    runners: dict[str, object] = {}
    llama_missing: dict[str, str] = {}
    try:
        llama_cpp = ensure_llama_cpp(install=not args.no_install)
        q4_1 = embedded_model_path()
        ggufs = {"Q4_1": q4_1, **{k: requantize(llama_cpp, q4_1, k, args.threads) for k in FTYPES}}
        ctx = args.pp + args.prompt + args.new + 16
        runners.update({f"llama.cpp {k}": LlamaCppRunner(llama_cpp, p, args.threads, ctx) for k, p in ggufs.items()})
    except RuntimeError as e:  # the build failed or was not asked for: lilliput's rows are still measured
        llama_cpp = None
        llama_missing = {f"llama.cpp {k}": str(e) for k in ("Q4_1", *FTYPES)}
    install_s = time.perf_counter() - t_install
    ours, missing, tok = lilliput_models(args.threads)
    missing.update(llama_missing)
    runners.update(ours)

    text = "\n\n".join(lambada_passages(64))
    ids_ours = tok.encode(text, bos=False)
    ids_llama = runners["llama.cpp Q4_1"].tokens(text) if "llama.cpp Q4_1" in runners else []
    same_tokens = ids_ours[:args.pp] == ids_llama[:args.pp] if ids_llama else None

    def ids(name: str, n: int) -> list[int]:
        return (ids_llama if name.startswith("llama.cpp") else ids_ours)[:n]

    runs = {}
    for name, r in runners.items():  # one round: every runner's decode, then its prompt processing
        runs[("decode", name)] = lambda r=r, name=name: r.decode_tok_s(ids(name, args.prompt), args.new)
        runs[("pp", name)] = lambda r=r, name=name: r.prompt_tok_s(ids(name, args.pp))
    timed = interleave(runs, args.repeats, warmup=1)
    decode = {name: timed[("decode", name)]["values"] for name in runners}
    pp = {name: timed[("pp", name)]["values"] for name in runners}
    med = {name: timed[("decode", name)]["median"] for name in runners}
    pp_med = {name: timed[("pp", name)]["median"] for name in runners}

    bw = read_bandwidth_gb_s()
    rows = []
    for name, r in runners.items():
        d = med[name]
        limit = bw * 1e9 / r.bytes_per_token
        rows.append({"engine": name.split()[0], "model": name.split()[1], "bytes_per_token": r.bytes_per_token,
                     "decode_tok_s": round(d, 1), "decode_range": [round(min(decode[name]), 1), round(max(decode[name]), 1)],
                     "prompt_tok_s": round(pp_med[name], 1),
                     "prompt_range": [round(min(pp[name]), 1), round(max(pp[name]), 1)],
                     "limit_tok_s": round(limit, 1), "fraction_of_limit": round(d / limit, 3),
                     **({"quantization": r.config} if hasattr(r, "config") else {})})
    def ratio(a: str, b: str):
        return round(med[a] / med[b], 3) if a in med and b in med else None

    result = {
        "threads": args.threads, "new_tokens": args.new, "prompt_tokens": args.prompt, "pp_tokens": args.pp,
        "repeats": args.repeats, "llama_cpp": llama_cpp.__version__ if llama_cpp else None, "llama_cpp_pin": LLAMA_CPP_PIN,
        "llama_cpp_install_seconds": round(install_s, 1), "same_prompt_tokens": same_tokens,
        "read_bandwidth_gb_s": round(bw, 2),
        "int8_vs_q8_0": ratio("lilliput int8", "llama.cpp Q8_0"),
        "int4_vs_q4": ratio("lilliput int4", "llama.cpp Q4_0"),
        "int4_vs_q4_1": ratio("lilliput int4", "llama.cpp Q4_1"),
        "fp32_vs_q8_0": ratio("lilliput fp32", "llama.cpp Q8_0"),
        "prompt_int8_vs_q8_0": (round(pp_med["lilliput int8"] / pp_med["llama.cpp Q8_0"], 3)
                                if "lilliput int8" in pp_med and "llama.cpp Q8_0" in pp_med else None),
        "missing": missing, "rows": rows,
        "note": "decode: batch 1, greedy, tokens/s after the first token; prompt: one forward of pp_tokens "
                "(lilliput's figure includes sampling one token). limit = read bandwidth / bytes per token "
                "(all matrices; KV cache ignored). Goal: int8_vs_q8_0 >= 0.8, int4_vs_q4 >= 0.8.",
    }
    write_json(args.out, run_record("bench/vs_llamacpp.py " + " ".join(argv or sys.argv[1:]), machine=machine(),
                                    **result))
    for row in rows:
        print(f"{row['engine']:>9} {row['model']:<5} decode {row['decode_tok_s']:7.1f} tok/s  "
              f"prompt {row['prompt_tok_s']:7.1f} tok/s  limit {row['limit_tok_s']:7.1f}", file=sys.stderr)
    print(f"int8_vs_q8_0 {result['int8_vs_q8_0']}, int4_vs_q4 {result['int4_vs_q4']}; wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
