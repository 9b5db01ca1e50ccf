"""`lilliput collapse`: the model-collapse lab (train/collapse_study.py) run, saved, plotted and printed."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lilliput.core.options import flag, nested
from lilliput.core.record import run_record, write_json
from lilliput.train.collapse_gpt import QUICK, CollapseConfig
from lilliput.train.collapse_study import run_collapse


# --- the figure ---------------------------------------------------------------------------------

def plot_collapse(result: dict[str, Any], path: Path | str) -> Path:
    """A row per budget rule (GPT perplexity and tails vs generation, a line and min-max band per policy,
    the headline sampling), and a row with generation 0's held-out curve and the bigram scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpt, ngram, head = result["gpt"]["curves"], result["ngram"]["curves"], result["headline_sampling"]
    colors = {"replace": "tab:red", "accumulate": "tab:blue", "fraction": "tab:green"}
    rows = [[(f"GPT, {b} rule: held-out perplexity", gpt[b][head], "perplexity"),
             (f"GPT, {b} rule: rare-word coverage", gpt[b][head], "tail_coverage"),
             (f"GPT, {b} rule: rare word-pair coverage", gpt[b][head], "tail_coverage_2")] for b in gpt]
    rows.append([("GPT generation 0: held-out perplexity", None, None),
                 ("bigram: held-out perplexity", ngram[head], "perplexity"),
                 ("bigram: rare-word coverage", ngram[head], "tail_coverage")])
    fig, axes = plt.subplots(len(rows), 3, figsize=(13, 3.4 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c, (title, data, metric) in enumerate(row):
            ax = axes[r][c]
            if data is None:  # the convergence panel
                g0 = result["gpt"]["generation0"]
                x, m = g0["curve"]["tokens"], g0["curve"]["perplexity"]
                ax.plot(x, m["mean"], marker="o", color="black", label="mean over seeds")
                ax.fill_between(x, m["min"], m["max"], color="black", alpha=0.15)
                if "control" in g0:
                    cx = [p["tokens"] for p in g0["control"]["curve"]]
                    ax.plot(cx, [p["perplexity"] for p in g0["control"]["curve"]], ls="--", color="gray",
                            label="seed 0, trained longer")
                ax.set_xlabel("tokens trained")
                ax.legend(fontsize=8)
            else:
                for p, curve in data.items():
                    x, m = curve["generation"], curve[metric]
                    ax.plot(x, m["mean"], marker="o", color=colors.get(p), label=p)
                    ax.fill_between(x, m["min"], m["max"], color=colors.get(p), alpha=0.15)
                ax.set_xlabel("generation")
                ax.set_xticks(x)
                if c == 0:
                    ax.legend(fontsize=8)
            ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3)
    fig.suptitle(f"Model collapse: replace vs accumulate ({head} sampling; mean over seeds, band = min-max)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- the command ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class CollapseJob:
    out: str = "runs/collapse"
    """Folder for collapse.json, collapse.png and the ledgers."""
    quick: bool = field(default=False, metadata=flag(action="store_true"))
    """Tiny models on the shipped sample, in seconds (the lab's sizes are QUICK's, flags change them further)."""
    device: str = "cpu"
    """cpu or cuda."""
    json: bool = field(default=False, metadata=flag(action="store_true"))
    """Print the headline figures as one JSON object."""
    lab: CollapseConfig = field(default=CollapseConfig(), metadata=nested())
    """The lab's sizes."""


def quick_job() -> CollapseJob:
    """What `--quick` starts from."""
    return CollapseJob(quick=True, lab=QUICK)


def run_collapse_lab(job: CollapseJob) -> None:
    """`lilliput collapse`: run the lab, write collapse.json and collapse.png, print the headline figures."""
    out = Path(job.out)
    result = run_collapse(job.lab, out, device=job.device)
    path = write_json(out / "collapse.json", run_record("lilliput collapse", **result))
    png = plot_collapse(result, out / "collapse.png")
    growth_of = {f"{rule}.{k}": v for rule in ("equal_compute", "equal_passes")
                 for k, v in (result.get(rule) or {}).items() if k.endswith("_ppl_growth")}
    if job.json:
        print(json.dumps(growth_of))
    else:
        for k, v in growth_of.items():
            print(f"{k}: {v:.3f}")
        print(f"-> {path}, {png}, ledgers under {out / 'ledgers'}")
