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
