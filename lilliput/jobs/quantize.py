"""`lilliput quantize`: load a model, quantize it (compress.quantize), measure it, save a checkpoint."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from lilliput.compress.calibration import CalibrationConfig
from lilliput.compress.qconfig import RTNConfig
from lilliput.compress.quantize import METHODS, config_dict, quantize_
from lilliput.core.checkpoint import load_model, quantization_section, save_checkpoint
from lilliput.core.record import run_record
from lilliput.eval.bench import model_label
from lilliput.eval.efficiency import model_bytes, parameter_count
from lilliput.eval.perplexity import HELDOUT, heldout_perplexity


@dataclass(frozen=True)
class QuantizeJob:
    """`lilliput quantize`: load a model, quantize it, save a checkpoint folder with run.json."""

    model: str | None = None
    """A .gguf file, a model folder or a hub id; the embedded SmolLM2-135M-Instruct when omitted."""
    method: str = "rtn"
    """rtn, gptq or awq."""
    bits: int = RTNConfig.bits
    """8 (per channel) or 4 (per group)."""
    group_size: int = RTNConfig.group_size
    """Columns per int4 group: 32, 64 or 128 (a layer it does not divide uses the largest that does)."""
    out: str = "quantized"
    """Output folder."""
    samples: int = 32
    """Calibration windows (GPTQ, AWQ)."""
    seq_len: int = CalibrationConfig.seq_len
    """Tokens per calibration window."""
    full_corpus: bool = False
    """Draw calibration windows from the fetched corpus (tokenizing its 26 MB takes minutes on
    2 cores) instead of the shipped sample texts."""
    lm_head: bool = RTNConfig.lm_head
    """Quantize the output layer too."""
    eval_passages: int | None = HELDOUT.passages
    """LAMBADA passages for held-out perplexity before and after (None skips it)."""

    def config(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: pass one of {', '.join(METHODS)}")
        kw = dict(bits=self.bits, group_size=self.group_size, lm_head=self.lm_head)
        if self.method != "rtn":
            kw["calibration"] = CalibrationConfig(samples=self.samples, seq_len=self.seq_len,
                                                  full_corpus=self.full_corpus)
        return METHODS[self.method](**kw)


def method_label(cfg) -> str:
    """What a quantization config does, for model labels: "int8 RTN", "int4 g64 GPTQ"."""
    method = next((k for k, v in METHODS.items() if v is type(cfg)), type(cfg).__name__)
    return f"int{cfg.bits}" + (f" g{cfg.group_size}" if cfg.bits == 4 else "") + f" {method.upper()}"


def run_quantize(job: QuantizeJob) -> Path:
    """Run the job; returns the checkpoint folder (config.json records every quantized layer)."""
    cfg = job.config()  # validate before loading anything
    label = f"{model_label(job.model)} + {method_label(cfg)}"
    model, tok = load_model(job.model, device="cpu")
    heldout = dataclasses.replace(HELDOUT, passages=job.eval_passages) if job.eval_passages else None

    def ppl() -> float | None:
        return heldout_perplexity(model, tok, heldout) if heldout else None

    before, size_before = ppl(), model_bytes(model)
    t0 = time.perf_counter()
    quantize_(model, cfg, tokenizer=tok)
    seconds = time.perf_counter() - t0
    after = ppl()
    section = quantization_section(model)
    groups = sorted({s.get("group_size") for s in section["layers"].values() if "group_size" in s})
    metrics = {"ppl_before": before, "ppl_after": after,
               "ppl_ratio": after / before if before and after else None,
               "heldout": dataclasses.asdict(heldout) if heldout else None,
               "bytes_before": size_before, "bytes_after": model_bytes(model), "parameters": parameter_count(model),
               "quantize_seconds": seconds, "layers": len(section["layers"]), "group_sizes_used": groups}
    record = run_record("lilliput quantize", label=label, job=dataclasses.asdict(job),
                        config=config_dict(cfg), metrics=metrics)
    return save_checkpoint(model, tok, job.out, record)

