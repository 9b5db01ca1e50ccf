"""The export formats' registry and the one path every export takes: validate, write under a
temporary name, check, rename into place.

A format is an `ExportFormat`: its types, a writer and a checker. `export()` owns what is common:
unknown formats and types, an existing output without `force`, an unwritable folder, and a model
the format cannot express are one-line `ValueError`s raised before anything is written; a writer or
check that fails leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lilliput.core.registry import Registry


@dataclass(frozen=True)
class ExportFormat:
    """One target format."""

    name: str
    """The `--format` value."""
    types: tuple[str, ...]
    """Weight types it writes (the `--type` values), canonical spelling."""
    writes_folder: bool
    """True when the output is a folder (Hugging Face, ONNX), False for a single file (GGUF)."""
    write: Callable[..., dict[str, Any]]
    """write(model, tokenizer, path, type, source) -> facts about what was written (per-tensor types, ...);
    `source` is where the model came from (a folder's run.json feeds the model card), or None."""
    check: Callable[..., dict[str, Any]]
    """check(model, tokenizer, path, type) -> measured agreement; raises ExportCheckError when out of tolerance."""
    default_type: Callable[[Any], str]
    """The type closest to a model's own weights (float32 -> F32, int8 -> Q8_0, ...)."""
    runtime: str = ""
    """Who reads it, for messages and the model card."""
    moe: bool = False
    """It expresses mixture-of-experts feed-forwards (Hugging Face's Qwen3-MoE and OLMoE)."""
    expresses: Callable[[Any], None] | None = None
    """expresses(model) raises one line when the format cannot express the model; None: attention
    blocks only (`check_llama`, MoE where `moe`)."""

    def canonical_type(self, type: str | None, model) -> str:
        if type is None:
            return self.default_type(model)
        for t in self.types:
            if t.lower() == type.lower():
                return t
        raise ValueError(f"unknown {self.name} type {type!r}: pass one of {', '.join(self.types)}")


FORMATS: Registry[ExportFormat] = Registry("export format")


class ExportCheckError(ValueError):
    """The written export disagrees with the source model beyond its type's tolerance."""


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote and how it checked out."""

    path: Path
    format: str
    type: str
    bytes: int
    seconds: float
    written: dict[str, Any] = field(default_factory=dict)
    check: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "format": self.format, "type": self.type, "bytes": self.bytes,
                "seconds": round(self.seconds, 2), "written": self.written, "check": self.check}


def check_output_path(out: Path, force: bool) -> None:
    """An existing output needs `force`; the folder it goes in must be writable."""
    if out.exists() and not force:
        raise ValueError(f"{out} already exists: pass --force to replace it, or choose another --out")
    parent = out.resolve().parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {out}: {existing} is not a writable folder; choose another --out")


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def check_llama(model, target: str, moe: bool = False) -> None:
    """Raise one line naming the first block the format cannot express (attention + SwiGLU, or + MoE
    where the format has experts)."""
    from lilliput.core.model import GPT, Attention, SwiGLU
    from lilliput.core.moe import MoE

    if not isinstance(model, GPT):
        raise ValueError(f"{target} export takes a lilliput GPT, got {type(model).__name__}")
    for i, block in enumerate(model.layers):
        if not isinstance(block.mixer, Attention):
            raise ValueError(f"layer {i} has mixer {type(block.mixer).__name__} ({model.config.mixer!r}): {target} "
                             f"expresses only Llama attention blocks; export to lilliput's own checkpoint instead")
        if not isinstance(block.ffn, SwiGLU) and not (moe and isinstance(block.ffn, MoE)):
            raise ValueError(f"layer {i} has feed-forward {type(block.ffn).__name__} ({model.config.ffn!r}): "
                             f"{target} expresses only {'SwiGLU and MoE' if moe else 'SwiGLU'} feed-forwards; "
                             "export to lilliput's own checkpoint instead")


def export(model, tokenizer, format: str, out: Path | str, type: str | None = None, force: bool = False,
           check: bool = True, source: Path | str | None = None) -> ExportResult:
    """Write `model` (float, int8, int4 or structurally pruned) in `format` at `out`, then check it.

    `type` None picks the type closest to the model's own weights. The export is written under a
    temporary name beside `out` and renamed into place only after its check passed. `source` is
    the model's folder or file, when it came from one (its run.json feeds the model card).
    """
    fmt = FORMATS[format.lower()] if isinstance(format, str) else format
    type = fmt.canonical_type(type, model)
    out = Path(out)
    check_output_path(out, force)
    if fmt.expresses is not None:
        fmt.expresses(model)
    else:
        check_llama(model, fmt.name, moe=fmt.moe)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    _remove(tmp)
    t0 = time.perf_counter()
    try:
        written = fmt.write(model, tokenizer, tmp, type, source)
        checked = fmt.check(model, tokenizer, tmp, type) if check else {"skipped": True}
        if out.exists():  # force: replace, never leaving a half-old, half-new output
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            _remove(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        _remove(tmp)
        raise
    return ExportResult(out, fmt.name, type, _size(out), time.perf_counter() - t0, written, checked)
