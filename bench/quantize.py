"""Weight quantization of SmolLM2-135M and of a float32 model lilliput trained itself, in one run.

Rows: fp32, bf16, int8 (RTN), int4 g32/g64/g128 x (RTN, GPTQ, AWQ). Each row: held-out
perplexity (LAMBADA passages, never seen in training or calibration), size in bytes of the
weights as stored, and decode-only tok/s at batch 1 (128 new tokens, ignore_eos, median of 3,
every row timed in this run, interleaved). SmolLM2 here was Q4_1 to begin with, so int4 quality
is also measured on a float32 student (`--student`: a float checkpoint such as bench/prune.py's
healed model, or one this script trains when the folder is empty). Writes
bench/results/quantize.json whole. Sizes, parameter counts and decode-only timing come from `lilliput.eval.efficiency`;
the student trains through `lilliput.train.loop`. One run writes the whole file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "quantize.json"
STUDENT = ROOT / "runs" / "quant-student-21m"


def student_config():
    from lilliput.core.config import preset

    # student-20m has 17.3M parameters; 10 layers brings it to ~21M (the brief asks >= 20M)
    return preset("student-20m").replace(n_layers=10, max_seq_len=1024, name="quant-student-21m")


def train_student(out: Path, minutes: float, seq_len: int = 128, batch: int = 8, lr: float = 5e-3) -> Path:
    """The float32 student: `minutes` of next-token training through lilliput's trainer
    (`lilliput.train.loop`, AdamW, warmup then cosine on the clock to 10%); saves a checkpoint."""
    from lilliput.core.checkpoint import load_model, save_checkpoint
    from lilliput.core.model import GPT
    from lilliput.core.record import run_record
    from lilliput.eval.efficiency import parameter_count
    from lilliput.train.data import default_documents, token_stream
    from lilliput.train.loop import LanguageModeling, Trainer, TrainConfig, WindowBatches

    _, tok = load_model(None, device="cpu")
    docs = default_documents()
    # a slice of every document (~4 MB of text in all): tokenizing the whole 26 MB corpus takes
    # longer than the training it would feed
    cap = max(4_000_000 // max(len(docs), 1), 2000)
    stream = token_stream(tok, [dataclasses.replace(d, text=d.text[:cap]) for d in docs])
    print(f"training stream: {stream.numel()} tokens from {len(docs)} documents", file=sys.stderr, flush=True)
    torch.manual_seed(0)
    model = GPT(student_config())
    cfg = TrainConfig(lr=lr, warmup_steps=100, max_minutes=minutes, progress=False)
    summary = Trainer(LanguageModeling(model), WindowBatches(stream, batch, seq_len), cfg).fit()
    model.eval()
    record = run_record("bench/quantize.py --train-only", steps=summary["steps"], tokens=summary["tokens"],
                        minutes=minutes, final_loss=float(summary["final"]["ce"]), params=parameter_count(model),
                        seq_len=seq_len, batch=batch, lr=lr, train=dataclasses.asdict(cfg))
    return save_checkpoint(model, tok, out, record)


def held_out_ppl(model, tok, text: str, window: int) -> float:
    from lilliput.eval.perplexity import HeldoutConfig, heldout_perplexity

    return heldout_perplexity(model, tok, HeldoutConfig(window=window), text=text)


def decode_tok_s(models: dict, tok, prompt: str, new: int, repeats: int) -> dict[str, list[float]]:
    """Decode tok/s at batch 1 of each (model, kernel variant), runs interleaved so drift hits all alike
    (one warm-up round: kernel build, RoPE tables, pages)."""
    from lilliput.eval.efficiency import decode_tok_s as one_run, interleave

    ids = tok.encode(prompt)
    runs = {k: (lambda m=m, v=variant: one_run(set_variant_(m, v), tok, ids, new)) for k, (m, variant) in models.items()}
    return {k: s["values"] for k, s in interleave(runs, repeats, warmup=1).items()}


def set_variant_(model, variant: str):
    from lilliput.compress.qlinear import QuantLinear

    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.kernel_variant = variant
    return model


def quantized_rows(base, calib, groups, calibrated_groups, log) -> dict:
    """{row name: (model, info)}: int8 RTN, int4 RTN per group, GPTQ and AWQ per calibrated group."""
    import copy

    from lilliput.compress.quantize import AWQConfig, GPTQConfig, RTNConfig, quantize_
    from lilliput.core.checkpoint import quantization_section

    plans = {"int8": RTNConfig(bits=8)}
    for g in groups:
        plans[f"int4_g{g}_rtn"] = RTNConfig(bits=4, group_size=g)
        if g in calibrated_groups:
            plans[f"int4_g{g}_gptq"] = GPTQConfig(bits=4, group_size=g, calibration=None)
            plans[f"int4_g{g}_awq"] = AWQConfig(bits=4, group_size=g, calibration=None)
    out = {}
    for name, cfg in plans.items():
        t0 = time.perf_counter()
        m = quantize_(copy.deepcopy(base), cfg, calibration=calib)
        layers = quantization_section(m)["layers"]
        used = sorted({s.get("group_size", "per-channel") for s in layers.values()}, key=str)
        out[name] = (m, {"method": type(cfg).__name__.removesuffix("Config").lower(), "bits": cfg.bits,
                         "group_size_requested": cfg.group_size if cfg.bits == 4 else None,
                         "group_sizes_used": used, "lm_head_bits": layers["lm_head"]["bits"],
                         "layers_quantized": len(layers), "quantize_s": round(time.perf_counter() - t0, 2)})
        log(f"{name}: quantized in {out[name][1]['quantize_s']} s, groups used {used}")
    return out


def student_part(args, groups, calibrated, text, ccfg, log) -> dict:
    """int4 quality on the float32 student (weights never on a 4-bit grid)."""
    from lilliput.compress.calibration import calibration_batches
    from lilliput.core.checkpoint import load_model
    from lilliput.eval.efficiency import model_bytes, parameter_count

    student_dir = Path(args.student)
    student, stok = load_model(student_dir, device="cpu")
    s_calib = calibration_batches(stok, ccfg)
    s_base = held_out_ppl(student, stok, text, args.window)
    log(f"student fp32 ppl {s_base:.2f}")
    rows = {"fp32": {"ppl": s_base, "ppl_ratio": 1.0, "bytes": model_bytes(student)}}
    for name, (m, info) in quantized_rows(student, s_calib, groups, calibrated, log).items():
        p = held_out_ppl(m, stok, text, args.window)
        rows[name] = {**info, "ppl": p, "ppl_ratio": p / s_base, "bytes": model_bytes(m)}
        log(f"student {name} ppl {p:.2f} ({p / s_base:.4f}x)")
    tr = json.loads((student_dir / "run.json").read_text()) if (student_dir / "run.json").is_file() else {}
    train = {k: tr.get(k) for k in ("command", "steps", "tokens", "minutes", "final_loss", "params", "seq_len", "batch")}
    return {"checkpoint": str(student_dir), "config": student.config.to_dict(), "params": parameter_count(student),
            "train": train, "rows": rows}


def smollm2_part(args, groups, calibrated, text, ccfg, log) -> dict:
    import copy

    from lilliput.compress.calibration import calibration_batches
    from lilliput.core.checkpoint import load_model
    from lilliput.eval.efficiency import model_bytes

    model, tok = load_model(None, device="cpu")
    calib = calibration_batches(tok, ccfg)
    base = held_out_ppl(model, tok, text, args.window)
    log(f"smollm2 fp32 ppl {base:.3f}")
    rows = {"fp32": {"ppl": base, "ppl_ratio": 1.0, "bytes": model_bytes(model)}}
    models = {"fp32": model}
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    p = held_out_ppl(bf16, tok, text, args.window)
    rows["bf16"] = {"ppl": p, "ppl_ratio": p / base, "bytes": model_bytes(bf16)}
    models["bf16"] = bf16
    for name, (m, info) in quantized_rows(model, calib, groups, calibrated, log).items():
        p = held_out_ppl(m, tok, text, args.window)
        rows[name] = {**info, "ppl": p, "ppl_ratio": p / base, "bytes": model_bytes(m)}
        models[name] = m
        log(f"smollm2 {name} ppl {p:.3f} ({p / base:.4f}x)")

    return {"rows": rows, **speed_rows(models, rows, tok, groups, args, log)}


def speed_rows(models: dict, rows: dict, tok, groups, args, log) -> dict:
    """Decode-only tok/s of every model in the same interleaved rounds, plus both kernel paths of
    qgemv*.c, written into `rows`."""
    from lilliput.eval.tasks import lambada_passages

    prompt = lambada_passages(1)[0][:200]
    timed = {k: (m, "auto") for k, m in models.items()}
    for variant in ("widen", "dot"):
        timed[f"int8[{variant}]"] = (models["int8"], variant)
        timed[f"int4_g{groups[-1]}_rtn[{variant}]"] = (models[f"int4_g{groups[-1]}_rtn"], variant)
    runs = decode_tok_s(timed, tok, prompt, args.new, args.repeats)
    fp32_tok_s = statistics.median(runs["fp32"])
    variants = {}
    for name, r in runs.items():
        med = statistics.median(r)
        target = rows.setdefault(name, {}) if "[" not in name else variants.setdefault(name, {})
        target.update(tok_s=med, tok_s_runs=r, speedup_vs_fp32=med / fp32_tok_s)
        log(f"decode {name}: {med:.1f} tok/s ({med / fp32_tok_s:.2f}x)")
    return {"kernel_variants": variants, "fp32_tok_s": fp32_tok_s}


def summary(sm: dict, st: dict | None, g: int) -> dict:
    """The fields the targets checker reads, from the two parts."""
    rows = sm["rows"]
    out = {"int8": {"ppl_ratio": rows["int8"]["ppl_ratio"], "speedup_vs_fp32": rows["int8"]["speedup_vs_fp32"],
                    "tok_s": rows["int8"]["tok_s"], "fp32_tok_s": sm["fp32_tok_s"], "bytes": rows["int8"]["bytes"],
                    "model": "SmolLM2-135M-Instruct"}}
    calibrated = [m for m in ("gptq", "awq") if f"int4_g{g}_{m}" in rows]
    if st is not None and calibrated:
        srows = st["rows"]
        best = min(calibrated, key=lambda m: srows[f"int4_g{g}_{m}"]["ppl_ratio"])
        out[f"int4_g{g}_best"] = {
            "method": best, "ppl_ratio": srows[f"int4_g{g}_{best}"]["ppl_ratio"],
            "ppl_ratio_model": "the float32 student of this run (SmolLM2 is Q4_1 already)",
            "rtn_ppl_ratio": srows[f"int4_g{g}_rtn"]["ppl_ratio"],
            "speedup_vs_fp32": rows[f"int4_g{g}_{best}"]["speedup_vs_fp32"], "speedup_model": "SmolLM2-135M-Instruct",
            "smollm2_ppl_ratio": rows[f"int4_g{g}_{best}"]["ppl_ratio"],
            "smollm2_group_sizes_used": rows[f"int4_g{g}_{best}"]["group_sizes_used"]}
        out["calibrated_beat_rtn_on_student"] = {
            name.removesuffix("_rtn"): {m: srows[name.replace("_rtn", f"_{m}")]["ppl"] < r["ppl"]
                                        for m in ("gptq", "awq") if name.replace("_rtn", f"_{m}") in srows}
            for name, r in srows.items() if name.endswith("_rtn")}
    return out


def main(argv=None) -> int:
    from lilliput.eval.perplexity import HELDOUT

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--train-only", action="store_true", help="only train the float32 student")
    ap.add_argument("--train-minutes", type=float, default=10.0)
    ap.add_argument("--student", default=str(STUDENT), help="a float32 lilliput checkpoint (trained if missing)")
    ap.add_argument("--passages", type=int, default=HELDOUT.passages, help="LAMBADA passages of held-out text")
    ap.add_argument("--window", type=int, default=HELDOUT.window)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--groups", default="32,64,128")
    ap.add_argument("--calibrated-groups", default="32,64,128", help="groups also run with GPTQ and AWQ")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    if args.train_only or not (Path(args.student) / "config.json").is_file():
        train_student(Path(args.student), args.train_minutes)
    if args.train_only:
        return 0

    from lilliput.compress.calibration import CalibrationConfig
    from lilliput.core.record import run_record, write_json
    from lilliput.eval.tasks import lambada_passages

    t_start = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t_start:6.0f}s] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    groups = [int(g) for g in args.groups.split(",")]
    calibrated = [int(g) for g in args.calibrated_groups.split(",") if g]
    text = "\n\n".join(lambada_passages(args.passages))
    # calibration from the shipped sample texts (tokenizing the full 26 MB corpus costs minutes)
    ccfg = CalibrationConfig(samples=args.calib_samples, seq_len=args.calib_len, full_corpus=False)
    settings = {"held_out": f"{args.passages} LAMBADA passages, window {args.window}",
                "calibration": {"samples": args.calib_samples, "seq_len": args.calib_len,
                                "source": "shipped sample texts"},
                "decode": {"new_tokens": args.new, "repeats": args.repeats, "statistic": "median", "batch": 1,
                           "speed": "decode-only tok/s (lilliput.eval.efficiency.engine_rates)"},
                "groups": groups, "calibrated_groups": calibrated}
    student = student_part(args, groups, calibrated, text, ccfg, log)
    smollm2 = smollm2_part(args, groups, calibrated, text, ccfg, log)
    command = "bench/quantize.py " + " ".join(argv if argv is not None else sys.argv[1:])
    record = run_record(command.strip(), **summary(smollm2, student, groups[-1]), smollm2=smollm2, student=student,
                        settings=settings, seconds=round(time.perf_counter() - t_start, 1))
    write_json(args.out, record)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
