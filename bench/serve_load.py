"""Load test of `lilliput serve`: concurrent streaming clients on loopback, one run.

The server runs as its own process (`python -m lilliput.cli serve`, as a user starts it), serving
what that command serves by default: a float model quantized to int8 on load (RTN; `weights` in the
JSON). The clients are the official `openai` async client in this process (raw `httpx` in the soak,
which also sends malformed bodies).

1. N concurrent streaming clients (N = 1, 4, 16), each sending requests from one fixed, seeded
   mix (prompts cut from LAMBADA passages, 32-256 tokens; 16-128 output tokens, `ignore_eos`)
   back to back, for a bounded time and count per N: requests completed, errors, request and
   output-token throughput, and TTFT, TPOT, ITL and end-to-end latency (E2EL) p50/p90/p99, the
   metric names of vLLM's `bench serve`. N = 1 is the same requests sent one at a time.
2. The engine without HTTP: the requests of N = 1 through an in-process `Engine`, one at a
   time; `server_overhead_n1` = E2EL(HTTP) / E2EL(engine) - 1 on the same requests.
3. Prefix caching: requests that share a few-shot preamble (~300 tokens) plus their own question,
   one at a time, on a server with and without `--prefix-cache`: TTFT p50 of each.
4. Structured output: 50 extraction prompts (a name, an age and a city in a sentence) to the
   chat endpoint, greedy, without and with `response_format` json_schema: the share whose reply
   parses and validates, and decode tokens/s constrained / free (`json_speed_ratio`).
5. Soak (`--soak N`, 10,000 by default, as the record needs; `--soak 0` skips it): a fresh server,
   a warm-up of `--soak-warmup` requests of the soak mix, then N requests from `--soak-clients`
   clients in `--soak-rounds` rounds: ~15% malformed bodies (each must get a 4xx with an error
   object: `malformed_not_4xx`), ~20% streams the client leaves after the first chunk, the rest
   short (8-32 prompt tokens, 2-8 new ones) completions and chat requests, streamed or not, some
   with n=2, logprobs or a JSON schema of their own. The server process's RSS (Linux /proc) after
   the warm-up and after each round: `soak_rss_growth` = (RSS at the end - RSS after the warm-up) /
   RSS after the warm-up (target <= 0.02), with `errors` 0 (well-formed requests answered with a
   5xx or a broken answer, or not at all). Wall time: SmolLM2 served as int8 answered ~11 soak
   requests/s on one thread of a shared 2-core Xeon, so the default 10,300 (warm-up included) take
   ~15 minutes, and the whole default run (parts 1-5) ~25-30 minutes; `--tiny` soaks at ~100/s.

Writes bench/results/serve_load.json (`errors`, `throughput_16_vs_1`, `server_overhead_n1`,
`ttft_prefix_cache_speedup`, `json_valid_constrained`, `json_valid_free`, `json_speed_ratio`,
`soak_rss_growth`) and serve_load.png. `--tiny` runs everything on a random 2-layer model with a
byte tokenizer (validation only: its JSON parts are skipped, a byte tokenizer has no end token).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from lilliput.eval import serve_peer as sp
from lilliput.eval.efficiency import percentile

OUT = Path(__file__).parent / "results" / "serve_load.json"
NAMES = ["Maria Lopez", "John Smith", "Aiko Tanaka", "Omar Haddad", "Lena Fischer", "Ravi Patel", "Sara Rossi",
         "Tom Brown", "Nina Petrova", "Carlos Diaz"]
CITIES = ["Lisbon", "Boston", "Osaka", "Cairo", "Berlin", "Mumbai", "Rome", "Leeds", "Kazan", "Lima"]
TEMPLATES = ["{n}, aged {a}, lives in {c}.", "Meet {n} from {c}; {n} is {a} years old.",
             "{c} is home to {n}, who turned {a} this year.", "Our new member {n} ({a}) moved to {c}.",
             "At {a}, {n} runs a small shop in {c}."]
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"}}}


def describe_weights(model) -> str:
    """What the server serves: "int8", "int4", "int8+int4" (its quantized layers) or the float dtype."""
    from lilliput.core.layers import layer_specs

    kinds = sorted({spec["kind"] for spec in layer_specs(model).values()})
    return "+".join(kinds) if kinds else str(next(model.parameters()).dtype).removeprefix("torch.")


def dist(xs: list[float]) -> dict:
    """mean and p50/p90/p99 in milliseconds (vLLM bench serve's reporting)."""
    if not xs:
        return {}
    return {"mean_ms": round(1000 * statistics.fmean(xs), 2),
            **{f"p{q}_ms": round(1000 * percentile(xs, q), 2) for q in (50, 90, 99)}}


# --- the server process ----------------------------------------------------------------------------

class ServerProcess(sp.ServerProcess):
    """`python -m lilliput.cli serve`, as a user starts it."""

    def __init__(self, model: str | None, max_batch: int, threads: int, prefix_cache: bool = True):
        port = sp.free_port()
        cmd = [sys.executable, "-m", "lilliput.cli", "serve", "--port", str(port), "--max-batch", str(max_batch),
               "--served-name", sp.SERVED_NAME, "--prefix-cache" if prefix_cache else "--no-prefix-cache"]
        cmd += ["--model", model] if model else []
        super().__init__(cmd, port, {"OMP_NUM_THREADS": str(threads)}, timeout=600)


# --- requests ----------------------------------------------------------------------------------------

def request_mix(tok, n: int, seed: int, tiny: bool) -> list[dict]:
    rng = random.Random(seed)
    if tiny:
        text = list(("the quick brown fox jumps over the lazy dog " * 40).encode())
    else:
        from lilliput.eval.task_sets import lambada_passages

        text = tok.encode("\n\n".join(lambada_passages(120)), bos=False)
    plens, news = ([8, 16, 32], [4, 8, 16]) if tiny else ([32, 64, 128, 256], [16, 32, 64, 128])
    out = []
    for _ in range(n):
        plen, new = rng.choice(plens), rng.choice(news)
        start = rng.randrange(0, len(text) - plen)
        out.append({"prompt": text[start:start + plen], "max_tokens": new})
    return out


def prefix_mix(tok, n: int, tiny: bool) -> list[list[int]]:
    """Prompts sharing a few-shot preamble, each with its own question."""
    shots = "".join(f"Q: Where does {a} live? A: {c}.\n" for a, c in zip(NAMES, CITIES))
    preamble = "Answer each question in one word.\n" + (shots[:120] if tiny else shots * 3)
    return [tok.encode(preamble + f"Q: Where does {NAMES[i % 10].split()[0]} {i} live? A:", bos=False)
            for i in range(n)]


async def load_level(url: str, reqs: list[dict], clients: int, duration: float, max_requests: int) -> dict:
    """`clients` workers sending requests from the mix back to back until time or count runs out."""
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=600)
    results, nxt = [], iter(range(max_requests))
    t0 = time.perf_counter()

    async def worker():
        while time.perf_counter() - t0 < duration:
            i = next(nxt, None)
            if i is None:
                return
            r = reqs[i % len(reqs)]
            results.append(await sp.stream_completion(client, {"prompt": r["prompt"], "max_tokens": r["max_tokens"],
                                                                "temperature": 0, "extra_body": {"ignore_eos": True}}))

    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - t0
    await client.close()
    ok = [r for r in results if "error" not in r]
    return {"clients": clients, "completed": len(ok), "errors": len(results) - len(ok), "seconds": round(wall, 2),
            "request_throughput": round(len(ok) / wall, 3),
            "output_throughput": round(sum(r["out"] for r in ok) / wall, 2),
            "ttft": dist([r["ttft"] for r in ok]), "tpot": dist([r["tpot"] for r in ok if r["tpot"] is not None]),
            "itl": dist([x for r in ok for x in r["itl"]]), "e2el": dist([r["e2el"] for r in ok]),
            "error_examples": [r["error"] for r in results if "error" in r][:3], "_e2el": [r["e2el"] for r in ok]}


