"""The provenance ledger: every document lilliput trains on, where it came from, and what was done to it.

One SQLite file (standard library, WAL mode) holds:

- `documents`: id, sha256, bytes, tokens (and which tokenizer counted them), source (package,
  file), licence, origin ("human" or "synthetic"), generator (model fingerprint, sampling
  settings, seed, watermark key id; JSON), generation (0 = human, n = made by a model trained
  on generation n-1), created time, and the text itself when the ledger holds it;
- `parents`: which documents a synthetic one was generated from (its prompt, its source);
- `decisions`: curation verdicts per document (filter, reason, kept or removed).

    ledger = Ledger.open("ledger.sqlite")           # creates it, or checks it is one of ours
    ledger.add(Entry(text=t, source="my-notes", licence="CC0-1.0"))
    sel = ledger.select(SelectionConfig("accumulate"))  # a training set, by policy
    sel.record()  # {"ledger", "query", "documents", "digest"} for run.json

Writers: every write is one `BEGIN IMMEDIATE` transaction, so several processes may write at
once (they take turns on SQLite's lock, waiting up to `timeout` seconds), and a writer killed
mid-transaction loses only that transaction: WAL replays what was committed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
APPLICATION_ID = 0x4C4C4C47  # "LLLG": marks a SQLite file as a lilliput ledger
ORIGINS = ("human", "synthetic")
POLICIES = ("human", "replace", "accumulate", "fraction")

_SCHEMA = """
CREATE TABLE documents (
    id TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    tokens INTEGER,
    tokenizer TEXT,
    source TEXT NOT NULL DEFAULT '',
    package TEXT NOT NULL DEFAULT '',
    file TEXT NOT NULL DEFAULT '',
    licence TEXT NOT NULL DEFAULT '',
    origin TEXT NOT NULL CHECK (origin IN ('human', 'synthetic')),
    generator TEXT,
    generation INTEGER NOT NULL DEFAULT 0 CHECK (generation >= 0),
    created TEXT NOT NULL,
    text TEXT
);
CREATE INDEX documents_sha256 ON documents (sha256);
CREATE INDEX documents_generation ON documents (origin, generation);
CREATE TABLE parents (
    id TEXT NOT NULL REFERENCES documents (id),
    parent TEXT NOT NULL,
    PRIMARY KEY (id, parent)
);
CREATE TABLE decisions (
    id TEXT NOT NULL,
    filter TEXT NOT NULL,
    kept INTEGER NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    run TEXT NOT NULL DEFAULT '',
    created TEXT NOT NULL
);
CREATE INDEX decisions_id ON decisions (id);
"""


def default_ledger_path() -> Path:
    """`$LILLIPUT_CACHE/ledger.sqlite`, else `~/.cache/lilliput/ledger.sqlite`."""
    root = os.environ.get("LILLIPUT_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "lilliput") / "ledger.sqlite"


def model_fingerprint(model) -> str:
    """"sha256:<16 hex>" over a torch model's parameter and buffer names, shapes, dtypes and bytes."""
    import torch  # here, so that ledger writers need not load torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}\n".encode("utf-8"))
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()[:16]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Generator:
    """What made a synthetic text: enough to make it again."""

    model: str
    """Model fingerprint (e.g. the sha256 of its weights file, or a name plus its run's git SHA)."""
    sampling: dict = field(default_factory=dict)
    """Sampling settings (temperature, top_k, top_p, max_new_tokens, ...)."""
    seed: int | None = None
    """Sampler seed."""
    watermark_key_id: str | None = None
    """Id of the watermark key (never the key itself; see watermark.key_id); None: not watermarked."""
    prompt: str | None = None
    """The prompt it was generated from (chat messages as the teacher saw them); None: not recorded."""


def _generator_dict(g: Generator) -> dict[str, Any]:
    """A generator as stored: without `prompt` when none was recorded (rows written before it existed match)."""
    d = asdict(g)
    if d["prompt"] is None:
        del d["prompt"]
    return d


@dataclass(frozen=True)
class Entry:
    """A document to add. `id` defaults to "<origin>/<sha256[:16]>"."""

    text: str | None = None
    """The text; None records a document by hash only (then give sha256 and bytes)."""
    id: str | None = None
    sha256: str | None = None
    bytes: int | None = None
    tokens: int | None = None
    tokenizer: str | None = None
    """Which tokenizer counted `tokens`."""
    source: str = ""
    package: str = ""
    file: str = ""
    licence: str = ""
    origin: str = "human"
    """"human" or "synthetic"."""
    generator: Generator | None = None
    """Required for synthetic documents."""
    generation: int = 0
    """0 for human text; n for text from a model trained on generation n-1."""
    parents: tuple[str, ...] = ()
    """Ids of the documents this one was generated from."""
    keep_text: bool = True
    """Store the text in the ledger (export needs it); False stores only its hash."""


