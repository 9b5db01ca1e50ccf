"""Text generation for callers that hold all their prompts up front: thin wrappers over the engine.

`generate` queues every prompt in an `Engine` sized for them (one row each, rows only as long
as the longest prompt + max_new_tokens) and steps it until all have finished; `chat` renders a
conversation with the chat template first. Streaming goes through each sequence's incremental
`StreamDecoder`; stop strings never reach the stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from lilliput.core.model import GPT
from lilliput.infer.engine import Engine, EngineConfig
from lilliput.infer.sampling import LogitsProcessor
from lilliput.infer.sequence import GenerationConfig

__all__ = ["GenerationConfig", "Generation", "generate", "chat"]


@dataclass
class Generation:
    text: str
    tokens: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (eos or stop string) or "length"
    timings: dict[str, float] = field(default_factory=dict)
    logprobs: list[dict] = field(default_factory=list)


def generate(model: GPT, tokenizer, prompts: str | Sequence[str] | Sequence[Sequence[int]],
             cfg: GenerationConfig = GenerationConfig(),
             on_text: Callable[[int, str], None] | None = None, bos: bool | None = None,
             processors: Sequence[LogitsProcessor] = ()) -> list[Generation]:
    """Generate a continuation for each prompt (text, or token ids). `on_text(row, delta)` streams
    each prompt's new text as it becomes final; `processors` (e.g. a watermark) apply to every prompt."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise ValueError("no prompts given")
    ids = [list(p) if not isinstance(p, str) else tokenizer.encode(p, bos=bos) for p in prompts]
    if any(len(p) == 0 for p in ids):
        raise ValueError("a prompt is empty: give at least one token of text")
    longest = max(len(p) for p in ids)
    if longest + cfg.max_new_tokens > model.config.max_seq_len:
        raise ValueError(f"prompt ({longest}) + max_new_tokens ({cfg.max_new_tokens}) exceeds the model's "
                         f"context of {model.config.max_seq_len} tokens")
    engine = Engine(model, tokenizer, EngineConfig(max_batch=len(ids), max_len=max(2, longest + cfg.max_new_tokens),
                                                   prefill_chunk=max(256, longest)))
    row_of = {}
    stream = (lambda seq, text: on_text(row_of[seq.id], text)) if on_text else None
    seqs = []
    for i, p in enumerate(ids):
        seq = engine.add(p, cfg, processors=processors, on_text=stream)
        row_of[seq.id] = i
        seqs.append(seq)
    engine.run()
    results = []
    for seq in seqs:
        n = len(seq.output)
        t_first, t_end = seq.first_token_at or seq.arrival, seq.finished_at or seq.arrival
        timings = {"prefill_s": t_first - seq.arrival if n else 0.0, "total_s": t_end - seq.arrival,
                   "decode_tok_s": (n - 1) / (t_end - t_first) if n > 1 and t_end > t_first else 0.0}
        results.append(Generation(seq.text, seq.output, len(seq.prompt), seq.finish_reason or "length", timings,
                                  seq.logprobs))
    return results


def chat(model: GPT, tokenizer, messages: list[dict], cfg: GenerationConfig = GenerationConfig(),
         on_text: Callable[[int, str], None] | None = None) -> Generation:
    """One assistant turn after `messages` ([{"role": ..., "content": ...}]), using the chat template."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return generate(model, tokenizer, [prompt], cfg, on_text, bos=False)[0]
