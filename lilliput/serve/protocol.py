"""OpenAI's request and response shapes: parsing bodies into settings, and the JSON sent back.

Requests are checked with strict pydantic models (wrong types are a 400, as OpenAI answers;
unknown fields are ignored, as OpenAI does) and then turned into a `GenerationConfig`. Every
failure is an `ApiError`, which the app renders as `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from lilliput.infer.sequence import GenerationConfig, Sequence


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --- requests ---------------------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict | None = None


class TextPart(_Strict):
    type: str
    text: str | None = None


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            if any(p.type != "text" for p in self.content):
                raise ApiError(400, "only text content parts are supported", "messages", "unsupported_content")
            return "".join(p.text or "" for p in self.content)
        return self.content or ""


class _Sampling(_Strict):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    response_format: ResponseFormat | None = None
    user: Any = None  # ignored, as the issue asks
    ignore_eos: bool | None = None  # vLLM's extension: fixed output lengths for load tests


class ChatRequest(_Sampling):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str]
    logprobs: int | None = None
    echo: bool | None = None
    """Return the prompt before each answer, with its tokens' log-probabilities when `logprobs` is set
    (the first token has none); with max_tokens 0, only the prompt, scored."""
    best_of: int | None = None
    """Samples drawn server-side (sharing one prefill); the n with the highest mean token
    log-probability are returned (OpenAI's legacy `best_of`)."""


def best_of_count(req: CompletionRequest) -> int | None:
    """Candidates to draw for `best_of`, checked against n and streaming; None when not asked."""
    if req.best_of is None:
        return None
    n = sample_count(req)
    _check(n <= req.best_of <= MAX_N, f"best_of must be in [n={n}, {MAX_N}], got {req.best_of}", "best_of")
    _check(not req.stream, "best_of cannot be streamed: the best is known at the end", "best_of")
    return req.best_of


def parse(model: type[_Strict], body: Any) -> Any:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_body")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = str(err["loc"][0]) if err["loc"] else None
        if err["type"] == "missing":
            raise ApiError(400, f"'{param}' is a required property", param, "missing_required_parameter") from None
        raise ApiError(400, f"invalid value for '{param}': {err['msg']}", param, "invalid_type") from None


def _check(ok: bool, message: str, param: str) -> None:
    if not ok:
        raise ApiError(400, message, param, "invalid_value")


MAX_N = 16
"""Most samples per request (each takes a row)."""


def generation_config(req: _Sampling, max_tokens: int | None, logprobs: int | None) -> GenerationConfig:
    """The engine's settings for a request (max_tokens already resolved against the context)."""
    t = 1.0 if req.temperature is None else req.temperature
    _check(0 <= t <= 2, f"temperature must be in [0, 2], got {t}", "temperature")
    top_p = 1.0 if req.top_p is None else req.top_p
    _check(0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}", "top_p")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    _check(len(stop) <= 4, f"at most 4 stop sequences, got {len(stop)}", "stop")
    for name in ("presence_penalty", "frequency_penalty"):
        v = getattr(req, name) or 0.0
        _check(-2 <= v <= 2, f"{name} must be in [-2, 2], got {v}", name)
    _check(req.seed is None or -2**63 <= req.seed < 2**63 - MAX_N, f"seed must be a 64-bit integer, got {req.seed}", "seed")
    return GenerationConfig(max_new_tokens=max_tokens, temperature=t, top_p=top_p if top_p < 1 else None,
                            stop=tuple(s for s in stop if s), seed=req.seed, logprobs=logprobs,
                            ignore_eos=bool(req.ignore_eos))


def sample_count(req: _Sampling) -> int:
    n = 1 if req.n is None else req.n
    _check(1 <= n <= MAX_N, f"n must be in [1, {MAX_N}], got {n}", "n")
    return n


def resolve_max_tokens(requested: int | None, param: str, prompt_param: str, prompt_len: int, context: int) -> int:
    """The token budget: what was asked (checked against the context), or the rest of the context."""
    if prompt_len >= context:
        raise ApiError(400, f"the prompt is {prompt_len} tokens; this model's context is {context} tokens",
                       prompt_param, "context_length_exceeded")
    if requested is None:
        return context - prompt_len
    _check(requested >= 1, f"{param} must be >= 1, got {requested}", param)
    if prompt_len + requested > context:
        raise ApiError(400, f"the prompt ({prompt_len} tokens) + {param} ({requested}) exceeds this model's "
                       f"context of {context} tokens; lower {param}", param, "context_length_exceeded")
    return requested


# --- responses ---------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def finish_reason(seq: Sequence) -> str:
    return seq.finish_reason if seq.finish_reason in ("stop", "length") else "stop"


class LogprobFormat:
    """Engine log-probability records ({"token", "logprob", "top": [(id, lp)]}) in OpenAI's shapes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def piece(self, tok: int) -> str:
        return self.tokenizer.decode([tok])

    def chat(self, records: list[dict]) -> dict:
        """Chat: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}."""
        def one(tok, lp):
            s = self.piece(tok)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
        return {"content": [{**one(r["token"], r["logprob"]), "top_logprobs": [one(t, lp) for t, lp in r["top"]]}
                            for r in records], "refusal": None}

    def echoed(self, first: int, prompt: list[dict], records: list[dict]) -> dict:
        """Completions with echo: the prompt's tokens (the first token, `first`, has no log-probability:
        nothing comes before it), then the answer's."""
        head = self.piece(first)
        rest = self.completion([*prompt, *records], len(head))
        return {"tokens": [head, *rest["tokens"]], "token_logprobs": [None, *rest["token_logprobs"]],
                "top_logprobs": [None, *rest["top_logprobs"]], "text_offset": [0, *rest["text_offset"]]}

    def completion(self, records: list[dict], offset: int = 0) -> dict:
        """Completions: {"tokens", "token_logprobs", "top_logprobs": [{token: lp}], "text_offset"}."""
        tokens = [self.piece(r["token"]) for r in records]
        offsets, pos = [], offset
        for s in tokens:
            offsets.append(pos)
            pos += len(s)
        return {"tokens": tokens, "token_logprobs": [r["logprob"] for r in records],
                "top_logprobs": [{self.piece(t): lp for t, lp in r["top"]} for r in records], "text_offset": offsets}