@dataclass(frozen=True)
class SelectionConfig:
    """Which documents make a training set."""

    policy: str = "accumulate"
    """human: human text only; replace: the latest generation only (human text while there is no
    synthetic one); accumulate: every generation; fraction: `human_fraction` of the documents are human."""
    human_fraction: float = 0.5
    """For policy=fraction: the share of human documents; the rest is synthetic, all generations."""
    include_removed: bool = False
    """Keep documents a curation filter removed (off: a removal in `decisions` excludes a document)."""
    seed: int = 0
    """Which documents a fraction policy keeps when one side must be cut."""

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if not 0.0 <= self.human_fraction <= 1.0:
            raise ValueError(f"human_fraction must be in [0, 1], got {self.human_fraction}")


def selection_digest(rows: Iterable[tuple[str, str]]) -> str:
    """sha256 over the sorted "id<TAB>sha256" lines of a document set: names it by content."""
    h = hashlib.sha256()
    for doc_id, digest in sorted(rows):
        h.update(f"{doc_id}\t{digest}\n".encode("utf-8"))
    return h.hexdigest()


@dataclass(frozen=True)
class Selection:
    ledger: str
    config: SelectionConfig
    ids: tuple[str, ...]
    digest: str

    def record(self) -> dict[str, Any]:
        """What a trained model's run.json says about its data (pass as `Trainer(..., record={"data": ...})`)."""
        return {"ledger": self.ledger, "query": asdict(self.config), "documents": len(self.ids),
                "digest": self.digest}


