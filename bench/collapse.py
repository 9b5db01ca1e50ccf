"""The model-collapse lab at equal compute: generations trained on their predecessors' text, replace vs accumulate.

Generation 0 trains on human text; generation g+1 on text written by generation g, chosen from a
provenance ledger by policy: replace (the latest generation only) or accumulate (all human and all
synthetic text so far). Three scales (lilliput/train/collapse_toys.py, collapse_gpt.py, driven by
collapse_study.py): a Gaussian refitted to its samples, a word bigram model, and small GPTs
(~125k parameters; a byte-level BPE of 1,024 tokens learnt from the human set) trained from
scratch on a human set of 8,000 pieces of 256 bytes (2.05 MB) of the fetched corpus, writing
through the engine by pure sampling, 5 generations, 3 seeds. Every generation but the last writes
as many tokens as the human set holds. Two budget rules, side by side:

- equal_compute (`tokens`, Kazdan et al. 2024's accumulate-subsample): every generation trains on
  the same tokens as generation 0, whatever its training set;
- equal_passes (`epochs`, Gerstgrasser et al. 2024): every generation makes as many passes over its
  training set as generation 0 made over the human set (accumulate's generation g trains g+1 times
  as long).

Replace trains on a set the size of the human one, so both rules give it the same tokens: it runs
once and stands under both. A seed's generation 0 (its model and the documents it writes) is shared
by every chain of the seed.

What it shows: held-out perplexity growth (last generation / generation 0 of each seed; mean, std,
min, max and the per-seed values), and per generation the tails of what each generation writes:
coverage of the held-out text's rare words and word pairs, distinct-1/2/3, unigram entropy and KL.
What it does not show: anything about large models or web-scale data; a converged generation 0
unless `gpt.generation0.control` says so: that control trains seed 0's generation 0 for twice the
tokens, and where it still lowers held-out perplexity, generation 0 is short of convergence and the
equal-passes rule's longer training of accumulate buys compute as well as data. Top-p sampling and
the fixed-fraction policy are left out of the full run for time (--samplings pure,top_p,
--policies replace,accumulate,fraction run them). The JSON's `shows` and `does_not_show` say the same.

Written to bench/results/collapse.json (and collapse.png beside it):

- `equal_compute`, `equal_passes`: per policy `<policy>_ppl_growth` (the mean over seeds of each
  seed's ratio), `ppl_growth[policy]` (mean, std, median, p90, min, max, n, runs), mean perplexity
  per generation, `<measure>_ratio[policy]` for the text measures (last / generation 0), each
  generation's train tokens, and which chains the rules share;
- `replace_ppl_growth`, `accumulate_ppl_growth`: equal_compute's (`headline_budget`, `headline_sampling`);
  `ppl_growth`, `tail_coverage_ratio`: the same per sampling and policy;
- `gpt.curves[budget][sampling][policy][metric]`: per generation mean, std, min, max over seeds and the
  runs, for perplexity, tail_coverage, tail_coverage_2, distinct_1/2/3, unigram_entropy (bits),
  unigram_kl (bits) and human_share; `gpt.generation0`: generation 0's held-out curve (every seed)
  and the control; `gpt.tokenizer`, `gpt.human`, `gpt.train_tokens`, `gpt.task_seconds`;
- `ngram`: the same for a word bigram model; `gaussian[policy]`: fitted variance per generation;
- `watermark`: generation 0 writes watermarked documents, mixed with as many human pieces into a
  scraped set; the detector routes each into a ledger; true/false positives, TPR, FPR, mean z;
- `estimate` (measured up front), `work` (models, tokens trained and written), `seconds`, `config`.

The estimate times a few training steps, an engine batch and a perplexity pass on one thread here,
and lays the tasks out on the two worker processes as they will run: it assumes a free core per
worker.

    .venv/bin/python bench/collapse.py            # the full run: 2 workers, about 45 minutes on 2 free cores
    .venv/bin/python bench/collapse.py --quick    # seconds: tiny models, the shipped sample, one process

The full run needs the fetched corpus (`lilliput data fetch`; the shipped sample is too small).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from lilliput.core.options import add_config_args, config_from_args
from lilliput.core.record import run_record, write_json
from lilliput.jobs.collapse import CollapseJob, plot_collapse
from lilliput.train.collapse_gpt import QUICK, CollapseConfig
from lilliput.train.collapse_study import run_collapse

OUT = Path(__file__).parent / "results" / "collapse.json"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny models on the shipped sample (seconds)")
    ap.add_argument("--ledgers", default=None, help="keep the ledgers in this folder (default: a temporary one)")
    ap.add_argument("--device", default=CollapseJob.device)
    ap.add_argument("--out", default=str(OUT))
    add_config_args(ap, CollapseConfig)
    args = ap.parse_args(argv)
    base = QUICK if args.quick else CollapseConfig()
    cfg = config_from_args(CollapseConfig, args, base=base)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            result = run_collapse(cfg, Path(args.ledgers or tmp), device=args.device)
        except ValueError as e:  # a corpus too small for the sizes asked for: one line with the fix
            raise SystemExit(f"error: {e}") from None
    out = write_json(args.out, run_record("bench/collapse.py " + " ".join(argv), **result))
    png = plot_collapse(result, Path(args.out).with_suffix(".png"))
    for key in ("equal_compute", "equal_passes"):
        if result.get(key):
            print(f"{key}: " + ", ".join(f"{p}_ppl_growth {g['mean']:.3f} (std {g['std']:.3f})"
                                         for p, g in result[key]["ppl_growth"].items()))
    print(f"-> {out}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
