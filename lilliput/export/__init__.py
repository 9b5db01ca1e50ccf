"""Export lilliput models to the runtimes people deploy with: GGUF (llama.cpp, Ollama, LM Studio),
Hugging Face folders (transformers, vLLM, TGI) and ONNX (ONNX Runtime).

    from lilliput.export import export
    result = export(model, tokenizer, "gguf", "model.Q8_0.gguf", type="Q8_0")

Every format registers itself in `FORMATS` (lilliput.export.target); every export is written under
a temporary name, checked against the source model, and only then renamed into place.
"""

from lilliput.export.target import FORMATS, ExportResult, export  # noqa: F401
from lilliput.export import gguf, hf, onnx  # noqa: F401,E402  (the built-in formats register themselves)
