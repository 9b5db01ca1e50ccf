"""Textbook-style synthetic data: prompts (lilliput.data.textbook) and the synth job (lilliput.jobs.synth)."""

import dataclasses
import json

import pytest
import torch

from lilliput.core.config import ModelConfig
from lilliput.core.model import GPT
from lilliput.core.tokenizer import ByteTokenizer
from lilliput.data.ledger import Ledger
from lilliput.data.textbook import (KINDS, PERSONAS, TEMPLATES, assemble, document_seed, load_topics,
                                    textbook_prompt, textbook_prompts)
from lilliput.data.watermark import key_id


def test_prompt_is_a_function_of_topic_and_seed_and_varies_across_seeds():
    assert textbook_prompt("fractions", 7) == textbook_prompt("fractions", 7)
    assert textbook_prompt("fractions", 7).messages() == textbook_prompt("fractions", 7).messages()
    ps = [textbook_prompt("fractions", s) for s in range(60)]
    assert len({p.kind for p in ps}) == len(KINDS)
    assert len({p.persona for p in ps}) >= len(PERSONAS) - 1
    assert len({p.template for p in ps}) == len(TEMPLATES)
    assert len({p.user() for p in ps}) >= 50  # nearly every seed asks differently
    m = ps[0].messages()
    assert [x["role"] for x in m] == ["system", "user"] and "fractions" in m[1]["content"]
    assert m[0]["content"] == f"You are {ps[0].persona}."


def test_prompt_stream_covers_every_topic_per_round_and_depends_on_the_run_seed():
    topics = ["atoms", "verbs", "Rome", "pi", "tides"]
    a = [p for _, p in zip(range(15), textbook_prompts(topics, seed=3))]
    assert [p for _, p in zip(range(15), textbook_prompts(topics, seed=3))] == a  # deterministic
    for r in range(3):
        assert sorted(p.topic for p in a[5 * r:5 * r + 5]) == sorted(topics)
    assert [p.seed for p in a] == [document_seed(3, i) for i in range(15)]
    assert len({p.seed for p in a}) == 15
    b = [p for _, p in zip(range(15), textbook_prompts(topics, seed=4))]
    assert not {p.seed for p in a} & {p.seed for p in b}
    assert next(textbook_prompts(topics, seed=3, start=7)) == a[7]  # resumable


def test_topics_file(tmp_path):
    shipped = load_topics()
    assert len(shipped) >= 90 and len(set(shipped)) == len(shipped)
    f = tmp_path / "t.txt"
    f.write_text("# a comment\n\natoms\n  verbs \natoms\n")
    assert load_topics(f) == ["atoms", "verbs"]
    f.write_text("# only a comment\n")
    with pytest.raises(ValueError, match="no topics"):
        load_topics(f)
    with pytest.raises(FileNotFoundError):
        load_topics(tmp_path / "missing.txt")


def test_assemble_drops_an_unfinished_sentence_only_when_cut():
    text = "  Atoms are small.\n\n\n\nThey have a nucleus. Electrons orbit the  \n"
    assert assemble(text) == "Atoms are small.\n\nThey have a nucleus. Electrons orbit the"
    assert assemble(text, cut=True) == "Atoms are small.\n\nThey have a nucleus."
    assert assemble('He said "stop." Then he', cut=True) == 'He said "stop."'
    assert assemble("no sentence end at all", cut=True) == "no sentence end at all"
    assert assemble(" \n ") == ""


@pytest.fixture
def byte_teacher():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=512)
    return GPT(cfg).eval(), ByteTokenizer()


def test_synth_writes_curated_documents_and_records_each_in_the_ledger(tmp_path, byte_teacher, one_thread,
                                                                      monkeypatch):
    from lilliput.jobs import synth

    real = synth.write_textbook

    def with_a_duplicate(*args, **kwargs):  # the last answer again, under another prompt
        written, seconds = real(*args, **kwargs)
        last = written[-1]
        twin = dataclasses.replace(last, prompt=dataclasses.replace(last.prompt, seed=last.prompt.seed + 1),
                                   index=len(written))
        return written + [twin], seconds

    monkeypatch.setattr(synth, "write_textbook", with_a_duplicate)
    topics = tmp_path / "topics.txt"
    topics.write_text("atoms\nverbs\nRome\n")
    job = synth.SynthJob(topics=str(topics), tokens=120, max_new_tokens=30, max_batch=4, quality=False,
                         watermark="secret", out=str(tmp_path / "out"), ledger=str(tmp_path / "l.sqlite"))
    model, tok = byte_teacher
    out = synth.run_synth(job, model, tok, label="tiny", log=None)

    run = json.loads((out / "run.json").read_text())
    m = run["metrics"]
    assert 120 <= m["teacher_tokens"] <= 120 + 4 * 30  # the budget, plus what was in flight
    assert m["documents"] == m["answers"] and m["answers"] * 30 == m["teacher_tokens"]  # each ran to 30 tokens
    assert m["curation"]["removed_by_filter"] == {"exact_dedup": 1} and m["kept"] == m["documents"] - 1
    assert run["generator"]["watermark_key_id"] == key_id("secret") and "secret" not in json.dumps(run)
    kept = [json.loads(line) for line in (out / synth.DOCUMENTS_FILE).read_text().splitlines()]
    assert len(kept) == m["kept"] and {d["topic"] for d in kept} == {"atoms", "verbs", "Rome"}

    with Ledger.open(tmp_path / "l.sqlite", create=False) as led:
        rows = led.documents()
        assert len(rows) == m["documents"] and {r["origin"] for r in rows} == {"synthetic"}
        doc = led.get(kept[0]["id"])
        gen = doc["generator"]
        assert doc["generation"] == 1 and doc["tokens"] == 30
        assert gen["seed"] == kept[0]["seed"] and gen["model"].startswith("sha256:")
        assert gen["sampling"]["temperature"] == job.temperature and gen["watermark_key_id"] == key_id("secret")
        assert kept[0]["topic"] in gen["prompt"] and gen["prompt"] == kept[0]["prompt"]
        removed = [r for r in rows if r["id"] not in {d["id"] for d in kept}]
        assert len(removed) == 1
        assert [(d["filter"], d["kept"]) for d in led.get(removed[0]["id"])["decisions"]] == [("exact_dedup", 0)]


