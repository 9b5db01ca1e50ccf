"""The hybrid router on multiple-choice tasks: quality against the share of queries sent to the
large model, beside random routing and the oracle, one run.

Small = a shrunk SmolLM2 (`--small PATH`, or by default the embedded model RTN-quantized to int4
in this process, output layer included), large = SmolLM2 in float. Both score every choice of
ARC-Easy, PIQA, HellaSwag and SciQ by log-likelihood (lilliput.eval.tasks, acc_norm: divided by
the choice's length in characters). A seeded random half of each task's items calibrates (the
sets' files may be ordered: the first half is not a sample of the rest), the other half is held out
for every reported number.

For each uncertainty signal of the small model's answer (margin between the top two choices,
entropy over the choices, the chosen answer's normalized log-likelihood, and `learned`: a logistic
regression of "the small answer is wrong" on those three, fit on the calibration items): the routing curve on
the held-out items, its APGR (RouteLLM: area under the performance gap recovered) and CPT(50%),
CPT(80%) (the share of large calls needed for that part of the gap); the threshold calibrated
for `--retain` (0.95) of the large model's accuracy and what it gives held out
(`accuracy_retained`, `escalated_fraction`), and the compute saved against always-large
(the bytes of every matrix read per token as the cost, since CPU decode is bandwidth-bound:
1 - (small + escalated x large) / large). Writes bench/results/router.json and router.png.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import random
import sys
from pathlib import Path

import torch

from lilliput.core.record import run_record, write_json
from lilliput.eval.efficiency import linear_bytes
from lilliput.eval.tasks import TASKS, loglikelihoods
from lilliput.infer.router import (CHOICE_SIGNALS, apgr, call_performance_threshold, choice_uncertainty, fit_signal,
                                   oracle_curve,
                                   random_curve, routed_accuracy, routing_curve, threshold_for_quality,
                                   threshold_for_share)

OUT = Path(__file__).parent / "results" / "router.json"


def score(model, tok, items, batch_size: int) -> list[list[float]]:
    """Length-normalized log-likelihood of each choice of each item."""
    reqs = [pair for it in items for pair in it.requests()]
    res = loglikelihoods(model, tok, reqs, batch_size)
    out, k = [], 0
    for it in items:
        n = len(it.choices)
        lengths = [len(c) for c in it.choices] if it.continuation is None else [len(it.continuation)] * n
        out.append([s / max(ln, 1) for (s, _), ln in zip(res[k:k + n], lengths)])
        k += n
    return out


def summarize(u, small, large, retain: float, cal) -> dict:
    """Held-out numbers for one signal; `cal` = (u, small, large) of the calibration items."""
    a, b = sum(small) / len(small), sum(large) / len(large)
    curve = routing_curve(u, small, large)
    t = threshold_for_quality(*cal, retain)
    acc, share = routed_accuracy(u, small, large, t)
    return {"apgr": round(apgr(curve, a, b), 4) if apgr(curve, a, b) is not None else None,
            "cpt50": call_performance_threshold(curve, a, b, 0.5), "cpt80": call_performance_threshold(curve, a, b, 0.8),
            "threshold": t, "accuracy": round(acc, 4), "accuracy_retained": round(acc / b, 4) if b else None,
            "escalated_fraction": round(share, 4), "curve": [(round(s, 4), round(x, 4)) for s, x in curve]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", default=None, help="the shrunk model (default: embedded SmolLM2, RTN int4 here)")
    ap.add_argument("--large", default=None, help="the large model (default: embedded SmolLM2, float)")
    ap.add_argument("--tasks", default="arc_easy,piqa,hellaswag,sciq")
    ap.add_argument("--limit", type=int, default=500, help="items per task (half calibrate, half held out)")
    ap.add_argument("--retain", type=float, default=0.95, help="target share of the large model's accuracy")
    ap.add_argument("--escalate", type=float, default=0.3, help="also report a threshold for this share")
    ap.add_argument("--split-seed", type=int, default=0, help="seed of each task's calibration / held-out split")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="two random tiny models (validation only)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.tiny:
        from lilliput.core.config import preset
        from lilliput.core.model import GPT
        from lilliput.core.tokenizer import ByteTokenizer

        torch.manual_seed(0)
        small = GPT(preset("tiny")).eval()
        torch.manual_seed(1)
        large, tok = GPT(preset("tiny")).eval(), ByteTokenizer()
        small_name, large_name = "tiny seed 0", "tiny seed 1"
    else:
        from lilliput.compress.quantize import RTNConfig, quantize_
        from lilliput.core.checkpoint import load_model

        large, tok = load_model(args.large, device="cpu")
        large_name = args.large or "embedded SmolLM2-135M-Instruct (float)"
        if args.small:
            small, _ = load_model(args.small, device="cpu")
            small_name = args.small
        else:
            cfg = RTNConfig(bits=4, group_size=128, lm_head_bits=4)
            small, small_name = quantize_(copy.deepcopy(large), cfg), f"embedded SmolLM2, {cfg}"

    cal, test, per_task = ([], [], []), ([], [], []), {}
    for name in args.tasks.split(","):
        if name not in TASKS:
            raise SystemExit(f"unknown task {name!r}; known: {sorted(TASKS)}")
        items = TASKS[name].load(args.limit)
        s_scores, l_scores = score(small, tok, items, args.batch_size), score(large, tok, items, args.batch_size)
        rows = []
        for it, ss, ls in zip(items, s_scores, l_scores):
            pick = lambda xs: max(range(len(xs)), key=xs.__getitem__)  # noqa: E731
            rows.append((choice_uncertainty(ss), pick(ss) == it.gold, pick(ls) == it.gold))
        half = len(rows) // 2  # a seeded random half calibrates: a set's file may be ordered
        rows = random.Random(f"{name}:{args.split_seed}").sample(rows, len(rows))
        for part, rs in ((cal, rows[:half]), (test, rows[half:])):
            for j in range(3):  # signals, small correct, large correct
                part[j].extend(r[j] for r in rs)
        per_task[name] = {"items": len(rows), "small_acc": round(sum(r[1] for r in rows) / len(rows), 4),
                          "large_acc": round(sum(r[2] for r in rows) / len(rows), 4)}
        print(f"  {name:<10} {per_task[name]}", file=sys.stderr)

    small_ok, large_ok = test[1], test[2]
    a, b = sum(small_ok) / len(small_ok), sum(large_ok) / len(large_ok)
    # the learned signal: fit on all calibration items for the held-out numbers; its calibration
    # APGR (which picks the signal) comes from two-fold cross-fitting, as the others' does not fit
    learned = fit_signal(cal[0], cal[1])
    for row in test[0]:
        row["learned"] = learned(row)
    for fit_part, apply_part in ((slice(0, None, 2), slice(1, None, 2)), (slice(1, None, 2), slice(0, None, 2))):
        fold = fit_signal(cal[0][fit_part], cal[1][fit_part])
        for row in cal[0][apply_part]:
            row["learned"] = fold(row)
    names = (*CHOICE_SIGNALS, "learned")
    signals = {}
    for sig in names:
        u_cal, u_test = [x[sig] for x in cal[0]], [x[sig] for x in test[0]]
        signals[sig] = summarize(u_test, small_ok, large_ok, args.retain, (u_cal, cal[1], cal[2]))
        t = threshold_for_share(u_cal, args.escalate)
        acc, share = routed_accuracy(u_test, small_ok, large_ok, t)
        signals[sig][f"at_escalate_{args.escalate}"] = {"accuracy": round(acc, 4), "escalated_fraction": round(share, 4)}
    # the signal is chosen on the calibration items (largest APGR there), then reported held out
    cal_apgr = {sig: apgr(routing_curve([x[sig] for x in cal[0]], cal[1], cal[2]),
                          sum(cal[1]) / len(cal[1]), sum(cal[2]) / len(cal[2])) or 0.0 for sig in names}
    best = max(cal_apgr, key=cal_apgr.get)
    sb, lb = linear_bytes(small), linear_bytes(large)
    esc = signals[best]["escalated_fraction"]
    oracle = oracle_curve(small_ok, large_ok)
    result = {
        "small": small_name, "large": large_name, "tasks": per_task, "held_out_items": len(small_ok),
        "small_acc": round(a, 4), "large_acc": round(b, 4), "signal": best, "retain_target": args.retain,
        "accuracy_retained": signals[best]["accuracy_retained"], "escalated_fraction": esc,
        "apgr": signals[best]["apgr"], "cpt50": signals[best]["cpt50"], "cpt80": signals[best]["cpt80"],
        "compute_saved_vs_large": round(1 - (sb + esc * lb) / lb, 4), "bytes_per_token": {"small": sb, "large": lb},
        "oracle_apgr": round(apgr(oracle, a, b), 4) if apgr(oracle, a, b) is not None else None, "random_apgr": 0.5,
        "learned_signal": dataclasses.asdict(learned), "signals": signals, "calibration_apgr": {k: round(v, 4) for k, v in cal_apgr.items()},
        "oracle_curve": [(round(s, 4), round(x, 4)) for s, x in oracle],
    }
    out = Path(args.out)
    write_json(out, run_record("bench/router.py " + " ".join(argv if argv is not None else sys.argv[1:]), **result))
    plot(result, small_ok, large_ok, out.with_suffix(".png"))
    print(f"signal {best}: accuracy_retained {result['accuracy_retained']} at escalated_fraction {esc}, apgr "
          f"{result['apgr']}, cpt50 {result['cpt50']}, cpt80 {result['cpt80']}, compute_saved_vs_large "
          f"{result['compute_saved_vs_large']}; wrote {out}", file=sys.stderr)
    return 0


def plot(result: dict, small_ok, large_ok, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for sig, s in result["signals"].items():
        xs, ys = zip(*s["curve"])
        ax.plot(xs, ys, label=f"router: {sig} (APGR {s['apgr']})")
    xs, ys = zip(*random_curve(small_ok, large_ok))
    ax.plot(xs, ys, "k--", label="random (APGR 0.5)")
    xs, ys = zip(*result["oracle_curve"])
    ax.plot(xs, ys, "k:", label=f"oracle (APGR {result['oracle_apgr']})")
    ax.set(xlabel="share of queries sent to the large model", ylabel="accuracy (held out)",
           title="small/large routing on multiple choice")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
