"""`lilliput finetune`: LoRA / QLoRA adapters on a base model (lilliput/jobs/finetune.py)."""

from __future__ import annotations

import dataclasses
import json

from lilliput.core.options import add_config_args, config_from_args, field_docs

BUDGET = {"steps": "max_steps", "minutes": "max_minutes", "tokens": "max_tokens"}
"""Short flags for the training budget (the TrainConfig field each sets)."""


def _lora_config(ns):
    from lilliput.train.lora import LoRAConfig

    given = {f.name: getattr(ns, "lora_" + f.name) for f in dataclasses.fields(LoRAConfig)
             if getattr(ns, "lora_" + f.name, None) is not None}
    return LoRAConfig(**given)


def cmd_finetune(ns) -> int:
    from lilliput.jobs.finetune import FinetuneJob, run_finetune
    from lilliput.train.loop import TrainConfig

    default = FinetuneJob.__dataclass_fields__["train"].default  # the job's budget unless flags change it
    budget = {field: getattr(ns, field) for field in BUDGET.values() if getattr(ns, field) is not None}
    if budget:  # a budget given replaces the job's default one
        default = dataclasses.replace(default, **{**dict.fromkeys(BUDGET.values()), **budget})
    train = config_from_args(TrainConfig, ns, base=default)
    out = run_finetune(config_from_args(FinetuneJob, ns, lora=_lora_config(ns), train=train))
    run = json.loads((out / "run.json").read_text())
    ppl = run["heldout_perplexity"]
    print(f"{run['trainable_params']:,} adapter parameters, {run['train']['steps']} steps, "
          f"{run['train']['tokens']:,} tokens" + (f"; held-out perplexity {ppl['before']:.2f} -> {ppl['after']:.2f}"
                                                 if ppl["before"] else ""))
    if "merge" in run:
        m = run["merge"]
        print(f"merged {m['layers']} layers into {out / 'merged'}" + (
            f" (re-quantized: max |error| {m['max_abs_error']:.3g}, {m['relative_error']:.1%} of the update lost "
            "to rounding; --merge-dequantize keeps it exact)" if m["max_abs_error"] else ""))
    print(f"saved {out}")
    return 0


def add_finetune_parsers(sub) -> None:
    from lilliput.jobs.finetune import FinetuneJob
    from lilliput.train.lora import LoRAConfig
    from lilliput.train.loop import TrainConfig

    p = sub.add_parser("finetune", help="train LoRA adapters (QLoRA on a quantized base) on chat or text data")
    add_config_args(p, FinetuneJob, skip=("lora", "train"))
    docs = field_docs(LoRAConfig)
    for f in dataclasses.fields(LoRAConfig):  # --lora-rank, --lora-alpha, ...: LoRAConfig's defaults
        many = f.name == "targets"
        p.add_argument("--lora-" + f.name, dest="lora_" + f.name, default=None, metavar="A,B" if many else None,
                       type=(lambda s: tuple(x for x in s.split(",") if x)) if many else type(f.default),
                       help=f"{docs.get(f.name, '')} (default: {','.join(f.default) if many else f.default})")
    tdocs, steps = field_docs(TrainConfig), FinetuneJob.__dataclass_fields__["train"].default.max_steps
    for flag, field in BUDGET.items():
        p.add_argument("--" + flag, dest=field, default=None, type=float if flag == "minutes" else int,
                       help=f"{tdocs[field]} (default: {steps} steps; one of these replaces it)")
    add_config_args(p, TrainConfig, skip=("out", *BUDGET.values()))
    p.set_defaults(func=cmd_finetune)
