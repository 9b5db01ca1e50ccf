"""Curation: documents in, fewer and better documents out, with every removal and its reason.

The stages, in order (each one on or off in `CurateConfig`):

1. exact duplicates (sha256 of the text): the first copy stays;
2. C4's line filters (drops lines; removes a document left with too few sentences);
3. Gopher's quality rules, then its repetition rules (lilliput.data.quality);
4. near-duplicates by MinHash LSH over word 5-grams (lilliput.data.minhash): of each group
   of documents above the Jaccard threshold, the first in input order stays;
5. perplexity under a reference model, above `max_perplexity` removed. The scorer is a callable
   (text -> perplexity) the caller passes in: data/ sits below the model code, so
   `lilliput curate` builds it from lilliput.eval.perplexity.

    result = curate(docs, CurateConfig())       # docs: [CurateDocument(id, text)]
    result.kept, result.decisions, result.summary()
    ledger.decide(result.ledger_rows(), run="curate 2026-12-01")

`read_documents` / `write_documents` read a JSON-lines file ({"id", "text", ...}, what
`lilliput data export` writes) or a folder of .txt files, and write JSON lines.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from lilliput.data.minhash import MinHashConfig, minhash_signatures, near_duplicates
from lilliput.data.quality import (C4Config, GopherQualityConfig, GopherRepetitionConfig, c4_lines,
                                   gopher_quality, gopher_repetition)

FILTERS = ("exact_dedup", "c4", "gopher_quality", "gopher_repetition", "near_dedup", "perplexity")


@dataclass(frozen=True)
class CurateConfig:
    exact_dedup: bool = True
    """Remove documents whose text is byte-identical to an earlier one."""
    c4: bool = True
    """Apply C4's line filters (drop lines without terminal punctuation, short lines, boilerplate)."""
    gopher_quality: bool = True
    """Apply Gopher's quality rules (length, word length, symbols, bullets, stop words)."""
    gopher_repetition: bool = True
    """Apply Gopher's repetition rules (duplicate lines, paragraphs and n-grams)."""
    near_dedup: bool = True
    """Remove near-duplicates found by MinHash LSH."""
    near_threshold: float = 0.8
    """Jaccard similarity of word 5-gram sets at which two documents are near-duplicates."""
    max_perplexity: float | None = None
    """Remove documents whose perplexity under the reference model is above this; None: off."""
    c4_config: C4Config = field(default_factory=C4Config)
    quality_config: GopherQualityConfig = field(default_factory=GopherQualityConfig)
    repetition_config: GopherRepetitionConfig = field(default_factory=GopherRepetitionConfig)
    minhash_config: MinHashConfig = field(default_factory=MinHashConfig)


@dataclass(frozen=True)
class CurateDocument:
    id: str
    text: str
    meta: dict = field(default_factory=dict)
    """Other fields of its input line, written back unchanged."""


@dataclass(frozen=True)
class Decision:
    id: str
    filter: str
    kept: bool
    """False: removed; True: kept but changed (C4 dropped some of its lines)."""
    reason: str


@dataclass
class CurateResult:
    kept: list[CurateDocument]
    decisions: list[Decision]
    total: int

    def removed(self) -> list[Decision]:
        return [d for d in self.decisions if not d.kept]

    def summary(self) -> dict:
        """{"documents", "kept", "removed_by_filter": {filter: n}, "changed_by_filter": {filter: n}}."""
        return {"documents": self.total, "kept": len(self.kept),
                "removed_by_filter": dict(Counter(d.filter for d in self.decisions if not d.kept)),
                "changed_by_filter": dict(Counter(d.filter for d in self.decisions if d.kept))}

    def ledger_rows(self) -> list[tuple[str, str, bool, str]]:
        """(id, filter, kept, reason) rows for `Ledger.decide`."""
        return [(d.id, d.filter, d.kept, d.reason) for d in self.decisions]


