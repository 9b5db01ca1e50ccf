"""The hybrid router on multiple-choice tasks: quality against the share of queries sent to the
large model, beside random routing and the oracle, one run, over 3 seeds of the calibration split.

Small = a model a recipe in this repository rebuilds (`--recipe`, default `smollm2-gptq-int4`: int4
GPTQ of the embedded SmolLM2-135M-Instruct, calibrated on the default corpus with a fixed seed), run
here in-process and cached under $LILLIPUT_CACHE/recipes (~/.cache/lilliput/recipes) keyed by the
recipe file, the input model's weights, the corpus and the lilliput version (not by lilliput's code:
`--rebuild` after changing a method; `small_model.built_by` names the commit that built it); or a
folder given with `--small PATH` (then `small_model_from_recipe` is false: nothing here can rebuild
it). Large = the recipe's input in float (the embedded SmolLM2, or `--large MODEL`), or any
OpenAI-compatible server (`--large http://host:port/v1`, the edge/cloud pair), which scores the same
token ids through completions with echo + logprobs (lm-evaluation-harness's `local-completions`);
its model must share SmolLM2's tokenizer, and the recipe then runs on the embedded model.

Both score every choice of ARC-Easy, PIQA, HellaSwag and SciQ (the first `--limit` items of each) by
log-likelihood (lilliput.eval.tasks, acc_norm: divided by the choice's length in characters); the
models score each item once. For each seed of `--seeds`, a seeded random half of each task's items
calibrates (the sets' files may be ordered: the first half is not a sample of the rest) and the other
half is held out for every number of that seed. Per seed, for each uncertainty signal of the small
model's answer (margin between the top two choices, entropy over the choices, the chosen answer's
normalized log-likelihood, and `learned`: a logistic regression of "the small answer is wrong" on
those three, fit on the calibration items): the routing curve on the held-out items, its APGR
(RouteLLM: area under the performance gap recovered) and CPT(50%), CPT(80%) (the share of large calls
needed for that part of the gap); the signal with the largest calibration APGR is chosen, and the
threshold calibrated for `--retain` (0.95) of the large model's accuracy gives `accuracy_retained` and
`escalated_fraction` held out. The top-level `accuracy_retained`, `escalated_fraction` and `apgr` are
means over the seeds; `spread` has their standard deviation, extremes and per-seed values. Compute
saved against always-large counts the bytes of every matrix read per token (CPU decode is
bandwidth-bound): 1 - (small + escalated x large) / large; unknown for a large model behind a server.

What it does not show is written into the JSON (`does_not_show`). Writes bench/results/router.json
and router.png (the routing curves of the first seed's held-out half).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from lilliput.core.record import run_record, write_json
from lilliput.eval.efficiency import linear_bytes, model_bytes, parameter_count
from lilliput.eval.tasks import TASKS, endpoint_loglikelihoods, loglikelihoods
from lilliput.infer.endpoint import Endpoint, is_endpoint
from lilliput.infer.router import (CHOICE_SIGNALS, apgr, call_performance_threshold, choice_uncertainty, fit_signal,
                                   oracle_curve, random_curve, routed_accuracy, routing_curve, threshold_for_quality,
                                   threshold_for_share)

OUT = Path(__file__).parent / "results" / "router.json"
SIGNALS = (*CHOICE_SIGNALS, "learned")

SHOWS = [
    "held-out routing quality of this small/large pair on the first --limit items of each task, the threshold "
    "and the signal chosen on the other (calibration) half",
    "how much of that depends on which half calibrates: 3 seeds of the split, mean, spread and per-seed values",
]
DOES_NOT_SHOW = [
    "variance from the small model's build: the recipe's calibration seed is fixed, so every seed routes the same "
    "two models' scores",
    "a sample beyond the first --limit items of each set, or any task other than the four",
    "routing of generated answers: the server's RoutedEngine escalates on generation signals (token log-probabilities, "
    "entropy), not on the choice margins scored here",
    "wall-clock or energy savings: compute_saved_vs_large is a bytes-read proxy for bandwidth-bound CPU decode, and "
    "it counts neither the large model's own latency nor a server's",
    "a large model stronger than the recipe's input unless --large names one: by default the gap closed is only what "
    "the recipe cost",
]


def score(model, tok, items, batch_size: int, concurrency: int) -> list[list[float]]:
    """Length-normalized log-likelihood of each choice of each item (a local model, or an Endpoint)."""
    reqs = [pair for it in items for pair in it.requests()]
    if isinstance(model, Endpoint):
        res = endpoint_loglikelihoods(model, tok, reqs, concurrency)
    else:
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
    g = apgr(curve, a, b)
    return {"apgr": round(g, 4) if g is not None else None,
            "cpt50": call_performance_threshold(curve, a, b, 0.5), "cpt80": call_performance_threshold(curve, a, b, 0.8),
            "threshold": t if math.isfinite(t) else str(t), "accuracy": round(acc, 4), "accuracy_retained": round(acc / b, 4) if b else None,
            "escalated_fraction": round(share, 4), "curve": [(round(s, 4), round(x, 4)) for s, x in curve]}


def route_split(rows: dict[str, list], seed: int, retain: float, escalate: float) -> dict:
    """Calibrate on a seeded half of each task's rows (signals, small correct, large correct), report on
    the other half: one seed's numbers."""
    cal, test = ([], [], []), ([], [], [])
    for name, task_rows in rows.items():
        half = len(task_rows) // 2  # a seeded random half calibrates: a set's file may be ordered
        shuffled = random.Random(f"{name}:{seed}").sample(task_rows, len(task_rows))
        for part, rs in ((cal, shuffled[:half]), (test, shuffled[half:])):
            part[0].extend(dict(r[0]) for r in rs)  # copies: each seed adds its own learned signal
            part[1].extend(r[1] for r in rs)
            part[2].extend(r[2] for r in rs)
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
    signals = {}
    for sig in SIGNALS:
        u_cal, u_test = [x[sig] for x in cal[0]], [x[sig] for x in test[0]]
        signals[sig] = summarize(u_test, small_ok, large_ok, retain, (u_cal, cal[1], cal[2]))
        acc, share = routed_accuracy(u_test, small_ok, large_ok, threshold_for_share(u_cal, escalate))
        signals[sig][f"at_escalate_{escalate}"] = {"accuracy": round(acc, 4), "escalated_fraction": round(share, 4)}
    # the signal is chosen on the calibration items (largest APGR there), then reported held out
    cal_apgr = {sig: apgr(routing_curve([x[sig] for x in cal[0]], cal[1], cal[2]),
                          sum(cal[1]) / len(cal[1]), sum(cal[2]) / len(cal[2])) or 0.0 for sig in SIGNALS}
    best = max(cal_apgr, key=cal_apgr.get)
    oracle = oracle_curve(small_ok, large_ok)
    og = apgr(oracle, a, b)
    chosen = signals[best]
    return {"seed": seed, "signal": best, "small_acc": round(a, 4), "large_acc": round(b, 4),
            **{k: chosen[k] for k in ("accuracy_retained", "escalated_fraction", "apgr", "cpt50", "cpt80", "threshold")},
            "oracle_apgr": round(og, 4) if og is not None else None,
            "calibration_apgr": {k: round(v, 4) for k, v in cal_apgr.items()},
            "learned_signal": dataclasses.asdict(learned), "signals": signals,
            "oracle_curve": [(round(s, 4), round(x, 4)) for s, x in oracle], "held_out": (small_ok, large_ok)}


