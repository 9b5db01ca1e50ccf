"""Curation on datatrove (lilliput.data.curate): the pipeline on the local executor, its verdicts in
ledger shards, lilliput's own steps, and the command. The Ray run is tests/test_curate_ray.py."""

import dataclasses
import json
import random
import re
from collections import Counter

import pytest

from lilliput.data.corpus import sample_documents
from lilliput.data.curate import CurateConfig, curate, curate_documents, lsh_params
from lilliput.data.ledger import Entry, Ledger, SelectionConfig
from lilliput.data.planted import jaccard, passages, plant, score


def planted_corpus(n: int = 24, seed: int = 0):
    """n prose passages and a copy of each (exact, or with 0.5% .. 15% of its words replaced)."""
    return plant(passages(sample_documents(), n), seed=seed)


def write_jsonl(path, docs):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def read_output(folder):
    return {json.loads(line)["id"]: json.loads(line) for f in sorted(folder.glob("*.jsonl"))
            for line in f.read_text().splitlines()}


def clusters(decisions) -> set[tuple[str, str]]:
    """Pairs of documents in one MinHash cluster, from the reasons the ledger holds."""
    members: dict[str, list[str]] = {}
    for doc_id, _, _, reason in decisions:
        if m := re.search(r"MinHash cluster (\d+)", reason):
            members.setdefault(m[1], []).append(doc_id)
    return {(a, b) for ids in members.values() for a in ids for b in ids if a < b}


