"""Associative recall against state size (Zoology's MQAR at CPU scale): attention, Mamba, xLSTM (mLSTM)
and a hybrid (Mamba, then attention), each trained at widths 16, 32, 64 on multi-query associative
recall with a vocabulary of 1024 and 8, 16, 32, 64 key-value pairs (sequences of 4 x pairs tokens),
3 seeds, after a learning-rate sweep per architecture. The lab is `lilliput.train.recall_lab` (its
docstring says how the models are built and trained); this script runs it and writes
bench/results/recall.json whole, with recall.png beside it (accuracy against decode-state bytes, a
line per architecture, a panel per pair count).

What it shows: at equal training, which architectures can still look a key's value up as the pairs
outgrow their state (Zoology: attention recalls at every width, fixed-state models lose as pairs grow,
a hybrid's attention layer recovers it). What it does not show: what more training, other widths or
other layer counts would give (a model that needs 10x the steps reads here as one that cannot), nor
quality on text (bench/arena.py). In the probe that sized it, every model with a Mamba layer (the
hybrid too) stayed at chance at every swept lr: such a line says "did not learn in this budget".

Fields: `archs.<arch>.lr` (the swept lr kept) and `archs.<arch>.by_width.<width>`: `parameters`,
`state_bytes_at_seq_len` (fp32 bytes of one sequence's decode state at 4 x pairs tokens, per pair
count), `accuracy.<pairs>` (mean, std, min, max, values over seeds; ci_low, ci_high: 95% bootstrap
interval over the test sequences of the seed mean). `attention_worst_accuracy`: attention's lowest
mean accuracy over the pair counts at the widest width (the training budget was chosen so that it
is >= 0.9); `accuracy_at_most_pairs`: each architecture at the widest width and the most pairs;
`lr_sweep`, `runs`: every run; `estimate` (printed first), `seconds`; `what_was_run`, `what_it_shows`.

    .venv/bin/python bench/recall.py            # the full run (~30 min on 2 cores, 2 workers; printed first)
    .venv/bin/python bench/recall.py --quick    # smoke (seconds)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lilliput.core.options import add_config_args, config_from_args
from lilliput.core.record import run_record, write_json
from lilliput.train.recall_lab import RecallLabConfig, quick_config, recall_lab

OUT = Path(__file__).parent / "results" / "recall.json"


def log(message: str) -> None:
    print(f"[recall] {message}", file=sys.stderr, flush=True)


def plot(result: dict, path: Path) -> Path | None:
    """Accuracy against decode-state bytes: a panel per pair count, a line per architecture (a point per
    width, bars from the lowest to the highest seed)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [str(p) for p in sorted(result["config"]["pairs"])]
    fig, axes = plt.subplots(1, len(pairs), figsize=(3.6 * len(pairs), 3.6), sharey=True, squeeze=False)
    for ax, n in zip(axes[0], pairs):
        for arch, r in result["archs"].items():
            ws = sorted(r["by_width"], key=int)
            x = [r["by_width"][w]["state_bytes_at_seq_len"][n] for w in ws]
            acc = [r["by_width"][w]["accuracy"][n] for w in ws]
            y = [a["mean"] for a in acc]
            ax.errorbar(x, y, yerr=[[m - a["min"] for m, a in zip(y, acc)], [a["max"] - m for m, a in zip(y, acc)]],
                        marker="o", capsize=3, label=f"{arch} (lr {r['lr']:g})")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("decode state, bytes (fp32)")
        ax.set_title(f"{n} pairs, {4 * int(n)} tokens")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("recall accuracy")
    axes[0][-1].legend(fontsize=7)
    widths = ", ".join(str(w) for w in result["config"]["widths"])
    fig.suptitle(f"MQAR, vocabulary {result['config']['vocab_size']}, widths {widths}, "
                 f"{result['config']['seeds']} seeds (bars: min..max)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap, RecallLabConfig)
    ap.add_argument("--out", default=str(OUT), help="the JSON file (recall.png goes beside it)")
    args = ap.parse_args(argv)
    cfg = config_from_args(RecallLabConfig, args, base=quick_config() if args.quick else None)
    result = recall_lab(cfg, log=log)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = plot(result, out.with_suffix(".png"))
    result["plots"] = [png.name] if png else []
    write_json(out, run_record("bench/recall.py " + " ".join(argv), **result))
    log(f"attention's worst accuracy at width {result['widest']}: {result['attention_worst_accuracy']:.3f}; at "
        f"{max(cfg.pairs)} pairs: " + ", ".join(f"{a} {v:.3f}" for a, v in result["accuracy_at_most_pairs"].items())
        + f" -> {out} ({result['seconds'] / 60:.1f} min; estimated {result['estimate']['minutes']:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