def engine_alone(model, tok, reqs: list[dict], n: int) -> list[float]:
    """The first n requests through an in-process engine, one at a time: end-to-end seconds each."""
    from lilliput.infer.engine import Engine, EngineConfig
    from lilliput.infer.sequence import GenerationConfig

    engine = Engine(model, tok, EngineConfig(max_batch=1))
    out = []
    for r in reqs[:n]:
        t = time.perf_counter()
        engine.add(r["prompt"], GenerationConfig(max_new_tokens=r["max_tokens"], ignore_eos=True))
        engine.run()
        out.append(time.perf_counter() - t)
    return out


async def ttft_one_at_a_time(url: str, prompts: list[list[int]]) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=600)
    rs = [await sp.stream_completion(client, {"prompt": p, "max_tokens": 4, "temperature": 0}) for p in prompts]
    await client.close()
    ok = [r for r in rs if "error" not in r]
    return {"requests": len(rs), "errors": len(rs) - len(ok), "prompt_tokens_mean": round(statistics.fmean(map(len, prompts)), 1),
            "cached_tokens_mean": round(statistics.fmean(r["cached"] for r in ok), 1) if ok else None,
            "ttft": dist([r["ttft"] for r in ok])}


async def json_extraction(url: str, n: int, max_tokens: int) -> dict:
    import jsonschema
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=600)
    rng = random.Random(0)
    items = [(rng.choice(NAMES), rng.randint(18, 90), rng.choice(CITIES), rng.choice(TEMPLATES)) for _ in range(n)]
    out = {}
    for mode in ("free", "constrained"):
        valid, rates, errors, examples = 0, [], 0, []
        for name, age, city, tpl in items:
            msg = (f"Extract the person's name, age and city from this sentence: \"{tpl.format(n=name, a=age, c=city)}\" "
                   "Reply with only a JSON object with keys name, age and city.")
            extra = {"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}} \
                if mode == "constrained" else {}
            stamps, text, usage = [], "", None
            try:
                stream = await client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": msg}], max_tokens=max_tokens, temperature=0,
                    stream=True, stream_options={"include_usage": True}, **extra)
                async for c in stream:
                    if c.choices and c.choices[0].delta.content:
                        stamps.append(time.perf_counter())
                        text += c.choices[0].delta.content
                    if c.usage is not None:
                        usage = c.usage
            except Exception:
                errors += 1
                continue
            try:
                jsonschema.validate(json.loads(text), SCHEMA)
                valid += 1
            except (ValueError, jsonschema.ValidationError):
                pass
            if len(examples) < 3:
                examples.append(text)
            if usage and usage.completion_tokens > 1 and len(stamps) > 1:
                rates.append((usage.completion_tokens - 1) / (time.perf_counter() - stamps[0]))
        out[mode] = {"valid": round(valid / n, 3), "errors": errors,
                     "decode_tok_s_median": round(statistics.median(rates), 2) if rates else None, "examples": examples}
    await client.close()
    return out


