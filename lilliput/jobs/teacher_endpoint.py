"""A teacher behind an OpenAI-compatible HTTP endpoint: vLLM serving a large model, `lilliput serve`,
or any server that speaks `/v1/chat/completions`.

    teacher = TeacherEndpoint("http://gpu-box:8000")      # /v1 is added when missing
    text, tokens, finish = teacher.complete(messages, GenerationConfig(max_new_tokens=384), seed=7)

Requests carry the OpenAI fields (max_tokens, temperature, top_p, seed) and vLLM's extensions
top_k and repetition_penalty (servers that do not know them ignore them, as lilliput serve does).
`write` keeps `max_batch` requests in flight until the token budget is spent, as the local
engine keeps its rows full. The key is sent as `Authorization: Bearer`; it is never recorded.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from lilliput.infer.endpoint import Endpoint
from lilliput.infer.sequence import GenerationConfig


class TeacherEndpoint(Endpoint):
    role = "teacher"

    def sampling(self, cfg: GenerationConfig) -> dict:
        """The sampling fields a request carries (what the ledger records as the generator's settings)."""
        body = {"max_tokens": cfg.max_new_tokens, "temperature": cfg.temperature}
        for name, value in (("top_p", cfg.top_p), ("top_k", cfg.top_k), ("repetition_penalty", cfg.repetition_penalty)):
            if value is not None:
                body[name] = value
        return body

    def complete(self, messages: list[dict], cfg: GenerationConfig, seed: int | None = None) -> tuple[str, int, str]:
        """(text, completion tokens, finish reason) of one chat completion."""
        body = {"model": self.model, "messages": messages, **self.sampling(cfg)}
        if seed is not None:
            body["seed"] = seed
        reply = self._request("/chat/completions", body)
        try:
            choice = reply["choices"][0]
            text = choice["message"]["content"] or ""
            tokens = int(reply["usage"]["completion_tokens"])  # the token budget is kept in the teacher's tokens
            return text, tokens, choice.get("finish_reason") or "stop"
        except (KeyError, IndexError, TypeError, ValueError):
            raise RuntimeError(f"teacher {self.base} sent no chat completion with usage: {json.dumps(reply)[:200]}") from None

    def write(self, prompts: Iterable, cfg: GenerationConfig, tokens: int, max_batch: int,
              log: Callable[[str], None] | None = None) -> tuple[list[tuple[int, object, str, int, str]], float]:
        """Answers to `prompts` (textbook prompts: `.messages()`, `.seed`) until about `tokens` tokens are
        written, `max_batch` requests at a time: ([(index, prompt, text, tokens, finish)], seconds)."""
        it, t0, last_log = iter(prompts), time.perf_counter(), time.perf_counter()
        done: list[tuple[int, object, str, int, str]] = []
        live: dict[Future, tuple[int, object]] = {}
        written = added = 0
        with ThreadPoolExecutor(max_workers=max_batch) as pool:
            while True:
                expect = written / len(done) if done else cfg.max_new_tokens / 2
                while len(live) < max_batch and written + expect * len(live) < tokens:
                    p = next(it)
                    live[pool.submit(self.complete, p.messages(), cfg, p.seed)] = (added, p)
                    added += 1
                if not live:
                    break
                finished, _ = wait(live, return_when=FIRST_COMPLETED)
                for f in finished:
                    i, p = live.pop(f)
                    text, n, finish = f.result()
                    done.append((i, p, text, n, finish))
                    written += n
                if log is not None and time.perf_counter() - last_log > 30:
                    last_log, dt = time.perf_counter(), time.perf_counter() - t0
                    log(f"synth: {len(done)} documents, {written:,}/{tokens:,} tokens, {written / dt:.0f} tok/s")
        return sorted(done, key=lambda d: d[0]), time.perf_counter() - t0
