"""`lilliput export`: load a model, write it for llama.cpp, transformers/vLLM or ONNX Runtime, check it."""

from __future__ import annotations

from dataclasses import dataclass

from lilliput.export.target import ExportResult


@dataclass(frozen=True)
class ExportJob:
    """Export any lilliput model (float, int8, int4, structurally pruned) in a deployable format."""

    out: str
    """Output path: a .gguf file, or a folder for hf and onnx."""
    format: str = "gguf"
    """gguf (llama.cpp, Ollama, LM Studio), hf (transformers, vLLM, TGI) or onnx (ONNX Runtime)."""
    model: str | None = None
    """A .gguf file, a lilliput or Hugging Face model folder, or a hub id; the embedded SmolLM2-135M-Instruct when omitted."""
    type: str | None = None
    """Weight type. gguf: F32, F16, BF16, Q8_0, Q4_0, Q4_1; hf: float32, float16, bfloat16; onnx: float32, int8,
    int4 (an int4 model keeps its own grid; any other is put on a min/max grid with float zero points per
    block). Omitted: the type closest to the model's own weights."""
    group: int | None = None
    """onnx int4 of a model not already int4: input columns per block (16, 32, 64, 128 or 256); omitted: 32."""
    force: bool = False
    """Replace an existing output."""
    check: bool = True
    """Read the export back in its runtime and compare logits with lilliput's before keeping it."""


def run_export(job: ExportJob) -> ExportResult:
    """Validate the job, load the model on CPU, export it; returns what was written and how it checked out."""
    from pathlib import Path

    from lilliput.core.checkpoint import load_model
    from lilliput.export import FORMATS, export
    from lilliput.export.target import check_output_path

    fmt = FORMATS[job.format.lower()]  # bad flags fail before the model loads
    if job.type is not None:
        fmt.canonical_type(job.type, None)
    if job.group is not None:
        from lilliput.export.onnx import onnx_format

        if fmt.name != "onnx":
            raise ValueError(f"--group sets the blocks of an onnx int4 export; {fmt.name} has none: drop --group")
        fmt = onnx_format(job.group)
    check_output_path(Path(job.out), job.force)
    model, tok = load_model(job.model, device="cpu")
    return export(model, tok, fmt, job.out, job.type, force=job.force, check=job.check, source=job.model)


def summary(result: ExportResult) -> str:
    """One line for the terminal."""
    c = result.check
    agree = (f"max |logit diff| {c['max_abs_logit_diff']:.2g}, relative {c['relative_error']:.2g}, "
             f"top-1 {c['top1_agreement']:.0%}") if "relative_error" in c else "not checked"
    return (f"exported {result.format} {result.type} to {result.path} ({result.bytes / 2**20:.1f} MiB, "
            f"{result.seconds:.1f} s); check: {agree}")

