"""The measuring commands: `lilliput eval ppl`, `eval tasks`, `bench` and `report`. Each loads, calls
lilliput.eval and prints; the measurements are the library's."""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lilliput.core.checkpoint import LoadConfig
from lilliput.core.options import flag, nested
from lilliput.eval.bench import BenchConfig
from lilliput.eval.perplexity import PerplexityConfig
from lilliput.eval.report import ReportConfig
from lilliput.eval.tasks import TaskConfig
from lilliput.jobs.text_file import read_text


@dataclass(frozen=True)
class PerplexityJob:
    file: str = field(metadata=flag(positional=True))
    """A UTF-8 text file."""
    load: LoadConfig = field(default=LoadConfig(), metadata=nested())
    """The model."""
    config: PerplexityConfig = field(default=PerplexityConfig(), metadata=nested())
    """Windows, stride and batch."""
    json: bool = field(default=False, metadata=flag(action="store_true"))
    """Print one JSON object."""


def run_perplexity(job: PerplexityJob) -> None:
    from lilliput.eval.perplexity import perplexity

    text = read_text(job.file)
    model, tok = job.load.load()
    result = perplexity(model, tok, text, job.config)
    if job.json:
        print(json.dumps(result))
    else:
        print(f"perplexity {result['perplexity']:.3f} over {result['tokens']} tokens ({job.file})")


@dataclass(frozen=True)
class TasksJob:
    load: LoadConfig = field(default=LoadConfig(), metadata=nested())
    """The model."""
    config: TaskConfig = field(default=TaskConfig(), metadata=nested())
    """Which tasks, how many items, batch."""
    json: bool = field(default=False, metadata=flag(action="store_true"))
    """Print one JSON object."""


def run_tasks(job: TasksJob) -> None:
    from lilliput.eval.tasks import evaluate_tasks

    model, tok = job.load.load()
    result = evaluate_tasks(model, tok, job.config, log=lambda message: print(message, file=sys.stderr, flush=True))
    if job.json:
        print(json.dumps(result))
    else:
        for task, m in result.items():
            print(f"{task:>14}: " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in m.items()))


@dataclass(frozen=True)
class BenchJob:
    model: tuple[str, ...] | None = field(default=None, metadata=flag(action="append"))
    """A model to measure (repeat for more; omit, or give "embedded", for the embedded one)."""
    config: BenchConfig = field(default=BenchConfig(), metadata=nested(skip=("models",)))
    """What to measure and how often."""


def run_benchmark(job: BenchJob) -> None:
    from lilliput.eval.bench import run_bench

    models = tuple(None if m in ("", "embedded") else m for m in (job.model or [None]))
    cfg = dataclasses.replace(job.config, models=models)
    run_bench(cfg)
    print(f"wrote {Path(cfg.out) / 'bench.json'}")


@dataclass(frozen=True)
class ReportJob:
    runs: tuple[str, ...] = field(metadata=flag(positional=True))
    """bench.json / run.json files or folders holding them."""
    config: ReportConfig = field(default=ReportConfig(), metadata=nested(skip=("runs",)))
    """Where the page goes, its title."""


def run_report(job: ReportJob) -> Path:
    from lilliput.eval.report import make_report

    return make_report(dataclasses.replace(job.config, runs=job.runs))
