"""Test-time compute on SmolLM2-135M: accuracy against the number of samples, per choosing rule.

Questions with a program that checks answers (`lilliput.eval.short_answer`): synthetic arithmetic,
counting and alphabet questions, and ARC-Easy as lettered multiple choice answered by
generation. For each question the int8 model draws 16 samples that share one prefill (the
engine forks the prefilled row); the first n of them (n = 1, 2, 4, 8, 16) are chosen from by
best-of-n (the model's mean log-probability), majority vote and log-probability-weighted vote,
beside the oracle (pass@n: any sample right). Baselines: greedy decoding of the int8 model and of
the float model, with their seconds, so accuracy can be read against compute (generated tokens
and wall-clock seconds). Writes bench/results/test_time.json (`best_gain`: best method at n=16
minus greedy int8 accuracy) and test_time.png.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

import torch

from lilliput.compress.quantize import RTNConfig, quantize_
from lilliput.core.checkpoint import load_model
from lilliput.core.record import run_record, write_json
from lilliput.eval.short_answer import arc_letters, extract, is_correct, synthetic
from lilliput.infer import kernels
from lilliput.infer.engine import Engine, EngineConfig
from lilliput.infer.search import choose, mean_logprob, sample_n
from lilliput.infer.sequence import GenerationConfig

OUT = Path(__file__).parent / "results" / "test_time.json"
METHODS = ("best_of_n", "vote", "weighted_vote")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--per-family", type=int, default=12, help="synthetic questions per family (5 families)")
    ap.add_argument("--arc", type=int, default=60, help="ARC-Easy questions")
    ap.add_argument("--n", type=int, default=16, help="samples per question")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--new", type=int, default=16, help="tokens per answer")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    kernels.set_threads(args.threads)

    fp32, tok = load_model(None, device="cpu")
    int8 = quantize_(copy.deepcopy(fp32), RTNConfig(bits=8))
    questions = synthetic(args.per_family, seed=0) + arc_letters(args.arc)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q.prompt}]) for q in questions]
    greedy_cfg = GenerationConfig(max_new_tokens=args.new)
    sample_cfg = GenerationConfig(max_new_tokens=args.new, temperature=args.temperature, top_p=0.95, seed=0)
    ns = [n for n in (1, 2, 4, 8, 16, 32) if n <= args.n]

    greedy = {}
    for name, model in (("int8", int8), ("fp32", fp32)):
        engine = Engine(model, tok, EngineConfig(max_batch=16, max_len=512))
        t = time.perf_counter()
        seqs = engine.generate(prompts, greedy_cfg, bos=False)
        secs = time.perf_counter() - t
        right = [is_correct(q, s.text) for q, s in zip(questions, seqs)]
        greedy[name] = {"accuracy": sum(right) / len(questions), "seconds": round(secs, 2),
                        "tokens": sum(len(s.output) for s in seqs)}
        if name == "int8":
            greedy_right = right
        print(f"greedy {name}: {greedy[name]}", file=sys.stderr)

    engine = Engine(int8, tok, EngineConfig(max_batch=args.n, max_len=512))
    correct = {m: {n: 0 for n in ns} for m in (*METHODS, "oracle")}
    by_family: dict[str, dict[str, int]] = {}
    tokens = {n: 0 for n in ns}
    t0 = time.perf_counter()
    for i, (q, p) in enumerate(zip(questions, prompts)):
        seqs = sample_n(engine, p, dataclasses.replace(sample_cfg, seed=i), args.n, bos=False)
        fam = by_family.setdefault(q.family, {"n": 0, "greedy_int8": 0, f"oracle@{args.n}": 0,
                                              **{f"{m}@{args.n}": 0 for m in METHODS}})
        fam["n"] += 1
        fam["greedy_int8"] += greedy_right[i]
        fam[f"oracle@{args.n}"] += any(is_correct(q, s.text) for s in seqs)
        for n in ns:
            first = seqs[:n]
            tokens[n] += sum(len(s.output) for s in first)
            for m in METHODS:
                ok = is_correct(q, choose(first, m, extract=lambda t: extract(t, q.kind), score=mean_logprob).text)
                correct[m][n] += ok
                if n == args.n:
                    fam[f"{m}@{args.n}"] += ok
            correct["oracle"][n] += any(is_correct(q, s.text) for s in first)
        if (i + 1) % 20 == 0:
            print(f"{i + 1}/{len(questions)}: " + ", ".join(f"{m} {correct[m][args.n] / (i + 1):.3f}"
                                                          for m in correct), file=sys.stderr)
    sample_secs = time.perf_counter() - t0
    Q = len(questions)
    acc = {m: {n: round(c / Q, 4) for n, c in v.items()} for m, v in correct.items()}
    best = max(METHODS, key=lambda m: acc[m][args.n])
    result = {
        "threads": args.threads, "questions": Q, "n": args.n, "temperature": args.temperature, "top_p": 0.95,
        "max_new_tokens": args.new, "sampler_model": "SmolLM2-135M-Instruct int8 (RTN)",
        "best_gain": round(acc[best][args.n] - greedy["int8"]["accuracy"], 4),
        "best_method": best, "accuracy": acc, "greedy": greedy,
        "compute": {"generated_tokens": tokens, f"sampling_seconds_n{args.n}": round(sample_secs, 2),
                    "seconds_per_question_estimate": {n: round(sample_secs / Q * n / args.n, 3) for n in ns}},
        "per_family": by_family,
        "note": "n samples share one prefill; accuracy of each rule on the first n of 16 samples; oracle = any of "
                "the n right (pass@n). Seconds for n < 16 are scaled from the 16-sample run (decode dominates).",
    }
    write_json(args.out, run_record("bench/test_time.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                                    **result))
    plot(acc, greedy, tokens, ns, Q, Path(args.out).with_suffix(".png"))
    print(f"best_gain {result['best_gain']} ({best} at n={args.n}); wrote {args.out}", file=sys.stderr)
    return 0


def plot(acc: dict, greedy: dict, tokens: dict, ns: list[int], Q: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for m, style in (("oracle", "k--"), ("best_of_n", "o-"), ("vote", "s-"), ("weighted_vote", "^-")):
        axes[0].plot(ns, [acc[m][n] for n in ns], style, label=m)
        axes[1].plot([tokens[n] / Q for n in ns], [acc[m][n] for n in ns], style, label=m)
    for ax in axes:
        ax.axhline(greedy["int8"]["accuracy"], color="grey", ls=":", label="greedy int8")
        ax.axhline(greedy["fp32"]["accuracy"], color="tab:red", ls=":", label="greedy fp32")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("samples n")
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("generated tokens per question")
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M: test-time compute on checkable short answers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
