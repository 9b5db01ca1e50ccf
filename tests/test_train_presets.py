"""Every scratch preset trains through the CLI entry point: `lilliput train --preset P --steps 4 --eval-every 2`."""

from __future__ import annotations

import json

import pytest

from lilliput.cli import main
from lilliput.jobs.train import scratch_presets

# the arena presets and the 20M student are wider than a test needs: the same architecture, narrower
SHRINK = {"student-20m": ["--dim", "32", "--n-layers", "2", "--n-heads", "2", "--n-kv-heads", "2", "--ffn-dim", "64"],
          **{p: ["--dim", "32"] for p in scratch_presets() if p.endswith(("-arena", "-arena-active"))}}


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("The sea is wide and the sky is blue. A small model learns the bytes of a text.\n" * 60)
    return path


@pytest.mark.parametrize("preset", scratch_presets())
def test_every_preset_trains_through_the_cli(preset, text, tmp_path, capsys):
    out = tmp_path / preset
    argv = ["train", "--preset", preset, "--data", str(text), "--out", str(out), "--steps", "4", "--eval-every", "2",
            "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1", "--cache-dir", str(tmp_path / "cache"),
            "--no-progress", "--device", "cpu", *SHRINK.get(preset, [])]
    assert main(argv) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["steps"] == 4 and line["val_loss"] is not None and line["val_loss"] == line["val_loss"]  # not NaN
    assert (out / "config.json").is_file()
