"""The jobs the CLI runs (lilliput/jobs/), through `cli.main` as a user calls them."""

import json

import pytest

from lilliput.cli import main
from lilliput.core.checkpoint import load_model, save_checkpoint
from lilliput.eval.efficiency import parameter_count

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny_ckpt(tiny_model, byte_tokenizer, tmp_path):
    return str(save_checkpoint(tiny_model, byte_tokenizer, tmp_path / "tiny"))


def saved(capsys) -> str:
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert out.startswith("saved ")
    return out.removeprefix("saved ")


@pytest.mark.parametrize("argv,label", [
    (["--bits", "8"], "tiny + int8 RTN"), (["--bits", "4", "--group-size", "32"], "tiny + int4 g32 RTN")])
def test_quantize_job(tiny_ckpt, tiny_model, tmp_path, capsys, argv, label):
    assert main(["quantize", "--model", tiny_ckpt, "--out", str(tmp_path / "q"), "--eval-passages", "2", *argv]) == 0
    out = saved(capsys)
    run = json.loads((tmp_path / "q" / "run.json").read_text())
    assert run["label"] == label and run["command"] == "lilliput quantize"
    assert run["metrics"]["parameters"] == parameter_count(tiny_model)
    assert run["metrics"]["bytes_after"] < run["metrics"]["bytes_before"] and run["metrics"]["ppl_after"] > 1
    model, _ = load_model(out, device="cpu")
    assert model.quantization["method"] == "rtn"


def test_prune_job(tiny_ckpt, tiny_model, tmp_path, capsys):
    assert main(["prune", "--model", tiny_ckpt, "--method", "magnitude", "--sparsity", "0.5",
                 "--out", str(tmp_path / "p"), "--eval-passages", "2", "--device", "cpu"]) == 0
    run = json.loads((tmp_path / "p" / "run.json").read_text())
    assert run["label"] == "tiny + magnitude 50%"
    assert run["params"]["total_before"] == run["params"]["total_after"] == parameter_count(tiny_model)
    assert run["params"]["block_linear_nonzero_after"] == run["params"]["block_linear_before"] // 2


def test_shrink_job(tiny_ckpt, tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[eval]\npassages = 2\ntasks = []\ndecode_tokens = 3\ndecode_repeats = 1\n'
                      '[[stages]]\nkind = "quantize"\nbits = 8\n')
    assert main(["shrink", "--model", tiny_ckpt, "--recipe", str(recipe), "--out", str(tmp_path / "s")]) == 0
    assert json.loads((tmp_path / "s" / "run.json").read_text())["label"] == "tiny + int8 RTN"


def test_distill_job(tiny_ckpt, tmp_path, capsys, monkeypatch):
    from lilliput.data.corpus import Document
    from lilliput.train import distill

    docs = [Document(id="t/a", source="t", title="a", text="the cat sat on the mat. " * 40)]
    monkeypatch.setattr(distill, "default_documents", lambda: docs)
    assert main(["distill", "--student", "tiny", "--teacher", tiny_ckpt, "--out", str(tmp_path / "d"),
                 "--max-steps", "2", "--seq-len", "16", "--batch-size", "2", "--eval-passages", "2",
                 "--device", "cpu", "--no-progress"]) == 0
    run = json.loads((tmp_path / "d" / "run.json").read_text())
    assert run["label"] == "tiny distilled from tiny" and run["student_params"] > 0


def test_model_labels_say_what_a_model_is(tiny_model, byte_tokenizer, tmp_path):
    from lilliput.compress.quantize import RTNConfig, quantize_
    from lilliput.eval.bench import EMBEDDED_LABEL, model_label

    assert model_label(None) == EMBEDDED_LABEL == "SmolLM2-135M-Instruct"
    assert model_label("llamacpp:") == "llama.cpp SmolLM2-135M-Instruct"
    plain = save_checkpoint(tiny_model, byte_tokenizer, tmp_path / "model")  # a folder named "model", as in the demo
    assert model_label(str(plain)) == "tiny"  # config.json's model name, not the folder's
    q = save_checkpoint(quantize_(tiny_model, RTNConfig(bits=8)), byte_tokenizer, tmp_path / "q")
    assert model_label(str(q)) == "tiny + int8 RTN"  # no label in run.json: config.json's quantization
    (q / "run.json").write_text(json.dumps({"label": "base + int8 RTN"}))
    assert model_label(str(q)) == "base + int8 RTN"