# --- the soak ---------------------------------------------------------------------------------------

def rss_mib(pid: int) -> dict:
    """The resident memory of process `pid` (Linux /proc): total, anonymous and file-backed, in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {k: round(int(fields[f].split()[0]) / 1024, 1) for k, f in
            (("rss", "VmRSS"), ("anon", "RssAnon"), ("file", "RssFile"))}


def malformed_bodies(vocab: int) -> list[tuple[str, bytes]]:
    """(path, body) pairs a server must answer with a 4xx and an error object."""
    chat, cmpl = "/v1/chat/completions", "/v1/completions"
    return [(cmpl, b'{"model": "m", "prompt": "unclosed'), (chat, b"\xff\xfe not utf-8"), (cmpl, b"[1, 2, 3]"),
            (cmpl, b'{"model": "m"}'), (chat, b'{"model": "m", "messages": "hi"}'),
            (cmpl, b'{"model": "m", "prompt": "x", "max_tokens": 0}'),
            (cmpl, b'{"model": "m", "prompt": "x", "temperature": "hot"}'),
            (cmpl, b'{"model": "gpt-9", "prompt": "x"}'), (cmpl, b'{"model": "m", "prompt": "x", "n": 99}'),
            (cmpl, json.dumps({"model": "m", "prompt": [1, vocab + 5]}).encode()),
            (chat, b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "response_format": '
                   b'{"type": "json_schema", "json_schema": {"schema": {"type": "bogus"}}}}')]


def soak_mix(tok, n: int, seed: int, tiny: bool) -> list[tuple[str, str, bytes]]:
    """n soak requests (kind, path, body): ~15% malformed, ~20% streams the client leaves after the
    first chunk, the rest well-formed and short (8-32 prompt tokens, 2-8 new ones; completions and chat,
    streamed or not, some with n=2, logprobs or, off --tiny, a JSON schema of their own)."""
    rng = random.Random(seed)
    if tiny:
        ids = list(("the quick brown fox jumps over the lazy dog " * 40).encode())
    else:
        from lilliput.eval.task_sets import lambada_passages

        ids = tok.encode("\n\n".join(lambada_passages(60)), bos=False)
    bad = malformed_bodies(tok.vocab_size)
    out = []
    for i in range(n):
        u = rng.random()
        start = rng.randrange(0, len(ids) - 32)
        prompt = ids[start:start + rng.choice([8, 16, 32])]
        body = {"model": "m", "prompt": prompt, "max_tokens": rng.choice([2, 4, 6]), "temperature": rng.choice([0, 0.8]),
                "seed": i}
        if u < 0.15:
            out.append(("malformed", *bad[i % len(bad)]))
            continue
        if u < 0.35:  # left mid-stream
            out.append(("disconnect", "/v1/completions", json.dumps({**body, "max_tokens": 32, "stream": True}).encode()))
            continue
        path, v = "/v1/completions", rng.random()
        if v < 0.4:
            path = "/v1/chat/completions"
            body = {k: body[k] for k in ("model", "max_tokens", "temperature", "seed")}
            body["messages"] = [{"role": "user", "content": tok.decode(prompt)}]
        elif v < 0.5:
            body["logprobs"] = 2
        if rng.random() < 0.1:
            body["n"] = 2
        if not tiny and rng.random() < 0.05:  # a schema of its own: a grammar is compiled per request
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": f"r{i}", "schema": {
                "type": "object", "properties": {f"k{i}": {"type": "integer"}}, "required": [f"k{i}"]}}}
            body["max_tokens"] = 8
        body["stream"] = rng.random() < 0.5
        out.append(("ok", path, json.dumps(body).encode()))
    return out


async def soak_one(client, kind: str, path: str, body: bytes) -> tuple[str, str]:
    """One soak request -> (outcome, what went wrong): "ok"; "error" (a well-formed request got a 5xx,
    a broken answer or no connection); "not_4xx" (a malformed one was not refused with a 4xx and an
    error object)."""
    import httpx

    headers = {"Content-Type": "application/json"}
    try:
        if kind == "disconnect":
            async with client.stream("POST", path, content=body, headers=headers) as r:
                if r.status_code != 200:
                    return "error", f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        return "ok", ""  # leave after the first chunk: closing an unread response drops the connection
            return "error", "a stream without a chunk"
        if kind == "ok" and b'"stream": true' in body:
            async with client.stream("POST", path, content=body, headers=headers) as r:
                lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
            if r.status_code != 200 or not lines or lines[-1] != "data: [DONE]" or any('"error"' in x for x in lines):
                return "error", f"HTTP {r.status_code}: {lines[-2:]!r}"[:300]
            return "ok", ""
        r = await client.post(path, content=body, headers=headers)
        if kind == "malformed":
            return ("ok", "") if 400 <= r.status_code < 500 and "error" in r.json() else ("not_4xx", f"HTTP {r.status_code}")
        return ("ok", "") if r.status_code == 200 and r.json().get("choices") else ("error", f"HTTP {r.status_code}: "
                                                                                     f"{r.text[:200]}")
    except (httpx.HTTPError, ValueError) as e:  # no connection, or a body that is not JSON
        return "not_4xx" if kind == "malformed" else "error", f"{type(e).__name__}: {e}"[:300]


async def soak(srv: "ServerProcess", mix: list[tuple[str, str, bytes]], warmup: list, rounds: int, clients: int) -> dict:
    """The warm-up, then `mix` in `rounds` equal rounds from `clients` concurrent clients; the server's
    RSS after the warm-up and after each round."""
    import httpx

    async def run(reqs: list) -> list[tuple[str, str]]:
        out, todo = [], iter(reqs)
        async with httpx.AsyncClient(base_url=srv.url, timeout=300) as client:
            async def worker():
                for kind, path, body in todo:
                    outcome, why = await soak_one(client, kind, path, body)
                    out.append((kind, outcome))
                    if why and len(problems) < 5:
                        problems.append(f"{kind} {path} {body[:120]!r}: {why}")
            await asyncio.gather(*(worker() for _ in range(clients)))
        return out

    problems: list[str] = []

    warm = await run(warmup)
    base = rss_mib(srv.proc.pid)
    samples, results, t0 = [], [], time.perf_counter()
    size = -(-len(mix) // rounds)
    for k in range(0, len(mix), size):
        results += await run(mix[k:k + size])
        samples.append(rss_mib(srv.proc.pid))
        print(f"  soak {len(results)}/{len(mix)}: RSS {samples[-1]['rss']} MiB (after the warm-up {base['rss']})",
              file=sys.stderr)
    wall = time.perf_counter() - t0
    for _ in range(50):  # the rows of the last clients that left are freed at the next step
        with urllib.request.urlopen(srv.url + "/metrics", timeout=10) as r:
            gauges = {line.split()[0].removeprefix("lilliput_"): float(line.split()[1]) for line in
                      r.read().decode().splitlines() if line.startswith(
                          ("lilliput_running_sequences", "lilliput_queue_length", "lilliput_requests_aborted"))}
        if gauges["running_sequences"] == gauges["queue_length"] == 0:
            break
        time.sleep(0.2)
    with urllib.request.urlopen(srv.url + "/health", timeout=10) as r:
        health = r.status

    def count(kind: str, outcome: str | None = None) -> int:
        return sum(k == kind and (outcome is None or o == outcome) for k, o in results)

    return {"requests": len(results), "warmup_requests": len(warmup), "clients": clients, "rounds": len(samples),
            "seconds": round(wall, 1), "requests_per_s": round(len(results) / wall, 2),
            "malformed": count("malformed"), "disconnects": count("disconnect"), "well_formed": count("ok"),
            "errors": count("ok", "error") + count("disconnect", "error"),
            "warmup_errors": sum(outcome != "ok" for _, outcome in warm),
            "malformed_not_4xx": count("malformed", "not_4xx"), "problem_examples": problems,
            "health_at_end": health, "metrics_at_end": gauges,
            "rss_after_warmup_mib": base, "rss_per_round_mib": [x["rss"] for x in samples], "rss_at_end_mib": samples[-1],
            "rss_growth": round((samples[-1]["rss"] - base["rss"]) / base["rss"], 4)}


def plot(levels: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [lv["clients"] for lv in levels]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ax[0].plot(n, [lv["output_throughput"] for lv in levels], "o-")
    ax[0].set(xscale="log", xlabel="concurrent clients", ylabel="output tokens/s", title="throughput")
    for key in ("ttft", "e2el"):
        ax[1].plot(n, [lv[key].get("p50_ms") for lv in levels], "o-", label=f"{key.upper()} p50")
    ax[1].set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="ms", title="latency")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model to serve (the embedded SmolLM2 when omitted)")
    ap.add_argument("--tiny", action="store_true", help="a random tiny model + byte tokenizer (validation only)")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--duration", type=float, default=120, help="seconds per concurrency level (bound)")
    ap.add_argument("--max-requests", type=int, default=200, help="requests per concurrency level (bound)")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engine-requests", type=int, default=8, help="requests of the no-HTTP engine comparison")
    ap.add_argument("--prefix-requests", type=int, default=16)
    ap.add_argument("--json-prompts", type=int, default=50)
    ap.add_argument("--json-max-tokens", type=int, default=64)
    ap.add_argument("--soak", type=int, default=10_000, metavar="N",
                    help="requests of the soak of a fresh server after its warm-up (default %(default)s, ~15 minutes "
                         "on SmolLM2; 0: no soak)")
    ap.add_argument("--soak-clients", type=int, default=8)
    ap.add_argument("--soak-rounds", type=int, default=10, help="RSS samples, one after each equal round")
    ap.add_argument("--soak-warmup", type=int, default=300, help="requests of the soak mix before its baseline RSS")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    for name in ("soak", "soak_warmup"):
        if getattr(args, name) < 0:
            ap.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("soak_clients", "soak_rounds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    import torch

    from lilliput.core.record import run_record, write_json

    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    if args.tiny:
        from lilliput.core.checkpoint import save_checkpoint
        from lilliput.core.config import preset
        from lilliput.core.model import GPT
        from lilliput.core.tokenizer import ByteTokenizer

        torch.manual_seed(0)
        model, tok = GPT(preset("tiny")).eval(), ByteTokenizer()
        spec = str(save_checkpoint(model, tok, Path(tmp.name) / "tiny"))
    else:
        from lilliput.core.checkpoint import load_model

        spec = args.model
        model, tok = load_model(spec, device="cpu")
    from lilliput.serve.app import int8_on_load

    model, tok = int8_on_load(lambda: (model, tok))()  # what `lilliput serve` serves: a float model as int8
    reqs = request_mix(tok, max(args.max_requests, 64), seed=0, tiny=args.tiny)
    levels = []
    with ServerProcess(spec, args.max_batch, args.threads) as srv:
        asyncio.run(load_level(srv.url, reqs, 1, 30, 2))  # warm-up
        for n in [int(c) for c in args.clients.split(",")]:
            lv = asyncio.run(load_level(srv.url, reqs, n, args.duration, args.max_requests))
            print(f"  N={n:<3} {lv['completed']} done, {lv['errors']} errors, {lv['output_throughput']} tok/s, "
                  f"TTFT p50 {lv['ttft'].get('p50_ms')} ms", file=sys.stderr)
            levels.append(lv)
        prefix = prefix_mix(tok, args.prefix_requests, args.tiny)
        ttft_cached = asyncio.run(ttft_one_at_a_time(srv.url, prefix))
        json_part = None if args.tiny else asyncio.run(json_extraction(srv.url, args.json_prompts, args.json_max_tokens))
    with ServerProcess(spec, args.max_batch, args.threads, prefix_cache=False) as srv:
        ttft_uncached = asyncio.run(ttft_one_at_a_time(srv.url, prefix))
    soaked = None
    if args.soak:
        mix = soak_mix(tok, args.soak_warmup + args.soak, seed=1, tiny=args.tiny)
        with ServerProcess(spec, args.max_batch, args.threads) as srv:
            soaked = asyncio.run(soak(srv, mix[args.soak_warmup:], mix[:args.soak_warmup], args.soak_rounds,
                                      args.soak_clients))
    one_level = next((lv for lv in levels if lv["clients"] == 1), None)
    overhead = None
    if one_level and one_level["completed"]:
        k = min(args.engine_requests, one_level["completed"])
        alone = engine_alone(model, tok, reqs, k)  # the same first k requests N = 1 sent
        overhead = round(statistics.fmean(one_level["_e2el"][:k]) / statistics.fmean(alone) - 1, 4)
    by_n = {lv["clients"]: lv for lv in levels}
    for lv in levels:
        lv.pop("_e2el")

    def ratio(a, b):
        return round(a / b, 3) if a and b else None

    result = {
        "model": args.model or ("tiny (random, byte tokenizer)" if args.tiny else "embedded SmolLM2-135M-Instruct"),
        "weights": describe_weights(model), "max_batch": args.max_batch, "threads": args.threads,
        "duration_s": args.duration,
        "errors": sum(lv["errors"] for lv in levels) + ttft_cached["errors"] + ttft_uncached["errors"]
        + (soaked["errors"] if soaked else 0),
        "soak_rss_growth": soaked["rss_growth"] if soaked else None,  # issue 22's target: first in the headline
        "throughput_16_vs_1": ratio(by_n.get(16, {}).get("output_throughput"), by_n.get(1, {}).get("output_throughput")),
        "server_overhead_n1": overhead,
        "ttft_prefix_cache_speedup": ratio(ttft_uncached["ttft"].get("p50_ms"), ttft_cached["ttft"].get("p50_ms")),
        "json_valid_constrained": json_part["constrained"]["valid"] if json_part else None,
        "json_valid_free": json_part["free"]["valid"] if json_part else None,
        "json_speed_ratio": ratio(json_part["constrained"]["decode_tok_s_median"], json_part["free"]["decode_tok_s_median"])
        if json_part else None,
        "levels": levels, "prefix_cache": {"on": ttft_cached, "off": ttft_uncached}, "json": json_part, "soak": soaked,
        "note": "N = 1 is the mix sent one at a time; server_overhead_n1 = mean E2EL over HTTP / mean E2EL of the "
                "same requests through an in-process Engine, minus 1; TTFT from send to the first text chunk; a JSON "
                "reply is valid when the whole reply parses (no code fence or prose around it) and validates; "
                "json decode tok/s = (completion tokens - 1) / time after the first text chunk, median. soak: a fresh "
                "server, a warm-up of the same mix, then ~15% malformed bodies (each must get a 4xx with an error "
                "object: malformed_not_4xx), ~20% streams left after the first chunk, the rest short well-formed "
                "requests; errors = well-formed requests answered with a 5xx, a broken answer or no connection; "
                "soak_rss_growth = (RSS at the end - RSS after the warm-up) / RSS after the warm-up, of the server "
                "process.",
    }
    out = Path(args.out)
    write_json(out, run_record("bench/serve_load.py " + " ".join(argv if argv is not None else sys.argv[1:]), **result))
    plot(levels, out.with_suffix(".png"))
    print(f"errors {result['errors']}, throughput_16_vs_1 {result['throughput_16_vs_1']}, server_overhead_n1 "
          f"{overhead}, ttft_prefix_cache_speedup {result['ttft_prefix_cache_speedup']}, json_valid_constrained "
          f"{result['json_valid_constrained']}, json_valid_free {result['json_valid_free']}, json_speed_ratio "
          f"{result['json_speed_ratio']}" + (f", soak_rss_growth {soaked['rss_growth']} ({soaked['requests']} requests, "
          f"{soaked['requests_per_s']}/s, malformed_not_4xx {soaked['malformed_not_4xx']})" if soaked else "")
          + f"; wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
