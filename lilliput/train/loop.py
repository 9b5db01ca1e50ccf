"""The training loop: AdamW, warmup + cosine learning rate, clipping, accumulation, checkpoints.

What is trained is an *objective*: an `nn.Module` whose `forward(batch)` returns
`(loss, metrics)`. `LanguageModeling(model)` is plain next-token cross-entropy; distillation
objectives live in `distill.py`. Data is a *batch source*: a callable `data(index) -> batch`
(a dict with at least "idx", the token ids whose count is the token budget) that is a pure
function of the index. The loop asks for index `(step * grad_accum + micro) * world + rank`,
so the data position is just the step number, every rank reads its own shard, and resuming
from a checkpoint replays exactly the batches a straight run would have seen.

    trainer = Trainer(LanguageModeling(model), WindowBatches(stream, 8, 256), TrainConfig(max_steps=100, out="runs/x"))
    trainer.fit()            # trains, logs train_log.jsonl, checkpoints, writes run.json

Under `torchrun` (WORLD_SIZE > 1) the loop joins the process group (NCCL on CUDA, gloo on
CPU) and wraps the objective in DistributedDataParallel or FSDP (`parallel.py`); rank 0 alone
writes files. An optional `evaluate(module) -> {"val_loss": ...}` runs every eval_every steps
and at the end; its numbers go to train_log.jsonl, the progress bar and run.json.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from lilliput.core.moe import moe_aux_loss, moe_layers, moe_metrics
from lilliput.core.record import run_record, write_json
from lilliput.train.losses import cross_entropy
from lilliput.train.muon import Muon, muon_param_groups
from lilliput.train.parallel import PARALLEL, as_float, distributed_init, full_state, load_full_state, no_sync, wrap

STATE_FILE = "trainer_state.pt"
LOG_FILE = "train_log.jsonl"
SCHEDULES = ("cosine", "wsd")
OPTIMIZERS = ("adamw", "muon")
BUDGET = ("max_steps", "max_tokens", "max_minutes")
"""TrainConfig's budget: a config that nests one takes a budget given as replacing its default one
(`nested(one_of=BUDGET)`)."""


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 3e-4
    """Peak learning rate (reached after warmup)."""
    min_lr_ratio: float = 0.1
    """The schedule ends at lr * min_lr_ratio."""
    schedule: str = "cosine"
    """Learning rate after warmup: cosine (decays all along) or wsd (warmup, stable, then a linear
    decay over the last decay_fraction of the run)."""
    decay_fraction: float = 0.2
    """wsd: fraction of the run spent decaying."""
    optimizer: str = "adamw"
    """adamw, or muon (Muon on the hidden matrices, AdamW at lr on embeddings, output, norms, biases)."""
    muon_lr: float = 0.02
    """muon: peak learning rate of the hidden matrices."""
    warmup_steps: int = 10
    """Optimizer steps of linear warmup from 0."""
    weight_decay: float = 0.1
    """AdamW weight decay (matrices only; norms and biases are not decayed)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this; None is off."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    max_steps: int | None = None
    """Stop after this many optimizer steps."""
    max_tokens: int | None = None
    """Stop once this many tokens (over all ranks) have been trained on."""
    max_minutes: float | None = None
    """Stop after this much training time. Alone, the schedule runs on the clock (its progress is
    training time over the budget); with max_steps or max_tokens it only stops early."""
    bf16: bool = False
    """Run forward passes under bfloat16 autocast (weights and optimizer stay float32)."""
    log_every: int = 10
    """Write a line to train_log.jsonl every N steps."""
    eval_every: int | None = None
    """Evaluate on held-out data every N steps (and at the end); None evaluates only at the end."""
    eval_batches: int = 20
    """Held-out batches per evaluation."""
    parallel: str = "ddp"
    """Under torchrun: ddp (a full copy per rank) or fsdp (parameters, gradients and optimizer
    state sharded over ranks)."""
    ckpt_every: int | None = None
    """Save trainer_state.pt every N steps (and at the end); None saves only at the end."""
    out: str | None = None
    """Folder for train_log.jsonl, trainer_state.pt and run.json; None writes nothing."""
    seed: int = 0
    """Seed of torch, numpy and random at the start (restored exactly on resume)."""
    progress: bool = True
    """Show a progress bar on stderr (rank 0)."""

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        for name, value, known in (("schedule", self.schedule, SCHEDULES), ("optimizer", self.optimizer, OPTIMIZERS),
                                   ("parallel", self.parallel, PARALLEL)):
            if value not in known:
                raise ValueError(f"{name} must be one of {', '.join(known)}, got {value!r}")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if self.eval_every is not None and self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1 or None, got {self.eval_every}")
        if self.max_steps is None and self.max_tokens is None and self.max_minutes is None:
            raise ValueError("give a budget: max_steps, max_tokens or max_minutes")
        for name in ("max_steps", "max_tokens", "max_minutes"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"{name} must be > 0, got {v}")


