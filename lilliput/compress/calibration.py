"""Calibration data for GPTQ, AWQ, Wanda and SparseGPT: random windows of the default corpus."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lilliput.train.data import default_documents, random_windows, token_stream


@dataclass(frozen=True)
class CalibrationConfig:
    samples: int = 64
    """Number of calibration sequences."""
    seq_len: int = 512
    """Tokens per calibration sequence."""
    seed: int = 0
    """Seed choosing the windows."""
    full_corpus: bool = True
    """Use the fetched corpus when present (else the shipped sample)."""


def calibration_batches(tokenizer, cfg: CalibrationConfig = CalibrationConfig()) -> torch.Tensor:
    """(samples, seq_len) token ids drawn from the human corpus."""
    if cfg.samples < 1:
        raise ValueError(f"samples must be >= 1, got {cfg.samples}")
    stream = token_stream(tokenizer, default_documents(cfg.full_corpus))
    return random_windows(stream, cfg.samples, cfg.seq_len, cfg.seed)
