"""`lilliput finetune`: load a base (quantize it for QLoRA), add LoRA adapters (train.lora), train
them on chat or text examples (train.examples) with the Trainer, measure, save the adapters (and a
merged checkpoint with `merge`)."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lilliput.core.checkpoint import load_model, save_checkpoint
from lilliput.core.options import nested
from lilliput.core.record import run_record, write_json
from lilliput.eval.bench import model_label
from lilliput.eval.perplexity import HELDOUT, heldout_perplexity
from lilliput.jobs.train import BUDGET_FLAGS
from lilliput.train.examples import ExampleBatches, make_examples, read_records
from lilliput.train.lora import LoRAConfig, add_lora_, base_fingerprint, merge_lora_, save_adapters, trainable_parameters
from lilliput.train.loop import BUDGET, LanguageModeling, TrainConfig, Trainer

MERGED = "merged"


@dataclass(frozen=True)
class FinetuneJob:
    """`lilliput finetune`: data, base model, output; the adapters in `lora`, training in `train`."""

    data: str
    """JSON lines ({"messages": [{"role", "content"}, ...]} or {"text": ...}), a .txt file, or a folder of them."""
    out: str
    """Output folder: adapter_model.safetensors, adapter_config.json, run.json (and merged/ with merge)."""
    model: str | None = None
    """A .gguf file, a model folder (e.g. from `lilliput quantize`: QLoRA) or a hub id; the embedded SmolLM2-135M-Instruct when omitted."""
    lora: LoRAConfig = field(default=LoRAConfig(), metadata=nested(prefix="lora_"))
    """The adapters (--lora-rank, --lora-alpha, ...)."""
    train: TrainConfig = field(default=TrainConfig(max_steps=100), metadata=nested(
        skip=("out",), names=BUDGET_FLAGS, one_of=BUDGET))
    """How to train (TrainConfig's defaults, 100 steps: a budget given replaces them; its out is not used:
    the adapters, not the trainer state, are what is kept)."""
    bits: int | None = None
    """Quantize the base to int8 or int4 (RTN, groups of 32) before adding the adapters: QLoRA; None keeps the
    loaded model as it is."""
    seq_len: int = 256
    """Most tokens per training chunk (longer examples are cut)."""
    batch_size: int = 8
    """Chunks per micro-batch."""
    merge: bool = False
    """Also write a merged checkpoint to out/merged (loadable by `lilliput generate --model`)."""
    merge_dequantize: bool = False
    """Merging into a quantized base: dequantize it to float (exact) instead of re-quantizing (rounds; the error is reported)."""
    eval_passages: int | None = HELDOUT.passages
    """LAMBADA passages for held-out perplexity before and after (None skips it)."""
    device: str | None = None
    """cpu or cuda; CUDA when available when omitted."""

    def __post_init__(self):
        if self.bits not in (None, 4, 8):
            raise ValueError(f"bits must be 4 or 8 (or omitted), got {self.bits}")


def run_finetune(job: FinetuneJob) -> Path:
    """Run the job; returns the output folder."""
    records = read_records(job.data)  # bad data fails before the model loads
    out = Path(job.out)
    model, tok = load_model(job.model, device=job.device, dtype=torch.float32)
    label = model_label(job.model)
    if job.bits:
        from lilliput.compress.quantize import RTNConfig, quantize_

        quantize_(model, RTNConfig(bits=job.bits, group_size=32))
        label += f" + int{job.bits} RTN"
    batches = ExampleBatches(make_examples(tok, records), job.batch_size, min(job.seq_len, model.config.max_seq_len),
                             seed=job.train.seed, pad_id=tok.pad_id or 0)
    heldout = dataclasses.replace(HELDOUT, passages=job.eval_passages) if job.eval_passages else None

    def ppl() -> float | None:
        return heldout_perplexity(model, tok, heldout) if heldout else None

    base = base_fingerprint(model)
    before = ppl()
    torch.manual_seed(job.train.seed)
    add_lora_(model, job.lora)
    trainer = Trainer(LanguageModeling(model), batches, dataclasses.replace(job.train, out=None))
    summary = trainer.fit()
    model.eval()
    after = ppl()
    record = {"label": f"{label} + LoRA r{job.lora.rank}", "job": dataclasses.asdict(job), "base_model": base,
              "examples": len(records), "chunks": len(batches.chunks), "trainable_params": trainable_parameters(model),
              "train": summary, "heldout_perplexity": {"before": before, "after": after},
              "heldout": dataclasses.asdict(heldout) if heldout else None}
    save_adapters(model, out, base=base, extra={"base_label": label})
    if job.merge:
        t0 = time.perf_counter()
        merge_lora_(model, dequantize=job.merge_dequantize)
        record["merge"] = {**model.lora_merge, "seconds": round(time.perf_counter() - t0, 3)}
        save_checkpoint(model, tok, out / MERGED, run_record("lilliput finetune --merge", **record))
    write_json(out / "run.json", run_record("lilliput finetune", **record))
    return out


def summary(out: Path) -> str:
    """Lines for the terminal, from the run's run.json: adapters, budget, held-out perplexity, the merge."""
    run = json.loads((out / "run.json").read_text())
    ppl = run["heldout_perplexity"]
    lines = [f"{run['trainable_params']:,} adapter parameters, {run['train']['steps']} steps, "
             f"{run['train']['tokens']:,} tokens" + (f"; held-out perplexity {ppl['before']:.2f} -> {ppl['after']:.2f}"
                                                    if ppl["before"] else "")]
    if "merge" in run:
        m = run["merge"]
        lines.append(f"merged {m['layers']} layers into {out / MERGED}" + (
            f" (re-quantized: max |error| {m['max_abs_error']:.3g}, {m['relative_error']:.1%} of the update lost "
            "to rounding; --merge-dequantize keeps it exact)" if m["max_abs_error"] else ""))
    return "\n".join(lines + [f"saved {out}"])