# --- data and objective -----------------------------------------------------------------------

class WindowBatches:
    """Random windows of a token stream: batch `index` is a pure function of (seed, index).

    Each batch is {"idx": (batch_size, seq_len + 1)}: seq_len inputs and their next tokens.
    """

    def __init__(self, stream: torch.Tensor, batch_size: int, seq_len: int, seed: int = 0):
        if stream.numel() < seq_len + 2:
            raise ValueError(f"the token stream ({stream.numel()} tokens) is shorter than seq_len+2={seq_len + 2}")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
        self.stream, self.batch_size, self.seq_len, self.seed = stream, batch_size, seq_len, seed

    def __call__(self, index: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        starts = torch.randint(0, self.stream.numel() - self.seq_len - 1, (self.batch_size,), generator=g)
        offsets = torch.arange(self.seq_len + 1)
        return {"idx": self.stream[starts[:, None] + offsets[None, :]]}  # (B, T+1)


class LanguageModeling(nn.Module):
    """Next-token cross-entropy of `model` on batch["idx"] (B, T+1), plus the auxiliary losses of
    its MoE layers (load balancing, router z-loss) when it has any; their expert loads are logged."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        idx = batch["idx"]
        logits = self.model(idx[:, :-1])  # (B, T, V)
        loss = cross_entropy(logits, idx[:, 1:], batch.get("mask"))
        metrics = {"ce": loss.detach()}
        if moe_layers(self.model):
            aux = moe_aux_loss(self.model)
            loss = loss + aux
            metrics |= {"moe_aux": aux.detach(), **moe_metrics(self.model)}
        return loss, metrics


# --- batches ----------------------------------------------------------------------------------

def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch.to(device) if isinstance(batch, torch.Tensor) else batch


def _batch_tokens(batch: Any) -> int:
    if isinstance(batch, dict):
        if "tokens" in batch:
            return int(batch["tokens"])
        return int(batch["idx"].numel())
    return int(batch.numel())


# --- the trainer ------------------------------------------------------------------------------

class Trainer:
    """Trains `objective` (a module returning (loss, metrics)) on batches from `data`."""

    def __init__(self, objective: nn.Module, data: Callable[[int], Any], cfg: TrainConfig,
                 record: dict[str, Any] | None = None,
                 evaluate: Callable[[nn.Module], dict[str, float]] | None = None):
        self.cfg, self.data, self.record, self.evaluate = cfg, data, dict(record or {}), evaluate
        self.rank, self.world = distributed_init()
        self.objective = objective
        self.device = next(objective.parameters()).device
        self.out = Path(cfg.out) if cfg.out else None
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.wrapped = wrap(objective, cfg.parallel, self.world)
        self.optimizer = self._optimizer()
        self.tokens_per_step = None
        if cfg.max_tokens is not None:
            self.tokens_per_step = _batch_tokens(data(0)) * cfg.grad_accum * self.world
        self.total_steps = self._total_steps()
        self.step, self.tokens, self.seconds = 0, 0, 0.0
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        self.last: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}

    def _optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        if cfg.optimizer == "muon":  # modded-nanogpt's speedrun: no weight decay on the Muon matrices
            groups = muon_param_groups(self.objective, cfg.muon_lr, cfg.lr, cfg.weight_decay, cfg.betas)
            for g in groups:
                g["weight_decay"] = 0.0 if g["use_muon"] else g["weight_decay"]
            return Muon(groups)
        params = [p for p in self.objective.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)

    def _total_steps(self) -> int | None:
        limits = []
        if self.cfg.max_steps is not None:
            limits.append(self.cfg.max_steps)
        if self.cfg.max_tokens is not None:
            limits.append(math.ceil(self.cfg.max_tokens / self.tokens_per_step))
        return min(limits) if limits else None

    def lr_factor(self, step: int) -> float:
        """Multiplier of the peak lr at optimizer step `step`: linear warmup, then cosine or wsd.

        With only a time budget, progress is training time over the budget instead of steps."""
        w, r = self.cfg.warmup_steps, self.cfg.min_lr_ratio
        if step < w:
            return (step + 1) / (w + 1)
        if self.total_steps is not None:
            total = self.total_steps
            progress = min(1.0, (step - w) / max(1, total - w))
            if self.cfg.schedule == "wsd":
                decay = max(1, round(self.cfg.decay_fraction * total))
                progress = min(1.0, max(0.0, (step - (total - decay)) / decay))
        else:
            progress = min(1.0, self.seconds / (60 * self.cfg.max_minutes))
            if self.cfg.schedule == "wsd":
                progress = min(1.0, max(0.0, (progress - 1) / self.cfg.decay_fraction + 1))
        if self.cfg.schedule == "wsd":
            return 1 - (1 - r) * progress
        return r + (1 - r) * 0.5 * (1 + math.cos(math.pi * progress))

    # -- one step --

    def train_step(self) -> dict[str, float]:
        """One optimizer step over grad_accum micro-batches; returns the step's metrics."""
        cfg = self.cfg
        self.objective.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        tokens = 0
        for micro in range(cfg.grad_accum):
            index = (self.step * cfg.grad_accum + micro) * self.world + self.rank
            batch = _to(self.data(index), self.device)
            tokens += _batch_tokens(batch)
            with no_sync(self.wrapped, self.world, sync=micro == cfg.grad_accum - 1):
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    loss, metrics = self.wrapped(batch)
                (loss / cfg.grad_accum).backward()
            for k, v in {"loss": loss, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach() if isinstance(v, torch.Tensor) else v) / cfg.grad_accum
        if cfg.grad_clip is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            sums["grad_norm"] = as_float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        sums["lr"] = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.tokens += tokens * self.world
        return sums

    def done(self) -> bool:
        cfg = self.cfg
        if self.total_steps is not None and self.step >= self.total_steps:
            return True
        if cfg.max_tokens is not None and self.tokens >= cfg.max_tokens:
            return True
        return cfg.max_minutes is not None and self.seconds >= 60 * cfg.max_minutes

    def _stop_by_time(self) -> bool:
        """Every rank must stop at the same step: rank 0's clock decides."""
        stop = torch.tensor([float(self.done())])
        if self.world > 1 and self.cfg.max_minutes is not None:
            dist.broadcast(stop, 0)
        return bool(stop.item())

    def run_eval(self) -> dict[str, float]:
        """`evaluate` on the (wrapped) objective in eval mode, without gradients, timed apart."""
        if self.evaluate is None:
            return {}
        t0 = time.perf_counter()
        self.objective.eval()
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
            result = {k: as_float(v) for k, v in self.evaluate(self.wrapped).items()}
        self.objective.train()
        self.eval_seconds = getattr(self, "eval_seconds", 0.0) + time.perf_counter() - t0
        self.last_eval = result
        return result

    def fit(self, until: int | None = None) -> dict[str, Any]:
        """Train until the budget is spent (or until step `until`, for tests and staged runs).

        Writes run.json only when the budget is spent. Returns a summary."""
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", file=sys.stderr,
                   disable=not self.cfg.progress or self.rank != 0)
        log = None
        if self.out is not None and self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            log = open(self.out / LOG_FILE, "a")

        def write(row: dict[str, Any]) -> None:
            if log is not None:
                log.write(json.dumps({"step": self.step, **row, "tokens": self.tokens,
                                      "seconds": round(self.seconds, 3)}) + "\n")
                log.flush()

        try:
            while not self._stop_by_time() and (until is None or self.step < until):
                t0 = time.perf_counter()
                metrics = self.train_step()
                self.seconds += time.perf_counter() - t0
                self.last = metrics
                bar.update(1)
                post = {"loss": f"{metrics['loss']:.4f}", "lr": f"{metrics['lr']:.2e}",
                        "tok/s": f"{self.tokens / max(self.seconds, 1e-9):,.0f}"}
                last_step = self.total_steps is not None and self.step >= self.total_steps
                if self.cfg.eval_every and self.step % self.cfg.eval_every == 0 and not last_step:
                    write(self.run_eval())
                if self.last_eval:
                    post |= {k: f"{v:.4f}" for k, v in self.last_eval.items()}
                bar.set_postfix(post)
                if self.step % self.cfg.log_every == 0 or self.step == 1:
                    write(metrics)
                if self.cfg.ckpt_every and self.step % self.cfg.ckpt_every == 0:
                    self.save()
            finished = self._stop_by_time()  # the same verdict on every rank
            if finished and self.evaluate is not None:
                write(self.run_eval())
        finally:
            bar.close()
            if log is not None:
                log.close()
        summary = {"steps": self.step, "tokens": self.tokens, "seconds": round(self.seconds, 3),
                   "tokens_per_second": round(self.tokens / self.seconds, 1) if self.seconds else None,
                   "final": self.last, **self.last_eval}
        if finished:
            if self.out is not None:
                self.save()
                if self.rank == 0:
                    write_json(self.out / "run.json", run_record("train", config=dataclasses.asdict(self.cfg),
                                                                 **summary, **self.record))
        return summary

    # -- checkpoints --

    def state_dict(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        model, optimizer = full_state(self.objective, self.optimizer)  # collective under FSDP
        return {"objective": model, "optimizer": optimizer,
                "scheduler": self.scheduler.state_dict(), "step": self.step, "tokens": self.tokens,
                "seconds": self.seconds, "rng": rng, "world": self.world, "config": dataclasses.asdict(self.cfg)}

    def save(self, path: Path | str | None = None) -> Path | None:
        """Write the full trainer state (rank 0; every rank calls it); the data position is the step number."""
        path = Path(path) if path is not None else (self.out / STATE_FILE if self.out else None)
        if path is None:
            return path
        state = self.state_dict()
        if self.rank != 0:
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        return path

    def load(self, path: Path | str | None = None) -> "Trainer":
        """Restore a state written by `save` (model, optimizer, schedule, RNGs, data position)."""
        path = Path(path) if path is not None else (self.out / STATE_FILE if self.out else None)
        if path is None or not path.is_file():
            raise FileNotFoundError(f"no trainer state at {path}: train with ckpt_every or out= first")
        state = torch.load(path, map_location=self.device, weights_only=False)
        if state["world"] != self.world:
            raise ValueError(f"{path} was saved by {state['world']} ranks, resuming with {self.world}: "
                             "relaunch with the same number of processes")
        load_full_state(self.objective, self.optimizer, state["objective"], state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.tokens, self.seconds = state["step"], state["tokens"], state["seconds"]
        rng = state["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
        return self

    def resume_if_possible(self) -> bool:
        """Load out/trainer_state.pt when it exists; True if it did."""
        if self.out is not None and (self.out / STATE_FILE).is_file():
            self.load()
            return True
        return False
