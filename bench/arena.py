"""The arena: dense attention (+SwiGLU), MoE (matched total and matched active parameters), Mamba-2,
xLSTM (mLSTM) and a hybrid (attention every 4th layer, Mamba elsewhere), trained at equal budget
and measured side by side. The same job as `lilliput arena` (lilliput/jobs/arena.py), written to
bench/results/arena.json with the plots arena_decode.png, arena_ppl.png, arena_recall.png beside it.

Fields (per architecture under `archs`):

- `parameters`, `active_parameters`: eval.efficiency counts (presets `*-arena` in core/config.py);
- `heldout_perplexity`, `heldout_bits_per_byte`: LAMBADA passages, per byte, windows of the training
  length; mean, std, min, max and values over the seeds;
- `train_tokens_per_s`: training throughput (same spread); `final_train_ce`: last step's loss;
- `decode_ms`: ms per decode step of `decode_batch` rows (one new token each) whose state holds C
  tokens of context, for each C; all architectures on the same torch path (model forward over a
  DecodeState, the engine's path for non-Llama mixers); `decode_growth`: longest context / shortest;
- `decode_state_bytes`: fp32 bytes per sequence (`per_token`, `per_sequence`, `by_context`).

Top level: `archs_trained`; `ssm_decode_growth` (Mamba's decode_growth, expected <= 1.3: a fixed-size
state) and `attention_decode_growth` (dense attention's, expected > 1.3: it reads every cached key);
`recall` (multi-query associative recall accuracy against width, train/recall.py); `what_was_run`;
`estimate_seconds` (printed up front) and `seconds` (what it took); `quick` (a smoke run: its figures
show that the stages work, not which architecture wins).

    .venv/bin/python bench/arena.py                  # the full run (~30 min on 2 quiet cores)
    .venv/bin/python bench/arena.py --quick          # smoke (well under a minute)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lilliput.core.options import add_config_args, config_from_args
from lilliput.jobs.arena import ArenaJob, quick_job, run_arena

OUT = Path(__file__).parent / "results" / "arena.json"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap, ArenaJob, skip=("out",))
    ap.add_argument("--out", default=str(OUT), help="the JSON file (plots go beside it)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    job = config_from_args(ArenaJob, args, base=quick_job() if args.quick else None, out=str(out.parent))
    run_arena(job, command="bench/arena.py " + " ".join(argv), json_name=out.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
