import json

import pytest

from lilliput.cli import main
from lilliput.core.checkpoint import save_checkpoint


@pytest.fixture
def tiny_ckpt(tiny_model, byte_tokenizer, tmp_path):
    return str(save_checkpoint(tiny_model, byte_tokenizer, tmp_path / "tiny"))


def one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("lilliput: error:") and "\n" not in err and "Traceback" not in err
    return err


def test_info_json(tiny_ckpt, capsys):
    assert main(["info", "--model", tiny_ckpt, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["n_layers"] == 2 and info["parameters"] > 0


def test_generate_streams_text(tiny_ckpt, capsys):
    assert main(["generate", "hello", "--model", tiny_ckpt, "--max-new-tokens", "5", "--seed", "1",
                 "--temperature", "0.8"]) == 0
    assert "5 tokens" in capsys.readouterr().err


def test_eval_ppl_json(tiny_ckpt, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat. " * 20)
    assert main(["eval", "ppl", str(text), "--model", tiny_ckpt, "--window", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["perplexity"] > 1 and out["tokens"] > 0


@pytest.mark.parametrize("argv,match", [
    (["info", "--model", "/nonexistent/model.gguf"], "not found"),
    (["eval", "ppl", "/nonexistent.txt"], "not found"),
    (["eval", "tasks", "--tasks", "nope", "--limit", "1"], "unknown task"),
])
def test_bad_input_is_one_line_and_exit_2(argv, match, capsys, tiny_ckpt):
    argv = [a if a != "TINY" else tiny_ckpt for a in argv]
    if argv[:2] == ["eval", "tasks"]:
        argv += ["--model", tiny_ckpt]
    assert main(argv) == 2
    assert match in one_line_error(capsys)


def fail_loading_with(monkeypatch, error):
    def load_model(*args, **kwargs):
        raise error

    monkeypatch.setattr("lilliput.core.checkpoint.load_model", load_model)


def test_runtime_error_is_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.delenv("LILLIPUT_DEBUG", raising=False)
    fail_loading_with(monkeypatch, RuntimeError("CUDA out of memory. Tried to allocate 2 GiB\nDetails: ..."))
    assert main(["info"]) == 2
    assert one_line_error(capsys) == (
        "lilliput: error: CUDA out of memory. Tried to allocate 2 GiB (LILLIPUT_DEBUG=1 shows the rest)")


def test_lilliput_debug_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("LILLIPUT_DEBUG", "1")
    fail_loading_with(monkeypatch, RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        main(["info"])


def test_programming_errors_keep_their_traceback(monkeypatch):
    monkeypatch.delenv("LILLIPUT_DEBUG", raising=False)
    fail_loading_with(monkeypatch, TypeError("a bug, not bad input"))
    with pytest.raises(TypeError):
        main(["info"])


@pytest.mark.parametrize("typed,meant", [
    (r"\n\n", "\n\n"),
    ("é\\t日本", "é\t日本"),  # non-ASCII text survives (unicode_escape alone gives "Ã©")
    (r"a\\nb", "a\\nb"),  # an escaped backslash stays one literal backslash
    (r"\x41\u00e9\N{BULLET}", "Aé•"),
    (r"50\%", r"50\%"),  # not an escape: kept as typed
])
def test_stop_flag_reads_backslash_escapes(typed, meant, tiny_ckpt, monkeypatch, capsys):
    from types import SimpleNamespace

    seen = []

    def generate(model, tokenizer, prompts, cfg, on_text):
        seen.append(cfg.stop)
        return [SimpleNamespace(text="", tokens=[], timings={"decode_tok_s": 0.0}, finish_reason="stop")]

    monkeypatch.setattr("lilliput.infer.generate.generate", generate)
    assert main(["generate", "hi", "--model", tiny_ckpt, "--stop", typed, "--no-stream"]) == 0
    assert seen == [(meant,)]


def test_stop_flag_with_unknown_character_name(tiny_ckpt, capsys):
    assert main(["generate", "hi", "--model", tiny_ckpt, "--stop", r"\N{NO SUCH THING}"]) == 2
    assert "names no Unicode character" in one_line_error(capsys)


@pytest.mark.parametrize("limit,hint", [([], True), (["--limit", "2"], False)])
def test_eval_tasks_says_how_much_it_will_score(limit, hint, tiny_ckpt, monkeypatch, capsys):
    from lilliput.eval.tasks import TASKS, Task
    from lilliput.eval.task_sets import Item

    monkeypatch.setitem(TASKS, "toy", Task(lambda n: [Item("Q:", ("yes", "no"), 0)] * (n or 3)))
    assert main(["eval", "tasks", "--tasks", "toy", "--model", tiny_ckpt, "--batch-size", "1", *limit]) == 0
    err = capsys.readouterr().err
    assert ("scoring 2 items (4 requests): toy 2" if limit else "scoring 3 items (6 requests): toy 3") in err
    assert "to go (" in err and ("--limit N scores only" in err) == hint


def test_empty_text_file(tiny_ckpt, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert main(["eval", "ppl", str(empty), "--model", tiny_ckpt]) == 2
    assert "empty" in one_line_error(capsys)


def test_corrupt_model_file(tmp_path, capsys):
    bad = tmp_path / "m.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 8)
    assert main(["info", "--model", str(bad)]) == 2
    assert "GGUF" in one_line_error(capsys)


def test_unknown_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2
    one_line_error(capsys)


def test_help_comes_from_config_docstrings(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    assert "Sampling temperature; 0 means greedy." in out


@pytest.mark.slow
def test_eval_tasks_json_on_real_model(capsys):
    assert main(["eval", "tasks", "--tasks", "piqa,arc_easy", "--limit", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"piqa", "arc_easy"} and out["piqa"]["n"] == 4


def test_chat_reads_messages_from_stdin(tiny_ckpt, monkeypatch, capsys):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\n\nsecond message\n"))
    assert main(["chat", "--model", tiny_ckpt, "--max-new-tokens", "4", "--no-stream"]) == 0
    assert capsys.readouterr().out.count("\n") >= 2  # one reply per non-empty message


def test_data_fetch_reports_sources(tmp_path, monkeypatch, capsys):
    from lilliput.data import corpus

    def fake_fetch(cfg):
        return corpus.Manifest(sources=(), documents=())

    monkeypatch.setattr(corpus, "fetch", fake_fetch)
    monkeypatch.setenv("LILLIPUT_CACHE", str(tmp_path))  # the ledger it records into
    assert main(["data", "fetch", "--cache-dir", str(tmp_path)]) == 0
    assert "manifest.json" in capsys.readouterr().out


def test_generate_speculative_and_best_of(tiny_ckpt, capsys):
    plain = ["generate", "abc abc abc", "--model", tiny_ckpt, "--max-new-tokens", "12", "--ignore-eos", "--no-stream"]
    assert main(plain) == 0
    want = capsys.readouterr().out
    assert main(plain + ["--speculate", "lookup", "--k", "3"]) == 0
    out = capsys.readouterr()
    assert out.out == want and "verifications" in out.err  # greedy speculation: the same text
    assert main(plain + ["--speculate", f"draft:{tiny_ckpt}"]) == 0
    assert capsys.readouterr().out == want
    assert main(plain + ["--best-of", "3", "--vote", "--temperature", "1.0", "--seed", "2"]) == 0
    assert "best of 3 by majority vote" in capsys.readouterr().err
    assert main(plain + ["--best-of", "0"]) == 2
    assert "--best-of must be >= 1" in capsys.readouterr().err


def test_the_command_table_makes_every_subcommand():
    import argparse
    import dataclasses

    from lilliput.cli import build_parser
    from lilliput.cli.commands import COMMANDS

    def leaves(p, words=()):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sub in a.choices.items():
                    yield from leaves(sub, words + (name,))
                return
        yield " ".join(words)

    assert sorted(leaves(build_parser())) == sorted(c.name for c in COMMANDS)
    assert all(dataclasses.is_dataclass(c.job) for c in COMMANDS)


@pytest.mark.parametrize("argv,check", [
    (["collapse", "--quick", "--generations", "4", "--lr", "0.01"],  # --quick's job, then the flags
     lambda job: job.lab.generations == 4 and job.lab.seeds == 1 and job.lab.train.lr == 0.01
     and job.lab.train.max_tokens == 8 * 64 * 12),
    (["arena", "--quick", "--tokens", "64"], lambda job: job.quick and job.seeds == 1 and job.train.max_tokens == 64),
    (["distill", "--student", "tiny", "--out", "x", "--max-minutes", "5"],  # a budget given replaces 200 steps
     lambda job: (job.config.train.max_steps, job.config.train.max_minutes, job.config.train.lr) == (None, 5, 1e-3)),
    (["finetune", "--data", "d", "--out", "o", "--minutes", "2", "--lora-rank", "4"],
     lambda job: (job.train.max_steps, job.train.max_minutes, job.lora.rank) == (None, 2, 4)),
    (["train", "--preset", "dense-tiny", "--out", "o", "--steps", "3"],
     lambda job: (job.config.max_steps, job.config.out) == (3, None)),
    (["serve", "--max-batch", "3", "--port", "0"],
     lambda job: (job.config.engine.max_batch, job.config.port) == (3, 0)),
])
def test_flags_build_the_job(argv, check):
    import dataclasses

    from lilliput.cli import build_parser, run

    ns = build_parser().parse_args(argv)
    seen = []
    assert run(dataclasses.replace(ns.entry, run=seen.append, say=None), ns) == 0
    assert check(seen[0])
