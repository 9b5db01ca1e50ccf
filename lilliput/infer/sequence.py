"""One request's life in the engine: its settings, tokens, sampler, stream and timings.

A `Sequence` is created by `Engine.add`, waits, is admitted to a row of the decode state,
prefills its prompt (in chunks), then decodes one token per engine step until end of sequence,
a stop string or its token budget; then its row is freed. Its own `torch.Generator` makes a
seeded request give the same tokens whatever else shares the batch.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence as Seq

import torch

from lilliput.core.tokenizer import StreamDecoder
from lilliput.infer.sampling import LogitsProcessor, RepetitionPenalty, drawer_of


def common_prefix(a: Seq, b: Seq) -> int:
    """Length of the longest common prefix of two sequences (token ids, or the characters of two texts)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128
    """Most tokens to generate per prompt."""
    temperature: float = 0.0
    """Sampling temperature; 0 means greedy."""
    top_k: int | None = None
    """Sample only among the k most likely tokens."""
    top_p: float | None = None
    """Nucleus sampling: the smallest set of tokens with this much probability."""
    repetition_penalty: float | None = None
    """Penalty > 1 for tokens already in the prompt or output (1 or None is off)."""
    stop: tuple[str, ...] = ()
    """Strings that end generation (not included in the output)."""
    seed: int | None = None
    """Seed of the sampler, for repeatable sampling."""
    ignore_eos: bool = False
    """Keep generating past end-of-sequence tokens (for benchmarks)."""
    logprobs: int | None = None
    """Record each generated token's log-probability and this many top alternatives (None: off)."""

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs}")

    def processors(self) -> list[LogitsProcessor]:
        """The processors these settings imply (before any the caller adds)."""
        return [RepetitionPenalty(self.repetition_penalty)] if self.repetition_penalty not in (None, 1.0) else []


class Status(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    RUNNING = "running"
    FINISHED = "finished"


class StopScanner:
    """Finds the first stop string in a sequence's text and holds back text that may begin one."""

    def __init__(self, stops: Seq[str]):
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)

    def cut(self, text: str, since: int) -> int | None:
        """Index of the first stop string that ends after `since` (text before it was checked)."""
        lo = max(0, since - self.longest + 1)
        hits = [i for s in self.stops if (i := text.find(s, lo)) >= 0]
        return min(hits) if hits else None

    def safe_len(self, text: str) -> int:
        """Length of the prefix of text that cannot be the start of a stop string."""
        keep = len(text)
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    keep = min(keep, len(text) - n)
                    break
        return keep


_ids = itertools.count()


@dataclass
class Sequence:
    prompt: list[int]
    cfg: GenerationConfig
    processors: list[LogitsProcessor] = field(default_factory=list)
    on_text: Callable[["Sequence", str], None] | None = None
    """Called with each piece of new text as it becomes final (stop strings never reach it)."""
    id: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.WAITING
    row: int | None = None
    computed: int = 0
    """Tokens of this sequence already in its row of the decode state."""
    cached_tokens: int = 0
    """Prompt tokens found in the prefix cache (not prefilled again)."""
    output: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (eos or stop string), "length" or "abort"
    logprobs: list[dict] = field(default_factory=list)
    followers: list["Sequence"] = field(default_factory=list)
    """Further samples of this prompt: they take rows when this one does and start from its
    prefill (the state is copied, the last prompt logits shared), each with its own sampler."""
    origin: "Sequence | None" = None
    """The sequence this one answers again (a routed small answer that escalated to the large model)."""
    streamed: int = 0
    """Output tokens whose text has reached `on_text` (during a call: up to this delta's last token)."""
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None

    def __post_init__(self):
        if not self.prompt:
            raise ValueError("a prompt is empty: give at least one token of text")
        self.processors = self.cfg.processors() + list(self.processors)
        self.drawer = drawer_of(self.processors)
        """The processor that draws this sequence's tokens (a distortion-free watermark), or None."""
        if self.drawer is not None and self.cfg.temperature <= 0:
            raise ValueError(f"{type(self.drawer).__name__} draws the token by sampling: set temperature > 0 "
                             "(1.0 samples the model's own distribution)")
        seed = self.cfg.seed if self.cfg.seed is not None else torch.seed() % 2**63
        self.generator = torch.Generator().manual_seed(seed)
        self._sent = 0
        self._held: list[tuple[str, int]] | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def pending(self) -> list[int]:
        """Tokens not yet in the decode state: the prompt's rest, or the last sampled token."""
        return self.tokens[self.computed:]

    def attach_stream(self, tokenizer, eos: set[int]) -> None:
        self.stream = StreamDecoder(tokenizer)
        self.scanner = StopScanner(self.cfg.stop)
        self.eos = eos

    def append(self, token: int) -> None:
        """Take a sampled token: end the sequence on eos, a stop string or the budget; stream text."""
        if token in self.eos:
            return self.finish("stop")
        self.output.append(token)
        before = len(self.text)
        self.text += self.stream.push(token)
        if self.scanner.stops and (cut := self.scanner.cut(self.text, before)) is not None:
            self.text = self.text[:cut]
            return self._end("stop")
        if len(self.output) >= self.cfg.max_new_tokens:
            return self.finish("length")
        if self.on_text:
            self._emit(self.scanner.safe_len(self.text) if self.scanner.stops else len(self.text))

    def finish(self, reason: str) -> None:
        """End now (eos, budget, abort): text held back for an incomplete character is released."""
        before = len(self.text)
        self.text += self.stream.flush()
        if self.scanner.stops and (cut := self.scanner.cut(self.text, before)) is not None:
            self.text, reason = self.text[:cut], "stop"
        self._end(reason)

    def _end(self, reason: str) -> None:
        self.status, self.finish_reason = Status.FINISHED, reason
        self.finished_at = time.perf_counter()
        if self.on_text:
            self._emit(len(self.text))

    def hold(self) -> None:
        """Keep text back from `on_text` until `release` (a routed small answer awaits its verdict)."""
        self._held = []

    def release(self) -> None:
        """Give the held text to `on_text`, delta by delta as it was made, and stream from now on."""
        held, self._held = self._held or [], None
        for text, tokens in held:
            self.streamed = tokens
            self.on_text(self, text)

    def _emit(self, ready: int) -> None:
        if ready > self._sent:
            text = self.text[self._sent:ready]
            if self._held is not None:
                self._held.append((text, len(self.output)))
            else:
                self.streamed = len(self.output)
                self.on_text(self, text)
            self._sent = ready
