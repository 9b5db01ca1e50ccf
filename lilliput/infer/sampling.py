"""From logits to the next token: pure filters (temperature, top-k, top-p), the draw, and the
per-sequence logits processors (repetition penalty; watermarks and grammars plug in the same way;
a processor that draws the token itself, a `TokenDrawer`, replaces the multinomial draw)."""

from __future__ import annotations

import torch


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probabilities sum to at least p (always at least one)."""
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    remove = cum <= (1 - p)
    remove[..., -1] = False
    return logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


def p_active(top_p: float) -> bool:
    return 0.0 < top_p < 1.0


# --- per-sequence logits processors ------------------------------------------------------------------

class LogitsProcessor:
    """Changes one sequence's next-token logits. `ids` are its tokens so far (prompt, then output),
    `prompt_len` where the output starts, `logits` (V,) fp32 (a fresh tensor: edit in place or
    return a new one). Processors form a chain per sequence, applied in order before sampling:
    repetition penalty, a watermark, a grammar."""

    def __call__(self, ids: list[int], prompt_len: int, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TokenDrawer(LogitsProcessor):
    """A processor that draws the token itself, in place of the sampler's multinomial draw: a
    distortion-free watermark (Gumbel-max) is a keyed choice that is an exact sample from the
    distribution it is given. It rides in the chain like any processor (its `__call__` leaves the
    logits as they are) and `draw` gets `probs` (V,): what the sampler would draw from, after the
    whole chain, temperature, top-k and top-p; `generator` is the sequence's own, for steps the
    drawer leaves to chance. The sampler finds it by its `draw` method (duck typing: lilliput.data
    implements it without importing infer); one per chain, and only when sampling (temperature > 0)."""

    def __call__(self, ids: list[int], prompt_len: int, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def draw(self, ids: list[int], prompt_len: int, probs: torch.Tensor, generator: torch.Generator) -> int:
        raise NotImplementedError


def drawer_of(processors: list[LogitsProcessor]) -> LogitsProcessor | None:
    """The processor of a chain that draws the token (it has a `draw` method), or None."""
    drawers = [p for p in processors if callable(getattr(p, "draw", None))]
    if len(drawers) > 1:
        raise ValueError(f"{len(drawers)} processors draw the token ({', '.join(type(p).__name__ for p in drawers)}): "
                         "keep one")
    return drawers[0] if drawers else None


class RepetitionPenalty(LogitsProcessor):
    """CTRL-style penalty over the prompt and the output (as Hugging Face applies it)."""

    def __init__(self, penalty: float):
        if penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {penalty}")
        self.penalty = penalty

    def __call__(self, ids: list[int], prompt_len: int, logits: torch.Tensor) -> torch.Tensor:
        seen = torch.tensor(sorted(set(ids)), dtype=torch.long)
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / self.penalty, vals * self.penalty)
        return logits


def filtered_logits(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """(..., V) logits after temperature, top-k and top-p: what a sampler draws from (temperature > 0)."""
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and p_active(top_p):
        logits = top_p_filter(logits, top_p)
    return logits


class PresenceFrequencyPenalty(LogitsProcessor):
    """OpenAI's penalties over the output so far: logit -= frequency * count + presence * (count > 0)."""

    def __init__(self, presence: float = 0.0, frequency: float = 0.0):
        self.presence, self.frequency = presence, frequency

    def __call__(self, ids: list[int], prompt_len: int, logits: torch.Tensor) -> torch.Tensor:
        out = ids[prompt_len:]
        if out:
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[-1])[:logits.shape[-1]]
            logits -= self.frequency * counts.to(logits.dtype) + self.presence * (counts > 0).to(logits.dtype)
        return logits
