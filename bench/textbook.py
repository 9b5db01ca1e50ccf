"""Textbook-quality synthetic data at small scale (the Phi-1 question, seed 004): does a student learn more
from a teacher's textbook-style text than from human text, for the same tokens?

The teacher (the embedded SmolLM2-135M-Instruct, int8 RTN unless --no-int8, through the batched engine)
writes `--tokens` tokens of textbook-style documents through `lilliput.jobs.synth` (prompts from
lilliput.data.textbook: ~100 topics x kinds x personas x audiences, one seed per document), watermarked
with the distortion-free Gumbel scheme (`--watermark-scheme`; the documents are distributed as the
teacher's), curated, and every document entered in a ledger inside --synth-dir. The set is cached in
--synth-dir and reused when its run.json matches the request. Every `--holdout`-th document (by hash
of its id) is held out: never trained on, it is the textbook evaluation text, and the watermark is
detected on it (against human text of the same token counts).

Students (lilliput.train.textbook_lab): byte-level GPTs of one size, trained from scratch on equal
tokens of human text, textbook text and mixes (--mixes: 0, 0.5, 1), --seeds each, scored on held-out
human text (LAMBADA passages), held-out textbook documents, zero-shot ARC-Easy, PIQA and SciQ
(acc_norm; chance is 0.25, 0.5, 0.25), and the word diversity of what they write.

Written to bench/results/textbook.json (+ textbook.png): `synth` (how the set was made, the split,
`watermark` detection), `students[]` (one row per share and seed), `mixes` (each figure over seeds),
`vs_human` (per share: perplexity ratios seed by seed, task differences with a bootstrap interval over
questions), `reference_diversity`, `seeds`, `shows` / `does_not_show`.

    .venv/bin/python bench/textbook.py            # full: 2M teacher tokens (~140 min on Zen 3) + 9 students (~36 min)
    .venv/bin/python bench/textbook.py --quick    # smoke: a few teacher documents, tiny students
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from lilliput.core.model import GPT
from lilliput.core.record import run_record, write_json
from lilliput.core.tokenizer import ByteTokenizer
from lilliput.eval.efficiency import parameter_count
from lilliput.eval.perplexity import HELDOUT
from lilliput.eval.task_sets import lambada_passages
from lilliput.jobs.synth import DOCUMENTS_FILE, SynthJob, run_synth
from lilliput.jobs.watermark import SCHEMES
from lilliput.train.data import default_documents, random_windows
from lilliput.train.loop import TrainConfig
from lilliput.train.textbook_lab import (OPENING, TextbookLabConfig, Texts, byte_stream, summarize, train_students,
                                         word_diversity)

OUT = Path(__file__).parent / "results" / "textbook.json"
TEACHER_TOK_S = 235.0  # SmolLM2 int8, batch 16, watermarked, documents up to 384 tokens: 2 quiet AMD Zen 3 cores (AVX2)
KEY = "lilliput-textbook-key"


def split_documents(docs: list[dict], every: int) -> tuple[list[str], list[str]]:
    """(train, held-out) texts: in the order of their ids' hashes, every `every`-th document is held out
    (the first one always: at least one)."""
    ranked = sorted(docs, key=lambda d: hashlib.sha256(d["id"].encode("utf-8")).hexdigest())
    return ([d["text"] for i, d in enumerate(ranked) if i % every],
            [d["text"] for i, d in enumerate(ranked) if i % every == 0])


def synth_set(args, log) -> tuple[Path, dict, bool]:
    """The synthetic set's folder, its run.json and whether it came from the cache."""
    job = SynthJob(teacher=args.teacher, tokens=args.tokens, out=str(args.synth_dir), seed=args.seed,
                   watermark=args.watermark_key or None, watermark_scheme=args.watermark_scheme,
                   ledger=str(Path(args.synth_dir) / "ledger.sqlite"), max_new_tokens=args.max_new_tokens,
                   max_batch=args.max_batch, device="cpu")
    run_file = Path(args.synth_dir) / "run.json"
    if run_file.exists() and (Path(args.synth_dir) / DOCUMENTS_FILE).exists() and not args.resynth:
        run = json.loads(run_file.read_text())
        if run.get("request") == dataclasses.asdict(job) and run.get("int8") == args.int8:
            log(f"reusing the synthetic set in {args.synth_dir}")
            return Path(args.synth_dir), run, True
        log(f"{args.synth_dir} holds another synthetic set (different job): writing it again")
    from lilliput.core.checkpoint import load_model
    from lilliput.eval.bench import model_label

    teacher, ttok = load_model(args.teacher, device="cpu")
    label = model_label(args.teacher)
    if args.int8:
        from lilliput.compress.quantize import RTNConfig, quantize_

        quantize_(teacher, RTNConfig(bits=8), tokenizer=ttok)
        label += " + int8 RTN"
    out = run_synth(job, teacher, ttok, label=label, log=log)
    run = json.loads(run_file.read_text())
    run["int8"], run["request"] = args.int8, dataclasses.asdict(job)  # the key itself stays out of run.json's job
    write_json(run_file, run)
    del teacher
    return out, run, False


