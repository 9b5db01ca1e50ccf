"""The sampler: from next-token logits to a sequence's token, and the log-probabilities recorded on
the way. The engine samples every step's batch here (`sample_batch`); speculative decoding builds
its acceptance test from the same pieces (`process`, `probabilities`, `draw`, `record`), so both
draw from one distribution and record one format.

Each sequence samples with its own settings, its own `torch.Generator` and its own chain of
logits processors (sampling.py holds the filters and the processors themselves); a processor that
draws the token itself (`TokenDrawer`: a distortion-free watermark) replaces the draw.

A batch samples together: processors run per row (they hold per-sequence state), then the
temperature, top-k / top-p and softmax of every sampled row at once, and one draw for all of them:
the inverse of each row's cumulative distribution at a uniform number from the row's own generator
(`draw` does the same for one row, so the engine and speculation draw alike for a given seed).
Per-row torch calls cost ~0.1 ms each against a 49k vocabulary (a multinomial draw alone did):
sampling 16 rows one by one took as long as the model's step.
"""

from __future__ import annotations

import torch

from lilliput.infer import kernels
from lilliput.infer.sampling import filtered_logits
from lilliput.infer.sequence import GenerationConfig, Sequence


def process(seq: Sequence, ids: list[int], logits: torch.Tensor) -> torch.Tensor:
    """seq's logits processors applied in order to next-token logits (V,) after `ids` (a copy when
    there are any: the caller's tensor is left as it was)."""
    return _processed(seq, ids, logits.clone()) if seq.processors else logits


def _processed(seq: Sequence, ids: list[int], logits: torch.Tensor) -> torch.Tensor:
    """seq's logits processors applied in order to logits (V,) the caller owns (changed in place or not)."""
    for p in seq.processors:
        logits = p(ids, len(seq.prompt), logits)
    return logits


def probabilities(cfg: GenerationConfig, logits: torch.Tensor) -> torch.Tensor:
    """(V,) what a sampler with temperature > 0 draws from: temperature, top-k and top-p, then softmax."""
    return filtered_logits(logits[None].float(), cfg.temperature, cfg.top_k, cfg.top_p).softmax(-1)[0]


def draw(seq: Sequence, probs: torch.Tensor) -> int:
    """One token from probabilities (V,) with seq's own generator."""
    return int(inverse_cdf(probs[None], uniforms([seq]))[0])


def uniforms(seqs: list[Sequence]) -> torch.Tensor:
    """(B,) float64: one uniform number in [0, 1) from each sequence's own generator."""
    return torch.cat([torch.rand(1, generator=s.generator, dtype=torch.float64) for s in seqs])


BLOCK = 256
"""Tokens per block of the two-level inverse CDF."""


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(B,) long: in each row of probabilities (B, V) (not necessarily normalised), the first token
    whose cumulative probability exceeds u times the row's total: token i with probability p_i. Two
    levels, since a float64 cumulative sum over 49k tokens costs ~20x the softmax: the sums of blocks
    of BLOCK tokens (float32, each exact to ~1e-7 of its block's mass) pick a block, the block's own
    float64 cumulative sum the token; the row's total is float64's. A token (or block) of probability
    0 is never chosen, rounding at the top included."""
    B, V = probs.shape
    blocks = torch.nn.functional.pad(probs.float(), (0, -V % BLOCK)).view(B, -1, BLOCK)  # (B, nb, BLOCK)
    cdf = blocks.sum(-1).double().cumsum(-1)  # (B, nb)
    at = u.to(cdf.device) * cdf[:, -1]  # (B,)
    b = _first_above(cdf, at)
    before = torch.where(b > 0, cdf.gather(1, (b - 1).clamp(min=0)[:, None])[:, 0], 0.0)
    inner = blocks[torch.arange(B, device=cdf.device), b].double().cumsum(-1)  # (B, BLOCK)
    return (b * BLOCK + _first_above(inner, at - before)).clamp_(max=V - 1)


def _first_above(cdf: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) per row the first index where the nondecreasing cdf (B, N) exceeds x (B,), or where it
    reaches its total when x is not below it (rounding): never an index whose own mass is 0."""
    above = torch.searchsorted(cdf, x[:, None].contiguous(), right=True)[:, 0]
    last = torch.searchsorted(cdf, cdf[:, -1:].contiguous(), right=False)[:, 0]
    return torch.minimum(above, last)


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
    """One token for `seq` from its next-token logits (V,): `sample_batch` of one row."""
    return sample_batch([seq], logits[None])[0]


def sample_batch(seqs: list[Sequence], logits: torch.Tensor) -> list[int | None]:
    """Each sequence's next token from its row of logits (B, V): processors, draw (by the sequence's
    drawer when a processor draws the token), log-probabilities. None for a row whose processors allow
    no token at all (a grammar that is complete): that sequence then ends with "stop".
    One argmax kernel call when every sequence is greedy with nothing to process or record."""
    if all(s.cfg.temperature <= 0 and not s.processors and s.cfg.logprobs is None for s in seqs):
        return kernels.argmax(logits)
    chained = [i for i, s in enumerate(seqs) if s.processors]
    if chained:
        logits = logits.clone()  # the caller's (perhaps an expanded view) stays as it was
        for i in chained:
            logits[i] = _processed(seqs[i], seqs[i].tokens, logits[i])  # a row of the copy: no second one
        allowed = torch.isfinite(logits[chained]).any(-1).tolist()
        dead = {i for i, ok in zip(chained, allowed) if not ok}
    else:
        dead = set()
    tokens: list[int | None] = [None] * len(seqs)
    greedy = [i for i, s in enumerate(seqs) if s.cfg.temperature <= 0 and i not in dead]
    if greedy:
        for i, t in zip(greedy, logits[greedy].argmax(-1).tolist()):
            tokens[i] = t
    groups: dict[tuple, list[int]] = {}  # rows that filter alike: top-k and top-p are per call
    for i, s in enumerate(seqs):
        if s.cfg.temperature > 0 and i not in dead:
            groups.setdefault((s.cfg.top_k, s.cfg.top_p), []).append(i)
    for (top_k, top_p), rows in groups.items():
        temperature = torch.tensor([[seqs[i].cfg.temperature] for i in rows], device=logits.device)
        picked = logits if len(rows) == len(seqs) else logits[rows]  # every row, in order: no copy
        probs = filtered_logits(picked.float(), temperature, top_k, top_p).softmax(-1)  # (G, V)
        chance = [j for j, i in enumerate(rows) if seqs[i].drawer is None]
        for j, i in enumerate(rows):
            if seqs[i].drawer is not None:
                s = seqs[i]
                tokens[i] = s.drawer.draw(s.tokens, len(s.prompt), probs[j], s.generator)
        if chance:
            drawn = inverse_cdf(probs[chance], uniforms([seqs[rows[j]] for j in chance])).tolist()
            for j, t in zip(chance, drawn):
                tokens[rows[j]] = t
    for i, s in enumerate(seqs):
        if tokens[i] is not None:
            record(s, logits[i], tokens[i])
    return tokens
