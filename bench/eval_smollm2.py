"""Zero-shot scores of the embedded SmolLM2-135M-Instruct beside the scores Hugging Face published.

Writes bench/results/eval_smollm2.json. Differences above 3 points carry an explanation.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from lilliput.core.checkpoint import load_model
from lilliput.core.record import run_record, write_json
from lilliput.eval.perplexity import HELDOUT, HeldoutConfig, heldout
from lilliput.eval.tasks import TaskConfig, evaluate_tasks

OUT = Path(__file__).parent / "results" / "eval_smollm2.json"

# The SmolLM2-135M-Instruct model card's "Instruction model" table (lighteval, zero-shot;
# ARC is the mean of ARC-Easy and ARC-Challenge), and the base SmolLM2-135M card for tasks the
# instruct table omits. Percent.
PUBLISHED = {
    "instruct": {"hellaswag": 40.9, "arc_avg": 37.3, "piqa": 66.3},
    "base": {"hellaswag": 42.1, "arc_avg": 43.9, "piqa": 68.4, "winogrande": 51.3, "openbookqa": 34.6},
}
# which of our metrics the published number corresponds to (lighteval normalises by length)
METRIC = {"hellaswag": "acc_norm", "piqa": "acc_norm", "arc_easy": "acc_norm", "arc_challenge": "acc_norm",
          "openbookqa": "acc_norm", "winogrande": "acc", "boolq": "acc", "sciq": "acc_norm", "lambada": "acc"}
REASONS = [
    "weights: the embedded GGUF is Q4_1 (4-bit, blocks of 32) dequantized to float; Hugging Face "
    "evaluated the original bfloat16 weights",
    "prompt format: scores here use lm-evaluation-harness prompts and length normalisation by "
    "characters; Hugging Face used lighteval's prompts (and, for the base-model figures, a "
    "different model: SmolLM2-135M, not the instruct tune)",
    "sample: the first N items of each set (see n), not the full split",
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--limit", type=int, default=500, help="items per task (None = all)")
    ap.add_argument("--passages", type=int, default=HELDOUT.passages, help="LAMBADA passages for perplexity")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    model, tok = load_model(None, device="cpu")
    tasks = ("hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande", "boolq", "openbookqa", "sciq", "lambada")
    scores = evaluate_tasks(model, tok, TaskConfig(tasks=tasks, limit=args.limit))
    ppl = heldout(model, tok, HeldoutConfig(passages=args.passages))  # lilliput's one held-out window

    ours = {t: round(100 * scores[t][METRIC[t]], 2) for t in tasks}
    ours["arc_avg"] = round((ours["arc_easy"] + ours["arc_challenge"]) / 2, 2)
    comparison = {}
    for source, table in PUBLISHED.items():
        for task, published in table.items():
            if task in comparison:
                continue
            diff = round(ours[task] - published, 2)
            comparison[task] = {"lilliput": ours[task], "published": published, "published_for": source,
                                "metric": METRIC.get(task, "acc_norm"), "difference": diff,
                                "explanation": REASONS if abs(diff) > 3 else None}
    result = {"limit": args.limit, "scores": scores, "lilliput_percent": ours, "comparison": comparison,
              "lambada_perplexity": ppl, "seconds": round(time.perf_counter() - t0, 1),
              "threads": torch.get_num_threads()}
    write_json(args.out, run_record("bench/eval_smollm2.py " + " ".join(argv or sys.argv[1:]), **result))
    for task, c in comparison.items():
        print(f"{task:>12}: lilliput {c['lilliput']:5.1f}  published {c['published']:5.1f} ({c['published_for']})  "
              f"diff {c['difference']:+.1f}", file=sys.stderr)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