def detection(args, test_docs: list[str], human: torch.Tensor) -> dict:
    """The watermark detected on the held-out documents, and on human text cut to the same token counts."""
    from lilliput.core.checkpoint import load_model
    from lilliput.jobs.watermark import watermark_detector

    _, ttok = load_model(args.teacher, device="cpu")
    det = watermark_detector(args.watermark_scheme, args.watermark_key)
    marked = [det.detect(ttok.encode(t, bos=False)) for t in test_docs]
    plain = []
    for i, d in enumerate(marked):
        window = bytes(random_windows(human, 1, 8 * max(d.tokens, 4), seed=i)[0].tolist()).decode("utf-8", "replace")
        plain.append(det.detect(ttok.encode(window, bos=False)[: d.tokens]))

    def rate(ds) -> float:
        return sum(d.watermarked for d in ds) / len(ds)

    return {"scheme": args.watermark_scheme, "documents": len(marked), "detected": rate(marked),
            "human_flagged": rate(plain), "fpr": marked[0].fpr,
            "median_tokens": statistics.median(d.tokens for d in marked),
            "text": "held-out documents as curated (re-tokenized text), human windows of the same token counts"}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    lab = TextbookLabConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2_000_000, help="teacher tokens of synthetic text")
    ap.add_argument("--max-new-tokens", type=int, default=SynthJob.max_new_tokens, help="most teacher tokens per document")
    ap.add_argument("--max-batch", type=int, default=SynthJob.max_batch, help="documents the teacher writes at once")
    ap.add_argument("--teacher", default=None, help="teacher model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True,
                    help="quantize the teacher to int8 (RTN) first: faster generation")
    ap.add_argument("--watermark-key", default=KEY, help="the documents' watermark key ('' for none)")
    ap.add_argument("--watermark-scheme", default="gumbel", choices=SCHEMES)
    ap.add_argument("--synth-dir", default=None, help="cache folder of the synthetic set "
                    "(default: $LILLIPUT_CACHE or ~/.cache/lilliput, textbook-synth/<tokens>-<seed>[-int8][-scheme])")
    ap.add_argument("--resynth", action="store_true", help="write the synthetic set again even when cached")
    ap.add_argument("--holdout", type=int, default=10, help="every Nth synthetic document (in id-hash order) is held out")
    ap.add_argument("--mixes", default=",".join(map(str, lab.mixes)), help="synthetic shares of the students' data")
    ap.add_argument("--seeds", type=int, default=lab.seeds, help="students per share")
    ap.add_argument("--student-tokens", type=int, default=lab.train.max_tokens, help="training tokens (bytes) per student")
    ap.add_argument("--dim", type=int, default=lab.dim)
    ap.add_argument("--layers", type=int, default=lab.layers)
    ap.add_argument("--heads", type=int, default=lab.heads)
    ap.add_argument("--seq-len", type=int, default=lab.seq_len)
    ap.add_argument("--batch", type=int, default=lab.batch)
    ap.add_argument("--lr", type=float, default=lab.train.lr)
    ap.add_argument("--tasks", default=",".join(lab.tasks), help="zero-shot multiple-choice tasks")
    ap.add_argument("--task-limit", type=int, default=None, help="first N items of each task (default: all)")
    ap.add_argument("--eval-bytes", type=int, default=lab.eval_bytes, help="most bytes of held-out textbook text scored")
    ap.add_argument("--samples", type=int, default=lab.samples, help="generations per student for diversity")
    ap.add_argument("--sample-bytes", type=int, default=lab.sample_bytes,
                    help=f"bytes per generation ({OPENING} + this <= --seq-len)")
    ap.add_argument("--workers", type=int, default=lab.workers, help="student processes")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the teacher (each student worker: 1)")
    ap.add_argument("--seed", type=int, default=0, help="the synthetic set's seed (students: 0..seeds-1)")
    ap.add_argument("--quick", action="store_true", help="smoke run: a few teacher documents, tiny students")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens, args.max_new_tokens, args.student_tokens = min(args.tokens, 1200), min(args.max_new_tokens, 128), 24_000
        args.dim, args.layers, args.seq_len, args.samples, args.sample_bytes = 64, 2, 128, 4, 96
        args.holdout, args.eval_bytes, args.task_limit = 4, 8_000, args.task_limit or 20
    cache = Path(os.environ.get("LILLIPUT_CACHE") or Path.home() / ".cache" / "lilliput")
    args.synth_dir = args.synth_dir or str(cache / "textbook-synth" / (
        f"{args.tokens}-{args.seed}{'-int8' if args.int8 else ''}"
        f"{'-' + args.watermark_scheme if args.watermark_key else ''}"))
    try:
        lab = TextbookLabConfig(
            mixes=tuple(float(x) for x in args.mixes.split(",")), seeds=args.seeds, dim=args.dim, layers=args.layers,
            heads=args.heads, seq_len=args.seq_len, batch=args.batch,
            train=dataclasses.replace(lab.train, lr=args.lr, max_tokens=args.student_tokens),
            tasks=tuple(t for t in args.tasks.split(",") if t), task_limit=args.task_limit, eval_bytes=args.eval_bytes,
            samples=args.samples, sample_bytes=args.sample_bytes, workers=args.workers, threads=1)
    except ValueError as e:
        ap.error(str(e))
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    def log(m: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f}s] {m}", file=sys.stderr, flush=True)

    n_params = parameter_count(GPT(lab.model_config()))
    cached = (Path(args.synth_dir) / "run.json").exists() and not args.resynth
    teacher_s = 0 if cached else args.tokens / TEACHER_TOK_S * (1 if args.int8 else 3) + 30
    student_s = lab.estimate_seconds(n_params)
    log(f"estimate on 2 quiet cores: teacher {teacher_s / 60:.1f} min ({'cached' if cached else f'{args.tokens:,} tokens'}), "
        f"{len(lab.mixes)} shares x {lab.seeds} seeds of {n_params / 1e6:.2f}M-parameter students x "
        f"{args.student_tokens:,} tokens on {lab.workers} workers {student_s / 60:.1f} min; "
        f"total ~{(teacher_s + student_s) / 60:.0f} min")

    # --- the synthetic set, split by document --------------------------------------------------------------
    t0 = time.perf_counter()
    synth_dir, synth_run, from_cache = synth_set(args, log)
    teacher_seconds = time.perf_counter() - t0
    docs = [json.loads(line) for line in (synth_dir / DOCUMENTS_FILE).read_text(encoding="utf-8").splitlines() if line]
    train_docs, test_docs = split_documents(docs, args.holdout)
    if not test_docs or not train_docs:
        raise SystemExit(f"{len(docs)} synthetic documents: too few to train on and hold out; raise --tokens")
    human_docs = default_documents()
    human = byte_stream([d.text for d in human_docs])
    textbook_test = "\n\n".join(test_docs)
    log(f"{len(train_docs)} synthetic documents to train on ({byte_stream(train_docs).numel():,} bytes), "
        f"{len(test_docs)} held out; human corpus {human.numel():,} bytes ({len(human_docs)} documents)")
    watermark = detection(args, test_docs, human) if args.watermark_key else None
    if watermark:
        log(f"watermark ({args.watermark_scheme}): {watermark['detected']:.3f} of {len(test_docs)} held-out documents "
            f"detected, {watermark['human_flagged']:.3f} of human windows flagged")

    tok = ByteTokenizer()
    lam = lambada_passages()
    openings = (test_docs * lab.samples)[: lab.samples // 2]
    openings += lam[-(lab.samples - len(openings)):]  # LAMBADA's tail: not in HELDOUT
    human_ref = [tok.decode(random_windows(human, 1, lab.sample_bytes, seed=i)[0].tolist()) for i in range(lab.samples)]
    synth_ref = [t[: lab.sample_bytes] for t in (train_docs * lab.samples)[: lab.samples]]
    reference = {"human": word_diversity(human_ref), "synthetic": word_diversity(synth_ref)}

    texts = Texts(human=bytes(human.numpy()), textbook_train=tuple(train_docs), textbook_test=textbook_test,
                  openings=tuple(openings))
    students = train_students(lab, texts, log=log)
    fields = summarize(students, lab)

    synth_record = {k: synth_run.get(k) for k in ("command", "git_sha", "created", "label", "job", "teacher",
                                                     "generator", "metrics", "int8")}
    result = run_record(
        "bench/textbook.py " + " ".join(argv), quick=args.quick, seeds=lab.seeds,
        shows=("students of one size trained on equal tokens of human text, the teacher's textbook-style text and "
               "a 50/50 mix, each share with --seeds seeds: held-out human and textbook perplexity and zero-shot "
               "accuracy, seed spreads and paired intervals over questions"),
        does_not_show=("one synthetic set (teacher seed 0): the seeds vary the students, not the teacher's text; "
                       "byte-level students of ~1M parameters are near chance on ARC-Easy, PIQA and SciQ, so task "
                       "differences are small next to their intervals; a 135M teacher is not Phi-1's GPT-3.5"),
        synth={**synth_record, "dir": str(synth_dir), "from_cache": from_cache, "seconds": round(teacher_seconds, 1),
               "train_documents": len(train_docs), "heldout_documents": len(test_docs), "holdout_every": args.holdout,
               "pool_bytes": byte_stream(train_docs).numel(),
               "textbook_eval_bytes": len(textbook_test[: lab.eval_bytes].encode("utf-8")), "watermark": watermark},
        human={"documents": len(human_docs), "bytes": human.numel(), "sources": sorted({d.source for d in human_docs})},
        student={"config": lab.model_config().to_dict(), "parameters": n_params, "tokenizer": repr(tok),
                 "train": dataclasses.asdict(lab.train), "seq_len": lab.seq_len, "batch": lab.batch,
                 "tasks": list(lab.tasks), "task_limit": lab.task_limit, "workers": lab.workers},
        heldout_human=dataclasses.asdict(HELDOUT) | {"window": min(HELDOUT.window, lab.seq_len)},
        diversity_samples={"samples": lab.samples, "bytes": lab.sample_bytes,
                           "openings": f"{OPENING} bytes of held-out textbook documents and LAMBADA's last passages"},
        reference_diversity=reference, **fields,
        students=[{k: v for k, v in r.items() if k != "task_items"} for r in students],
        seconds=round(time.perf_counter() - t_start, 1))
    write_json(args.out, result)
    plot(fields["mixes"], reference, list(lab.tasks), Path(args.out).with_suffix(".png"), quick=args.quick)
    log(f"wrote {args.out}")
    return 0


def plot(mixes: list[dict], reference: dict, tasks: list[str], path: Path, quick: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [100 * m["synthetic_fraction"] for m in mixes]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))

    def band(ax, key, color, label=None, sub=None):
        vals = [(m[key] if sub is None else m[key][sub]) for m in mixes]
        ax.errorbar(x, [v["mean"] for v in vals], yerr=[v["std"] for v in vals], fmt="o-", color=color, capsize=3,
                    label=label)

    band(axes[0], "ppl_human", "tab:blue")
    axes[0].set_title("held-out human text (LAMBADA)")
    band(axes[1], "ppl_textbook", "tab:orange")
    axes[1].set_title("held-out textbook documents")
    for ax in axes[:2]:
        ax.set_ylabel("byte perplexity (mean ± std over seeds)")
    for t, c in zip(tasks, ("tab:purple", "tab:red", "tab:brown", "tab:cyan")):
        band(axes[2], "tasks", c, label=t, sub=t)
    axes[2].set_title("zero-shot acc_norm")
    axes[2].legend(fontsize=8)
    band(axes[3], "distinct_2", "tab:green", label="students")
    for name, style in (("human", ":"), ("synthetic", "--")):
        axes[3].axhline(reference[name]["distinct_2"], ls=style, color="grey", label=f"{name} text")
    axes[3].set_title("distinct-2 (words) of generations")
    axes[3].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("synthetic share of training data (%)")
        ax.grid(alpha=0.3)
    fig.suptitle("Students trained on human vs textbook-style synthetic text" + (" (quick)" if quick else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
