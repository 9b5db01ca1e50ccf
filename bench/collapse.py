"""The model-collapse lab: generations trained on their predecessors' text, replace vs accumulate.

Generation 0 trains on human text; generation g+1 on text written by generation g, chosen from
a provenance ledger by policy: replace (the latest generation only), accumulate (all human and
all synthetic so far), fraction (half human, half synthetic from every generation). Written by
pure sampling (temperature 1) and by top-p 0.9; each (policy, sampling) over several seeds.
Three scales (lilliput/train/collapse_toys.py, collapse_gpt.py): a Gaussian refitted to its samples,
a word bigram model, and byte-level GPTs of ~1M parameters trained from scratch on pieces of the
default corpus, sampled through the engine. By default (`--budget epochs`, Gerstgrasser et al. 2024)
every generation makes as many passes over its training set as generation 0 made over the human
set, so accumulate's generation g trains (g+1) x `train_tokens`; `--budget tokens` trains every
generation for `train_tokens` (Kazdan et al. 2024's accumulate-subsample).

Written to bench/results/collapse.json (and collapse.png beside it):

- `replace_ppl_growth`, `accumulate_ppl_growth`, `fraction_ppl_growth`: GPT held-out perplexity of
  the last generation / of generation 0, means over seeds, pure sampling (`headline_sampling`);
- `ppl_growth`, `tail_coverage_ratio`: the same ratios (and last / first tail coverage) per
  sampling and policy;
- `gpt.curves[sampling][policy][metric]`: per generation mean, std, min, max over seeds and the
  runs themselves, for perplexity (held-out human pieces), tail_coverage (share of the held-out
  text's rarer half of distinct words that the generation's text uses), distinct_1/2/3, unigram
  entropy (bits), unigram_kl (KL(held-out || generated) words, bits) and human_share (of the
  training documents); `gpt.parameters`, `gpt.model`; `gpt.budget` and `gpt.train_tokens[sampling][policy]`
  (each generation's token budget, from the documents the ledger selected);
- `ngram`: the same for a word bigram model (samples from its counts, perplexity with smoothing);
- `gaussian[policy]`: fitted variance per generation (mean, median, min, max over 20 seeds);
- `watermark`: generation 0 writes watermarked documents, mixed with as many human pieces into
  a scraped set; the detector routes each into a ledger; true/false positives, TPR, FPR, mean z,
  and how many synthetic documents remain in the ledger's human selection;
- `estimate` (measured up front), `work` (models, tokens trained in all and per generation,
  documents written), `seconds`, `config`.

    .venv/bin/python bench/collapse.py --threads 1    # the full run (~80 minutes on one core)
    .venv/bin/python bench/collapse.py --quick        # seconds: tiny models, the shipped sample
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
    base = QUICK if args.quick else CollapseConfig(threads=2)
    cfg = config_from_args(CollapseConfig, args, base=base)
    with tempfile.TemporaryDirectory() as tmp:
        result = run_collapse(cfg, Path(args.ledgers or tmp), device=args.device)
    out = write_json(args.out, run_record("bench/collapse.py " + " ".join(argv), **result))
    png = plot_collapse(result, Path(args.out).with_suffix(".png"))
    print(f"replace_ppl_growth {result.get('replace_ppl_growth', float('nan')):.3f}, accumulate_ppl_growth "
          f"{result.get('accumulate_ppl_growth', float('nan')):.3f} -> {out}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
