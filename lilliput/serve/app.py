"""The OpenAI-compatible HTTP server: FastAPI routes over one engine thread.

FastAPI + uvicorn: the pairing vLLM and SGLang serve the same API with, asyncio-native server-sent
events, and the official `openai` client as the test client. Every request goes to one `Worker`
(worker.py), whose engine batches concurrent requests continuously; handlers only parse,
tokenize, check lengths and relay events.

    server = Server(ServeConfig(port=0), load=lambda: (model, tokenizer)).start()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="-")
    ...
    server.stop()
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import gc
import json
import logging
import socket
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from lilliput.core.layers import layer_specs
from lilliput.core.options import nested
from lilliput.infer.engine import EngineConfig
from lilliput.infer.grammar import JsonGrammar
from lilliput.infer.router import RouterConfig
from lilliput.infer.sampling import PresenceFrequencyPenalty
from lilliput.infer.search import mean_logprob
from lilliput.serve import protocol as P
from lilliput.serve.metrics import Metrics
from lilliput.serve.worker import Job, Route, Worker

log = logging.getLogger("lilliput.serve")


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    """Address to bind; loopback unless told otherwise."""
    port: int = 8000
    """TCP port (0 picks a free one)."""
    api_key: str | None = None
    """Require `Authorization: Bearer KEY` on /v1 routes (None: open)."""
    engine: EngineConfig = dataclasses.field(
        default=EngineConfig(), metadata=nested(only=("max_batch", "prefill_chunk", "prefix_cache")))
    """The engine every request goes through: rows decoded together, prefill chunk, prefix cache."""
    quantize: bool = True
    """Serve a float model (--model, --small) as int8, quantized on load (RTN per output channel, the
    output layer too: what `lilliput quantize` makes), for the C kernels' int8 path on CPU; --no-quantize
    serves it as loaded (float32, or bfloat16 with --dtype bfloat16). A model already quantized is served
    as it is, and so is one off CPU (int8 layers there dequantize their weights in every forward: no
    faster) and --large (the reference whose answers a threshold was calibrated on)."""
    max_body_bytes: int = 1_000_000
    """Largest request body accepted (413 past it)."""
    served_name: str | None = None
    """Model id shown in /v1/models and responses; the --model value (or smollm2-135m-instruct) when omitted."""
    small: str | None = None
    """With --large: a shrunk model that answers first (a routed pair; --model is then unused)."""
    large: str | None = None
    """With --small: the model a request escalates to when the small answer is unsure."""
    router: RouterConfig = dataclasses.field(default=RouterConfig(), metadata=nested(
        only=("threshold", "escalate", "signal"), help={
            "threshold": "Escalate when the small answer's uncertainty signal is above this (bench/router.py "
                         "calibrates one).",
            "escalate": "Instead of --threshold: send this share of requests to --large (the threshold follows "
                        "recent answers).",
            "signal": "Uncertainty signal of the small answer: mean_logprob, min_logprob (negated) or entropy."}))
    """With --small and --large: when a request escalates."""

    def __post_init__(self):
        if (self.small is None) != (self.large is None):
            raise ValueError("a routed pair needs both --small and --large")
        if self.small is not None and (self.router.threshold is None) == (self.router.escalate is None):
            raise ValueError("--small/--large need one of --threshold (calibrate one with bench/router.py) "
                             "or --escalate SHARE")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")

    def router_config(self) -> RouterConfig:
        return self.router

    def engine_config(self) -> EngineConfig:
        return self.engine


def int8_on_load(load: Callable[[], tuple]) -> Callable[[], tuple]:
    """`load`, then its model quantized to int8 (RTN, `ServeConfig.quantize`) when it is a float model on
    CPU; a model with quantized layers already, or on a GPU, is returned as loaded."""
    def load_int8() -> tuple:
        model, tokenizer = load()
        if layer_specs(model) or next(model.parameters()).device.type != "cpu":
            return model, tokenizer
        from lilliput.compress.quantize import RTNConfig, quantize_

        try:
            quantize_(model, RTNConfig(bits=8))
        except ValueError as e:
            raise ValueError(f"{e}; --no-quantize serves the model in float") from None
        release_freed_memory()
        return model, tokenizer
    return load_int8


def release_freed_memory() -> None:
    """Give memory freed inside the C heap back to the system. glibc keeps freed chunks for reuse, so
    the float weights a model was quantized from stayed resident: SmolLM2 served as int8 from its
    float load held 1,330 MiB, ~650 of them free."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): its allocator decides
        pass


