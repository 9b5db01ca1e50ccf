"""Serving workloads measured through an OpenAI-compatible endpoint: `lilliput serve` and its peers alike.

Every request goes to the streaming `/v1/completions` endpoint with a prompt of token ids (the
same ids reach every server: no tokenizer or BOS difference), greedy (temperature 0) and with
`ignore_eos`, so each request produces exactly the tokens it asks for. Two workloads:

- streams: N requests sent together (arrival 0), prompts cut from LAMBADA, the same output length.
- arrivals: `mixed_requests`, the mix of bench/engine.py: prompts of 16-256 tokens from LAMBADA,
  16-128 new tokens, seeded Poisson arrivals; each request is sent at its arrival time.

One run gives output tokens/s (every output token over the time from the first send to the last
token), TTFT p50/p99 (from each request's send, which is its arrival) and each request's text,
for greedy text equality between servers (`text_equality`). The server under test runs as its
own process (`ServerProcess`, started from a command line, ready when a health path answers).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable

from lilliput.eval.efficiency import percentile
from lilliput.infer.sequence import common_prefix

SERVED_NAME = "m"
"""The model id every server under test is started with (`--served-name`, `--served-model-name`)."""


# --- workloads ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Request:
    prompt: list[int]
    """Prompt token ids."""
    new: int
    """Output tokens (sent as max_tokens with ignore_eos)."""
    arrival: float = 0.0
    """Seconds after the run starts when the request is sent."""


def _lambada_ids(tok, passages: int = 120) -> list[int]:
    from lilliput.eval.task_sets import lambada_passages

    return tok.encode("\n\n".join(lambada_passages(passages)), bos=False)


def mixed_requests(tok, n: int, rate: float, seed: int) -> list[Request]:
    """n requests: prompts of 16-256 tokens cut from LAMBADA passages, 16-128 new tokens, arrival
    times of a Poisson process of `rate` requests/s (bench/engine.py's continuous-batching mix)."""
    rng = random.Random(seed)
    text = _lambada_ids(tok)
    out, t = [], 0.0
    for _ in range(n):
        plen, new = rng.choice([16, 32, 64, 128, 256]), rng.choice([16, 32, 64, 128])
        start = rng.randrange(0, len(text) - plen)
        out.append(Request(text[start:start + plen], new, t))
        t += rng.expovariate(rate)
    return out


def stream_requests(tok, n: int, prompt_tokens: int, new: int, seed: int = 0) -> list[Request]:
    """n requests sent together: prompts of `prompt_tokens` tokens from LAMBADA, `new` output tokens each."""
    rng = random.Random(seed)
    text = _lambada_ids(tok)
    if len(text) <= prompt_tokens:
        raise ValueError(f"prompt_tokens must be < {len(text)}, got {prompt_tokens}")
    starts = [rng.randrange(0, len(text) - prompt_tokens) for _ in range(n)]
    return [Request(text[s:s + prompt_tokens], new) for s in starts]


# --- statistics --------------------------------------------------------------------------------------

def summarize(results: list[dict], seconds: float) -> dict:
    """Output tokens/s over the run's wall time and TTFT p50/p99 (seconds) of the requests that succeeded."""
    ok = [r for r in results if "error" not in r]
    ttft = [r["ttft"] for r in ok]
    return {"requests": len(results), "errors": len(results) - len(ok), "seconds": round(seconds, 3),
            "output_tokens": sum(r["out"] for r in ok),
            "output_tok_s": round(sum(r["out"] for r in ok) / seconds, 2) if seconds > 0 else None,
            "ttft_p50_s": round(percentile(ttft, 50), 4) if ttft else None,
            "ttft_p99_s": round(percentile(ttft, 99), 4) if ttft else None}


def text_equality(a: list[str | None], b: list[str | None]) -> dict:
    """The fraction of requests whose completions are identical, over the requests both servers answered
    (None: a failed request), and how far the others agree: the mean share of the longer completion's
    characters that both share from the start (where greedy decoding first went another way)."""
    if len(a) != len(b):
        raise ValueError(f"the runs answered different request lists ({len(a)} vs {len(b)})")
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    same = sum(x == y for x, y in pairs)
    differ = [common_prefix(x, y) / max(len(x), len(y)) for x, y in pairs if x != y]
    return {"compared": len(pairs), "identical": same, "fraction": round(same / len(pairs), 3) if pairs else None,
            "differing_shared_prefix": round(statistics.fmean(differ), 3) if differ else None}


def token_body(r: Request) -> dict:
    """The /v1/completions body of a request: token-id prompt, greedy, exactly `new` tokens."""
    return {"prompt": r.prompt, "max_tokens": r.new, "temperature": 0, "extra_body": {"ignore_eos": True}}


def text_body(r: Request, tok, eos_ids: list[int]) -> dict:
    """The body for servers that take only text prompts and know no ignore_eos (llama-cpp-python's): the
    prompt decoded to text, the end tokens banned through logit_bias."""
    return {"prompt": tok.decode(r.prompt), "max_tokens": r.new, "temperature": 0,
            "logit_bias": {str(i): -100 for i in eos_ids}}


# --- one streaming request, one workload -------------------------------------------------------------

async def stream_completion(client, body: dict) -> dict:
    """One streaming completion: TTFT, inter-token gaps, end-to-end seconds, output tokens and text
    (or the error). TTFT runs from the send to the first chunk with text."""
    t0 = time.perf_counter()
    stamps, usage, text = [], None, []
    try:
        stream = await client.completions.create(model=SERVED_NAME, stream=True,
                                                 stream_options={"include_usage": True}, **body)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                stamps.append(time.perf_counter())
                text.append(chunk.choices[0].text)
            if chunk.usage is not None:
                usage = chunk.usage
    except Exception as e:  # counted as an error of the run
        return {"error": f"{type(e).__name__}: {e}"}
    end = time.perf_counter()
    out = usage.completion_tokens if usage else len(stamps)
    ttft = (stamps[0] - t0) if stamps else end - t0
    return {"ttft": ttft, "itl": [b - a for a, b in zip(stamps, stamps[1:])], "e2el": end - t0, "out": out,
            "tpot": (end - t0 - ttft) / (out - 1) if out > 1 else None, "text": "".join(text),
            "cached": usage.prompt_tokens_details.cached_tokens
            if usage and getattr(usage, "prompt_tokens_details", None) else 0}


async def _run(url: str, reqs: list[Request], body: Callable[[Request], dict]) -> tuple[list[dict], float]:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=600)
    t0 = time.perf_counter()

    async def send(r: Request) -> dict:
        await asyncio.sleep(max(0.0, r.arrival - (time.perf_counter() - t0)))
        return await stream_completion(client, body(r))

    results = await asyncio.gather(*(send(r) for r in reqs))
    seconds = time.perf_counter() - t0
    await client.close()
    return list(results), seconds


