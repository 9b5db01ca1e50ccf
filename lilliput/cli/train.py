"""`lilliput train`: a small model from scratch in one command."""

from __future__ import annotations

import json

from lilliput.core.options import add_config_args, config_from_args

BUDGETS = (("--minutes", "--max-minutes", "max_minutes", float, "M", "stop after M minutes of training"),
           ("--tokens", "--max-tokens", "max_tokens", int, "N", "stop after N tokens (all ranks)"),
           ("--steps", "--max-steps", "max_steps", int, "S", "stop after S optimizer steps"))


def cmd_train(ns) -> int:
    from lilliput.jobs.train import TrainJob, run_train
    from lilliput.train.loop import TrainConfig

    if all(getattr(ns, dest) is None for _, _, dest, *_ in BUDGETS):
        raise ValueError("give a budget: --minutes M, --tokens N or --steps S")
    job = config_from_args(TrainJob, ns, config=config_from_args(TrainConfig, ns, out=ns.out))
    out = run_train(job)
    run = json.loads((out / "run.json").read_text())
    print(json.dumps({"out": str(out), "params": run["params"], "steps": run["train"]["steps"],
                      "tokens": run["train"]["tokens"], "tokens_per_second": run["train"]["tokens_per_second"],
                      "train_loss": run["train"]["final"].get("ce"), "val_loss": run["val_loss"]}))
    return 0


def add_train_parsers(sub) -> None:
    from lilliput.jobs.train import TrainJob, scratch_presets
    from lilliput.train.loop import TrainConfig

    p = sub.add_parser("train", help="train a small model from scratch",
                       description="Train a small model from scratch on a text file, a folder or the default "
                                   f"corpus. Presets: {', '.join(scratch_presets())}.")
    add_config_args(p, TrainJob)
    for short, long, dest, type_, metavar, help_ in BUDGETS:
        p.add_argument(short, long, dest=dest, type=type_, metavar=metavar, help=help_)
    add_config_args(p, TrainConfig, skip=("out", "max_minutes", "max_tokens", "max_steps"))
    p.set_defaults(func=cmd_train)
