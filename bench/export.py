"""Exports in their own runtimes beside lilliput's engine on the same weights, in one run.

The embedded SmolLM2-135M-Instruct (float32, from its Q4_1 GGUF), lilliput's RTN int8 of it and its
int4 (groups of 32, output layer int8; GPTQ by default, `--int4 rtn` for the quick round-to-nearest)
are exported as GGUF (F32, Q8_0, Q4_0, Q4_1: llama.cpp through
llama-cpp-python, installed on demand as bench/vs_llamacpp.py does), a Hugging Face folder (float32:
transformers) and ONNX (float32, int8, and int4 twice: `onnxruntime int4` is the export of the float
weights on their min/max grid with float zero points, blocks of 32; `onnxruntime int4 lilliput grid`
exports lilliput's int4 codes as they are: ONNX Runtime). Each row: file size, export seconds,
load seconds, perplexity on held-out LAMBADA passages (the same windows and tokens for every runtime:
`lilliput.eval.perplexity`, batch 1), decode tokens/s at batch 1 after a prompt (median of interleaved
repeats, `eval.efficiency.interleave`), and how many of the greedy tokens match lilliput's on the
same weights. Writes bench/results/export.json with `gguf_q8_0_ppl_ratio` (llama.cpp Q8_0 / llama.cpp
F32; target <= 1.01), `hf_max_logit_diff` (transformers vs lilliput over the first window; target
<= 1e-4) and `onnx_int4_ppl_ratio` (ONNX Runtime int4 of the float weights / lilliput fp32; target
<= 1.05). That last figure is lossless-by-construction territory: SmolLM2's block matrices ship as
GGUF Q4_1 (blocks of 32, w = d q + m), which the min/max grid with float zero points holds exactly,
and its embedding as Q8_0, which the int8 output layer (blocks of 32) holds exactly; what is left is
MatMulNBits' int8 activations. Beside it: `onnx_lilliput_int4_ppl_ratio` (lilliput's own int4, GPTQ
or RTN with integer zero points, exported as is / lilliput fp32) with
`onnx_int4_vs_lilliput_int4_ppl_ratio`, the part the export adds to lilliput's int4; and
`trained`, the quality that means something: a small float Llama lilliput trains here (byte
tokenizer, 4 layers of 128, `--train-steps` on the default corpus, at most `--train-minutes` 4) with its float
perplexity, the ONNX int4 (min/max grid) perplexity and their ratio `onnx_int4_trained_ppl_ratio`,
and lilliput's RTN int4 (integer zero points) of the same model for comparison.
`onnx_int4_decode_tok_s` sets the two int4 graphs' decode speeds side by side (the min/max grid
adds one small MatMul per layer for its zero points' remainders).

    python bench/export.py                          # the full run (llama.cpp built first when absent)
    python bench/export.py --quick --out /tmp/export.json   # smoke: 4 passages, window 128, RTN, 10 steps
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from lilliput.compress.calibration import CalibrationConfig
from lilliput.compress.quantize import GPTQConfig, RTNConfig, quantize_
from lilliput.core.checkpoint import load_model
from lilliput.core.config import ModelConfig
from lilliput.core.model import GPT
from lilliput.core.tokenizer import ByteTokenizer
from lilliput.data.corpus import Document
from lilliput.core.record import run_record, write_json
from lilliput.eval.efficiency import interleave
from lilliput.eval.perplexity import HeldoutConfig, heldout_perplexity
from lilliput.eval.task_sets import lambada_passages
from lilliput.export import export
from lilliput.export.runtimes import LlamaCppModel, OnnxModel, TransformersModel
from lilliput.infer.generate import GenerationConfig, generate
from lilliput.train.data import default_documents, token_stream
from lilliput.train.loop import LanguageModeling, Trainer, TrainConfig, WindowBatches

OUT = Path(__file__).parent / "results" / "export.json"
GGUF_TYPES = ("F32", "Q8_0", "Q4_0", "Q4_1")
ONNX_ROWS = {  # row: (ONNX type, the lilliput weights exported)
    "onnxruntime float32": ("float32", "fp32"),
    "onnxruntime int8": ("int8", "int8"),
    "onnxruntime int4": ("int4", "fp32"),  # min/max grid per block of 32, float zero points
    "onnxruntime int4 lilliput grid": ("int4", "int4"),  # lilliput's int4 codes (integer zero points) as they are
}
TRAINED = ModelConfig(name="bench-bytes-4x128", vocab_size=256, dim=128, n_layers=4, n_heads=4, n_kv_heads=2,
                      ffn_dim=384, max_seq_len=256)
"""The float model trained here: byte tokenizer, a small Llama (0.8M parameters)."""
QUICK = dict(passages=4, window=128, new=16, repeats=1, int4="rtn", no_install=True, train_steps=10)


def train_float_model(steps: int, minutes: float) -> tuple[GPT, ByteTokenizer, dict]:
    """TRAINED from scratch on the default corpus (each document's first 20k characters), float32."""
    tok = ByteTokenizer()
    docs = [Document(d.id, d.source, d.title, d.text[:20_000]) for d in default_documents()]
    torch.manual_seed(0)
    model = GPT(TRAINED)
    cfg = TrainConfig(lr=2e-3, warmup_steps=min(20, steps // 4), max_steps=steps, max_minutes=minutes,
                      progress=False)
    summary = Trainer(LanguageModeling(model), WindowBatches(token_stream(tok, docs), 16, 128), cfg).fit()
    return model.eval(), tok, {"steps": summary["steps"], "tokens": summary["tokens"],
                               "seconds": summary["seconds"], "final_loss": round(summary["final"]["loss"], 4)}


class Lilliput:
    """lilliput's engine behind the runtimes' interface (greedy decode at batch 1)."""

    def __init__(self, model, tok):
        self.model, self.tok, self.load_seconds = model, tok, None

    def greedy(self, ids: list[int], n: int) -> tuple[list[int], float]:
        g = generate(self.model, self.tok, [ids], GenerationConfig(max_new_tokens=n, ignore_eos=True))[0]
        return g.tokens, g.timings["decode_tok_s"]


def same_prefix(a: list[int], b: list[int]) -> int:
    """Greedy tokens equal before the first difference."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passages", type=int, default=40, help="held-out LAMBADA passages for perplexity")
    ap.add_argument("--window", type=int, default=512, help="perplexity window (tokens)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens before decoding")
    ap.add_argument("--new", type=int, default=64, help="greedy tokens decoded per timing run")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved decode timing rounds (after one warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--int4", choices=("gptq", "rtn"), default="gptq",
                    help="lilliput's int4 weights (groups of 32): GPTQ on 32x512 calibration tokens of the shipped "
                         "sample texts, or round to nearest")
    ap.add_argument("--train-steps", type=int, default=800,
                    help="steps (16 x 128 bytes) of the float model trained for the int4 quality figure")
    ap.add_argument("--train-minutes", type=float, default=4.0, help="wall-time cap on that training")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()) + " (overrides those flags)")
    ap.add_argument("--work", default=None, help="folder for the exports (a temporary one, removed, when omitted)")
    ap.add_argument("--no-install", action="store_true", help="skip llama.cpp rows when llama-cpp-python is absent")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    if min(args.passages, args.train_steps, args.window, args.prompt, args.new, args.repeats, args.threads) < 1:
        print("bench/export.py: error: every count must be >= 1", file=sys.stderr)
        return 2

    torch.set_num_threads(args.threads)
    from lilliput.infer import kernels

    kernels.set_threads(args.threads)
    missing: dict[str, str] = {}
    try:
        from lilliput.eval.peers import ensure_llama_cpp, llama_cpp_build_options

        llama_cpp = ensure_llama_cpp(install=not args.no_install)
    except RuntimeError as e:
        llama_cpp, missing["llama.cpp"] = None, str(e)

    model, tok = load_model(None, device="cpu")
    int4 = (RTNConfig(bits=4, group_size=32) if args.int4 == "rtn" else GPTQConfig(
        bits=4, group_size=32, calibration=CalibrationConfig(samples=32, seq_len=512, full_corpus=False)))
    t0 = time.perf_counter()
    weights = {"fp32": model, "int8": quantize_(copy.deepcopy(model), RTNConfig(bits=8)),
               "int4": quantize_(copy.deepcopy(model), int4, tokenizer=tok)}
    quantize_seconds = round(time.perf_counter() - t0, 1)
    text = "\n\n".join(lambada_passages(args.passages))
    prompt = tok.encode(text, bos=False)[:args.prompt]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="lilliput-export-"))
    work.mkdir(parents=True, exist_ok=True)

    rows: dict[str, dict] = {}
    runners: dict[str, object] = {}

    def add(name: str, runtime: str, fmt: str, wtype: str, source: str, make, result=None):
        try:
            runner = make()
        except Exception as e:  # a runtime that cannot load its export is a finding, not a crash
            missing[name] = f"{type(e).__name__}: {e}"
            return
        t0 = time.perf_counter()
        target = runner.model if isinstance(runner, Lilliput) else runner
        ppl = heldout_perplexity(target, tok, HeldoutConfig(window=args.window), text=text, batch_size=1)
        rows[name] = {"runtime": runtime, "format": fmt, "type": wtype, "weights": source,
                      "bytes": result.bytes if result else None,
                      "export_seconds": round(result.seconds, 1) if result else None,
                      "load_seconds": round(runner.load_seconds, 2) if runner.load_seconds is not None else None,
                      "perplexity": round(ppl, 4), "perplexity_seconds": round(time.perf_counter() - t0, 1),
                      "check": result.check if result else None}
        runners[name] = runner
        print(f"{name:<30} ppl {ppl:8.3f}", file=sys.stderr, flush=True)

    for name, m in weights.items():
        add(f"lilliput {name}", "lilliput", "lilliput", name, name, lambda m=m: Lilliput(m, tok))
    for wtype in GGUF_TYPES if llama_cpp is not None else ():
        r = export(model, tok, "gguf", work / f"smollm2.{wtype}.gguf", wtype, force=True)
        add(f"llama.cpp {wtype}", "llama.cpp", "gguf", wtype, "fp32", lambda r=r: LlamaCppModel(
            r.path, args.threads, n_ctx=max(args.window, args.prompt + args.new) + 8, llama_cpp=llama_cpp), r)
    r = export(model, tok, "hf", work / "smollm2-hf", "float32", force=True)
    add("transformers float32", "transformers", "hf", "float32", "fp32", lambda: TransformersModel(r.path), r)
    for name, (wtype, src) in ONNX_ROWS.items():
        r = export(weights[src], tok, "onnx", work / name.replace(" ", "-"), wtype, force=True)
        add(name, "onnxruntime", "onnx", wtype, src, lambda r=r: OnnxModel(r.path, threads=args.threads), r)

    # greedy tokens and decode speed, every runner once per round
    tokens = {name: r.greedy(prompt, args.new)[0] for name, r in runners.items()}
    speed = interleave({name: (lambda r=r: r.greedy(prompt, args.new)[1]) for name, r in runners.items()},
                       repeats=args.repeats, warmup=1)
    for name, row in rows.items():
        ref = f"lilliput {row['weights']}"
        row["decode_tok_s"] = round(speed[name]["median"], 1)
        row["decode_tok_s_range"] = [round(speed[name]["min"], 1), round(speed[name]["max"], 1)]
        row["decode_vs_lilliput"] = round(speed[name]["median"] / speed[ref]["median"], 3) if ref in speed else None
        row["greedy_same_as_lilliput"] = f"{same_prefix(tokens[name], tokens[ref])}/{args.new}" if ref in tokens else None
        row["ppl_vs_lilliput"] = round(row["perplexity"] / rows[ref]["perplexity"], 4) if ref in rows else None

    hf_diff = None
    if "transformers float32" in runners:
        ids = torch.tensor([tok.encode(text, bos=False)[:args.window]])
        with torch.inference_mode():
            hf_diff = float((runners["transformers float32"](ids) - model(ids)).abs().max())

    def ratio(a: str, b: str):
        return round(rows[a]["perplexity"] / rows[b]["perplexity"], 4) if a in rows and b in rows else None

    # the int4 grid's quality on a float model lilliput trains itself (no Q4_1 origin)
    small, btok, trained_run = train_float_model(args.train_steps, args.train_minutes)
    held = HeldoutConfig(window=args.window)
    t0 = time.perf_counter()
    small_onnx = export(small, btok, "onnx", work / "trained-onnx-int4", "int4", force=True)
    small_ppl = {"lilliput fp32": heldout_perplexity(small, btok, held, text=text, batch_size=1),
                 "onnxruntime int4": heldout_perplexity(OnnxModel(small_onnx.path, threads=args.threads), btok, held,
                                                        text=text, batch_size=1),
                 "lilliput int4 rtn (integer zero points)": heldout_perplexity(
                     quantize_(copy.deepcopy(small), RTNConfig(bits=4, group_size=32)), btok, held, text=text,
                     batch_size=1)}
    trained = {"config": TRAINED.name, "parameters": small.num_params(), "train": trained_run,
               "heldout": f"the same LAMBADA text, bytes, window {min(args.window, TRAINED.max_seq_len)}",
               "perplexity": {k: round(v, 4) for k, v in small_ppl.items()},
               "onnx_int4_ppl_ratio": round(small_ppl["onnxruntime int4"] / small_ppl["lilliput fp32"], 4),
               "lilliput_rtn_int4_ppl_ratio": round(small_ppl["lilliput int4 rtn (integer zero points)"]
                                                    / small_ppl["lilliput fp32"], 4),
               "onnx_int4_bytes": small_onnx.bytes, "onnx_int4_check": small_onnx.check,
               "seconds_after_training": round(time.perf_counter() - t0, 1)}
    print(f"trained {TRAINED.name}: ppl fp32 {small_ppl['lilliput fp32']:.3f}, onnx int4 "
          f"{small_ppl['onnxruntime int4']:.3f} (x{trained['onnx_int4_ppl_ratio']})", file=sys.stderr)

    result = {
        "settings": vars(args), "heldout": f"LAMBADA, first {args.passages} passages, window {args.window}, batch 1",
        "gguf_q8_0_ppl_ratio": ratio("llama.cpp Q8_0", "llama.cpp F32"),
        "gguf_f32_vs_lilliput_ppl_ratio": ratio("llama.cpp F32", "lilliput fp32"),
        "hf_max_logit_diff": hf_diff,
        "onnx_int4_ppl_ratio": ratio("onnxruntime int4", "lilliput fp32"),
        "onnx_int4_ppl_ratio_note": "lossless by construction on this model: its block matrices are GGUF Q4_1 "
                                    "(the min/max grid with float zero points holds them exactly) and its "
                                    "embedding Q8_0 (the int8 output layer's grid); the rest is MatMulNBits' "
                                    "int8 activations. See trained.onnx_int4_ppl_ratio for a float model.",
        "onnx_int4_trained_ppl_ratio": trained["onnx_int4_ppl_ratio"],
        "onnx_lilliput_int4_ppl_ratio": ratio("onnxruntime int4 lilliput grid", "lilliput fp32"),
        "onnx_int4_vs_lilliput_int4_ppl_ratio": ratio("onnxruntime int4 lilliput grid", "lilliput int4"),
        "lilliput_int4_ppl_ratio": ratio("lilliput int4", "lilliput fp32"),
        "onnx_int4_decode_tok_s": {name: rows[name].get("decode_tok_s") for name in
                                   ("onnxruntime int4", "onnxruntime int4 lilliput grid") if name in rows},
        "trained": trained,
        "int4_weights": {"method": args.int4, "group_size": 32, "lm_head_bits": 8, "quantize_seconds": quantize_seconds},
        "targets": {"gguf_q8_0_ppl_ratio": "<= 1.01", "hf_max_logit_diff": "<= 1e-4", "onnx_int4_ppl_ratio": "<= 1.05",
                    "onnx_int4_trained_ppl_ratio": "<= 1.05"},
        "llama_cpp": getattr(llama_cpp, "__version__", None),
        "llama_cpp_build": llama_cpp_build_options(llama_cpp) if llama_cpp else None,
        "onnxruntime": __import__("onnxruntime").__version__, "transformers": __import__("transformers").__version__,
        "missing": missing, "rows": rows,
        "note": "decode: greedy, batch 1, tokens/s of the steps after the first token, median of interleaved "
                "rounds; llama.cpp computes every position's logits (logits_all) so that perplexity uses its own "
                "numbers. ONNX int8/int4 run MatMulNBits with int8 activations (accuracy_level 4).",
    }
    write_json(args.out, run_record("bench/export.py " + " ".join(sys.argv[1:] if argv is None else argv), **result))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    for name, row in rows.items():
        size = f"{row['bytes'] / 2**20:7.1f} MiB" if row["bytes"] else " " * 11
        print(f"{name:<30} {size}  ppl {row['perplexity']:8.3f}  decode {row['decode_tok_s']:6.1f} tok/s  "
              f"greedy {row['greedy_same_as_lilliput']}", file=sys.stderr)
    print(f"gguf_q8_0_ppl_ratio {result['gguf_q8_0_ppl_ratio']}, hf_max_logit_diff {hf_diff}, "
          f"onnx_int4_ppl_ratio {result['onnx_int4_ppl_ratio']} (Q4_1 origin), trained "
          f"{result['onnx_int4_trained_ppl_ratio']}; wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
