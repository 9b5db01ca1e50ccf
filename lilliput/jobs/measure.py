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
from lilliput.jobs.serve_peer import PEERS, PeerBenchConfig
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
    peer: str | None = field(default=None, metadata=flag(choices=tuple(PEERS)))
    """Instead: lilliput serve beside a serving peer (vllm or llama.cpp) on one model, writing OUT/vs_<peer>.json
    (--threads, --new-tokens, --repeats and --out apply too; default: none, the bench above)."""
    serving: PeerBenchConfig = field(default=PeerBenchConfig(), metadata=nested(
        skip=("model", "peer", "new_tokens", "repeats", "threads", "rows")))
    """The serving comparison's workloads (with --peer)."""
    rows: tuple[str, ...] = ()
    """With --peer: rows to run, e.g. "lilliput bf16,vLLM bf16" (empty: all of the peer's rows)."""


def run_benchmark(job: BenchJob) -> None:
    from lilliput.eval.bench import run_bench

    models = tuple(None if m in ("", "embedded") else m for m in (job.model or [None]))
    if job.peer is not None:
        return run_peer(job, models)
    cfg = dataclasses.replace(job.config, models=models)
    run_bench(cfg)
    print(f"wrote {Path(cfg.out) / 'bench.json'}")


def run_peer(job: BenchJob, models: tuple[str | None, ...]) -> None:
    """`bench --peer`: lilliput serve beside a serving peer on one model; writes <out>/vs_<peer>.json."""
    from lilliput.core.record import run_record, write_json
    from lilliput.jobs.serve_peer import headline, run_peer_bench

    if len(models) != 1:
        raise ValueError(f"--peer compares one model, got {len(models)} --model flags")
    c = job.config
    cfg = dataclasses.replace(job.serving, peer=job.peer, model=models[0], threads=c.threads, new_tokens=c.new_tokens,
                              repeats=c.repeats, rows=job.rows)
    result = run_peer_bench(cfg)
    # the command line as the record's command; every value it set is in the record's config
    out = write_json(Path(c.out) / f"vs_{result['peer_key']}.json", run_record(f"lilliput bench --peer {cfg.peer}",
                                                                                **result))
    print(f"{headline(result)}; wrote {out}")


@dataclass(frozen=True)
class ReportJob:
    runs: tuple[str, ...] = field(metadata=flag(positional=True))
    """bench.json / run.json files or folders holding them."""
    config: ReportConfig = field(default=ReportConfig(), metadata=nested(skip=("runs",)))
    """Where the page goes, its title."""


def run_report(job: ReportJob) -> Path:
    from lilliput.eval.report import make_report

    return make_report(dataclasses.replace(job.config, runs=job.runs))