class Ledger:
    """A provenance ledger file. Open with `Ledger.open(path)`; usable as a context manager."""

    def __init__(self, conn: sqlite3.Connection, path: Path):
        self.conn, self.path = conn, path

    @classmethod
    def open(cls, path: Path | str, create: bool = True, timeout: float = 60.0) -> Ledger:
        """Open (or create) the ledger at `path`. A file that is not a ledger, or a ledger of a newer
        schema, raises ValueError."""
        path = Path(path).expanduser()
        if not path.exists():
            if not create:
                raise FileNotFoundError(f"no ledger at {path}; run `lilliput data fetch` or `lilliput data add` first")
            path.parent.mkdir(parents=True, exist_ok=True)
        elif path.is_dir():
            raise ValueError(f"{path} is a folder; pass the ledger file (e.g. {path / 'ledger.sqlite'})")
        conn = sqlite3.connect(path, timeout=timeout, isolation_level=None)  # autocommit: we BEGIN ourselves
        try:
            cls._check_or_create(conn, path)
        except BaseException:
            conn.close()
            raise
        return cls(conn, path)

    @staticmethod
    def _check_or_create(conn: sqlite3.Connection, path: Path) -> None:
        try:  # one read transaction: a writer creating the ledger meanwhile is seen whole or not at all
            conn.execute("BEGIN")  # (read apart, its tables could appear between the id and the count)
            try:
                app, version = conn.execute("PRAGMA application_id").fetchone()[0], conn.execute(
                    "PRAGMA user_version").fetchone()[0]
                tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")
        except sqlite3.DatabaseError:
            raise ValueError(f"{path} is not a lilliput ledger (not an SQLite database); "
                             "pass a ledger file or a new path to create one") from None
        if app == 0 and tables == 0:  # a new, empty file: make it a ledger (once, under the write lock)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
                    for statement in _SCHEMA.split(";"):  # not executescript: it would COMMIT first
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
                    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")
            app, version = APPLICATION_ID, SCHEMA_VERSION
        if app != APPLICATION_ID:
            raise ValueError(f"{path} is an SQLite database but not a lilliput ledger; "
                             "pass a ledger file or a new path to create one")
        if version > SCHEMA_VERSION:
            raise ValueError(f"{path} is a ledger of schema {version}, newer than this lilliput's "
                             f"{SCHEMA_VERSION}; upgrade lilliput to read it")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a process crash loses no commit

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it is committed, or none of it."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # --- writing -------------------------------------------------------------------------------------

    def add(self, entry: Entry) -> str:
        """Add one document; returns its id. Adding the same id with the same sha256 again is a no-op."""
        return self.add_many([entry])[0]

    def add_many(self, entries: Iterable[Entry]) -> list[str]:
        """Add documents in one transaction; returns their ids."""
        rows = [self._row(e) for e in entries]
        ids = []
        with self.transaction() as c:
            for row, parents in rows:
                old = c.execute("SELECT sha256 FROM documents WHERE id = ?", (row["id"],)).fetchone()
                if old is not None:
                    if old[0] != row["sha256"]:
                        raise ValueError(f"document {row['id']!r} is already in the ledger with another sha256 "
                                         f"({old[0][:16]}...); give the new text another id")
                else:
                    c.execute(f"INSERT INTO documents ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                              tuple(row.values()))
                    c.executemany("INSERT OR IGNORE INTO parents (id, parent) VALUES (?, ?)",
                                  [(row["id"], p) for p in parents])
                ids.append(row["id"])
        return ids

    @staticmethod
    def _row(e: Entry) -> tuple[dict[str, Any], tuple[str, ...]]:
        if e.origin not in ORIGINS:
            raise ValueError(f"origin must be 'human' or 'synthetic', got {e.origin!r}")
        if e.origin == "synthetic" and e.generator is None:
            raise ValueError("a synthetic document needs its generator (model fingerprint, sampling, seed)")
        if e.origin == "human" and e.generation != 0:
            raise ValueError(f"human text is generation 0, got generation {e.generation}")
        if e.origin == "synthetic" and e.generation < 1:
            raise ValueError(f"synthetic text is generation >= 1, got {e.generation}")
        if e.text is None and (e.sha256 is None or e.bytes is None):
            raise ValueError("give the text, or its sha256 and bytes")
        digest = sha256_text(e.text) if e.text is not None else e.sha256
        if e.text is not None and e.sha256 is not None and e.sha256 != digest:
            raise ValueError(f"sha256 {e.sha256[:16]}... does not match the text ({digest[:16]}...)")
        row = {"id": e.id or f"{e.origin}/{digest[:16]}", "sha256": digest,
               "bytes": len(e.text.encode("utf-8")) if e.text is not None else e.bytes,
               "tokens": e.tokens, "tokenizer": e.tokenizer, "source": e.source, "package": e.package,
               "file": e.file, "licence": e.licence, "origin": e.origin,
               "generator": json.dumps(_generator_dict(e.generator), sort_keys=True) if e.generator else None,
               "generation": e.generation, "created": _now(), "text": e.text if e.keep_text else None}
        return row, tuple(e.parents)

    def decide(self, decisions: Iterable[tuple[str, str, bool, str]], run: str = "") -> int:
        """Record curation verdicts (id, filter, kept, reason) in one transaction; returns how many."""
        rows = [(i, f, int(k), r, run, _now()) for i, f, k, r in decisions]
        with self.transaction() as c:
            c.executemany("INSERT INTO decisions (id, filter, kept, reason, run, created) VALUES (?, ?, ?, ?, ?, ?)",
                          rows)
        return len(rows)

    # --- reading -------------------------------------------------------------------------------------

    def get(self, doc_id: str) -> dict[str, Any]:
        row = self._query("SELECT * FROM documents WHERE id = ?", (doc_id,))
        if not row:
            raise KeyError(f"no document {doc_id!r} in {self.path}")
        doc = row[0]
        doc["parents"] = [p for (p,) in self.conn.execute("SELECT parent FROM parents WHERE id = ? ORDER BY parent",
                                                           (doc_id,))]
        doc["decisions"] = self._query("SELECT filter, kept, reason, run, created FROM decisions WHERE id = ?",
                                       (doc_id,))
        return doc

    def _query(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        cur = self.conn.execute(sql, args)
        names = [d[0] for d in cur.description]
        out = [dict(zip(names, r)) for r in cur.fetchall()]
        for d in out:
            if d.get("generator"):
                d["generator"] = json.loads(d["generator"])
        return out

    def documents(self, origin: str | None = None, generation: int | None = None, limit: int | None = None,
                  text: bool = False) -> list[dict[str, Any]]:
        """Document rows (without their text unless `text`), oldest first."""
        cols = "*" if text else ", ".join(c for c in _COLUMNS if c != "text")
        where, args = [], []
        if origin is not None:
            where.append("origin = ?")
            args.append(origin)
        if generation is not None:
            where.append("generation = ?")
            args.append(generation)
        sql = f"SELECT {cols} FROM documents" + (f" WHERE {' AND '.join(where)}" if where else "")
        sql += " ORDER BY rowid" + (f" LIMIT {int(limit)}" if limit is not None else "")
        return self._query(sql, tuple(args))

    def sha256_of(self, doc_id: str) -> str | None:
        """The recorded sha256 of a document, None when the ledger has no such id."""
        row = self.conn.execute("SELECT sha256 FROM documents WHERE id = ?", (doc_id,)).fetchone()
        return row[0] if row else None

    def __len__(self) -> int:
        return self.conn.execute("SELECT count(*) FROM documents").fetchone()[0]

    def stats(self) -> dict[str, Any]:
        """Counts by origin and generation, and curation removals by filter."""
        by = self._query("SELECT origin, generation, count(*) AS documents, sum(bytes) AS bytes, "
                         "sum(tokens) AS tokens FROM documents GROUP BY origin, generation ORDER BY generation")
        removed = self._query("SELECT filter, count(DISTINCT id) AS documents FROM decisions WHERE kept = 0 "
                              "GROUP BY filter ORDER BY filter")
        return {"ledger": str(self.path), "schema": SCHEMA_VERSION, "documents": len(self),
                "by_generation": by, "removed_by_filter": removed}

    def removed_ids(self) -> set[str]:
        return {i for (i,) in self.conn.execute("SELECT DISTINCT id FROM decisions WHERE kept = 0")}

    def select(self, cfg: SelectionConfig = SelectionConfig()) -> Selection:
        """The training set a policy picks, named by its digest."""
        rows = [(i, s, o, g) for i, s, o, g in self.conn.execute(
            "SELECT id, sha256, origin, generation FROM documents ORDER BY id")]
        if not cfg.include_removed:
            removed = self.removed_ids()
            rows = [r for r in rows if r[0] not in removed]
        human = [r for r in rows if r[2] == "human"]
        synthetic = [r for r in rows if r[2] == "synthetic"]
        if cfg.policy == "human":
            chosen = human
        elif cfg.policy == "replace":
            latest = max((r[3] for r in synthetic), default=0)
            chosen = [r for r in rows if r[3] == latest]
        elif cfg.policy == "accumulate":
            chosen = rows
        else:
            chosen = _mix(human, synthetic, cfg.human_fraction, cfg.seed)
        return Selection(str(self.path), cfg, tuple(sorted(r[0] for r in chosen)),
                         selection_digest((r[0], r[1]) for r in chosen))

    def texts(self, ids: Iterable[str]) -> Iterator[tuple[str, str]]:
        """(id, text) for each id; a document stored by hash only raises ValueError."""
        for doc_id in ids:
            row = self.conn.execute("SELECT text FROM documents WHERE id = ?", (doc_id,)).fetchone()
            if row is None:
                raise KeyError(f"no document {doc_id!r} in {self.path}")
            if row[0] is None:
                raise ValueError(f"document {doc_id!r} is recorded by hash only; its text is not in the ledger")
            yield doc_id, row[0]

    def export(self, out: Path | str, cfg: SelectionConfig = SelectionConfig()) -> Selection:
        """Write the selected documents as JSON lines {"id", "text", "origin", "generation", "sha256"}."""
        sel = self.select(cfg)
        meta = {r["id"]: r for r in self.documents()}
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for doc_id, text in self.texts(sel.ids):
                m = meta[doc_id]
                f.write(json.dumps({"id": doc_id, "text": text, "origin": m["origin"],
                                    "generation": m["generation"], "sha256": m["sha256"]}, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
        return sel


_COLUMNS = ("id", "sha256", "bytes", "tokens", "tokenizer", "source", "package", "file", "licence", "origin",
            "generator", "generation", "created", "text")


def mix_sizes(n_human: int, n_synthetic: int, fraction: float) -> tuple[int, int]:
    """(human, synthetic) documents a `fraction`-human selection keeps: all of the side that binds,
    the other cut to fit."""
    if fraction >= 1.0 or not n_synthetic:
        return n_human, 0
    if fraction <= 0.0 or not n_human:
        return 0, n_synthetic
    if n_human / (n_human + n_synthetic) > fraction:  # too much human text: keep all synthetic
        return min(n_human, round(n_synthetic * fraction / (1 - fraction))), n_synthetic
    return n_human, min(n_synthetic, round(n_human * (1 - fraction) / fraction))


def _mix(human: list, synthetic: list, fraction: float, seed: int) -> list:
    """Documents with `fraction` of them human (`mix_sizes`), each side cut at random."""
    if fraction >= 1.0 or not synthetic:
        return human
    if fraction <= 0.0 or not human:
        return synthetic
    n_h, n_s = mix_sizes(len(human), len(synthetic), fraction)
    rng = random.Random(seed)
    return rng.sample(human, n_h) + rng.sample(synthetic, n_s)
