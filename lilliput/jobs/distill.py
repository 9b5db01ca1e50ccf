"""`lilliput distill`: load the teacher, build or load the student, distill (train.distill), measure, save."""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lilliput.core.checkpoint import load_model, save_checkpoint
from lilliput.core.options import nested
from lilliput.core.record import run_record
from lilliput.eval.bench import model_label
from lilliput.eval.efficiency import parameter_count
from lilliput.eval.perplexity import HELDOUT, HeldoutConfig, heldout_perplexity
from lilliput.train.distill import DistillConfig, build_student, distill, init_embedding_from_teacher_


@dataclass(frozen=True)
class DistillJob:
    """`lilliput distill`: teacher and student specs, output folder, evaluation; training in `config`."""

    student: str
    """A model preset (e.g. student-20m), a ModelConfig .json, or a checkpoint folder (e.g. a pruned teacher)."""
    out: str
    """Output folder: the student checkpoint, train_log.jsonl, trainer_state.pt and run.json."""
    teacher: str | None = None
    """A .gguf, model folder or hub id; the embedded SmolLM2-135M-Instruct when omitted."""
    config: DistillConfig = field(default=DistillConfig(), metadata=nested())
    """How to distill (its train.out is replaced by this job's out)."""
    init_embedding: bool = True
    """Initialise a fresh student's embedding from the teacher's (PCA projection when narrower)."""
    eval_passages: int | None = HELDOUT.passages
    """LAMBADA passages of held-out text for perplexity before and after (None skips it)."""
    device: str | None = None
    """cpu or cuda; CUDA when available when omitted."""


def run_distill(job: DistillJob) -> Path:
    """Load the teacher, build or load the student, distill, evaluate, save. Returns the checkpoint folder."""
    out = Path(job.out)
    cfg = dataclasses.replace(job.config, train=dataclasses.replace(job.config.train, out=str(out)))
    teacher_label = model_label(job.teacher)
    teacher, tokenizer = load_model(job.teacher, device=job.device, dtype=torch.float32)
    student, student_tok = build_student(job.student, teacher, seed=cfg.train.seed)
    if student_tok is None and job.init_embedding:
        init_embedding_from_teacher_(student, teacher)
    window = min(HELDOUT.window, teacher.config.max_seq_len, student.config.max_seq_len)  # one window for both
    heldout = HeldoutConfig(passages=job.eval_passages, window=window) if job.eval_passages else None

    def ppl(model) -> float | None:
        return heldout_perplexity(model, tokenizer, heldout) if heldout else None

    scores = {"teacher": ppl(teacher), "student_before": ppl(student)}
    student = distill(teacher, student, tokenizer, cfg, student_tokenizer=student_tok)
    scores["student_after"] = ppl(student)
    student_label = model_label(job.student) if Path(job.student).is_dir() else job.student
    record = run_record("lilliput distill", label=f"{student_label} distilled from {teacher_label}",
                        job=dataclasses.asdict(job), student_config=student.config.to_dict(),
                        student_params=parameter_count(student), heldout_perplexity=scores,
                        heldout=dataclasses.asdict(heldout) if heldout else None,
                        train=getattr(student, "last_summary", None))
    tmp = save_checkpoint(student, tokenizer, out.with_name(f".{out.name}.model-tmp"), record)
    out.mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():  # merge beside the trainer's files: the folder is both a model and a run
        os.replace(f, out / f.name)
    shutil.rmtree(tmp)
    return out
