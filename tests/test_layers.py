import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from lilliput.core.checkpoint import load_folder, save_checkpoint
from lilliput.core.layers import LAYER_KINDS, build_layer, kind_of, layer_specs, register_layer, weight_numel

ROOT = Path(__file__).resolve().parents[1]


@register_layer("test-scaled-linear")
class ScaledLinear(nn.Module):
    """A layer kind defined outside lilliput, as a third-party plugin would."""

    def __init__(self, n: int, k: int):
        super().__init__()
        self.register_buffer("codes", torch.zeros(n, k, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(n))

    @property
    def weight_shape(self):
        return tuple(self.codes.shape)

    def spec(self) -> dict:
        return {"n": self.codes.shape[0], "k": self.codes.shape[1]}

    @classmethod
    def from_spec(cls, spec):
        return cls(spec["n"], spec["k"])

    def forward(self, x):
        return x @ (self.codes.float() * self.scale[:, None]).T


def test_plugin_kind_saves_and_loads(tiny_model, byte_tokenizer, tmp_path):
    layer = ScaledLinear(32, 64)  # w_down: (dim, ffn_dim)
    layer.codes.copy_(torch.randint(-5, 5, (32, 64)))
    tiny_model.layers[0].ffn.w_down = layer
    tiny_model.quantization = {"method": "test"}
    assert kind_of(layer) == "test-scaled-linear" and kind_of(nn.Linear(2, 2)) is None
    assert weight_numel(layer) == 64 * 32
    save_checkpoint(tiny_model, byte_tokenizer, tmp_path / "m")
    spec = json.loads((tmp_path / "m" / "config.json").read_text())["quantization"]["layers"]["layers.0.ffn.w_down"]
    assert spec == {"kind": "test-scaled-linear", "module": __name__, "n": 32, "k": 64}
    back, _ = load_folder(tmp_path / "m", device="cpu")
    assert isinstance(back.layers[0].ffn.w_down, ScaledLinear) and back.quantization == {"method": "test"}
    assert back.lm_head.weight is back.tok_emb.weight  # a float output layer is tied again
    idx = torch.randint(0, 256, (1, 9))
    torch.testing.assert_close(back(idx), tiny_model(idx))
    assert layer_specs(back) == {"layers.0.ffn.w_down": spec}


@pytest.mark.parametrize("spec,match", [
    ({"n": 1}, "no kind"),
    ({"kind": "nope"}, "names no module"),
    ({"kind": "nope", "module": "lilliput_no_such_module"}, "cannot be imported"),
    ({"kind": "nope", "module": "json"}, "does not register"),
    ({"kind": "nope", "module": "os; rm"}, "names no module"),
])
def test_unknown_kinds_fail_with_the_fix(spec, match):
    with pytest.raises(ValueError, match=match):
        build_layer(spec)
    assert "nope" not in LAYER_KINDS


LOAD_WITH_CORE_ONLY = """
import sys, torch
from lilliput.core.checkpoint import load_model
model, tok = load_model(sys.argv[1], device="cpu")
assert "lilliput.compress.qlinear" in sys.modules  # imported by name from config.json, not by core's code
assert not any(m.startswith(("lilliput.compress.quantize", "lilliput.eval", "lilliput.jobs")) for m in sys.modules)
with torch.no_grad():
    print(type(model.lm_head).__name__, model(torch.tensor([[1, 2, 3, 4]]))[0, -1, :4].tolist())
"""


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_checkpoint_loads_when_only_core_was_imported(tiny_model, byte_tokenizer, tmp_path, bits):
    from lilliput.compress.quantize import RTNConfig, quantize_

    q = quantize_(tiny_model, RTNConfig(bits=bits, group_size=32, lm_head_bits=None))
    save_checkpoint(q, byte_tokenizer, tmp_path / "q")
    proc = subprocess.run([sys.executable, "-c", LOAD_WITH_CORE_ONLY, str(tmp_path / "q")], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    name, logits = proc.stdout.split(" ", 1)
    assert name == f"Int{bits}Linear"
    with torch.no_grad():
        want = q(torch.tensor([[1, 2, 3, 4]]))[0, -1, :4]
    torch.testing.assert_close(torch.tensor(json.loads(logits)), want, atol=1e-5, rtol=1e-5)
