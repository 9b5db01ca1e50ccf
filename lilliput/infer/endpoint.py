"""A model behind an OpenAI-compatible HTTP server (vLLM, `lilliput serve`, llama.cpp's server, ...):
the edge/cloud pair's large model, a synthetic-data teacher.

    large = Endpoint("http://gpu-box:8000")                 # /v1 is added when missing
    records = large.prompt_logprobs(ids)                    # [(logprob, top-1 logprob)] of ids[1:]

`prompt_logprobs` asks `/v1/completions` for the prompt itself (`echo`, `logprobs`, `max_tokens` 0,
temperature 0), as lm-evaluation-harness's `local-completions` scores choices. Token ids are sent, so
the server's model must share the caller's tokenizer (SmolLM2-135M, -360M and -1.7B do). A server
that refuses `max_tokens` 0 is asked for 1 token, which is dropped (the harness always asks for 1).
The key is sent as `Authorization: Bearer`; it is never recorded.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from urllib.parse import urlparse


def is_endpoint(spec: str | None) -> bool:
    """True for an http(s) URL (a server to call), False for a model to load."""
    return spec is not None and urlparse(spec).scheme in ("http", "https")


class Endpoint:
    role = "endpoint"
    """What the server is to the caller, in error messages ("teacher", ...)."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, timeout: float = 600.0):
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"{url!r} is not an http(s) URL of an OpenAI-compatible server")
        base = url.rstrip("/")
        self.base = base if base.endswith("/v1") else base + "/v1"
        self.api_key, self.timeout = api_key, timeout
        self.model = model or self._first_model()
        self.echo_tokens = 0  # max_tokens of a scoring request; 1 once the server refused 0

    def _request(self, path: str, body: dict | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.base + path, data=None if body is None else json.dumps(body).encode(),
                                     headers=headers, method="GET" if body is None else "POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:200]
            raise EndpointError(f"{self.role} {self.base}{path} answered {e.code}: {detail}", e.code, detail) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            raise RuntimeError(f"{self.role} {self.base} is not reachable ({getattr(e, 'reason', e)}); "
                               "is the server running?") from None

    def _first_model(self) -> str:
        models = self._request("/models").get("data") or []
        if not models:
            raise RuntimeError(f"{self.role} {self.base} serves no model (/v1/models is empty)")
        return models[0]["id"]

    @property
    def label(self) -> str:
        return f"{self.model} @ {self.base}"

    def prompt_logprobs(self, ids: list[int]) -> list[tuple[float, float]]:
        """(log p(token | the tokens before it), the likeliest token's log-probability there) for ids[1:]."""
        if len(ids) < 2:
            raise ValueError(f"score at least 2 tokens (the first has no log-probability), got {len(ids)}")
        body = {"model": self.model, "prompt": [int(t) for t in ids], "echo": True, "logprobs": 1, "temperature": 0}
        try:
            reply = self._request("/completions", {**body, "max_tokens": self.echo_tokens})
        except EndpointError as e:
            if self.echo_tokens or e.status != 400 or "max_tokens" not in e.detail:
                raise
            self.echo_tokens = 1
            reply = self._request("/completions", {**body, "max_tokens": 1})
        try:
            lps = reply["choices"][0]["logprobs"]
            token, top = lps["token_logprobs"][1:len(ids)], lps["top_logprobs"][1:len(ids)]
            out = [(float(lp), max(float(v) for v in alts.values())) for lp, alts in zip(token, top)]
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            raise RuntimeError(f"{self.role} {self.base} sent no prompt log-probabilities for echo + logprobs: "
                               f"{json.dumps(reply)[:200]}") from None
        if len(out) != len(ids) - 1:
            raise RuntimeError(f"{self.role} {self.base} scored {len(out) + 1} prompt tokens, {len(ids)} were sent: "
                               "does it serve a model with this tokenizer?")
        return out


class EndpointError(RuntimeError):
    """An HTTP error answer: `status` and the start of its body (`detail`)."""

    def __init__(self, message: str, status: int, detail: str):
        super().__init__(message)
        self.status, self.detail = status, detail