def test_lsh_bands_put_the_s_curve_at_the_threshold():
    p = lambda s, b, r: 1 - (1 - s ** r) ** b  # noqa: E731  (a pair of Jaccard s shares one of b bands of r rows)
    # without the exact check the bands decide: the curve's middle sits at the threshold
    bands, rows = lsh_params(0.8, 112)
    assert (bands, rows) == (9, 12) and bands * rows <= 112
    assert p(0.95, bands, rows) > 0.99 and 0.4 < p(0.8, bands, rows) < 0.6 and p(0.6, bands, rows) < 0.05
    mh = CurateConfig(near_threshold=0.6, near_check=False).minhash()  # a lower threshold: the curve moves with it
    assert 0.3 < p(0.6, mh.num_buckets, mh.hashes_per_bucket) < 0.6
    # with the check, recall first: the most rows per band that still propose a pair at the threshold 99% of the time
    for threshold in (0.8, 0.6):
        mh = CurateConfig(near_threshold=threshold).minhash()
        b, r = mh.num_buckets, mh.hashes_per_bucket
        assert b * r <= 112 and p(threshold, b, r) >= 0.99 > p(threshold, 112 // (r + 1), r + 1), (b, r)
    assert CurateConfig().minhash().num_buckets == 18


def test_pipeline_finds_planted_copies_and_records_every_verdict(tmp_path):
    planted = planted_corpus()
    # two input files, two tasks: datatrove deals files out to tasks
    half = len(planted.docs) // 2
    write_jsonl(tmp_path / "in" / "a.jsonl", planted.docs[:half])
    write_jsonl(tmp_path / "in" / "b.jsonl", planted.docs[half:] + [{"id": "short", "text": "Too short to keep."}])
    result = curate([tmp_path / "in"], tmp_path / "out", CurateConfig(tasks=2, workers=1))
    kept = read_output(tmp_path / "out")
    s = result.summary()
    assert s["documents"] == len(planted.docs) + 1 and s["kept"] == len(kept)
    # every document has exactly one final verdict: kept, or removed by one filter
    final = [d for d in result.decisions if d[1] == "curate" or not d[2]]
    assert sorted(d[0] for d in final) == sorted([d["id"] for d in planted.docs] + ["short"])
    why = {d[0]: d for d in result.removed()}
    assert why["short"][1] in ("c4", "gopher_quality")
    quality = {d[0] for d in result.removed() if d[1] in ("c4", "gopher_quality", "gopher_repetition")}
    assert len(quality) < len(planted.docs) // 2  # most prose passages pass C4's and Gopher's rules
    checked = Counter()
    for a, b, sim in planted.pairs:
        if sim == 1.0:  # one of two identical texts goes, before any quality rule
            assert sorted(why[x][1] for x in (a, b) if x in why)[0] == "exact_dedup" and (a in kept) + (b in kept) <= 1
            checked["exact"] += 1
        elif a in quality or b in quality:
            continue
        elif sim >= 0.9:  # near copies at Jaccard >= 0.9: one of each pair goes
            assert (a in kept) != (b in kept), (a, b, sim)
            gone = why[a if a not in kept else b]
            assert gone[1] == "near_dedup" and "MinHash cluster" in gone[3]
            checked["near"] += 1
        elif sim < 0.5:  # copies with half their 5-grams changed: both stay
            assert a in kept and b in kept, (a, b, sim)
            checked["distinct"] += 1
    assert min(checked["exact"], checked["near"], checked["distinct"]) >= 2, checked
    assert {k: v for k, v in kept[next(iter(kept))].items() if k not in ("id", "text")} == {}  # no internal fields
    # the same command again resumes: every task is complete, nothing runs twice
    again = curate([tmp_path / "in"], tmp_path / "out", CurateConfig(tasks=2, workers=1))
    assert sorted(again.decisions) == sorted(result.decisions)


def test_near_dedup_precision_and_recall_on_planted_copies(tmp_path):
    planted = plant(passages(sample_documents(), 40), seed=1)
    cfg = CurateConfig(exact_dedup=False, c4=False, gopher_quality=False, gopher_repetition=False)
    _, result = curate_documents(planted.docs, cfg)
    m = score(clusters(result.decisions), planted.truth(0.8))
    # every candidate checked on the truth's own shingles: exact, but for a pair the bands never propose
    assert m["true"] >= 15 and m["precision"] == 1.0 and m["recall"] == 1.0, m
    # the bands alone (datatrove's way) at a curve whose middle is not the threshold: pairs below it go too
    low = dataclasses.replace(cfg, near_threshold=0.6, minhash_hashes=24)
    _, loose = curate_documents(planted.docs, dataclasses.replace(low, near_check=False))
    found = clusters(loose.decisions)
    assert any(jaccard(*(d["text"] for d in planted.docs if d["id"] in pair)) < 0.8 for pair in found)
    _, checked = curate_documents(planted.docs, low)
    sims = {tuple(sorted((a, b))): s for a, b, s in planted.pairs}
    assert all(sims.get(pair, 0.0) >= 0.6 for pair in clusters(checked.decisions))


def test_cached_tokenizer_gives_datatrove_s_words_and_sentences():
    from datatrove.utils.word_tokenizers import load_word_tokenizer

    from lilliput.data.word_tokenizer import CachedSpaCyTokenizer

    texts = passages(sample_documents(), 8, prose_only=False) + ["", "a", "Mr. Smith left... at 5 p.m.! (Why?)"]
    lines = [ln for t in texts for ln in t.splitlines()]
    ours, theirs = CachedSpaCyTokenizer("en", max_words=300), load_word_tokenizer("en")  # 300: pipelines renewed
    for texts_ in (texts, lines):
        assert [ours.word_tokenize(t) for t in texts_] == [theirs.word_tokenize(t) for t in texts_]
        assert [ours.span_tokenize(t) for t in texts_] == [theirs.span_tokenize(t) for t in texts_]
        assert [ours.sent_tokenize(t) for t in texts_] == [theirs.sent_tokenize(t) for t in texts_]
    # a text spaCy may choke on goes through datatrove's own code, whose answer depends on its history
    assert ours.word_tokenize("IS_ALPHA breaks spaCy.")[-2:] == ["spaCy", "."]
    with pytest.raises(ValueError, match="max_words"):
        CachedSpaCyTokenizer("en", max_words=0)


def test_documents_in_memory_keep_their_fields_and_ids_must_be_unique():
    docs = [{"id": f"d{k}", "text": t, "topic": k} for k, t in enumerate(passages(sample_documents(), 3))]
    kept, result = curate_documents(docs + [{"id": "dup", "text": docs[0]["text"], "topic": 9}],
                                    CurateConfig(c4=False, gopher_quality=False, gopher_repetition=False,
                                                 near_dedup=False))
    assert [d["id"] for d in kept] == ["d0", "d1", "d2"] and kept[1]["topic"] == 1
    assert result.summary()["removed_by_filter"] == {"exact_dedup": 1}
    with pytest.raises(ValueError, match="appears twice"):
        curate_documents(docs + docs[:1])


def test_watermark_step_drops_or_tags_watermarked_text(tmp_path):
    from datatrove.data import Document

    from lilliput.core.tokenizer import ByteTokenizer
    from lilliput.data.curate_steps import LedgerExclusion, LedgerWriter, WatermarkFilter
    from lilliput.data.ledger_shards import LedgerShard
    from lilliput.data.watermark import Detector

    det, tok, rng = Detector("k"), ByteTokenizer(), random.Random(0)
    text = "a"  # each next letter green after the one before: what a strongly watermarked sampler writes
    while len(text) < 300:
        ids = tok.encode(text, bos=False)
        text += rng.choice([c for c in "etaoinshrdlucmfwypvbgk ,."
                            if det.green_flags(ids + tok.encode(c, bos=False), prompt_len=len(ids) - 1).all()])
    human = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 2
    assert det.detect_text(text, tok).watermarked and not det.detect_text(human, tok).watermarked
    for action in ("drop", "tag"):
        shard = LedgerShard(tmp_path / action, "final")
        steps = [WatermarkFilter("k", ByteTokenizer, action=action, exclusion_writer=LedgerExclusion(shard, "watermark"),
                                 ledger=shard), LedgerWriter(shard)]
        data = [Document(text, "synthetic"), Document(human, "human")]
        for step in steps:
            data = step(data, rank=0)
        out = list(data)
        with Ledger.open(shard.path(0), create=False) as led:
            rows = led.conn.execute("SELECT id, filter, kept, reason FROM decisions ORDER BY rowid").fetchall()
        if action == "drop":
            assert [d.id for d in out] == ["human"]
            assert rows[0][:3] == ("synthetic", "watermark", 0) and rows[0][3].startswith("watermarked: z ")
        else:
            assert [d.id for d in out] == ["synthetic", "human"] and out[0].metadata["watermark_z"] > 4
            assert [(r[0], r[1], r[2]) for r in rows] == [("synthetic", "watermark", 1), ("synthetic", "curate", 1),
                                                          ("human", "curate", 1)]


def test_cli_curate_jsonl_and_parquet_into_a_ledger(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datatrove.data import Document
    from datatrove.pipeline.filters import GopherQualityFilter

    from lilliput.cli import main

    good = [t for t in passages(sample_documents(), 12) if GopherQualityFilter().filter(Document(t, "")) is True][:2]
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"id": "good", "text": good[0], "lang": "en"},
                                             {"id": "short", "text": "too short to keep."}])
    pq.write_table(pa.table({"id": ["pq"], "text": [good[1]]}), tmp_path / "in" / "b.parquet")
    led = tmp_path / "l.sqlite"
    with Ledger.open(led) as ledger:  # two of the three are in the ledger already (`lilliput data add`, say)
        ledger.add_many([Entry(text=good[0], id="good"), Entry(text="too short to keep.", id="short")])
    out = tmp_path / "out"
    assert main(["curate", "--input", str(tmp_path / "in" / "a.jsonl"), str(tmp_path / "in" / "b.parquet"),
                 "--output", str(out), "--ledger", str(led), "--no-c4", "--no-near-dedup", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["kept"] == 2 and summary["removed_by_filter"] == {"gopher_quality": 1}
    assert summary["merged"]["decisions"] == 3
    kept = read_output(out)
    assert sorted(kept) == ["good", "pq"] and kept["good"]["lang"] == "en"
    with Ledger.open(led) as ledger:
        assert [(d["filter"], d["kept"]) for d in ledger.get("short")["decisions"]] == [("gopher_quality", 0)]
        assert ledger.select(SelectionConfig("human")).ids == ("good",)  # a removal leaves every selection
        assert ledger.stats()["removed_by_filter"] == [{"filter": "gopher_quality", "documents": 1}]
    # merging the shards again records nothing twice
    assert main(["data", "ledger", "merge", str(tmp_path / "out.work" / "ledger"), "--ledger", str(led), "--json"]) == 0
    capsys.readouterr()
    with Ledger.open(led) as ledger:
        assert ledger.conn.execute("SELECT count(*) FROM decisions").fetchone()[0] == 3
    # user errors: one line, exit 2
    for argv, msg in ((["--input", str(tmp_path / "missing.jsonl")], "not found"),
                      (["--input", str(led)], "neither JSON lines"),
                      (["--input", str(tmp_path / "in"), "--executor", "spark"], "executor must be one of"),
                      (["--input", str(tmp_path / "in"), "--executor", "slurm"], "--slurm-partition"),
                      (["--input", str(tmp_path / "in"), "--max-perplexity", "10", "--model", str(tmp_path / "none")],
                       "not found")):
        assert main(["curate", *argv, "--output", str(tmp_path / "o2")]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err
    assert main(["data", "ledger", "merge", str(tmp_path / "nothing"), "--ledger", str(led)]) == 2


def test_perplexity_filter_with_a_real_model_through_the_cli(tmp_path, tiny_model, byte_tokenizer, capsys):
    from lilliput.cli import main
    from lilliput.core.checkpoint import save_checkpoint

    ckpt = str(save_checkpoint(tiny_model, byte_tokenizer, tmp_path / "tiny"))
    write_jsonl(tmp_path / "in.jsonl", [{"id": f"d{i}", "text": t} for i, t in
                                        enumerate(["hello there, a text of some length. " * 3, "another one."])])
    only_ppl = ["--no-exact-dedup", "--no-c4", "--no-gopher-quality", "--no-gopher-repetition", "--no-near-dedup"]
    for limit, kept in (("1e9", 2), ("1", 0)):  # a random byte model: perplexity ~256
        out = tmp_path / f"out{kept}"
        assert main(["curate", "--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--model", ckpt,
                     "--device", "cpu", "--max-perplexity", limit, "--json", *only_ppl]) == 0
        summary = json.loads(capsys.readouterr().out.splitlines()[-1])
        assert summary["kept"] == kept and summary["removed_by_filter"] == ({"perplexity": 2} if not kept else {})
    with pytest.raises(ValueError, match="no perplexity scorer"):
        curate([tmp_path / "in.jsonl"], tmp_path / "o", CurateConfig(max_perplexity=10.0))


def test_jaccard_of_planted_copies_follows_the_replaced_share():
    originals = passages(sample_documents(), 8)
    planted = plant(originals, rates=(0.0, 0.01, 0.05, 0.15))
    sims = [s for _, _, s in planted.pairs]
    assert sims[0] == sims[4] == 1.0 and 0.85 < sims[1] < 1.0 and 0.5 < sims[2] < 0.8 and sims[3] < 0.4
    assert jaccard(originals[0], originals[1]) < 0.05
    assert score({("c1", "o1"), ("o2", "o3")}, {("o1", "c1"), ("o0", "c0")}) == \
        {"found": 2, "true": 2, "correct": 1, "precision": 0.5, "recall": 0.5}
