"""The textbook lab (lilliput.train.textbook_lab): pools of equal size at each share, students as pure
functions of (config, texts, share, seed), and the summary across seeds and against human-only students."""

import dataclasses

import pytest
import torch

from lilliput.train.loop import TrainConfig
from lilliput.train.textbook_lab import TextbookLabConfig, Texts, byte_stream, mixed_pool, summarize, train_students

HUMAN = ("The old sailor walked along the harbour wall and looked at the grey sea. " * 80).encode()
BOOK = tuple(f"Lesson {i}: a triangle has three sides, and its angles add up to one hundred and eighty degrees."
             for i in range(40))


def test_pool_has_the_size_and_share_asked_and_depends_on_the_seed():
    human = byte_stream([HUMAN.decode()])
    size = byte_stream(BOOK).numel()
    only_human, half, only_book = (mixed_pool(human, BOOK, f, size, seed=0) for f in (0.0, 0.5, 1.0))
    assert only_human.numel() == half.numel() == only_book.numel() == size and only_book.dtype == torch.long
    assert b"Lesson" not in bytes(only_human.tolist()) and b"sailor" not in bytes(only_book.tolist())
    text = bytes(half.tolist())
    assert b"sailor" in text[: size // 2] and b"Lesson" in text[size // 2:]
    assert torch.equal(mixed_pool(human, BOOK, 0.5, size, seed=0), half)
    assert not torch.equal(mixed_pool(human, BOOK, 0.5, size, seed=1), half)


def test_config_refuses_what_cannot_run():
    with pytest.raises(ValueError, match="mixes"):
        TextbookLabConfig(mixes=(0.0, 1.5))
    with pytest.raises(ValueError, match="seeds"):
        TextbookLabConfig(seeds=0)
    with pytest.raises(ValueError, match="max_tokens"):
        TextbookLabConfig(train=TrainConfig())
    with pytest.raises(ValueError, match="longer than seq_len"):
        TextbookLabConfig(seq_len=64, sample_bytes=64)
    with pytest.raises(ValueError, match="multiple-choice"):
        TextbookLabConfig(tasks=("lambada",))


def tiny(**kw) -> TextbookLabConfig:
    train = TrainConfig(lr=3e-3, warmup_steps=2, max_tokens=4 * 64 * 6, progress=False, log_every=10**9)
    return dataclasses.replace(TextbookLabConfig(dim=32, layers=1, heads=2, seq_len=64, batch=4, train=train,
                                                 tasks=("arc_easy", "piqa"), task_limit=6, eval_bytes=2_000,
                                                 samples=2, sample_bytes=16, workers=1), **kw)


TEXTS = Texts(human=HUMAN, textbook_train=BOOK, textbook_test="\n\n".join(BOOK[:5]), openings=(BOOK[0], "Once upon"))


def test_students_per_share_and_seed_and_their_summary(one_thread):
    cfg = tiny(mixes=(0.0, 1.0), seeds=2)
    rows = train_students(cfg, TEXTS, log=lambda m: None)
    assert [(r["synthetic_fraction"], r["seed"]) for r in rows] == [(0.0, 0), (0.0, 1), (1.0, 0), (1.0, 1)]
    assert len({r["train_tokens"] for r in rows}) == 1 and rows[0]["train_tokens"] >= cfg.train.max_tokens
    for r in rows:
        assert r["ppl_human"] > 1 and r["ppl_textbook"] > 1
        assert {k: len(v) for k, v in r["task_items"].items()} == {"arc_easy": 6, "piqa": 6}
        assert r["tasks"]["piqa"] == sum(r["task_items"]["piqa"]) / 6
    assert rows[0]["ppl_human"] != rows[1]["ppl_human"]  # seeds differ
    # trained on the textbook, a student knows it better than one trained on human text, seed by seed
    assert all(rows[2 + s]["ppl_textbook"] < rows[s]["ppl_textbook"] for s in range(2))
    again = train_students(dataclasses.replace(cfg, mixes=(1.0,), seeds=1), TEXTS, log=lambda m: None)[0]
    assert again["ppl_textbook"] == rows[2]["ppl_textbook"]  # a pure function of (config, texts, share, seed)

    s = summarize(rows, cfg)
    assert [m["synthetic_fraction"] for m in s["mixes"]] == [0.0, 1.0] and s["mixes"][1]["seeds"] == 2
    book = s["mixes"][1]["ppl_textbook"]
    assert book["values"] == [rows[2]["ppl_textbook"], rows[3]["ppl_textbook"]] and book["std"] > 0
    vs = s["vs_human"]["1.0"]
    assert vs["ppl_textbook_ratio"]["values"] == [rows[2 + k]["ppl_textbook"] / rows[k]["ppl_textbook"] for k in range(2)]
    d = vs["task_acc_norm_difference"]["piqa"]
    assert d["n"] == 6 and d["ci_low"] <= d["mean"] <= d["ci_high"]
    assert d["mean"] == pytest.approx(s["mixes"][1]["tasks"]["piqa"]["mean"] - s["mixes"][0]["tasks"]["piqa"]["mean"])


def test_workers_give_the_rows_one_process_gives(one_thread):
    cfg = tiny(mixes=(0.5,), seeds=2)
    here = train_students(cfg, TEXTS, log=lambda m: None)
    there = train_students(dataclasses.replace(cfg, workers=2), TEXTS, log=lambda m: None)
    assert [r["ppl_human"] for r in there] == [r["ppl_human"] for r in here]
    assert [r["task_items"] for r in there] == [r["task_items"] for r in here]
