"""Text generation: prefill the prompt into a preallocated KV cache, then decode token by token.

Split as gpt-fast splits it: `prefill` (one forward over the prompt), `decode_step` (one token
for every row), `sample_next` (pure, in sampling.py), and `generate` driving them with stop
conditions and streaming. Batched prompts of different lengths are left-padded; the cache masks
the padding and RoPE positions count from each row's first real token.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from lilliput.core.model import GPT, KVCache
from lilliput.infer import gemv
from lilliput.infer.fastpath import accelerate_
from lilliput.infer.fused import FusedStep
from lilliput.infer.sampling import apply_repetition_penalty, sample_next


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


@dataclass
class Generation:
    text: str
    tokens: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (eos or stop string) or "length"
    timings: dict[str, float] = field(default_factory=dict)


def prefill(model: GPT, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run the prompt (B, T) through the model into the cache; logits of the last position (B, V)."""
    return model(idx, cache, start=0, last_only=True)[:, -1]


def decode_step(model: GPT, tokens: torch.Tensor, cache: KVCache, slot: int) -> torch.Tensor:
    """One new token per row (B,) at cache slot `slot`; logits (B, V)."""
    return model(tokens[:, None], cache, start=slot)[:, -1]


def _decode_threads(device: torch.device):
    """On CPU with the kernel, torch runs single-threaded while decoding: the kernel's threads own the cores."""
    if device.type == "cpu" and gemv.available():
        return gemv.decode_threads()
    return contextlib.nullcontext()


class _StopScanner:
    """Finds the first stop string in a row's decoded text and holds back text that may begin one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]

    def cut(self, text: str) -> int | None:
        hits = [text.find(s) for s in self.stops if s in text]
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


@torch.inference_mode()
def generate(model: GPT, tokenizer, prompts: str | Sequence[str] | Sequence[Sequence[int]],
             cfg: GenerationConfig = GenerationConfig(),
             on_text: Callable[[int, str], None] | None = None, bos: bool | None = None) -> list[Generation]:
    """Generate a continuation for each prompt (text, or token ids). `on_text(row, delta)` streams
    each row's new text as it is decoded (stop strings never reach it)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise ValueError("no prompts given")
    ids = [list(p) if not isinstance(p, str) else tokenizer.encode(p, bos=bos) for p in prompts]
    if any(len(p) == 0 for p in ids):
        raise ValueError("a prompt is empty: give at least one token of text")
    device = next(model.parameters()).device
    B, T = len(ids), max(len(p) for p in ids)
    total = T + cfg.max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({cfg.max_new_tokens}) exceeds the model's "
                         f"context of {model.config.max_seq_len} tokens")
    pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    pads = torch.tensor([T - len(p) for p in ids])
    idx = torch.tensor([[pad_id] * (T - len(p)) + p for p in ids], device=device)  # (B, T) left-padded
    dtype = next(model.parameters()).dtype
    # one unpadded sequence on CPU: decode with the fused C step (built per call: weights may change)
    fused = FusedStep.for_model(model) if B == 1 and device.type == "cpu" and cfg.max_new_tokens > 1 else None
    cache = KVCache(model.config, B, total, device, torch.float32 if fused else dtype,
                    pad=pads if pads.any() else None)
    if fused:
        fused.bind(cache, total)
    gen = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None
    eos = set() if cfg.ignore_eos else set(getattr(tokenizer, "eos_ids", None) or {tokenizer.eos_id} - {None})
    penalty = cfg.repetition_penalty not in (None, 1.0)
    history = idx.masked_fill(torch.arange(T, device=device)[None] < pads.to(device)[:, None], -1) if penalty else None
    scanner = _StopScanner(cfg.stop)

    out: list[list[int]] = [[] for _ in range(B)]
    texts, sent = [""] * B, [0] * B
    done, reasons = [False] * B, ["length"] * B

    if device.type == "cpu":
        accelerate_(model)
    t0 = time.perf_counter()
    logits = prefill(model, idx, cache) if cfg.max_new_tokens else None
    t_first = time.perf_counter()
    with _decode_threads(device):
        for step in range(cfg.max_new_tokens):
            if penalty:
                logits = apply_repetition_penalty(logits, history, cfg.repetition_penalty)
            nxt = sample_next(logits, cfg.temperature, cfg.top_k, cfg.top_p, gen)  # (B,)
            if step == 0:
                t_first = time.perf_counter()
            for b, tok in enumerate(nxt.tolist()):
                if done[b]:
                    continue
                if tok in eos:
                    done[b], reasons[b] = True, "stop"
                    continue
                out[b].append(tok)
                if scanner.stops or on_text:
                    texts[b] = tokenizer.decode(out[b])
                    cut = scanner.cut(texts[b])
                    if cut is not None:
                        texts[b], done[b], reasons[b] = texts[b][:cut], True, "stop"
                    if on_text:
                        ready = len(texts[b]) if done[b] else scanner.safe_len(texts[b].rstrip("\ufffd"))
                        if ready > sent[b]:
                            on_text(b, texts[b][sent[b]:ready])
                            sent[b] = ready
            if all(done) or step == cfg.max_new_tokens - 1:
                break
            if penalty:
                history = torch.cat([history, nxt[:, None]], dim=1)
            logits = fused(int(nxt[0]), T + step) if fused else decode_step(model, nxt, cache, T + step)
    t_end = time.perf_counter()

    results = []
    for b in range(B):
        text = texts[b] if (scanner.stops or on_text) else tokenizer.decode(out[b])
        if on_text and len(text) > sent[b]:
            on_text(b, text[sent[b]:])
        n = len(out[b])
        timings = {"prefill_s": t_first - t0 if n else 0.0, "total_s": t_end - t0,
                   "decode_tok_s": (n - 1) / (t_end - t_first) if n > 1 and t_end > t_first else 0.0}
        results.append(Generation(text, out[b], len(ids[b]), reasons[b], timings))
    return results


def chat(model: GPT, tokenizer, messages: list[dict], cfg: GenerationConfig = GenerationConfig(),
         on_text: Callable[[int, str], None] | None = None) -> Generation:
    """One assistant turn after `messages` ([{"role": ..., "content": ...}]), using the chat template."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return generate(model, tokenizer, [prompt], cfg, on_text, bos=False)[0]
