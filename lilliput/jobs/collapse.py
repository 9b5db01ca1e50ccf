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
    """Perplexity and tail coverage vs generation, one line and min-max band per policy; a row per sampling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpt, ngram = result["gpt"]["curves"], result["ngram"]["curves"]
    rows = list(gpt)
    panels = [("perplexity", gpt, "GPT: held-out perplexity"), ("tail_coverage", gpt, "GPT: tail coverage"),
              ("perplexity", ngram, "bigram: held-out perplexity"), ("tail_coverage", ngram, "bigram: tail coverage")]
    fig, axes = plt.subplots(len(rows), len(panels), figsize=(4.2 * len(panels), 3.4 * len(rows)), squeeze=False)
    colors = {"replace": "tab:red", "accumulate": "tab:blue", "fraction": "tab:green"}
    for r, s in enumerate(rows):
        for c, (metric, data, title) in enumerate(panels):
            ax = axes[r][c]
            for p, curve in data[s].items():
                x, m = curve["generation"], curve[metric]
                ax.plot(x, m["mean"], marker="o", color=colors.get(p), label=p)
                ax.fill_between(x, m["min"], m["max"], color=colors.get(p), alpha=0.15)
            ax.set_title(f"{title} ({s})", fontsize=9)
            ax.set_xlabel("generation")
            ax.set_xticks(x)
            ax.grid(alpha=0.3)
            if r == 0 and c == 0:
                ax.legend(fontsize=8)
    fig.suptitle("Model collapse: replace vs accumulate (mean over seeds, band = min-max)")
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
    growth_of = {k: v for k, v in result.items() if k.endswith("_ppl_growth")}
    if job.json:
        print(json.dumps(growth_of))
    else:
        for k, v in growth_of.items():
            print(f"{k}: {v:.3f}")
        print(f"-> {path}, {png}, ledgers under {out / 'ledgers'}")
