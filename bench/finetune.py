"""LoRA and QLoRA on SmolLM2: does a bounded fine-tune learn a domain without forgetting the rest?

The domain is one source of the default corpus (`--source`, the State of the Union addresses by
default; the fetched corpus, else the shipped sample): its documents sorted by id, every
`--holdout-every`-th one held out whole for evaluation (an excerpt of each, `--eval-tokens` in all,
so every era is scored), the others are the training text. LoRA adapters (rank `--rank` on every
block's wqkv, wo, w_gate_up, w_down) train for `--minutes` (constant learning rate after warmup)
on chunks of `--seq-len` tokens, first on SmolLM2-135M-Instruct in float32, then the same on its
int8 RTN quantization (QLoRA: the base stays int8 and frozen).

Written to bench/results/finetune.json:

- `domain_ppl_ratio`: held-out domain perplexity after / before, fp32 LoRA (target <= 0.8);
- `general_ppl_ratio`: held-out LAMBADA perplexity after / before (eval.perplexity HELDOUT,
  `--passages`), fp32 LoRA: what the fine-tune forgot (target <= 1.05);
- `lora`: both perplexities before and after, trainable parameters (and their share of the
  model's), steps, tokens, tokens/s and minutes of training;
- `qlora_int8`: the same on the int8 base (before = the int8 base), plus `base_bytes_unchanged`
  (the int8 codes and scales are bit-identical after training), `merge` (re-quantizing W + BA
  into int8: max |error| and the share of the update lost to rounding, see train.lora.merge_lora_)
  and `merged_domain_ppl` (the merged int8 model on the domain set);
- `data`: documents held out and trained on, training tokens available.

    .venv/bin/python bench/finetune.py            # the full run (~12-14 minutes on 2 quiet cores)
    .venv/bin/python bench/finetune.py --quick    # smoke: a few steps, little evaluation
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import random
import sys
import time
from pathlib import Path

import torch

from lilliput.compress.quantize import RTNConfig, quantize_
from lilliput.core.checkpoint import load_model
from lilliput.core.record import run_record, write_json
from lilliput.eval.efficiency import parameter_count
from lilliput.eval.perplexity import HELDOUT, PerplexityConfig, heldout_perplexity, perplexity
from lilliput.train.data import default_documents
from lilliput.train.examples import ExampleBatches, text_example
from lilliput.train.lora import LoRAConfig, add_lora_, merge_lora_, trainable_parameters
from lilliput.train.loop import LanguageModeling, TrainConfig, Trainer

OUT = Path(__file__).parent / "results" / "finetune.json"


def domain_split(source: str, every: int) -> tuple[list, list]:
    """(held-out, training) documents of one source: every `every`-th by id is held out whole."""
    docs = sorted((d for d in default_documents() if d.source == source), key=lambda d: d.id)
    if len(docs) < 2:
        raise SystemExit(f"source {source!r} has {len(docs)} documents: run `lilliput data fetch` or pick another")
    every = min(every, len(docs))
    held = [d for i, d in enumerate(docs) if i % every == every // 2]
    return held, [d for d in docs if d not in held]


def domain_text(held: list, tokens: int) -> str:
    """An opening excerpt of every held-out document, ~tokens/len(held) tokens each (4 chars a token)."""
    chars = max(400, 4 * tokens // len(held))
    return "\n\n".join(d.text[:chars] for d in held)


def buffer_digest(model) -> str:
    h = hashlib.sha256()
    for name, b in sorted(model.named_buffers()):
        h.update(name.replace(".base.", ".").encode() + b.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run_variant(args, model, tok, batches, text: str, bits: int | None) -> dict:
    """Perplexities before, LoRA training, perplexities after (and the int8 merge)."""
    pcfg = PerplexityConfig(window=512, batch_size=4, max_tokens=args.eval_tokens)
    general = dataclasses.replace(HELDOUT, passages=args.passages)

    def ppls() -> tuple[float, float]:
        return perplexity(model, tok, text, pcfg)["perplexity"], heldout_perplexity(model, tok, general)

    digest = buffer_digest(model) if bits else None
    d0, g0 = ppls()
    torch.manual_seed(args.seed)
    add_lora_(model, LoRAConfig(rank=args.rank, alpha=2.0 * args.rank))
    cfg = TrainConfig(lr=args.lr, weight_decay=0.0, warmup_steps=args.warmup, max_minutes=args.minutes,
                      max_steps=args.steps, min_lr_ratio=args.min_lr_ratio, seed=args.seed, progress=args.progress)
    summary = Trainer(LanguageModeling(model), batches, cfg).fit()
    model.eval()
    d1, g1 = ppls()
    result = {"domain_ppl_before": d0, "domain_ppl_after": d1, "domain_ppl_ratio": d1 / d0,
              "general_ppl_before": g0, "general_ppl_after": g1, "general_ppl_ratio": g1 / g0,
              "trainable_params": trainable_parameters(model),
              "trainable_share": trainable_parameters(model) / parameter_count(model),
              "steps": summary["steps"], "tokens": summary["tokens"], "tokens_per_second": summary["tokens_per_second"],
              "minutes": round(summary["seconds"] / 60, 2), "final_loss": summary["final"].get("loss")}
    if bits:
        result["base_bytes_unchanged"] = buffer_digest(model) == digest
        merge_lora_(model)
        result["merge"] = model.lora_merge
        result["merged_domain_ppl"] = perplexity(model, tok, text, pcfg)["perplexity"]
    print(f"[{'int8 ' if bits else 'fp32 '}] domain {d0:.2f} -> {d1:.2f}, general {g0:.2f} -> {g1:.2f}, "
          f"{summary['steps']} steps, {summary['tokens_per_second']} tok/s", file=sys.stderr, flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default="sotu", help="the domain: a source of the default corpus (sotu, bible, ...)")
    ap.add_argument("--holdout-every", type=int, default=10, help="hold out every N-th document of the domain")
    ap.add_argument("--eval-tokens", type=int, default=8192, help="held-out domain tokens scored")
    ap.add_argument("--passages", type=int, default=HELDOUT.passages, help="LAMBADA passages (general held-out text)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 * rank)")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (constant after warmup; 3e-3 beat 1e-3 in a 3-minute trial)")
    ap.add_argument("--warmup", type=int, default=5, help="warmup steps")
    ap.add_argument("--min-lr-ratio", type=float, default=1.0,
                    help="cosine decay to lr x this over --steps (1.0: constant after warmup)")
    ap.add_argument("--minutes", type=float, default=4.5, help="training time per variant")
    ap.add_argument("--steps", type=int, default=None, help="also stop after this many steps")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per training chunk")
    ap.add_argument("--batch-size", type=int, default=4, help="chunks per step")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-qlora", dest="qlora", action="store_false", help="skip the int8 (QLoRA) run")
    ap.add_argument("--progress", action="store_true", help="show the training progress bar")
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 steps, 512 eval tokens, 3 passages")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.minutes, args.eval_tokens, args.passages = 3, 1.0, 512, 3
        args.seq_len, args.batch_size = 64, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    held, train = domain_split(args.source, args.holdout_every)
    model, tok = load_model(None, device="cpu", dtype=torch.float32)
    text = domain_text(held, args.eval_tokens)
    # tokenize only what training can use (at most 2,000 tokens/s when bounded by time), from documents
    # of every era: the training documents in a seeded shuffle
    need = 2 * args.batch_size * (args.seq_len + 1) * args.steps if args.steps else int(args.minutes * 60 * 2000)
    random.Random(args.seed).shuffle(train)
    examples, n = [], 0
    for d in train:
        if n >= need:
            break
        examples.append(text_example(tok, d.text))
        n += len(examples[-1].ids)
    batches = ExampleBatches(examples, args.batch_size, args.seq_len, seed=args.seed, pad_id=tok.pad_id or 0)
    data = {"source": args.source, "held_out_documents": [d.id for d in held], "train_documents": len(examples),
            "train_tokens_available": n, "domain_eval_tokens": args.eval_tokens}
    fields = {"lora": run_variant(args, model, tok, batches, text, None)}
    del model
    if args.qlora:
        model, tok = load_model(None, device="cpu", dtype=torch.float32)
        quantize_(model, RTNConfig(bits=8))
        fields["qlora_int8"] = run_variant(args, model, tok, batches, text, 8)
    lora = fields["lora"]
    write_json(args.out, run_record("bench/finetune.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                                    domain_ppl_ratio=lora["domain_ppl_ratio"], general_ppl_ratio=lora["general_ppl_ratio"],
                                    **fields, data=data, config={k: v for k, v in vars(args).items() if k != "out"},
                                    total_minutes=round((time.perf_counter() - t0) / 60, 2)))
    plot(fields, Path(args.out).with_suffix(".png"))
    print(f"wrote {args.out}")
    return 0


def plot(fields: dict, path: Path) -> None:
    """Held-out perplexity before and after, domain and general text, per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k in ("lora", "qlora_int8") if k in fields]
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.2))
    for ax, part, title in zip(axes, ("domain", "general"), ("held-out domain text", "general text (LAMBADA)")):
        xs = range(len(names))
        before = [fields[n][f"{part}_ppl_before"] for n in names]
        after = [fields[n][f"{part}_ppl_after"] for n in names]
        ax.bar([x - 0.2 for x in xs], before, 0.4, label="before", color="0.7")
        ax.bar([x + 0.2 for x in xs], after, 0.4, label="after LoRA", color="C0")
        for x, b, a in zip(xs, before, after):
            ax.text(x + 0.2, a, f"x{a / b:.3f}", ha="center", va="bottom", fontsize=8)
        ax.set(xticks=list(xs), xticklabels=[{"lora": "LoRA fp32", "qlora_int8": "QLoRA int8"}[n] for n in names],
               ylabel="perplexity", title=title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
