"""Shrinking a trained model: quantization (round to nearest, GPTQ, AWQ), pruning, structured pruning.

Methods register themselves from the specific to the general: GPTQ and AWQ with `QUANTIZERS`
(quantizers.py), the LoRA merge into quantized layers with `train.lora` (qlora.py). Importing
them here, once, means every method is registered whenever any part of compress is imported;
no module imports one above it in the room.
"""

from lilliput.compress import awq, gptq, qlora, quantize  # noqa: F401  (they register themselves)
