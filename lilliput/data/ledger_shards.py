"""The ledger at scale: one shard per pipeline task, folded into one ledger afterwards.

Many tasks writing one SQLite file take turns on its lock; a cluster's tasks may not even share
a file system that locks. So each task of a curation pipeline writes its own shard, a complete
ledger file (`lilliput.data.ledger`, WAL), and `merge` folds the shards into one queryable ledger:

    shard = LedgerShard("work/ledger", "final")       # pickled into every task
    shard.decide(rank, doc_id, "gopher_quality", False, "gopher_short_doc")
    shard.close(rank)                                  # commit, then rename: the shard is complete
    merge(["work/ledger"], into=Ledger.open("ledger.sqlite"))

A task's shard is written as `<stage>-<rank>.sqlite.partial` and renamed to `.sqlite` only when
the task ends. Decisions are committed every `commit_every` rows, so a task killed mid-way
(SIGKILL, a pre-empted node) leaves a partial shard that holds exactly its committed rows
(WAL replays them; the open transaction is lost) and never a corrupt one. datatrove reruns an
unfinished task from its start, and so does its shard: the partial file is removed first, so
no decision is recorded twice. `merge` takes complete shards only, and refuses partial ones.

Merging is idempotent: each shard's decisions carry a run label naming the shard, and a merge
replaces the decisions of that label, so merging a shard twice records it once.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from lilliput.data.ledger import Ledger

PARTIAL = ".partial"


class LedgerShard:
    """The ledger shards of one pipeline stage: `<folder>/<stage>-<rank>.sqlite`, one per task.

    Picklable before use (datatrove copies pipeline steps into every task); each task opens its
    own shard on its first decision."""

    def __init__(self, folder: Path | str, stage: str, run: str = "", commit_every: int = 1000):
        self.folder, self.stage, self.run, self.commit_every = str(folder), stage, run, commit_every
        self._open: dict[int, tuple[Ledger, list[tuple]]] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}}  # open connections stay in the task that made them

    def path(self, rank: int) -> Path:
        return Path(self.folder) / f"{self.stage}-{rank:05d}.sqlite"

    def label(self, rank: int) -> str:
        """The run label of this shard's decisions (what an idempotent merge replaces)."""
        return f"{self.run} [{self.stage}-{rank:05d}]".strip()

    def _ledger(self, rank: int) -> tuple[Ledger, list[tuple]]:
        if rank not in self._open:
            partial = self.path(rank).with_name(self.path(rank).name + PARTIAL)
            for stale in (partial, *(partial.with_name(partial.name + s) for s in ("-wal", "-shm"))):
                stale.unlink(missing_ok=True)  # a rerun of a task killed before: start its shard again
            self._open[rank] = (Ledger.open(partial), [])
        return self._open[rank]

    def decide(self, rank: int, doc_id: str, filter: str, kept: bool, reason: str) -> None:
        """Record one verdict; every `commit_every` verdicts are committed together."""
        ledger, rows = self._ledger(rank)
        rows.append((doc_id, filter, kept, reason))
        if len(rows) >= self.commit_every:
            self._commit(rank)

    def _commit(self, rank: int) -> None:
        ledger, rows = self._open[rank]
        if rows:
            ledger.decide(rows, run=self.label(rank))
            rows.clear()

    def close(self, rank: int) -> Path:
        """Commit what is left and mark the shard complete; returns its path."""
        self._ledger(rank)  # a task that decided nothing still leaves an (empty) shard
        self._commit(rank)
        ledger, _ = self._open.pop(rank)
        partial = ledger.path
        ledger.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        ledger.close()
        os.replace(partial, self.path(rank))
        return self.path(rank)


def shard_files(paths: list[Path | str]) -> list[Path]:
    """The complete shards among `paths` (files, or folders searched for `*.sqlite`).

    A partial shard (a task that has not finished) is an error: its task must be rerun first."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            partial = sorted(p.glob(f"*.sqlite{PARTIAL}"))
            if partial:
                raise ValueError(f"{partial[0]} is the shard of a task that did not finish; rerun the pipeline "
                                 f"(it resumes unfinished tasks) before merging ({len(partial)} such shards)")
            found += sorted(p.glob("*.sqlite"))
        elif p.is_file():
            if p.name.endswith(PARTIAL):
                raise ValueError(f"{p} is the shard of a task that did not finish; rerun its task before merging")
            found.append(p)
        else:
            raise FileNotFoundError(f"ledger shard {p} not found; pass shard files or the folder holding them")
    if not found:
        raise FileNotFoundError(f"no ledger shards (*.sqlite) in {', '.join(map(str, paths))}")
    return found


def merge(paths: list[Path | str], into: Ledger) -> dict:
    """Fold ledger shards (files or folders of them) into `into`, one transaction per shard.

    Documents already there with the same sha256 are kept once (another sha256 under the same id
    is an error, as in `Ledger.add`); each shard's decisions replace earlier ones of its run label.
    Returns {"shards", "documents", "decisions"}: what was added."""
    shards = shard_files(paths)
    into_path = into.path.resolve()
    added_docs = added_decisions = 0
    t0 = time.perf_counter()
    for shard in shards:
        if shard.resolve() == into_path:
            raise ValueError(f"{shard} is the ledger being merged into; pass the shards only")
        with Ledger.open(shard, create=False) as src, into.transaction() as c:
            for row in src._query("SELECT * FROM documents ORDER BY rowid"):
                old = c.execute("SELECT sha256 FROM documents WHERE id = ?", (row["id"],)).fetchone()
                if old is not None:
                    if old[0] != row["sha256"]:
                        raise ValueError(f"{shard}: document {row['id']!r} is already in {into.path} with another "
                                         f"sha256 ({old[0][:16]}...)")
                    continue
                if isinstance(row.get("generator"), dict):  # _query parsed it; stored as JSON text
                    row["generator"] = json.dumps(row["generator"], sort_keys=True)
                c.execute(f"INSERT INTO documents ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                          tuple(row.values()))
                added_docs += 1
            c.executemany("INSERT OR IGNORE INTO parents (id, parent) VALUES (?, ?)",
                          src.conn.execute("SELECT id, parent FROM parents").fetchall())
            rows = src.conn.execute("SELECT id, filter, kept, reason, run, created FROM decisions").fetchall()
            for run in {r[4] for r in rows}:
                c.execute("DELETE FROM decisions WHERE run = ?", (run,))
            c.executemany("INSERT INTO decisions (id, filter, kept, reason, run, created) VALUES (?, ?, ?, ?, ?, ?)",
                          rows)
            added_decisions += len(rows)
    return {"shards": len(shards), "documents": added_docs, "decisions": added_decisions,
            "seconds": round(time.perf_counter() - t0, 3)}