DISCONNECT_POLL_S = 0.1
"""How often a non-streaming request checks that its client is still there (a stream's
disconnect cancels it at once)."""


def create_app(cfg: ServeConfig, worker: Worker, name: str) -> FastAPI:
    """`name` is the served model id; with a routed pair, each response's `model` (for one
    sample) and each choice's `routed_to` say which model answered."""
    app = FastAPI(title="lilliput", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = worker.metrics

    def error(e: P.ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(P.ApiError)
    async def _api_error(request, e: P.ApiError):
        metrics.inc("request_errors_total", code=e.status)
        return error(e)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        return error(P.ApiError(e.status_code, str(e.detail), None, None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e):
        return error(P.ApiError(400, str(e), None, "invalid_request"))

    if cfg.api_key is not None:
        app.add_middleware(_ApiKey, key=cfg.api_key)

    def loaded():
        if worker.error is not None:
            raise P.ApiError(503, f"the model failed to load: {worker.error}", None, "model_load_failed", "server_error")
        if not worker.ready.is_set():
            raise P.ApiError(503, "the model is loading; retry shortly", None, "model_loading", "server_error")

    async def body_of(request: Request):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > cfg.max_body_bytes:
            raise P.ApiError(413, f"the request body is over {cfg.max_body_bytes} bytes", None, "request_too_large")
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > cfg.max_body_bytes:
                raise P.ApiError(413, f"the request body is over {cfg.max_body_bytes} bytes", None, "request_too_large")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise P.ApiError(400, f"the request body is not valid JSON ({e})", None, "invalid_json") from None

    def check_model(req) -> None:
        if req.model is not None and req.model != name:
            raise P.ApiError(404, f"the model '{req.model}' does not exist; this server serves '{name}'",
                             "model", "model_not_found")

    async def build_job(req, ids: list[int], max_param: str, requested: int | None, logprobs: int | None,
                        n: int | None = None) -> Job:
        prompt_param = "messages" if isinstance(req, P.ChatRequest) else "prompt"
        max_tokens = P.resolve_max_tokens(requested, max_param, prompt_param, len(ids), worker.max_len)
        gen = P.generation_config(req, max_tokens, logprobs)
        n = P.sample_count(req) if n is None else n
        makers = []
        if req.presence_penalty or req.frequency_penalty:
            pres, freq = req.presence_penalty or 0.0, req.frequency_penalty or 0.0
            makers.append(lambda: PresenceFrequencyPenalty(pres, freq))
        fmt = req.response_format
        if fmt is not None and fmt.type != "text":
            schema = None
            if fmt.type == "json_schema":
                spec = fmt.json_schema or {}
                schema = spec.get("schema", {}) if isinstance(spec, dict) else None
            try:  # compiling (and the first time, indexing the vocabulary) runs off the event loop
                grammar = await asyncio.to_thread(JsonGrammar.from_schema, worker.tokenizer, schema,
                                                  worker.vocab_size)
            except ValueError as e:
                raise P.ApiError(400, str(e), "response_format", "invalid_schema") from None
            makers.append(grammar.processor)
        loop = asyncio.get_running_loop()
        return Job(ids, gen, n, lambda: [m() for m in makers], loop, asyncio.Queue())

    async def run_job(request: Request, job: Job) -> None:
        """Submit and wait until every sample is done; abort if the client leaves (polled)."""
        worker.submit(job)
        loop = asyncio.get_running_loop()
        done, checked = 0, loop.time()
        try:
            while done < job.n:
                get = asyncio.ensure_future(job.events.get())
                while not get.done():
                    await asyncio.wait([get], timeout=DISCONNECT_POLL_S)
                    if loop.time() - checked >= DISCONNECT_POLL_S:
                        checked = loop.time()
                        if await request.is_disconnected():
                            get.cancel()  # 499 (nginx's "client closed request"): no one reads it
                            raise P.ApiError(499, "the client closed the request", None, "client_closed")
                event = get.result()
                if event[0] == "error":
                    raise P.ApiError(500, event[1], None, "engine_error", "server_error")
                if event[0] == "done":
                    done += 1
        except BaseException:
            worker.abort(job)
            metrics.inc("requests_aborted_total")
            raise

    async def sse(job: Job, endpoint: str, head: list[dict], text: Callable, end: Callable,
                  usage: Callable | None) -> AsyncIterator[str]:
        """Server-sent events of a job: `head` chunks, one per text delta, one per finished sample,
        the usage chunk (when `usage` is given), then [DONE]. A client that leaves cancels this generator
        (Starlette watches the connection), which aborts the job."""
        def data(obj) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        worker.submit(job)
        finished = 0
        try:
            for c in head:
                yield data(c)
            while finished < job.n:
                event = await job.events.get()
                if event[0] == "error":
                    raise P.ApiError(500, event[1], None, "engine_error", "server_error")
                if event[0] == "text":
                    yield data(text(*event[1:]))
                else:
                    finished += 1
                    yield data(end(*event[1:]))
            u = count(job, endpoint)
            if usage is not None:
                yield data(usage(u))
        except P.ApiError as e:
            yield data(e.body())
        finally:
            if finished < job.n:
                worker.abort(job)
                metrics.inc("requests_aborted_total")
            # A client that leaves cancels this generator through anyio, whose CancelledError sits in a
            # reference cycle with its traceback, and so with this frame, until a full collection (~80k
            # new long-lived objects away): this frame lets go of the request's job and sequences now.
            job = text = end = usage = event = None
        yield "data: [DONE]\n\n"

    def answers(job: Job) -> dict:
        """index -> the sequence that answered it (a routed sample's large answer replaces its small one)."""
        return {job.index[s.id]: s for s in job.seqs}

    def route_fields(job: Job, index: int) -> dict:
        return {"routed_to": job.routes.get(index)} if worker.route is not None else {}

    def model_of(job: Job) -> str:
        if worker.route is not None and job.n == 1 and 0 in job.routes:
            return {"small": cfg.small, "large": cfg.large}[job.routes[0]]
        return name

    def count(job: Job, endpoint: str) -> dict:
        out = sum(len(s.output) for s in answers(job).values())
        metrics.inc("requests_total", endpoint=endpoint)
        metrics.inc("prompt_tokens_total", len(job.ids))
        metrics.inc("generation_tokens_total", out)
        cached = max((s.cached_tokens for s in job.seqs), default=0)
        return P.usage(len(job.ids), out, cached)

    # --- routes -------------------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        if worker.ready.is_set():
            return {"status": "ok"}
        status = "failed: " + worker.error if worker.error else "loading"
        return JSONResponse({"status": status}, status_code=503)

    @app.get("/metrics")
    async def metrics_route():
        gauges = {"queue_length": ("Requests waiting for a row.", worker.waiting),
                  "running_sequences": ("Sequences holding a row.", worker.running)}
        return PlainTextResponse(metrics.render(gauges), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "lilliput"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = P.parse(P.ChatRequest, await body_of(request))
        check_model(req)
        loaded()
        if not req.messages:
            raise P.ApiError(400, "'messages' must hold at least one message", "messages", "invalid_value")
        if req.top_logprobs is not None and not 0 <= req.top_logprobs <= 20:
            raise P.ApiError(400, f"top_logprobs must be in [0, 20], got {req.top_logprobs}", "top_logprobs", "invalid_value")
        tok = worker.tokenizer
        try:
            text = tok.apply_chat_template([{"role": m.role if m.role != "developer" else "system", "content": m.text()}
                                            for m in req.messages])
        except ValueError as e:
            raise P.ApiError(400, str(e), "messages", "invalid_value") from None
        ids = await asyncio.to_thread(tok.encode, text, False)  # a long prompt does not stall the streams
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        lp = (req.top_logprobs or 0) if req.logprobs else None
        job = await build_job(req, ids, param, requested, lp)
        rid, created, fmt = P.new_id("chatcmpl"), P.now(), P.LogprobFormat(tok)

        def chunk(choices, usage=None):
            c = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name, "choices": choices}
            if req.stream_options and req.stream_options.include_usage:
                c["usage"] = usage
            return c

        if req.stream:
            def text(i, delta, records):
                return chunk([{"index": i, "delta": {"content": delta},
                               "logprobs": fmt.chat(records) if lp is not None else None, "finish_reason": None}])

            def end(i, seq):
                return chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": P.finish_reason(seq),
                               **route_fields(job, i)}])

            head = [chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None}]) for i in range(job.n)]
            usage = (lambda u: chunk([], u)) if req.stream_options and req.stream_options.include_usage else None
            return StreamingResponse(sse(job, "chat", head, text, end, usage), media_type="text/event-stream")

        await run_job(request, job)
        choices = [{"index": i, "message": {"role": "assistant", "content": s.text, "refusal": None},
                    "logprobs": fmt.chat(s.logprobs[:len(s.output)]) if lp is not None else None,
                    "finish_reason": P.finish_reason(s), **route_fields(job, i)} for i, s in sorted(answers(job).items())]
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_of(job), "choices": choices,
                "usage": count(job, "chat"), "system_fingerprint": None}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = P.parse(P.CompletionRequest, await body_of(request))
        check_model(req)
        loaded()
        if req.logprobs is not None and not 0 <= req.logprobs <= 20:
            raise P.ApiError(400, f"logprobs must be in [0, 20], got {req.logprobs}", "logprobs", "invalid_value")
        if req.echo and (req.stream or req.best_of is not None or worker.route is not None):
            what = ("streamed" if req.stream else "combined with best_of" if req.best_of is not None
                    else "asked of a routed pair")
            raise P.ApiError(400, f"echo cannot be {what} here: ask without it", "echo", "unsupported_parameter")
        tok, prompt = worker.tokenizer, req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise P.ApiError(400, "send one prompt per request (a list of prompts is not supported)", "prompt",
                                 "invalid_value")
            prompt = prompt[0]
        if isinstance(prompt, list):
            if any(not 0 <= t < worker.vocab_size for t in prompt):
                raise P.ApiError(400, "a prompt token id is outside the vocabulary", "prompt", "invalid_value")
            ids = list(prompt)
        else:
            ids = await asyncio.to_thread(tok.encode, prompt)
        if not ids:
            raise P.ApiError(400, "the prompt is empty", "prompt", "invalid_value")
        best_of = P.best_of_count(req)  # candidates scored by their own log-probabilities
        requested = 16 if req.max_tokens is None else req.max_tokens
        rid, created, fmt = P.new_id("cmpl"), P.now(), P.LogprobFormat(tok)

        def body(choices, usage=None, model=name):
            c = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}
            if usage is not None or (req.stream and req.stream_options and req.stream_options.include_usage):
                c["usage"] = usage
            return c

        echoed = ("", [])  # with echo: the prompt's text and its tokens' records, before each answer
        if req.echo:
            if len(ids) > worker.max_len:
                raise P.ApiError(400, f"the prompt is {len(ids)} tokens; this model's context is {worker.max_len} "
                                 "tokens", "prompt", "context_length_exceeded")
            try:
                records = await worker.score(ids, req.logprobs) if req.logprobs is not None else []
            except Exception as e:
                raise P.ApiError(500, f"scoring the prompt failed: {type(e).__name__}: {e}", None, "engine_error",
                                 "server_error") from None
            echoed = (prompt if isinstance(prompt, str) else tok.decode(ids), records)
        if req.echo and requested == 0:  # the prompt scored, nothing generated (lm-eval's local-completions)
            lps = fmt.echoed(ids[0], echoed[1], []) if req.logprobs is not None else None
            metrics.inc("requests_total", endpoint="completions")
            metrics.inc("prompt_tokens_total", len(ids))
            return body([{"index": i, "text": echoed[0], "finish_reason": "length", "logprobs": lps}
                         for i in range(P.sample_count(req))], P.usage(len(ids), 0))
        job = await build_job(req, ids, "max_tokens", requested,
                              req.logprobs if best_of is None else (req.logprobs or 0), best_of)

        if req.stream:
            offsets = [0] * job.n

            def text(i, delta, records):
                lps = fmt.completion(records, offsets[i]) if req.logprobs is not None else None
                offsets[i] += len(delta)
                return body([{"index": i, "text": delta, "logprobs": lps, "finish_reason": None}])

            def end(i, seq):
                return body([{"index": i, "text": "", "logprobs": None, "finish_reason": P.finish_reason(seq),
                              **route_fields(job, i)}])

            usage = (lambda u: body([], u)) if req.stream_options and req.stream_options.include_usage else None
            return StreamingResponse(sse(job, "completions", [], text, end, usage), media_type="text/event-stream")

        await run_job(request, job)
        picked = sorted(answers(job).items())
        if best_of is not None:  # the n candidates with the highest mean log-probability, best first
            picked = sorted(picked, key=lambda kv: -mean_logprob(kv[1]))[:P.sample_count(req)]

        def logprobs(s):
            if req.logprobs is None:
                return None
            records = s.logprobs[:len(s.output)]
            return fmt.echoed(ids[0], echoed[1], records) if req.echo else fmt.completion(records)

        choices = [{"index": i, "text": echoed[0] + s.text, "finish_reason": P.finish_reason(s), "logprobs": logprobs(s),
                    **route_fields(job, k)} for i, (k, s) in enumerate(picked)]
        return body(choices, count(job, "completions"), model_of(job))

    return app


