"""The sampler: from next-token logits to a sequence's token, and the log-probabilities recorded on
the way. The engine samples every step's batch here (`sample_batch`); speculative decoding builds
its acceptance test from the same pieces (`process`, `probabilities`, `draw`, `record`), so both
draw from one distribution and record one format.

Each sequence samples with its own settings, its own `torch.Generator` and its own chain of
logits processors (sampling.py holds the filters and the processors themselves); a processor that
draws the token itself (`TokenDrawer`: a distortion-free watermark) replaces the multinomial draw.
"""

from __future__ import annotations

import torch

from lilliput.infer import kernels
from lilliput.infer.sampling import filtered_logits
from lilliput.infer.sequence import GenerationConfig, Sequence


def process(seq: Sequence, ids: list[int], logits: torch.Tensor) -> torch.Tensor:
    """seq's logits processors applied in order to next-token logits (V,) after `ids` (a copy when
    there are any: the caller's tensor is left as it was)."""
    if seq.processors:
        logits = logits.clone()
        for p in seq.processors:
            logits = p(ids, len(seq.prompt), logits)
    return logits


def probabilities(cfg: GenerationConfig, logits: torch.Tensor) -> torch.Tensor:
    """(V,) what a sampler with temperature > 0 draws from: temperature, top-k and top-p, then softmax."""
    return filtered_logits(logits[None].float(), cfg.temperature, cfg.top_k, cfg.top_p).softmax(-1)[0]


def draw(seq: Sequence, probs: torch.Tensor) -> int:
    """One token from probabilities (V,) with seq's own generator."""
    return int(torch.multinomial(probs, 1, generator=seq.generator))


def record(seq: Sequence, logits: torch.Tensor, tok: int) -> None:
    """Append tok's log-probability (and the top `cfg.logprobs` alternatives) under logits (V,), when
    seq asked for them; the end token is not part of the text and is not recorded."""
    k = seq.cfg.logprobs
    if k is None or tok in seq.eos:
        return
    lp = torch.log_softmax(logits.float(), -1)
    k = min(k, int(torch.isfinite(lp).sum()))  # a token a processor ruled out (-inf) is no alternative
    top = torch.topk(lp, k) if k else None
    seq.logprobs.append({"token": tok, "logprob": float(lp[tok]),
                         "top": list(zip(top.indices.tolist(), top.values.tolist())) if top else []})


def sample(seq: Sequence, logits: torch.Tensor) -> int | None:
    """One token for `seq` from its next-token logits (V,): processors, draw (by seq's drawer when a
    processor draws the token), log-probabilities.
    None when the processors allow no token at all (a grammar that is complete): the sequence then
    ends with "stop"."""
    if seq.processors:
        logits = process(seq, seq.tokens, logits)
        if not bool(torch.isfinite(logits).any()):
            return None
    cfg = seq.cfg
    if cfg.temperature <= 0:
        tok = int(logits.argmax())
    elif seq.drawer is not None:
        tok = seq.drawer.draw(seq.tokens, len(seq.prompt), probabilities(cfg, logits), seq.generator)
    else:
        tok = draw(seq, probabilities(cfg, logits))
    record(seq, logits, tok)
    return tok


def sample_batch(seqs: list[Sequence], logits: torch.Tensor) -> list[int | None]:
    """Each sequence's next token from its row of logits (B, V): one argmax kernel call when every
    sequence is greedy with nothing to process or record, else `sample` per row."""
    if all(s.cfg.temperature <= 0 and not s.processors and s.cfg.logprobs is None for s in seqs):
        return kernels.argmax(logits)
    return [sample(s, logits[i]) for i, s in enumerate(seqs)]