def test_synth_without_watermark_records_no_key(tmp_path, byte_teacher, one_thread):
    from lilliput.jobs.synth import SynthJob, run_synth

    job = SynthJob(tokens=20, max_new_tokens=20, max_batch=2, quality=False, out=str(tmp_path / "o"),
                   ledger=str(tmp_path / "l.sqlite"))
    run_synth(job, *byte_teacher, log=None)
    with Ledger.open(tmp_path / "l.sqlite", create=False) as led:
        rows = led.documents()
        assert rows and all(led.get(r["id"])["generator"]["watermark_key_id"] is None for r in rows)


def test_synth_job_rejects_a_bad_budget():
    from lilliput.jobs.synth import SynthJob

    with pytest.raises(ValueError, match="tokens must be >= 1"):
        SynthJob(tokens=0)


def test_synth_command_on_a_saved_tiny_teacher(tmp_path, byte_teacher, one_thread, capsys):
    from lilliput.cli import main
    from lilliput.core.checkpoint import save_checkpoint
    from lilliput.eval.bench import model_label

    teacher = save_checkpoint(*byte_teacher, tmp_path / "teacher")
    out, ledger = tmp_path / "out", tmp_path / "l.sqlite"
    assert main(["synth", "--teacher", str(teacher), "--tokens", "16", "--max-new-tokens", "16", "--max-batch", "1",
                 "--no-quality", "--device", "cpu", "--out", str(out), "--ledger", str(ledger)]) == 0
    assert f"wrote {out / 'documents.jsonl'}" in capsys.readouterr().out
    run = json.loads((out / "run.json").read_text())
    assert run["metrics"]["answers"] == 1 and run["metrics"]["teacher_tokens"] == 16
    assert run["teacher"]["label"] == model_label(str(teacher))
    assert main(["synth", "--tokens", "0", "--out", str(out)]) == 2  # a user error: one line, exit 2


def test_synth_with_the_gumbel_watermark_records_its_scheme_and_is_detected(tmp_path, byte_teacher, one_thread):
    from lilliput.data.gumbel_watermark import GumbelDetector
    from lilliput.jobs.synth import SynthJob, run_synth

    job = SynthJob(tokens=120, max_new_tokens=60, max_batch=2, quality=False, watermark="secret",
                   watermark_scheme="gumbel", temperature=1.0, top_k=None, repetition_penalty=None,
                   out=str(tmp_path / "o"), ledger=str(tmp_path / "l.sqlite"))
    out = run_synth(job, *byte_teacher, log=None)
    kept = [json.loads(line) for line in (out / "documents.jsonl").read_text().splitlines()]
    with Ledger.open(tmp_path / "l.sqlite", create=False) as led:
        gen = led.get(kept[0]["id"])["generator"]
    assert gen["watermark_key_id"] == key_id("secret") and gen["sampling"]["watermark_scheme"] == "gumbel"
    tok = byte_teacher[1]
    assert all(GumbelDetector("secret").detect_text(d["text"], tok).p_value < 1e-3 for d in kept)
    assert all(GumbelDetector("other").detect_text(d["text"], tok).p_value > 1e-3 for d in kept)


def test_synth_job_refuses_a_gumbel_watermark_without_sampling():
    from lilliput.jobs.synth import SynthJob

    with pytest.raises(ValueError, match="temperature > 0"):
        SynthJob(watermark="k", watermark_scheme="gumbel", temperature=0.0)
    with pytest.raises(ValueError, match="watermark_scheme must be one of"):
        SynthJob(watermark="k", watermark_scheme="purple")