def over_seeds(values: list) -> dict | None:
    """Mean, sample standard deviation, extremes and the values themselves (None where a seed had none)."""
    xs = [v for v in values if v is not None]
    if not xs:
        return None
    return {"mean": round(statistics.fmean(xs), 4), "std": round(statistics.stdev(xs), 4) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs), "per_seed": values}


def load_pair(args, log):
    """(small, large, tokenizer, small_model record, large_model record)."""
    from lilliput.core.checkpoint import load_model
    from lilliput.eval.bench import model_label
    from lilliput.jobs.shrink import recipe_model

    remote = is_endpoint(args.large)
    if remote:
        large = Endpoint(args.large, args.large_model, args.api_key or os.environ.get("OPENAI_API_KEY"))
        large_info = {"label": large.label, "endpoint": True, "bytes": None, "linear_bytes": None}
    else:
        large, tok = load_model(args.large, device="cpu")
        large_info = {"label": model_label(args.large) + " (float)", "endpoint": False, "bytes": model_bytes(large),
                      "linear_bytes": linear_bytes(large), "parameters": parameter_count(large)}
    t0 = time.perf_counter()
    if args.small:
        small, tok = load_model(args.small, device="cpu")
        info = {"from_recipe": False, "label": model_label(args.small), "path": args.small,
                "note": "a folder given with --small: no recipe in the repository rebuilds it"}
    else:
        small, tok, info = recipe_model(args.recipe, None if remote else args.large, rebuild=args.rebuild, log=log)
        info = {"from_recipe": True, **info}
    info.update(bytes=model_bytes(small), linear_bytes=linear_bytes(small), parameters=parameter_count(small),
                seconds_to_have=round(time.perf_counter() - t0, 1))
    return small, large, tok, info, large_info


