"""`lilliput prune`: load a model, prune it (compress.prune / compress.structured), measure, save."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lilliput.compress.calibration import CalibrationConfig
from lilliput.compress.prune import STRUCTURED, UNSTRUCTURED, MagnitudeConfig, WandaConfig, block_linears, prune_
from lilliput.compress.structured import StructuredConfig, structured_prune
from lilliput.core.checkpoint import load_model, save_checkpoint
from lilliput.core.record import run_record
from lilliput.eval.bench import model_label
from lilliput.eval.efficiency import parameter_count
from lilliput.eval.perplexity import HELDOUT, heldout_perplexity


@dataclass(frozen=True)
class PruneJob:
    """`lilliput prune`: load a model, prune it, measure held-out perplexity, save a checkpoint."""

    model: str | None = None
    """A .gguf file, a model folder or a hub id; the embedded SmolLM2-135M-Instruct when omitted."""
    method: str = "wanda"
    """magnitude, wanda or sparsegpt (zeroes weights) or heads, channels, layers (a smaller dense model)."""
    sparsity: float = WandaConfig.sparsity
    """Fraction removed, in [0, 1): of each linear layer's weights (unstructured), of the query heads,
    the MLP channels or the layers (structured)."""
    n_m: str | None = None
    """Semi-structured pattern such as '2:4' (unstructured methods only; overrides sparsity)."""
    out: str = "pruned"
    """Output checkpoint folder."""
    samples: int = 32
    """Calibration sequences."""
    seq_len: int = CalibrationConfig.seq_len
    """Tokens per calibration sequence."""
    seed: int = CalibrationConfig.seed
    """Seed choosing the calibration windows."""
    eval_passages: int | None = HELDOUT.passages
    """LAMBADA passages for held-out perplexity before and after (None skips it)."""
    device: str | None = None
    """cpu, cuda or cuda:N; CUDA when available when omitted."""

    def __post_init__(self):
        if self.method not in UNSTRUCTURED and self.method not in STRUCTURED:
            raise ValueError(f"unknown method {self.method!r}; choose one of "
                             f"{', '.join([*UNSTRUCTURED, *STRUCTURED])}")
        if not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.n_m is not None:
            if self.method not in UNSTRUCTURED:
                raise ValueError(f"n_m applies to magnitude, wanda and sparsegpt, not to {self.method}")
            parse_n_m(self.n_m)
        if self.samples < 1 or self.seq_len < 2:
            raise ValueError("samples must be >= 1 and seq_len >= 2")
        if self.eval_passages is not None and self.eval_passages < 1:
            raise ValueError(f"eval_passages must be >= 1 (or None to skip perplexity), got {self.eval_passages}")

    def label(self) -> str:
        """What the job does, for model labels: "wanda 50%", "heads 34%", "magnitude 2:4"."""
        return f"{self.method} {self.n_m or f'{self.sparsity:.0%}'}"


def parse_n_m(text: str) -> tuple[int, int]:
    """'2:4' -> (2, 4)."""
    try:
        n, m = (int(v) for v in text.split(":"))
    except ValueError:
        raise ValueError(f"n_m must look like '2:4' (keep n of every m), got {text!r}") from None
    if not 0 < n < m:
        raise ValueError(f"n_m needs 0 < n < m, got {text!r}")
    return n, m


def job_config(job: PruneJob, config):
    """The pruning config a job asks for, given the model's ModelConfig."""
    calib = CalibrationConfig(samples=job.samples, seq_len=job.seq_len, seed=job.seed)
    if job.method in UNSTRUCTURED:
        cls = UNSTRUCTURED[job.method]
        n_m = parse_n_m(job.n_m) if job.n_m else None
        if cls is MagnitudeConfig:
            return cls(sparsity=job.sparsity, n_m=n_m)
        return cls(sparsity=job.sparsity, n_m=n_m, calibration=calib)
    keep = 1.0 - job.sparsity
    if job.method == "heads":
        g = config.n_heads // config.n_kv_heads
        if g > 1:  # drop query heads within every group: the KV cache stays as it is
            return StructuredConfig(n_heads=config.n_kv_heads * max(1, round(g * keep)), calibration=calib)
        return StructuredConfig(n_heads=max(1, round(config.n_heads * keep)),
                                n_kv_heads=max(1, round(config.n_kv_heads * keep)), calibration=calib)
    if job.method == "channels":
        return StructuredConfig(ffn_dim=max(32, 32 * round(config.ffn_dim * keep / 32)), calibration=calib)
    return StructuredConfig(n_layers=max(1, round(config.n_layers * keep)), calibration=calib)


def prune(model, tok, job: PruneJob):
    """`model` pruned as `job` says: in place (unstructured) or a new, smaller model (structured)."""
    cfg = job_config(job, model.config)
    if job.method in UNSTRUCTURED:
        return prune_(model, cfg, tokenizer=tok)
    return structured_prune(model, cfg, tokenizer=tok)


def run_prune(job: PruneJob) -> Path:
    """Load, prune, measure perplexity before/after, save a checkpoint with run.json; its path."""
    label = f"{model_label(job.model)} + {job.label()}"
    model, tok = load_model(job.model, device=job.device)
    cfg = job_config(job, model.config)
    heldout = dataclasses.replace(HELDOUT, passages=job.eval_passages) if job.eval_passages else None
    params_before = parameter_count(model)
    linear_before = sum(m.weight.numel() for m in block_linears(model).values())
    ppl_before = heldout_perplexity(model, tok, heldout) if heldout else None
    t0 = time.perf_counter()
    pruned = prune(model, tok, job)
    if job.method in UNSTRUCTURED:
        nonzero = sum(int((m.weight != 0).sum()) for m in block_linears(pruned).values())
    else:
        nonzero = sum(m.weight.numel() for m in block_linears(pruned).values())
    seconds = time.perf_counter() - t0
    ppl_after = heldout_perplexity(pruned, tok, heldout) if heldout else None
    record = run_record(
        "lilliput prune", label=label, job=asdict(job), config={"method": type(cfg).__name__, **asdict(cfg)},
        model_config=pruned.config.to_dict(), prune_seconds=round(seconds, 2),
        params={"total_before": params_before, "total_after": parameter_count(pruned),
                "block_linear_before": linear_before, "block_linear_nonzero_after": nonzero,
                "note": "total = parameter_count (a tied embedding once); block_linear = every nn.Linear in the "
                        "blocks (embedding and lm_head are never pruned)"},
        perplexity={"before": ppl_before, "after": ppl_after,
                    "ratio": ppl_after / ppl_before if ppl_before and ppl_after else None,
                    "heldout": asdict(heldout) if heldout else None},
    )
    return save_checkpoint(pruned, tok, job.out, record)
