"""Knowledge distillation: train a small student to match a teacher that shares its tokenizer.

One config (`DistillConfig`), one function (`distill`), five modes:

- ``logits``    the teacher's next-token distribution on corpus windows (Hinton et al. 2015);
                dense logits computed on the fly, or top-k log-probs cached on disk once
                (`top_k`, see logit_cache.py) and shared by any number of student runs.
- ``sequence``  sequence-level KD (Kim & Rush 2016): the teacher continues prompts drawn from
                the corpus (`lilliput.infer.generate`), the student learns them by cross-entropy.
- ``on-policy`` GKD (Agarwal et al. 2024): a fraction `lmbda` of batches are the student's own
                samples scored token by token by the teacher; the rest are corpus windows.
- ``feature``   logits loss plus MSE between the student's final hidden states (the last
                block's output after the final RMSNorm: what lm_head reads; its scale is fixed
                by the norm, unlike the raw residual stream whose outliers reach the hundreds
                in SmolLM2) mapped by a learned linear projection, and the teacher's.
- ``context``   context distillation (Askell et al. 2021, Snell et al. 2022): the teacher sees
                `system_prompt` + the input, the student the input alone, so the prompt's
                effect is baked into the student's weights.

The loss is ``alpha * divergence(student, teacher) + (1 - alpha) * cross-entropy(data)`` (plus
the feature term), divergences as defined in losses.py. `lilliput distill` is
`lilliput.jobs.distill`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lilliput.core.config import ModelConfig, PRESETS, preset
from lilliput.core.model import GPT
from lilliput.core.moe import moe_aux_loss, moe_layers, moe_metrics
from lilliput.core.options import nested
from lilliput.train.data import default_documents, token_stream
from lilliput.train.logit_cache import CachedBatches, build_logit_cache
from lilliput.train.loop import BUDGET, Trainer, TrainConfig, WindowBatches
from lilliput.train.losses import DIVERGENCES, TopK, cross_entropy, divergence

MODES = ("logits", "sequence", "on-policy", "feature", "context")
PROBE = "Distillation probe: The quick brown fox, 1234567890 ÄÖÜ 東京 <|im_start|> \n\t  end."


@dataclass(frozen=True)
class DistillConfig:
    loss: str = "fkl"
    """Divergence between teacher and student: fkl (forward KL), rkl (reverse KL), jsd (generalized JSD), tvd (total variation)."""
    beta: float = 0.5
    """Teacher weight in the JSD mixture (jsd only): 0 is forward KL, 1 reverse KL."""
    temperature: float = 1.0
    """Softening of both distributions; the divergence is scaled by T^2."""
    alpha: float = 1.0
    """Weight of the divergence; 1 - alpha weighs cross-entropy on the data (0 = plain training)."""
    mode: str = "logits"
    """What the student learns from: logits, sequence, on-policy, feature or context."""
    lmbda: float = 0.5
    """on-policy: fraction of batches that are student samples (GKD's lambda)."""
    top_k: int | None = None
    """logits mode: cache the teacher's top-k log-probs on disk once (None: dense teacher logits on the fly)."""
    cache_windows: int | None = None
    """Windows in the logit cache (reused for several epochs when fewer than the budget needs); None: as many as the budget needs."""
    cache_dir: str | None = None
    """Folder of the logit cache (share one across runs); None: <out>/logit_cache."""
    seq_len: int = 256
    """Tokens per training window."""
    batch_size: int = 8
    """Windows per micro-batch."""
    prompt_len: int = 32
    """sequence / on-policy: prompt tokens taken from the corpus."""
    gen_len: int = 64
    """sequence / on-policy: tokens generated per prompt."""
    gen_temperature: float = 1.0
    """sequence / on-policy: sampling temperature of generations."""
    feature_weight: float = 1.0
    """feature: weight of the hidden-state MSE."""
    system_prompt: str | None = None
    """context: the text the teacher sees before every input (required in that mode)."""
    train: TrainConfig = field(default=TrainConfig(lr=1e-3, warmup_steps=20, max_steps=200), metadata=nested(
        only=("grad_accum", "lr", "warmup_steps", "min_lr_ratio", "weight_decay", "grad_clip", "max_steps", "max_tokens",
              "max_minutes", "bf16", "seed", "ckpt_every", "log_every", "progress"),
        one_of=BUDGET))
    """How the student trains: optimizer, schedule, budget (a budget given replaces the 200 steps), logging;
    its seed also orders the data and seeds the sampling, its out (None: nothing written) holds the logs,
    trainer state and run.json."""

    def __post_init__(self):
        if self.loss not in DIVERGENCES:
            raise ValueError(f"loss must be one of {', '.join(DIVERGENCES)}, got {self.loss!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("beta", "alpha", "lmbda"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k is not None and self.mode != "logits":
            raise ValueError(f"top_k (the offline logit cache) works with mode logits only, not {self.mode!r}")
        if self.mode == "context" and not self.system_prompt:
            raise ValueError("mode context needs system_prompt: the text the teacher sees and the student learns to do without")
        if self.mode in ("sequence", "on-policy") and not 0 < self.prompt_len < self.seq_len:
            raise ValueError(f"prompt_len must be in (0, seq_len={self.seq_len}), got {self.prompt_len}")


# --- tokenizers and students ------------------------------------------------------------------

def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the vocabulary size and the ids of a fixed probe string."""
    ids = tokenizer.encode(PROBE, bos=False)
    return hashlib.sha256(json.dumps([tokenizer.vocab_size, ids]).encode()).hexdigest()[:16]


def check_same_tokenizer(teacher: GPT, student: GPT, tokenizer, student_tokenizer=None) -> None:
    """One ValueError when teacher and student cannot share token ids."""
    tv, sv = teacher.config.vocab_size, student.config.vocab_size
    problems = []
    if tv != sv:
        problems.append(f"vocab sizes differ (teacher {tv}, student {sv})")
    if tokenizer.vocab_size > min(tv, sv):
        problems.append(f"the tokenizer has {tokenizer.vocab_size} tokens, more than the models' {min(tv, sv)}")
    if student_tokenizer is not None and tokenizer_fingerprint(student_tokenizer) != tokenizer_fingerprint(tokenizer):
        problems.append("their tokenizers encode the same probe text differently")
    if problems:
        raise ValueError("teacher and student must share a tokenizer: " + "; ".join(problems)
                         + ". Build the student from a config with the teacher's vocabulary (lilliput sets it for presets).")


def build_student(spec: str | dict | ModelConfig | Path, teacher: GPT, seed: int = 0):
    """(student, its tokenizer or None) from a preset name, a config dict / JSON file, or a checkpoint folder.

    A fresh config takes the teacher's vocab_size (a student must share its tokenizer) and is
    initialised from `seed`; a checkpoint (e.g. a pruned teacher) is loaded as it is."""
    from lilliput.core.checkpoint import load_model

    if isinstance(spec, (str, Path)) and Path(spec).is_dir():
        model, tok = load_model(spec, device=next(teacher.parameters()).device, dtype=torch.float32)
        return model.train(), tok
    if isinstance(spec, ModelConfig):
        config = spec
    elif isinstance(spec, dict):
        config = ModelConfig.from_dict(spec)
    elif str(spec).endswith(".json"):
        if not Path(spec).is_file():
            raise FileNotFoundError(f"student config {spec} not found")
        config = ModelConfig.from_dict(json.loads(Path(spec).read_text()))
    elif str(spec) in PRESETS:
        config = preset(str(spec))
    else:
        raise ValueError(f"student {spec!r} is neither a preset ({', '.join(PRESETS)}), a config .json, nor a checkpoint folder")
    config = config.replace(vocab_size=teacher.config.vocab_size)
    torch.manual_seed(seed)
    return GPT(config).to(next(teacher.parameters()).device).train(), None


@torch.no_grad()
def init_embedding_from_teacher_(student: GPT, teacher: GPT) -> GPT:
    """Initialise the student's token embedding from the teacher's (in place).

    Same width: copied. Narrower student: the teacher's embedding projected on its top principal
    directions (E_t V_k from the SVD E_t = U S V^T), rescaled to the teacher's std. Dot products
    between tokens, which tied output layers turn into logits, are kept as well as k dims allow."""
    e_t = teacher.tok_emb.weight.float()  # (V, Dt)
    ds = student.config.dim
    if e_t.shape[0] != student.config.vocab_size:
        raise ValueError("the student's vocabulary differs from the teacher's: cannot copy embeddings")
    if ds > e_t.shape[1]:
        raise ValueError(f"student width {ds} exceeds the teacher's {e_t.shape[1]}: nothing to project")
    if ds == e_t.shape[1]:
        e_s = e_t.clone()
    else:
        _, _, vh = torch.linalg.svd(e_t, full_matrices=False)  # vh (Dt, Dt)
        e_s = e_t @ vh[:ds].T  # (V, ds)
        e_s *= e_t.std() / e_s.std()
    student.tok_emb.weight.copy_(e_s)
    return student


# --- objectives -------------------------------------------------------------------------------

class Distillation(nn.Module):
    """The trainer's objective: forward(batch) -> (loss, metrics). Only the student (and the
    feature projection) are submodules: the frozen teacher stays out of state dicts, DDP and
    the optimizer."""

    def __init__(self, student: GPT, teacher: GPT, cfg: DistillConfig, tokenizer=None):
        super().__init__()
        self.student, self.cfg = student, cfg
        self.__dict__["teacher"] = teacher  # not a submodule
        self.__dict__["tokenizer"] = tokenizer
        self.prefix: torch.Tensor | None = None
        if cfg.mode == "feature":
            self.projection = nn.Linear(student.config.dim, teacher.config.dim, bias=False)
        if cfg.mode == "context":
            ids = tokenizer.encode(cfg.system_prompt + "\n\n", bos=None)
            self.prefix = torch.tensor(ids, dtype=torch.long)

    def _divergence(self, s_logits, teacher, mask=None):
        c = self.cfg
        return divergence(c.loss, s_logits, teacher, mask, c.temperature, c.beta)

    @torch.no_grad()
    def _teacher(self, idx: torch.Tensor, features: bool = False):
        self.teacher.eval()
        if features:
            h = self.teacher.features(idx)  # (B, T, Ct)
            return self.teacher.logits(h), h.float()
        return self.teacher(idx), None

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mode = self.cfg.mode
        if mode == "sequence":
            loss, metrics = self._sequence(batch)
        elif mode == "on-policy" and _coin(batch["seed"], self.cfg.train.seed) < self.cfg.lmbda:
            loss, metrics = self._on_policy(batch)
        else:
            loss, metrics = self._windows(batch)
        if moe_layers(self.student):  # an MoE student keeps its experts balanced as in plain training
            aux = moe_aux_loss(self.student)
            loss = loss + aux
            metrics = {**metrics, "moe_aux": aux.detach(), **moe_metrics(self.student)}
        return loss, metrics

    def _mix(self, kd: torch.Tensor | None, s_logits, targets, mask=None) -> tuple[torch.Tensor, dict]:
        a = self.cfg.alpha
        ce = cross_entropy(s_logits, targets, mask)
        metrics = {"ce": ce.detach()}
        if kd is None:
            return ce, metrics
        metrics["kd"] = kd.detach()
        return a * kd + (1 - a) * ce, metrics

    def _windows(self, batch):
        """logits / feature / context (and the off-policy half of on-policy) on corpus windows."""
        idx = batch["idx"]
        inp, tgt = idx[:, :-1], idx[:, 1:]  # (B, T)
        c = self.cfg
        need_kd = c.alpha > 0
        h_t = None
        if "topk_ids" in batch:
            teacher = TopK(batch["topk_ids"], batch["topk_logp"])
        elif not need_kd and c.mode != "feature":
            teacher = None
        elif c.mode == "context":
            prefix = self.prefix.to(idx.device).expand(idx.shape[0], -1)  # (B, P)
            t_logits, _ = self._teacher(torch.cat([prefix, inp], dim=1))
            teacher = t_logits[:, prefix.shape[1]:]  # (B, T, V): the input's positions only
        else:
            teacher, h_t = self._teacher(inp, features=c.mode == "feature")
        if c.mode == "feature":
            h_s = self.student.features(inp)  # (B, T, Cs)
            s_logits = self.student.logits(h_s)
        else:
            s_logits = self.student(inp)
        kd = self._divergence(s_logits, teacher) if need_kd and teacher is not None else None
        loss, metrics = self._mix(kd, s_logits, tgt)
        if h_t is not None:
            mse = F.mse_loss(self.projection(h_s.float()), h_t)
            metrics["feature_mse"] = mse.detach()
            loss = loss + c.feature_weight * mse
        return loss, metrics

    def _generate(self, model: GPT, prompts: torch.Tensor, seed: int) -> torch.Tensor:
        """prompts (B, P) continued by gen_len sampled tokens: (B, P + gen_len)."""
        from lilliput.infer.generate import GenerationConfig, generate

        c = self.cfg
        gcfg = GenerationConfig(max_new_tokens=c.gen_len, temperature=c.gen_temperature, seed=seed, ignore_eos=True)
        was_training = model.training
        gens = generate(model.eval(), self.tokenizer, prompts.tolist(), gcfg)
        model.train(was_training)
        new = torch.tensor([g.tokens for g in gens], dtype=torch.long, device=prompts.device)  # (B, gen_len)
        return torch.cat([prompts, new], dim=1)

    def _sequence(self, batch):
        """Cross-entropy on the teacher's continuations of corpus prompts (prompt tokens not scored)."""
        P = self.cfg.prompt_len
        seq = self._generate(self.teacher, batch["idx"][:, :P], _seed(batch["seed"], self.cfg.train.seed))
        mask = _generated_mask(seq, P)
        loss = cross_entropy(self.student(seq[:, :-1]), seq[:, 1:], mask)
        return loss, {"ce": loss.detach(), "on_policy": torch.tensor(0.0)}

    def _on_policy(self, batch):
        """The student's own samples, scored by the teacher at every generated position (GKD)."""
        P = self.cfg.prompt_len
        seq = self._generate(self.student, batch["idx"][:, :P], _seed(batch["seed"], self.cfg.train.seed))
        inp, mask = seq[:, :-1], _generated_mask(seq, P)
        t_logits, _ = self._teacher(inp)
        s_logits = self.student(inp)
        kd = self._divergence(s_logits, t_logits, mask)
        return kd, {"kd": kd.detach(), "on_policy": torch.tensor(1.0)}


def _seed(index: int, seed: int) -> int:
    return (seed * 1_000_003 + int(index)) % (2**31)


def _coin(index: int, seed: int) -> float:
    """A uniform draw that is a pure function of the batch index (resume replays it)."""
    return torch.rand((), generator=torch.Generator().manual_seed(_seed(index, seed) + 17)).item()


def _generated_mask(seq: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """(B, S-1) mask of the shifted targets that are generated tokens."""
    pos = torch.arange(1, seq.shape[1], device=seq.device)  # target positions
    return (pos >= prompt_len)[None].expand(seq.shape[0], -1)


class _Indexed:
    """Adds the batch index to a source's batches (sequence and on-policy seed their sampling with it)."""

    def __init__(self, source, tokens: int | None = None):
        self.source, self.tokens = source, tokens

    def __call__(self, index: int) -> dict:
        batch = dict(self.source(index), seed=index)
        if self.tokens is not None:
            batch["tokens"] = self.tokens
        return batch


# --- the entry point --------------------------------------------------------------------------

def _budget_windows(cfg: DistillConfig, world: int) -> int:
    if cfg.cache_windows is not None:
        return cfg.cache_windows
    per_step = cfg.batch_size * cfg.train.grad_accum * world
    steps = []
    if cfg.train.max_steps is not None:
        steps.append(cfg.train.max_steps)
    if cfg.train.max_tokens is not None:
        steps.append(math.ceil(cfg.train.max_tokens / (per_step * (cfg.seq_len + 1))))
    if not steps:
        raise ValueError("a logit cache needs max_steps, max_tokens or cache_windows to know how many windows to cache")
    return min(steps) * per_step


def distill(teacher: GPT, student: GPT, tokenizer, cfg: DistillConfig, documents=None,
            student_tokenizer=None, stream: torch.Tensor | None = None) -> GPT:
    """Train `student` to imitate `teacher` on `documents` (the default corpus when None), or on
    `stream`, documents already tokenized into one token stream; returns it.

    Writes train_log.jsonl, trainer_state.pt and run.json under cfg.train.out (when set) and resumes
    from a trainer_state.pt already there."""
    check_same_tokenizer(teacher, student, tokenizer, student_tokenizer)
    if cfg.mode == "feature" and not hasattr(student, "features"):
        raise ValueError("mode feature needs models with a features() method (lilliput GPT)")
    for p in teacher.parameters():
        p.requires_grad_(False)
    if stream is None:
        stream = token_stream(tokenizer, documents if documents is not None else default_documents())
    elif documents is not None:
        raise ValueError("give documents or a token stream, not both")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.top_k is not None:
        from lilliput.train.data import random_windows

        n = _budget_windows(cfg, world)
        windows = random_windows(stream, n, cfg.seq_len + 1, seed=cfg.train.seed)
        folder = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.train.out or ".") / "logit_cache"
        cache = build_logit_cache(teacher, windows, folder, cfg.top_k, progress=cfg.train.progress,
                                  meta={"teacher": teacher.config.name, "tokenizer": tokenizer_fingerprint(tokenizer)})
        data = CachedBatches(cache, cfg.batch_size, seed=cfg.train.seed)
    else:
        data = WindowBatches(stream, cfg.batch_size, cfg.seq_len, seed=cfg.train.seed)
    tokens = cfg.batch_size * (cfg.prompt_len + cfg.gen_len) if cfg.mode == "sequence" else None
    objective = Distillation(student, teacher, cfg, tokenizer).to(next(student.parameters()).device)
    trainer = Trainer(objective, _Indexed(data, tokens), cfg.train, record={"distill": dataclasses.asdict(cfg)})
    trainer.resume_if_possible()
    trainer.fit()
    student.last_summary = {"steps": trainer.step, "tokens": trainer.tokens, "seconds": round(trainer.seconds, 2),
                            "final": trainer.last}
    return student.eval()