def tiny_pair():
    from lilliput.core.config import preset
    from lilliput.core.model import GPT
    from lilliput.core.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    small = GPT(preset("tiny")).eval()
    torch.manual_seed(1)
    large = GPT(preset("tiny")).eval()
    info = {"from_recipe": False, "label": "tiny seed 0", "note": "--tiny: random models, validation only",
            "bytes": model_bytes(small), "linear_bytes": linear_bytes(small)}
    return small, large, ByteTokenizer(), info, {"label": "tiny seed 1", "endpoint": False, "bytes": model_bytes(large),
                                                  "linear_bytes": linear_bytes(large)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="smollm2-gptq-int4",
                    help="the recipe that builds the small model (a name in lilliput/recipes or a TOML file)")
    ap.add_argument("--small", default=None, help="a small model folder instead of a recipe (not rebuildable here)")
    ap.add_argument("--large", default=None,
                    help="the large model: a local model (default: embedded SmolLM2, float) or http://host:port/v1")
    ap.add_argument("--large-model", default=None, help="the model id at --large (default: the first it serves)")
    ap.add_argument("--api-key", default=None, help="key for --large (default: $OPENAI_API_KEY; never recorded)")
    ap.add_argument("--concurrency", type=int, default=8, help="scoring requests in flight to --large")
    ap.add_argument("--rebuild", action="store_true", help="build the recipe's model even if it is cached")
    ap.add_argument("--tasks", default="arc_easy,piqa,hellaswag,sciq")
    ap.add_argument("--limit", type=int, default=500, help="items per task (half calibrate, half held out)")
    ap.add_argument("--retain", type=float, default=0.95, help="target share of the large model's accuracy")
    ap.add_argument("--escalate", type=float, default=0.3, help="also report a threshold for this share")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of each task's calibration / held-out split")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="two random tiny models (validation only)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    unknown = [n for n in args.tasks.split(",") if n not in TASKS]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; known: {sorted(TASKS)}")
    if args.tiny and (args.small or args.large):
        raise SystemExit("--tiny uses two random tiny models: drop --small/--large")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t_start = time.perf_counter()
    small, large, tok, small_info, large_info = tiny_pair() if args.tiny else load_pair(args, log)
    rows, per_task, seconds = {}, {}, {"small_ready": small_info.get("seconds_to_have"), "small": {}, "large": {}}
    for name in args.tasks.split(","):
        items = TASKS[name].load(args.limit)
        t0 = time.perf_counter()
        s_scores = score(small, tok, items, args.batch_size, args.concurrency)
        t1 = time.perf_counter()
        l_scores = score(large, tok, items, args.batch_size, args.concurrency)
        seconds["small"][name], seconds["large"][name] = round(t1 - t0, 1), round(time.perf_counter() - t1, 1)
        pick = lambda xs: max(range(len(xs)), key=xs.__getitem__)  # noqa: E731
        rows[name] = [(choice_uncertainty(ss), pick(ss) == it.gold, pick(ls) == it.gold)
                      for it, ss, ls in zip(items, s_scores, l_scores)]
        per_task[name] = {"items": len(items), "characters": sum(len(c) + len(x) for it in items for c, x in it.requests()),
                          "small_acc": round(sum(r[1] for r in rows[name]) / len(items), 4),
                          "large_acc": round(sum(r[2] for r in rows[name]) / len(items), 4)}
        log(f"  {name:<10} {per_task[name]}  small {seconds['small'][name]} s, large {seconds['large'][name]} s")

    runs = [route_split(rows, seed, args.retain, args.escalate) for seed in seeds]
    spread = {k: over_seeds([r[k] for r in runs])
              for k in ("accuracy_retained", "escalated_fraction", "apgr", "cpt50", "cpt80", "small_acc", "large_acc",
                        "oracle_apgr")}
    signals = {}  # each signal's means over the seeds (whichever signal each seed chose)
    for sig in SIGNALS:
        per = [r["signals"][sig] for r in runs]
        signals[sig] = {k: (over_seeds([p[k] for p in per]) or {}).get("mean")
                        for k in ("apgr", "accuracy_retained", "escalated_fraction")}
        signals[sig]["per_seed"] = [{k: v for k, v in p.items() if k != "curve"} for p in per]
    if isinstance(large, Endpoint):
        large_info["how"] = f"completions with echo + logprobs, max_tokens {large.echo_tokens}, token ids sent"
    esc = spread["escalated_fraction"]["mean"]
    sb, lb = small_info.get("linear_bytes"), large_info.get("linear_bytes")
    result = {
        "small": small_info["label"], "large": large_info["label"],
        "small_model_from_recipe": small_info["from_recipe"], "small_model": small_info, "large_model": large_info,
        "tasks": per_task, "limit": args.limit, "held_out_items": len(runs[0]["held_out"][0]), "seeds": seeds,
        "retain_target": args.retain,
        "accuracy_retained": spread["accuracy_retained"]["mean"], "escalated_fraction": esc,
        "apgr": spread["apgr"]["mean"] if spread["apgr"] else None,
        "small_acc": spread["small_acc"]["mean"], "large_acc": spread["large_acc"]["mean"],
        "compute_saved_vs_large": round(1 - (sb + esc * lb) / lb, 4) if sb and lb else None,
        "bytes_per_token": {"small": sb, "large": lb}, "random_apgr": 0.5,
        "oracle_apgr": spread["oracle_apgr"]["mean"] if spread["oracle_apgr"] else None,
        "spread": spread, "signals_chosen": [r["signal"] for r in runs], "signals": signals,
        "per_seed": [{k: v for k, v in r.items() if k not in ("signals", "oracle_curve", "held_out")} for r in runs],
        "curves_seed": seeds[0], "curves": {sig: runs[0]["signals"][sig]["curve"] for sig in SIGNALS},
        "oracle_curve": runs[0]["oracle_curve"], "seconds": {**seconds, "total": round(time.perf_counter() - t_start, 1)},
        "shows": SHOWS, "does_not_show": DOES_NOT_SHOW,
    }
    out = Path(args.out)
    write_json(out, run_record("bench/router.py " + " ".join(argv if argv is not None else sys.argv[1:]), **result))
    plot(result, *runs[0]["held_out"], out.with_suffix(".png"))
    per = ", ".join(f"seed {r['seed']}: {r['signal']} {r['accuracy_retained']} at {r['escalated_fraction']}" for r in runs)
    log(f"accuracy_retained {result['accuracy_retained']} (std {spread['accuracy_retained']['std']}) at escalated_fraction "
        f"{esc} (std {spread['escalated_fraction']['std']}), apgr {result['apgr']}; {per}; compute_saved_vs_large "
        f"{result['compute_saved_vs_large']}; {result['seconds']['total']} s; wrote {out}")
    return 0


def plot(result: dict, small_ok, large_ok, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    first = result["per_seed"][0]
    for sig, curve in result["curves"].items():
        xs, ys = zip(*curve)
        g = result["signals"][sig]["per_seed"][0]["apgr"]
        ax.plot(xs, ys, label=f"router: {sig} (APGR {g})")
    xs, ys = zip(*random_curve(small_ok, large_ok))
    ax.plot(xs, ys, "k--", label="random (APGR 0.5)")
    xs, ys = zip(*result["oracle_curve"])
    ax.plot(xs, ys, "k:", label=f"oracle (APGR {first['oracle_apgr']})")
    ax.set(xlabel="share of queries sent to the large model", ylabel="accuracy (held out)",
           title=f"small/large routing on multiple choice (split seed {result['curves_seed']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