class _ApiKey:
    """`Authorization: Bearer KEY` on /v1 routes. A plain ASGI middleware: Starlette's
    BaseHTTPMiddleware would hide a client's disconnect from the handlers behind it."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            if dict(scope["headers"]).get(b"authorization") != self.expected:
                e = P.ApiError(401, "missing or wrong API key: send Authorization: Bearer KEY", None,
                               "invalid_api_key", "authentication_error")
                return await JSONResponse(e.body(), status_code=401)(scope, receive, send)
        await self.app(scope, receive, send)


class Server:
    """uvicorn serving the app in a background thread, on a socket bound before it starts (so
    port 0 gives a free port that `url` reports). For tests and the load test; `run_server`
    is the foreground command."""

    def __init__(self, cfg: ServeConfig, load: Callable[[], tuple], name: str = "lilliput",
                 load_large: Callable[[], tuple] | None = None):
        import uvicorn

        if cfg.quantize:  # in place: a model the caller keeps using is quantized too
            load = int8_on_load(load)
        route = Route(load_large, cfg.router_config()) if load_large is not None else None
        self.worker = Worker(load, cfg.engine_config(), Metrics(), route)
        self.app = create_app(cfg, self.worker, cfg.served_name or name)
        self.sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((cfg.host, cfg.port))
        host, port = self.sock.getsockname()[:2]
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, wait_loaded: bool = False, timeout: float = 600) -> "Server":
        self.worker.start()
        self.thread.start()
        while not self.server.started and self.thread.is_alive():
            threading.Event().wait(0.01)
        if wait_loaded and not self.worker.ready.wait(timeout):
            raise TimeoutError("the model did not load in time")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.worker.stop()
        self.sock.close()


def run_server(cfg: ServeConfig, load_cfg) -> None:
    """`lilliput serve`: bind, answer /health with 503 while the model loads, then serve until Ctrl-C."""
    import uvicorn

    route = None
    if cfg.small is not None:
        small, large = (dataclasses.replace(load_cfg, model=m) for m in (cfg.small, cfg.large))
        load_cfg, route = small, Route(large.load, cfg.router_config())
    name = cfg.served_name or ("router" if route else load_cfg.model or "smollm2-135m-instruct")
    load = int8_on_load(load_cfg.load) if cfg.quantize else load_cfg.load
    worker = Worker(load, cfg.engine_config(), Metrics(), route).start()
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and cfg.api_key is None:
        log.warning("serving on %s without --api-key: anyone who can reach it can use it", cfg.host)
    weights = "int8 on load, unless already quantized or off CPU" if cfg.quantize else "as loaded"
    print(f"lilliput: serving {name} ({weights}) on http://{cfg.host}:{cfg.port}/v1 (loading the model; /health says "
          "when ready)", flush=True)
    try:
        uvicorn.run(create_app(cfg, worker, name), host=cfg.host, port=cfg.port, log_level="info")
    finally:
        worker.stop()
