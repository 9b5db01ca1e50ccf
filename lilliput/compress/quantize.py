"""Weight-only quantization: `quantize_(model, Config)` replaces linear layers in place.

Each method is a frozen config registered on its type in `QUANTIZERS` (qconfig.py, torchao's
shape): `RTNConfig` (round to nearest, the baseline, here), `GPTQConfig` (gptq.py) and `AWQConfig`
(awq.py); the grids they round to are in grid.py.
bits=8 is symmetric per output channel; bits=4 is asymmetric per group of 32/64/128 columns.
Where the requested group does not divide a layer's width (SmolLM2's 576 is not a multiple of
128), that layer uses the largest of 128/64/32 below it that does, and the group actually used
is recorded per layer (config.json's quantization.layers); no layer is ever skipped silently.

The output layer is quantized too by default (`lm_head=True`): for SmolLM2 it is a fifth of
the weights read per decoded token. A tied embedding stays float for the lookup; the output
layer gets its own quantized copy.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch
import torch.nn as nn

from lilliput.compress.calibration import calibration_batches
from lilliput.compress.grid import Grid, grid_for, layer_bits, layer_group, target_linears  # noqa: F401
from lilliput.compress.qlinear import QuantLinear
from lilliput.compress.qconfig import METHODS, QUANTIZERS, AWQConfig, GPTQConfig, RTNConfig  # noqa: F401
from lilliput.core.layers import set_layer


# --- round to nearest --------------------------------------------------------------------------------

@QUANTIZERS.register(RTNConfig)
def _rtn(model: nn.Module, cfg: RTNConfig, calibration: torch.Tensor | None) -> None:
    for name, m in target_linears(model, cfg.lm_head):
        w = m.weight.detach().float()
        set_layer(model, name, grid_for(name, w, layer_bits(cfg, name), cfg.group_size).module(w, m.bias))


# --- the entry point -----------------------------------------------------------------------------------

def quantize_(model: nn.Module, cfg, tokenizer=None, calibration: torch.Tensor | None = None) -> nn.Module:
    """Quantize `model` in place with the method `cfg`'s type names; returns the model.

    Calibrated methods (GPTQ, AWQ) use `calibration` token ids (n, T) when given, else windows of
    the default corpus drawn with `tokenizer` as `cfg.calibration` says.
    """
    handler = QUANTIZERS[type(cfg)]
    if calibration is None and hasattr(cfg, "calibration"):
        if tokenizer is None:
            raise ValueError(f"{type(cfg).__name__} needs calibration data: pass tokenizer= or calibration=")
        calibration = calibration_batches(tokenizer, cfg.calibration)
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("the model is already quantized: start from a float model")
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:  # methods work in fp32; the unquantized parts return to `dtype`
        model.float()
    with torch.no_grad():
        handler(model, cfg, calibration)
    model.quantization = {"method": next(k for k, v in METHODS.items() if v is type(cfg)) if type(cfg) in
                          METHODS.values() else type(cfg).__name__, "config": config_dict(cfg)}
    return model.to(dtype)


def config_dict(cfg) -> dict[str, Any]:
    """A config dataclass as JSON-ready values (what model.quantization and run.json record)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