def curate(docs: list[CurateDocument], cfg: CurateConfig = CurateConfig(),
           perplexity: Callable[[str], float] | None = None) -> CurateResult:
    """Run the enabled stages over `docs`; every removal (and every change) is a Decision."""
    if cfg.max_perplexity is not None and perplexity is None:
        raise ValueError("max_perplexity is set but no perplexity scorer was given (text -> perplexity)")
    ids = [d.id for d in docs]
    if len(set(ids)) != len(ids):
        dup = next(i for i, n in Counter(ids).items() if n > 1)
        raise ValueError(f"document id {dup!r} appears twice in the input; ids must be unique")
    decisions: list[Decision] = []
    alive = list(docs)

    def drop(stage: str, verdicts: list[str | None]) -> None:
        nonlocal alive
        keep = []
        for doc, why in zip(alive, verdicts):
            if why is None:
                keep.append(doc)
            else:
                decisions.append(Decision(doc.id, stage, False, why))
        alive = keep

    if cfg.exact_dedup:
        first: dict[str, str] = {}
        verdicts = []
        for doc in alive:
            h = hashlib.sha256(doc.text.encode("utf-8")).hexdigest()
            verdicts.append(f"identical to {first[h]}" if h in first else None)
            first.setdefault(h, doc.id)
        drop("exact_dedup", verdicts)
    if cfg.c4:
        verdicts, edited = [], []
        for doc in alive:
            why, text, dropped = c4_lines(doc.text, cfg.c4_config)
            verdicts.append(why)
            if why is None and dropped:
                decisions.append(Decision(doc.id, "c4", True, f"dropped {dropped} lines"))
            edited.append(replace(doc, text=text) if why is None and text != doc.text else doc)
        alive = edited
        drop("c4", verdicts)
    if cfg.gopher_quality:
        drop("gopher_quality", [gopher_quality(d.text, cfg.quality_config) for d in alive])
    if cfg.gopher_repetition:
        drop("gopher_repetition", [gopher_repetition(d.text, cfg.repetition_config) for d in alive])
    if cfg.near_dedup and len(alive) > 1:
        mh = replace(cfg.minhash_config, threshold=cfg.near_threshold)
        texts = [d.text for d in alive]
        pairs = near_duplicates(minhash_signatures(texts, mh), mh, texts=texts)
        dup_of: dict[int, tuple[int, float]] = {}
        for i, j, est in pairs:  # sorted by i: j is a duplicate of the earliest kept document it matches
            if i not in dup_of and j not in dup_of:
                dup_of[j] = (i, est)
        drop("near_dedup", [f"near-duplicate of {alive[dup_of[k][0]].id} (Jaccard {dup_of[k][1]:.2f})"
                            if k in dup_of else None for k in range(len(alive))])
    if cfg.max_perplexity is not None:
        verdicts = []
        for d in alive:
            try:
                p = perplexity(d.text)
            except ValueError as e:  # e.g. a one-token text: nothing to score
                verdicts.append(f"cannot be scored: {e}")
                continue
            verdicts.append(f"perplexity {p:.1f} > {cfg.max_perplexity}" if p > cfg.max_perplexity else None)
        drop("perplexity", verdicts)
    return CurateResult(alive, decisions, len(docs))


# --- files ------------------------------------------------------------------------------------------

def read_documents(path: Path | str) -> list[CurateDocument]:
    """A JSON-lines file ({"id", "text", ...} per line) or a folder of .txt files (id: path without .txt)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise FileNotFoundError(f"no .txt files under {path}")
        return [CurateDocument(f.relative_to(path).with_suffix("").as_posix(), f.read_text(encoding="utf-8"))
                for f in files]
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass a .jsonl file (e.g. from `lilliput data export`) "
                                "or a folder of .txt files")
    docs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                docs.append(CurateDocument(str(row.pop("id")), row.pop("text"), row))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise ValueError(f"{path}:{n}: expected a JSON object with \"id\" and \"text\"") from None
    return docs


def write_documents(path: Path | str, docs: list[CurateDocument]) -> Path:
    """JSON lines {"id", "text", ...meta}, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"id": d.id, "text": d.text, **d.meta}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
