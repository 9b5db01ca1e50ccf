"""`lilliput train`: a small model from scratch: tokenize the data once into shards, build a preset
with the tokenizer's vocabulary, train (held-out loss every eval_every steps), save a checkpoint
that `lilliput generate --model OUT` and `lilliput eval ppl --model OUT` load."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lilliput.core.checkpoint import embedded_model_path, save_checkpoint
from lilliput.core.config import PRESETS, preset
from lilliput.core.device import pick_device
from lilliput.core.model import GPT
from lilliput.core.options import nested
from lilliput.core.record import run_record
from lilliput.core.tokenizer import ByteTokenizer, Tokenizer
from lilliput.eval.efficiency import parameter_count
from lilliput.train.data import VAL_FRACTION
from lilliput.train.loop import BUDGET, LanguageModeling, Trainer, TrainConfig
from lilliput.train.parallel import distributed_init, full_model_state
from lilliput.train.shards import TokenShards

TOKENIZERS = ("byte", "smollm2")
PRETRAINED = ("smollm2-135m",)  # the embedded model's shape: loaded, not trained here
BUDGET_FLAGS = {"max_steps": ("steps", "max_steps"), "max_tokens": ("tokens", "max_tokens"),
                "max_minutes": ("minutes", "max_minutes")}
"""The training budget's flags: --steps S, --tokens N, --minutes M (or their TrainConfig names)."""


def scratch_presets() -> list[str]:
    """Model presets meant for training from scratch."""
    return [name for name in PRESETS if name not in PRETRAINED]


@dataclass(frozen=True)
class TrainJob:
    """`lilliput train`: what to train on what; how to train is `config`."""

    preset: str
    """A model preset (see --help); its vocab_size becomes the tokenizer's."""
    out: str
    """Output folder: the checkpoint, train_log.jsonl, trainer_state.pt and run.json."""
    config: TrainConfig = field(metadata=nested(skip=("out",), names=BUDGET_FLAGS, one_of=BUDGET))
    """How to train; its budget has no default: --steps, --tokens or --minutes (its out is replaced by this
    job's out)."""
    data: str | None = None
    """A text file (one document), a .jsonl file ({"text": ...} per line) or a folder of .txt/.md/.jsonl
    files; the default corpus when omitted."""
    tokenizer: str = "byte"
    """byte (256 ids, like nanoGPT's character model) or smollm2 (the embedded model's 49,152-token BPE)."""
    batch_size: int = 16
    """Sequences per micro-batch (per rank)."""
    seq_len: int = 256
    """Tokens per training sequence (also the model's max_seq_len)."""
    val_fraction: float = VAL_FRACTION
    """Held-out tail of every shard, for evaluation."""
    dim: int | None = None
    """Override the preset's width."""
    n_layers: int | None = None
    """Override the preset's number of blocks."""
    n_heads: int | None = None
    """Override the preset's query heads."""
    n_kv_heads: int | None = None
    """Override the preset's key/value heads."""
    ffn_dim: int | None = None
    """Override the preset's feed-forward width."""
    cache_dir: str | None = None
    """Where token shards are cached; $LILLIPUT_CACHE/shards or ~/.cache/lilliput/shards when omitted."""
    device: str | None = None
    """cpu or cuda; CUDA when available when omitted (under torchrun: cuda:LOCAL_RANK)."""

    def __post_init__(self):
        if self.preset not in scratch_presets():
            raise ValueError(f"unknown preset {self.preset!r} to train from scratch; known: {', '.join(scratch_presets())}")
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer must be one of {', '.join(TOKENIZERS)}, got {self.tokenizer!r}")


def load_tokenizer_named(name: str):
    if name == "byte":
        return ByteTokenizer()
    from lilliput.core.gguf_file import GGUFFile

    return Tokenizer.from_gguf(GGUFFile(embedded_model_path()).metadata)


def run_train(job: TrainJob) -> Path:
    """Shard the data, build the model, train, save. Returns the checkpoint folder."""
    rank, world = distributed_init()
    device = pick_device(job.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    out = Path(job.out)
    cfg = dataclasses.replace(job.config, out=str(out))
    tokenizer = load_tokenizer_named(job.tokenizer)
    if world > 1 and int(os.environ.get("LOCAL_RANK", "0")) != 0:
        torch.distributed.barrier()  # the first rank of each node tokenizes; the others then find its shards
    shards = TokenShards.cached(job.data, tokenizer, job.cache_dir)
    if world > 1 and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        torch.distributed.barrier()
    overrides = {k: getattr(job, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim")
                 if getattr(job, k) is not None}
    model_cfg = preset(job.preset).replace(vocab_size=tokenizer.vocab_size, max_seq_len=job.seq_len, **overrides)
    torch.manual_seed(cfg.seed)
    model = GPT(model_cfg).to(device)
    params = parameter_count(model)
    train = shards.batches("train", job.batch_size, job.seq_len, job.val_fraction, seed=cfg.seed)
    val = shards.batches("val", job.batch_size, job.seq_len, job.val_fraction, seed=cfg.seed)
    data = {"source": shards.meta.get("source"), "digest": shards.meta.get("digest"), "tokens": shards.tokens,
            "train_windows": train.tokens, "val_windows": val.tokens, "shards": str(shards.folder)}
    trainer = Trainer(LanguageModeling(model), train, cfg, record={"data": data},
                      evaluate=lambda module: {"val_loss": val.mean_loss(module, cfg.eval_batches)})
    trainer.resume_if_possible()
    summary = trainer.fit()
    state = full_model_state(trainer.objective)  # collective under FSDP
    if rank != 0:
        return out
    final = GPT(model_cfg)
    final.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    record = run_record("lilliput train", job=dataclasses.asdict(job), model_config=model_cfg.to_dict(),
                        params=params, world=world, data=data, train=summary, val_loss=summary.get("val_loss"))
    tmp = save_checkpoint(final, tokenizer, out.with_name(f".{out.name}.model-tmp"), record)
    out.mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():  # beside the trainer's files: the folder is both a model and a run
        os.replace(f, out / f.name)
    shutil.rmtree(tmp)
    return out


def summary(out: Path) -> str:
    """One JSON line for the terminal, from the run's run.json."""
    run = json.loads((out / "run.json").read_text())
    return json.dumps({"out": str(out), "params": run["params"], "steps": run["train"]["steps"],
                       "tokens": run["train"]["tokens"], "tokens_per_second": run["train"]["tokens_per_second"],
                       "train_loss": run["train"]["final"].get("ce"), "val_loss": run["val_loss"]})
