"""Textbook-quality synthetic data at small scale (the Phi-1 question): does a tiny student learn more
from a teacher's textbook-style text than from human text, for the same tokens?

The teacher (the embedded SmolLM2-135M-Instruct, int8 RTN unless --no-int8) writes `--tokens`
tokens of textbook-style documents through `lilliput.jobs.synth` (prompts from
lilliput.data.textbook: ~100 topics x kinds x personas x audiences, one seed per document;
curated; recorded in a ledger inside --synth-dir). The set is cached in --synth-dir and reused
when its run.json matches the request. Every `--holdout`-th document (by hash of its id) is held
out: never trained on, it is the textbook evaluation text.

Students: byte-level (ByteTokenizer) GPTs of one size (~1M parameters by default), trained from
scratch, same seed, same `--student-tokens` training tokens, on a pool of the same size (the
synthetic training bytes) whose share `f` is synthetic and `1 - f` human (random 1 KiB windows of
the default corpus), for each `f` in --mixes.

Written to bench/results/textbook.json (+ textbook.png):

- `synth`: how the synthetic set was made (the synth job, teacher, token counts, curation summary,
  whether it came from the cache), and the held-out split;
- `students[]`: per synthetic share: `synthetic_fraction`, `ppl_human` (LAMBADA HELDOUT passages,
  lilliput.eval.perplexity.heldout), `ppl_textbook` (the held-out textbook documents),
  `train_loss` (final), `train_seconds`, and `diversity` of what the student generates (`--samples`
  continuations of `--sample-bytes` bytes at temperature 1 from openings of held-out human and
  textbook text): word distinct-1/-2/-3 and word unigram entropy (bits; lilliput.eval.diversity);
- `reference_diversity`: the same measures on human and on synthetic text cut to the same sizes,
  so a student's figures can be read against the text it learned from;
- `student`: the student config and parameter count; `estimate_seconds` printed up front.

No target: the curve of perplexity against synthetic share is the finding.

    .venv/bin/python bench/textbook.py            # full: ~250k teacher tokens (~12 min) + 5 students (~1 min each)
    .venv/bin/python bench/textbook.py --quick    # smoke: a few teacher documents, tiny students
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from lilliput.core.config import ModelConfig
from lilliput.core.model import GPT
from lilliput.core.record import run_record, write_json
from lilliput.core.tokenizer import ByteTokenizer
from lilliput.eval.diversity import distinct_n, unigram_entropy
from lilliput.eval.efficiency import parameter_count
from lilliput.eval.perplexity import HELDOUT, PerplexityConfig, heldout, perplexity
from lilliput.eval.task_sets import lambada_passages
from lilliput.infer.engine import Engine, EngineConfig
from lilliput.infer.sequence import GenerationConfig
from lilliput.jobs.synth import DOCUMENTS_FILE, SynthJob, run_synth
from lilliput.train.data import default_documents, random_windows
from lilliput.train.loop import LanguageModeling, TrainConfig, Trainer, WindowBatches

OUT = Path(__file__).parent / "results" / "textbook.json"
TEACHER_TOK_S = 350.0  # SmolLM2 int8, batch 16, 2 quiet cores (float32: about a third of it)
OPENING = 32  # bytes of held-out text each diversity sample continues
STUDENT_PARAM_TOK_S = 6e9  # student training: parameters x tokens per second on 2 quiet cores


def byte_stream(texts: list[str], sep: str = "\n\n") -> torch.Tensor:
    """Texts joined by `sep` as ByteTokenizer ids (its encode, without a Python list per byte): (N,) long."""
    return torch.frombuffer(bytearray(sep.join(texts).encode("utf-8")), dtype=torch.uint8).long()


def split_documents(docs: list[dict], every: int) -> tuple[list[str], list[str]]:
    """(train, held-out) texts: in the order of their ids' hashes, every `every`-th document is held out
    (the first one always: at least one)."""
    ranked = sorted(docs, key=lambda d: hashlib.sha256(d["id"].encode("utf-8")).hexdigest())
    return ([d["text"] for i, d in enumerate(ranked) if i % every],
            [d["text"] for i, d in enumerate(ranked) if i % every == 0])


def mixed_pool(human: torch.Tensor, synthetic_docs: list[str], fraction: float, size: int, seed: int) -> torch.Tensor:
    """`size` bytes: `fraction` of them synthetic (whole documents in a seeded random order), the rest
    random 1 KiB windows of the human stream."""
    g = torch.Generator().manual_seed(seed)
    parts, n_syn = [], round(fraction * size)
    if n_syn:
        order = torch.randperm(len(synthetic_docs), generator=g).tolist()
        syn = byte_stream([synthetic_docs[i] for i in order])[:n_syn]
        parts.append(syn)
    n_hum = size - sum(p.numel() for p in parts)
    if n_hum > 0:
        windows = random_windows(human, -(-n_hum // 1024), 1024, seed=seed)  # (n, 1024)
        parts.insert(0, windows.reshape(-1)[:n_hum])
    return torch.cat(parts)


def word_diversity(texts: list[str]) -> dict:
    words = [t.split() for t in texts]
    return {"distinct_1": distinct_n(words, 1), "distinct_2": distinct_n(words, 2), "distinct_3": distinct_n(words, 3),
            "word_entropy_bits": unigram_entropy([w for ws in words for w in ws]),
            "words": sum(len(w) for w in words)}


def sample_texts(model, tok, openings: list[list[int]], n_bytes: int, seed: int, batch: int) -> list[str]:
    """One continuation of `n_bytes` bytes per opening, temperature 1, seeded per opening."""
    engine = Engine(model, tok, EngineConfig(max_batch=batch, max_len=model.config.max_seq_len))
    seqs = [engine.add(o, GenerationConfig(max_new_tokens=n_bytes, temperature=1.0, seed=seed + i))
            for i, o in enumerate(openings)]
    engine.run()
    return [s.text for s in seqs]


def synth_set(args, log) -> tuple[Path, dict, bool]:
    """The synthetic set's folder, its run.json and whether it came from the cache."""
    job = SynthJob(teacher=args.teacher, tokens=args.tokens, out=str(args.synth_dir), seed=args.seed,
                   ledger=str(Path(args.synth_dir) / "ledger.sqlite"), max_new_tokens=args.max_new_tokens,
                   max_batch=args.max_batch, device="cpu")
    run_file = Path(args.synth_dir) / "run.json"
    want = {**dataclasses.asdict(job), "watermark": None}
    if run_file.exists() and (Path(args.synth_dir) / DOCUMENTS_FILE).exists() and not args.resynth:
        run = json.loads(run_file.read_text())
        if run.get("job") == want and run.get("int8") == args.int8:
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
    run["int8"] = args.int8
    write_json(run_file, run)
    del teacher
    return out, run, False


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=250_000, help="teacher tokens of synthetic text")
    ap.add_argument("--max-new-tokens", type=int, default=SynthJob.max_new_tokens, help="most teacher tokens per document")
    ap.add_argument("--max-batch", type=int, default=SynthJob.max_batch, help="documents the teacher writes at once")
    ap.add_argument("--teacher", default=None, help="teacher model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True,
                    help="quantize the teacher to int8 (RTN) first: faster generation")
    ap.add_argument("--synth-dir", default=None, help="cache folder of the synthetic set "
                    "(default: $LILLIPUT_CACHE or ~/.cache/lilliput, textbook-synth/<tokens>-<seed>[-int8])")
    ap.add_argument("--resynth", action="store_true", help="write the synthetic set again even when cached")
    ap.add_argument("--holdout", type=int, default=10, help="every Nth synthetic document (in id-hash order) is held out")
    ap.add_argument("--mixes", default="0,0.25,0.5,0.75,1", help="synthetic shares of the students' data")
    ap.add_argument("--student-tokens", type=int, default=400_000, help="training tokens (bytes) per student")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eval-bytes", type=int, default=60_000, help="most bytes of held-out textbook text scored")
    ap.add_argument("--samples", type=int, default=32, help="generations per student for diversity")
    ap.add_argument("--sample-bytes", type=int, default=192, help="bytes per generation (32 + this <= --seq-len)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke run: a few teacher documents, tiny students")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens, args.max_new_tokens, args.student_tokens = min(args.tokens, 1200), min(args.max_new_tokens, 128), 24_000
        args.dim, args.layers, args.seq_len, args.samples, args.sample_bytes = 64, 2, 128, 4, 96
        args.holdout, args.eval_bytes = 4, 8_000
    cache = Path(os.environ.get("LILLIPUT_CACHE") or Path.home() / ".cache" / "lilliput")
    args.synth_dir = args.synth_dir or str(cache / "textbook-synth" /
                                           f"{args.tokens}-{args.seed}{'-int8' if args.int8 else ''}")
    if OPENING + args.sample_bytes > args.seq_len:
        ap.error(f"--sample-bytes {args.sample_bytes} + a {OPENING}-byte opening is longer than --seq-len {args.seq_len}")
    mixes = [float(x) for x in args.mixes.split(",")]
    if any(not 0 <= f <= 1 for f in mixes):
        ap.error(f"--mixes must be shares in [0, 1], got {args.mixes}")
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    def log(m: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f}s] {m}", file=sys.stderr, flush=True)

    scfg = ModelConfig(name="textbook-student", vocab_size=256, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                       n_kv_heads=max(1, args.heads // 2), ffn_dim=3 * args.dim, max_seq_len=args.seq_len)
    n_params = parameter_count(GPT(scfg))
    cached = (Path(args.synth_dir) / "run.json").exists() and not args.resynth
    teacher_s = 0 if cached else args.tokens / TEACHER_TOK_S * (1 if args.int8 else 3) + 30
    student_s = len(mixes) * (n_params * args.student_tokens / STUDENT_PARAM_TOK_S + 15)
    log(f"estimate on 2 quiet cores: teacher {teacher_s / 60:.1f} min ({'cached' if cached else f'{args.tokens:,} tokens'}), "
        f"{len(mixes)} students of {n_params / 1e6:.2f}M parameters x {args.student_tokens:,} tokens "
        f"{student_s / 60:.1f} min; total ~{(teacher_s + student_s) / 60:.0f} min")

    # --- the synthetic set, split by document --------------------------------------------------------------
    t0 = time.perf_counter()
    synth_dir, synth_run, from_cache = synth_set(args, log)
    teacher_seconds = time.perf_counter() - t0
    docs = [json.loads(line) for line in (synth_dir / DOCUMENTS_FILE).read_text(encoding="utf-8").splitlines() if line]
    train_docs, test_docs = split_documents(docs, args.holdout)
    if not test_docs or not train_docs:
        raise SystemExit(f"{len(docs)} synthetic documents: too few to train on and hold out; raise --tokens")
    textbook_test = "\n\n".join(test_docs)[: args.eval_bytes]
    pool_size = byte_stream(train_docs).numel()
    human_docs = default_documents()
    human = byte_stream([d.text for d in human_docs])
    log(f"{len(train_docs)} synthetic documents to train on ({pool_size:,} bytes), {len(test_docs)} held out; "
        f"human corpus {human.numel():,} bytes ({len(human_docs)} documents)")

    tok = ByteTokenizer()
    lam = lambada_passages()
    openings = [tok.encode(t)[:OPENING] for t in (test_docs * args.samples)[: args.samples // 2]]
    openings += [tok.encode(p)[:OPENING] for p in lam[-(args.samples - len(openings)):]]  # LAMBADA's tail: not in HELDOUT
    ref_len = args.sample_bytes
    human_ref = [tok.decode(random_windows(human, 1, ref_len, seed=i)[0].tolist()) for i in range(args.samples)]
    synth_ref = [t[:ref_len] for t in (train_docs * args.samples)[: args.samples]]
    reference = {"human": word_diversity(human_ref), "synthetic": word_diversity(synth_ref)}

    students = []
    for f in mixes:
        t0 = time.perf_counter()
        pool = mixed_pool(human, train_docs, f, pool_size, seed=args.seed)
        torch.manual_seed(args.seed)
        model = GPT(scfg)
        tcfg = TrainConfig(lr=args.lr, warmup_steps=20, max_tokens=args.student_tokens, seed=args.seed,
                           progress=False, log_every=10**9)
        summary = Trainer(LanguageModeling(model), WindowBatches(pool, args.batch, args.seq_len, seed=args.seed),
                          tcfg).fit()
        train_s = time.perf_counter() - t0
        model.eval()
        h = heldout(model, tok, dataclasses.replace(HELDOUT, window=min(HELDOUT.window, args.seq_len)))
        tb = perplexity(model, tok, textbook_test, PerplexityConfig(window=args.seq_len, batch_size=8))
        texts = sample_texts(model, tok, openings, args.sample_bytes, args.seed, batch=min(16, len(openings)))
        row = {"synthetic_fraction": f, "ppl_human": h["perplexity"], "ppl_textbook": tb["perplexity"],
               "human_tokens_scored": h["tokens"], "textbook_tokens_scored": tb["tokens"],
               "train_loss": summary["final"].get("loss"), "train_steps": summary["steps"],
               "train_tokens": summary["tokens"], "train_seconds": round(train_s, 1),
               "diversity": word_diversity(texts), "sample": texts[0][:200]}
        students.append(row)
        log(f"synthetic {f:.2f}: ppl human {row['ppl_human']:.2f}, textbook {row['ppl_textbook']:.2f}, "
            f"distinct-2 {row['diversity']['distinct_2']:.3f} ({train_s:.0f} s)")

    synth_record = {k: synth_run.get(k) for k in ("command", "git_sha", "created", "label", "job", "teacher",
                                                     "generator", "metrics", "int8")}
    result = run_record("bench/textbook.py " + " ".join(argv), quick=args.quick,
                        synth={**synth_record, "dir": str(synth_dir), "from_cache": from_cache,
                               "seconds": round(teacher_seconds, 1), "train_documents": len(train_docs),
                               "heldout_documents": len(test_docs), "holdout_every": args.holdout,
                               "pool_bytes": pool_size, "textbook_eval_bytes": len(textbook_test.encode("utf-8"))},
                        human={"documents": len(human_docs), "bytes": human.numel(),
                               "sources": sorted({d.source for d in human_docs})},
                        student={"config": scfg.to_dict(), "parameters": n_params, "tokenizer": repr(tok),
                                 "train_tokens": args.student_tokens, "seq_len": args.seq_len, "batch": args.batch,
                                 "lr": args.lr},
                        heldout_human=dataclasses.asdict(HELDOUT) | {"window": min(HELDOUT.window, args.seq_len)},
                        diversity_samples={"samples": args.samples, "bytes": args.sample_bytes,
                                           "openings": "32 bytes of held-out textbook documents and LAMBADA's last passages"},
                        reference_diversity=reference, students=students,
                        seconds=round(time.perf_counter() - t_start, 1))
    write_json(args.out, result)
    plot(students, reference, Path(args.out).with_suffix(".png"), quick=args.quick)
    log(f"wrote {args.out}")
    return 0


def plot(students: list[dict], reference: dict, path: Path, quick: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [100 * s["synthetic_fraction"] for s in students]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(x, [s["ppl_human"] for s in students], "o-", color="tab:blue")
    axes[0].set_title("held-out human text (LAMBADA)")
    axes[1].plot(x, [s["ppl_textbook"] for s in students], "o-", color="tab:orange")
    axes[1].set_title("held-out textbook documents")
    for ax in axes[:2]:
        ax.set_ylabel("byte perplexity")
    axes[2].plot(x, [s["diversity"]["distinct_2"] for s in students], "o-", color="tab:green", label="students")
    for name, style in (("human", ":"), ("synthetic", "--")):
        axes[2].axhline(reference[name]["distinct_2"], ls=style, color="grey", label=f"{name} text")
    axes[2].set_title("distinct-2 (words) of generations")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("synthetic share of training data (%)")
        ax.grid(alpha=0.3)
    fig.suptitle("Students trained on human vs textbook-style synthetic text" + (" (quick)" if quick else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