def run_workload(url: str, reqs: list[Request], body: Callable[[Request], dict] = token_body) -> dict:
    """Send every request at its arrival time; the summary, the tokens asked for (fewer came back when a
    server stopped early), each request's text (None: failed) and the first errors."""
    results, seconds = asyncio.run(_run(url, reqs, body))
    return {**summarize(results, seconds), "requested_tokens": sum(r.new for r in reqs),
            "texts": [r.get("text") for r in results],
            "error_examples": [r["error"] for r in results if "error" in r][:3]}


def repeat_workload(url: str, reqs: list[Request], repeats: int, body: Callable[[Request], dict] = token_body) -> dict:
    """`repeats` runs of one workload: the median output tokens/s with its range, TTFT p50/p99 of the
    median run, and the first run's texts."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    runs = [run_workload(url, reqs, body) for _ in range(repeats)]
    rates = [r["output_tok_s"] or 0.0 for r in runs]
    mid = runs[sorted(range(len(runs)), key=rates.__getitem__)[len(runs) // 2]]
    return {"output_tok_s": round(statistics.median(rates), 2), "output_tok_s_range": [min(rates), max(rates)],
            "ttft_p50_s": mid["ttft_p50_s"], "ttft_p99_s": mid["ttft_p99_s"],
            "errors": sum(r["errors"] for r in runs), "requests": mid["requests"],
            "output_tokens": mid["output_tokens"], "requested_tokens": mid["requested_tokens"], "runs": [{k: v for k, v in r.items() if k != "texts"} for r in runs],
            "texts": runs[0]["texts"]}


# --- the server process ------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _json_field(body: bytes, key: str) -> str:
    """`key` of a JSON object body as text; "" when the body is not one (another server's error page)."""
    try:
        value = json.loads(body)
    except ValueError:
        return ""
    return str(value.get(key, "")) if isinstance(value, dict) else ""


class ServerProcess:
    """A server started from a command line, ready when GET `health` answers 200, failed at once when it
    exits or says it could not load its model; stopped on exit.

        with ServerProcess(cmd, port) as srv:
            run_workload(srv.url, reqs)
    """

    def __init__(self, cmd: list[str], port: int, env: dict[str, str] | None = None, timeout: float = 900,
                 health: str = "/health"):
        self.cmd, self.port, self.timeout, self.health = cmd, port, timeout, health
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.TemporaryFile()
        self.started = time.perf_counter()
        self.ready_seconds: float | None = None
        self.proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def tail(self, chars: int = 2000) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-chars:]

    def wait_ready(self) -> None:
        while time.perf_counter() - self.started < self.timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"`{' '.join(self.cmd[:6])} ...` exited with status {self.proc.returncode}:\n"
                                   f"{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + self.health, timeout=2) as r:
                    if r.status == 200:
                        self.ready_seconds = time.perf_counter() - self.started
                        return
            except urllib.error.HTTPError as e:  # lilliput's 503: {"status": "loading"} or "failed: why"
                status = _json_field(e.read(), "status")
                if status.startswith("failed"):
                    raise RuntimeError(f"the server could not load its model ({status}):\n{self.tail()}") from None
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"the server did not become healthy in {self.timeout:.0f} s:\n{self.tail()}")

    def stop(self) -> None:
        """Terminate the server and the processes it started (vLLM runs its engine in a child)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 15)
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
            except ProcessLookupError:
                pass

    def __enter__(self):
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()
