"""Shrinking a trained model: quantization (round to nearest, GPTQ, AWQ), pruning, structured pruning.

Methods register themselves from the specific to the general: GPTQ and AWQ with `QUANTIZERS`
(qconfig.py), the LoRA merge into quantized layers with `train.lora` (qlora.py). Importing
them here, once, means they are registered whenever any part of compress is imported; no module
imports one above it in the room. Round to nearest registers in quantize.py, beside `quantize_`,
which is left out here: loading a quantized checkpoint imports qlinear (so this package) and
nothing of the quantization entry point.
"""

from lilliput.compress import awq, gptq, qlora  # noqa: F401  (they register themselves)
