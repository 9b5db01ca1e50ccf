"""Every capability on every family (issue #19): each tiny specimen of `lilliput.eval.zoo.TINY` x each
capability of `lilliput.jobs.matrix`, every cell checked for being right, not only for running.

A cell may be refused only where the table below says so, by a one-line reason naming the variant;
anything else refused, or a wrong result, fails. bench/matrix.py writes the same table to
bench/results/matrix.json and the README."""

import pytest
import torch

pytest.importorskip("transformers")

from lilliput.eval import zoo  # noqa: E402
from lilliput.jobs import matrix  # noqa: E402

REFUSED = {
    # (specimen, capability): what the one-line reason must say
    ("llama-dynamic", "export-onnx"): "rope scaling 'dynamic'",
    ("phi3", "export-onnx"): "rope scaling 'longrope'",
    ("qwen3_moe", "export-onnx"): "onnx expresses only SwiGLU",
    ("olmoe", "export-onnx"): "onnx expresses only SwiGLU",
    ("qwen3_moe", "structured"): "not attention + moe",
    ("olmoe", "structured"): "not attention + moe",
    ("llama-dynamic", "serve"): "this model's context is",  # the family's template outgrows a tiny context
}

_specimens: dict[str, matrix.Specimen] = {}


@pytest.fixture(scope="module", autouse=True)
def one_thread_module():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    _specimens.clear()


def specimen(name: str) -> matrix.Specimen:
    if name not in _specimens:  # built once per module: every capability of a specimen shares it
        _specimens[name] = matrix.specimen(name)
    return _specimens[name]


@pytest.mark.parametrize("capability", list(matrix.CAPABILITIES))
@pytest.mark.parametrize("name", list(zoo.TINY))
def test_cell(name, capability):
    s = specimen(name)
    before = {k: v.clone() for k, v in s.model.state_dict().items()}
    cell = matrix.cell(s, capability)
    expected = REFUSED.get((name, capability))
    if expected is None:
        assert cell["status"] == "ok", cell
    else:
        assert cell["status"] == "refused" and expected in cell["reason"], cell
        assert "\n" not in cell["reason"]
    for k, v in s.model.state_dict().items():  # a capability never changes the shared specimen
        assert torch.equal(v, before[k]), f"{capability} changed {k} of the specimen"


def test_markdown_lists_each_refusal_once():
    table = {"a": {"family": "llama", "gptq": {"status": "ok"}, "export-onnx": {"status": "refused", "reason": "r"}},
             "b": {"family": "qwen2", "gptq": {"status": "refused", "reason": "r"},
                   "export-onnx": {"status": "failed", "reason": "x"}}}
    md = matrix.markdown(table)
    assert "| a (llama) | ok | refused [1] |" in md and "| b (qwen2) | refused [1] | failed |" in md
    assert md.count("[1] r") == 1
