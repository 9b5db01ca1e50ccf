"""The OpenAI-compatible server, on a tiny model + byte tokenizer, bound to a free loopback port.

The official `openai` client is the client for well-formed requests; raw HTTP (http.client) sends the
malformed ones. Every server is started inside the test module and stopped at its end."""

import copy
import http.client
import json
import threading
import time
from urllib.parse import urlparse

import pytest
import torch

from lilliput.core.config import preset
from lilliput.core.model import GPT
from lilliput.core.tokenizer import ByteTokenizer
from lilliput.infer.engine import EngineConfig
from lilliput.infer.router import RouterConfig
from lilliput.serve.app import ServeConfig, Server

openai = pytest.importorskip("openai")

KEY = "sk-test"


def tiny(eos: int | None = None):
    torch.manual_seed(0)
    model = GPT(preset("tiny")).eval()
    tok = ByteTokenizer()
    if eos is not None:
        tok.eos_ids = {eos}
    return model, tok


@pytest.fixture(scope="module")
def server():
    torch.set_num_threads(1)
    cfg = ServeConfig(port=0, api_key=KEY, engine=EngineConfig(max_batch=4), max_body_bytes=4096)
    s = Server(cfg, tiny, name="tiny").start(wait_loaded=True)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=30)


class Reply:
    """A raw HTTP answer (stdlib http.client: no client library between the test and the server)."""

    def __init__(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse):
        self.conn, self.resp, self.status_code = conn, resp, resp.status
        self.headers = {k.lower(): v for k, v in resp.getheaders()}
        self._body = None

    @property
    def text(self) -> str:
        if self._body is None:
            self._body = self.resp.read().decode()
            self.conn.close()
        return self._body

    def json(self):
        return json.loads(self.text)

    def iter_lines(self):
        while line := self.resp.readline():
            yield line.decode().rstrip("\r\n")

    def close(self):
        self.conn.close()


def request(server, method, path, body=None, key=KEY) -> Reply:
    u = urlparse(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if body is not None:
        headers["Content-Type"] = "application/json"
        body = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request(method, path, body=body, headers=headers)
    return Reply(conn, conn.getresponse())


def post(server, path, body, key=KEY) -> Reply:
    return request(server, "POST", path, body, key)


def get(server, path) -> Reply:
    return request(server, "GET", path, key=None)


def chat(text="hi", **kw):
    return dict(model="tiny", messages=[{"role": "user", "content": text}], **kw)


# --- the happy paths, through the openai client -----------------------------------------------------

def test_binds_loopback_and_lists_the_model(server, client):
    assert server.url.startswith("http://127.0.0.1:")
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_chat_non_streaming_reports_usage_and_length(client):
    r = client.chat.completions.create(**chat("hello"), max_tokens=5, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "length" and c.message.role == "assistant" and isinstance(c.message.content, str)
    assert r.usage.completion_tokens == 5 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5 and r.model == "tiny"


def test_chat_stream_equals_non_stream_and_ends_with_usage(client):
    want = client.chat.completions.create(**chat("abc"), max_completion_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(**chat("abc"), max_completion_tokens=12, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_raw_stream_is_sse_ending_in_done(server):
    r = post(server, "/v1/completions", {"model": "tiny", "prompt": "xy", "max_tokens": 4, "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    lines = [ln for ln in r.iter_lines() if ln]
    r.close()
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_completions_text_tokens_and_stream_agree(client):
    a = client.completions.create(model="tiny", prompt="The cat", max_tokens=8, temperature=0)
    b = client.completions.create(model="tiny", prompt=list(b"The cat"), max_tokens=8, temperature=0)
    s = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="The cat", max_tokens=8, temperature=0, stream=True) if c.choices)
    assert a.choices[0].text == b.choices[0].text == s and a.usage.completion_tokens == 8


def test_logprobs_in_openai_shapes(client):
    r = client.chat.completions.create(**chat("q"), max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 3 for t in content)
    for t in content:  # greedy: the chosen token is the most likely one
        assert t.logprob <= 0 and t.logprob == pytest.approx(max(x.logprob for x in t.top_logprobs))
    c = client.completions.create(model="tiny", prompt="q", max_tokens=3, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert all(len(d) <= 2 for d in lp.top_logprobs) and lp.text_offset[0] == 0


def test_stop_string_cuts_the_text(client):
    full = client.completions.create(model="tiny", prompt="abc", max_tokens=20, temperature=0).choices[0].text
    stop = full[5:7]
    cut = client.completions.create(model="tiny", prompt="abc", max_tokens=20, temperature=0, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[:full.index(stop)]


def test_seed_gives_same_sample_whatever_else_runs(client):
    kw = dict(model="tiny", prompt="seeded", max_tokens=16, temperature=1.0, seed=123)
    alone = client.completions.create(**kw).choices[0].text
    busy = []
    others = [threading.Thread(target=lambda i=i: busy.append(client.completions.create(
        model="tiny", prompt="noise " * (i + 1), max_tokens=30, temperature=1.2).choices[0].text)) for i in range(3)]
    for t in others:
        t.start()
    again = client.completions.create(**kw).choices[0].text
    for t in others:
        t.join()
    assert again == alone and len(busy) == 3


def test_n_samples_share_a_prefill_and_are_seeded(client, server):
    kw = dict(model="tiny", prompt="fork me", max_tokens=6, temperature=1.0, seed=5, n=3)
    r = client.completions.create(**kw)
    assert sorted(c.index for c in r.choices) == [0, 1, 2] and r.usage.completion_tokens == 18
    assert len({c.text for c in r.choices}) > 1  # different seeds
    assert [c.text for c in client.completions.create(**kw).choices] == [c.text for c in r.choices]
    # sample i is what seed + i alone gives
    one = client.completions.create(**{**kw, "n": 1, "seed": 6}).choices[0].text
    assert one == r.choices[1].text


def test_best_of_returns_the_most_likely_samples(client):
    kw = dict(model="tiny", prompt="choose", max_tokens=6, temperature=1.0, seed=9)
    every = client.completions.create(**kw, n=4, logprobs=0).choices  # the same 4 candidates, all returned
    mean = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in every]
    best = client.completions.create(**kw, n=2, best_of=4)
    assert best.usage.completion_tokens == 24  # all candidates are paid for
    want = [every[i].text for i in sorted(range(4), key=lambda i: -mean[i])[:2]]
    assert [c.text for c in best.choices] == want and [c.index for c in best.choices] == [0, 1]
    for bad in (dict(n=3, best_of=2), dict(best_of=2, stream=True), dict(best_of=17)):
        with pytest.raises(openai.BadRequestError, match="best_of"):
            client.completions.create(**kw, **bad)


def test_presence_and_frequency_penalties_change_greedy_output(client):
    base = client.completions.create(model="tiny", prompt="aaaa", max_tokens=24, temperature=0).choices[0].text
    pen = client.completions.create(model="tiny", prompt="aaaa", max_tokens=24, temperature=0,
                                    frequency_penalty=2.0, presence_penalty=2.0).choices[0].text
    assert pen != base and len(set(pen)) >= len(set(base))


def test_concurrent_requests_are_batched(client, server):
    m = server.worker.metrics
    before = sum(m.buckets["batch"][1:])  # steps that decoded more than one sequence
    out = []
    threads = [threading.Thread(target=lambda i=i: out.append(client.chat.completions.create(
        **chat(f"req {i}"), max_tokens=40, temperature=0))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 4 and sum(m.buckets["batch"][1:]) > before


def test_client_disconnect_frees_the_row(server):
    engine = server.worker.engine
    step = engine.step
    engine.step = lambda: (time.sleep(0.01), step())[1]  # slow enough to leave mid-stream
    try:
        r = post(server, "/v1/chat/completions", {**chat("long"), "max_tokens": 200, "stream": True})
        for line in r.iter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                break  # got a token; leave
        r.close()
        t0 = time.time()
        while (server.worker.running or engine.has_work()) and time.time() - t0 < 5:
            time.sleep(0.02)
        assert time.time() - t0 < 1.5 and not engine.has_work()
        assert 'finished_total{reason="abort"}' in get(server, "/metrics").text
    finally:
        del engine.step


# --- errors, auth, health, metrics ------------------------------------------------------------------

@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    ({"model": "tiny"}, 400, "messages"),
    ({**chat(), "model": "gpt-9"}, 404, "model"),
    ({**chat(), "max_tokens": 0}, 400, "max_tokens"),
    ({**chat(), "max_tokens": 10_000}, 400, "max_tokens"),
    ({**chat("x" * 300), "max_tokens": 1}, 400, "messages"),
    ({**chat(), "temperature": "hot"}, 400, "temperature"),
    ({**chat(), "messages": "hi"}, 400, "messages"),
    ({**chat(), "n": 0}, 400, "n"),
    ({**chat(), "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({**chat(), "response_format": {"type": "xml"}}, 400, "response_format"),
    ([1, 2], 400, None),
])
def test_bad_requests_get_openai_errors_and_the_server_stays_up(server, body, status, param):
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["param"] == param
    assert get(server, "/health").status_code == 200


def test_completions_errors(server):
    assert post(server, "/v1/completions", {"model": "tiny"}).json()["error"]["param"] == "prompt"
    r = post(server, "/v1/completions", {"model": "tiny", "prompt": "x" * 300, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = post(server, "/v1/completions", {"model": "tiny", "prompt": [1, 999], "max_tokens": 1})
    assert r.status_code == 400


def test_body_over_the_limit_is_413(server):
    r = post(server, "/v1/chat/completions", chat("y" * 5000))
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_unknown_parameters_and_user_are_ignored(server):
    r = post(server, "/v1/chat/completions", {**chat(), "max_tokens": 2, "user": "u1", "frobnicate": [1]})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None


def test_api_key_is_required_on_v1_but_not_health_or_metrics(server):
    assert post(server, "/v1/chat/completions", chat(), key=None).status_code == 401
    r = post(server, "/v1/chat/completions", chat(), key="wrong")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert request(server, "GET", "/v1/models", key=None).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()
    assert get(server, "/health").json() == {"status": "ok"}
    text = get(server, "/metrics").text
    for name in ("lilliput_requests_total", "lilliput_generation_tokens_total", "lilliput_queue_length",
                 "lilliput_time_to_first_token_seconds_bucket", "lilliput_inter_token_latency_seconds_count",
                 "lilliput_batch_size_bucket"):
        assert name in text


def test_health_is_503_while_loading():
    gate = threading.Event()

    def slow_load():
        gate.wait(10)
        return tiny()

    s = Server(ServeConfig(port=0), slow_load).start()
    try:
        assert get(s, "/health").status_code == 503
        r = post(s, "/v1/completions", {"prompt": "a"}, key=None)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        gate.set()
        assert s.worker.ready.wait(10) and get(s, "/health").status_code == 200
    finally:
        gate.set()
        s.stop()


def test_response_format_constrains_json_per_sample():
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "additionalProperties": False, "required": ["city", "n"],
              "properties": {"city": {"type": "string", "maxLength": 8}, "n": {"type": "integer", "maximum": 9}}}
    cfg = ServeConfig(port=0, engine=EngineConfig(max_batch=4))
    s = Server(cfg, lambda: tiny(eos=0), name="tiny").start(wait_loaded=True)
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="-", max_retries=0)
        r = c.chat.completions.create(**chat("json please"), max_tokens=100, temperature=1.0, seed=2, n=3,
                                      response_format={"type": "json_schema",
                                                       "json_schema": {"name": "x", "schema": schema}})
        assert len(r.choices) == 3
        for ch in r.choices:
            assert ch.finish_reason == "stop"
            jsonschema.validate(json.loads(ch.message.content), schema)
        r = c.completions.create(model="tiny", prompt="{", max_tokens=60, temperature=0,
                                 extra_body={"response_format": {"type": "json_object"}})
        assert r.choices[0].text.startswith("{")
        bad = post(s, "/v1/chat/completions", {**chat(), "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}}, key=None)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format"
    finally:
        s.stop()


def test_serve_command_builds_its_config_from_flags():
    from lilliput.cli import build_parser
    from lilliput.core.options import config_from_args
    from lilliput.jobs.serve import ServeJob

    ns = build_parser().parse_args(["serve", "--model", "m.gguf", "--port", "0", "--api-key", "k", "--max-batch", "3",
                                    "--no-prefix-cache"])
    cfg = config_from_args(ServeConfig, ns)
    assert (cfg.host, cfg.port, cfg.api_key, cfg.engine.max_batch, cfg.engine.prefix_cache) == ("127.0.0.1", 0, "k", 3, False)
    assert ns.model == "m.gguf" and ns.entry.job is ServeJob and cfg.quantize
    assert not config_from_args(ServeConfig, build_parser().parse_args(["serve", "--no-quantize"])).quantize
    with pytest.raises(ValueError, match="port"):
        ServeConfig(port=70000)


def test_a_float_model_is_served_as_int8_unless_told():
    from lilliput.compress.quantize import RTNConfig, quantize_
    from lilliput.core.layers import layer_specs

    def kinds(cfg, load):
        s = Server(cfg, load, name="tiny").start(wait_loaded=True)
        try:
            r = openai.OpenAI(base_url=s.url + "/v1", api_key="-", max_retries=0).completions.create(
                model="tiny", prompt="int8?", max_tokens=3)
            assert r.usage.completion_tokens == 3
            return {spec["kind"] for spec in layer_specs(s.worker.engine.model).values()}
        finally:
            s.stop()

    assert kinds(ServeConfig(port=0), tiny) == {"int8"}  # the default: quantized on load (RTN)
    assert kinds(ServeConfig(port=0, quantize=False), tiny) == set()  # --no-quantize: float, as loaded
    def int4():
        return quantize_(tiny()[0], RTNConfig(bits=4, group_size=32, lm_head_bits=4)), ByteTokenizer()

    assert kinds(ServeConfig(port=0), int4) == {"int4"}  # already shrunk: served as it is


@pytest.mark.parametrize("threshold, answered_by", [(1e9, "small"), (-1.0, "large")])
def test_routed_pair_says_which_model_answered(threshold, answered_by):
    def seeded(seed):
        torch.manual_seed(seed)
        return GPT(preset("tiny")).eval(), ByteTokenizer()

    from lilliput.infer.engine import Engine
    from lilliput.infer.sequence import GenerationConfig

    want = Engine(*seeded(0 if answered_by == "small" else 1)).generate(["route me"], GenerationConfig(max_new_tokens=8))[0]
    cfg = ServeConfig(port=0, small="tiny-small", large="tiny-large", router=RouterConfig(threshold=threshold),
                      quantize=False)  # as `want`
    s = Server(cfg, lambda: seeded(0), name="router", load_large=lambda: seeded(1)).start(wait_loaded=True)
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="-", max_retries=0)
        r = c.completions.create(model="router", prompt="route me", max_tokens=8, temperature=0)
        assert r.model == f"tiny-{answered_by}" and r.choices[0].model_extra["routed_to"] == answered_by
        assert r.choices[0].text == want.text and r.usage.completion_tokens == 8
        chunks = list(c.completions.create(model="router", prompt="route me", max_tokens=8, temperature=0, stream=True))
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want.text  # only the answer is streamed
        assert chunks[-1].choices[0].model_extra["routed_to"] == answered_by
        assert f'routed_total{{model="{answered_by}"}}' in get(s, "/metrics").text
        with pytest.raises(openai.BadRequestError, match="routed pair"):  # which model would score the prompt?
            c.completions.create(model="router", prompt="route me", max_tokens=0, echo=True, logprobs=0)
    finally:
        s.stop()
    with pytest.raises(ValueError, match="both"):
        ServeConfig(small="a")
    with pytest.raises(ValueError, match="threshold"):
        ServeConfig(small="a", large="b")


def test_shared_system_prompt_is_served_from_the_prefix_cache(client):
    system = {"role": "system", "content": "You answer in one word. " * 4}
    kw = dict(model="tiny", max_tokens=3, temperature=0)
    first = client.chat.completions.create(messages=[system, {"role": "user", "content": "a?"}], **kw)
    second = client.chat.completions.create(messages=[system, {"role": "user", "content": "b?"}], **kw)
    assert second.usage.prompt_tokens_details.cached_tokens >= len(system["content"])
    assert first.usage.prompt_tokens == second.usage.prompt_tokens


def test_non_streaming_client_that_leaves_is_aborted(server):
    engine = server.worker.engine
    step = engine.step
    engine.step = lambda: (time.sleep(0.01), step())[1]
    try:
        u = urlparse(server.url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        conn.request("POST", "/v1/completions", body=json.dumps({"model": "tiny", "prompt": "bye", "max_tokens": 200}),
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        time.sleep(0.3)
        conn.close()  # leave before the answer
        t0 = time.time()
        while engine.has_work() and time.time() - t0 < 5:
            time.sleep(0.02)
        assert time.time() - t0 < 1.5 and not engine.has_work()
    finally:
        del engine.step


def test_echo_it_cannot_do_is_refused_not_ignored(server):  # echo itself: tests/test_endpoint.py
    r = post(server, "/v1/completions", {"model": "tiny", "prompt": "x", "echo": True, "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo"


def test_engine_failure_is_a_500_and_the_server_stays_up(server, client):
    engine = server.worker.engine
    state = {"failed": False}
    step = engine.step

    def broken():
        if not state["failed"]:
            state["failed"] = True
            raise RuntimeError("boom")
        return step()

    engine.step = broken
    try:
        r = post(server, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 4})
        assert r.status_code == 500 and "boom" in r.json()["error"]["message"]
    finally:
        if server.worker.engine is engine:
            del engine.step
    assert client.completions.create(model="tiny", prompt="x", max_tokens=4).usage.completion_tokens == 4


@pytest.mark.slow
def test_smollm2_chat_and_json_through_the_openai_client(smollm):
    jsonschema = pytest.importorskip("jsonschema")
    model = copy.deepcopy(smollm[0])  # served as int8, quantized in place: the session's float model stays
    cfg = ServeConfig(port=0, engine=EngineConfig(max_batch=4))
    s = Server(cfg, lambda: (model, smollm[1]), name="smollm2").start(wait_loaded=True)
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="-", max_retries=0, timeout=120)
        r = c.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Say hello."}],
                                      max_tokens=40, temperature=0)
        assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content.strip()  # ended by <|im_end|>
        schema = {"type": "object", "required": ["city"], "additionalProperties": False,
                  "properties": {"city": {"type": "string", "maxLength": 20}}}
        r = c.chat.completions.create(model="smollm2", max_tokens=30, temperature=0,
                                      messages=[{"role": "user", "content": "Name the capital of France as JSON."}],
                                      response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    finally:
        s.stop()


def test_routed_pair_escalates_a_share_of_requests():
    def seeded(seed):
        torch.manual_seed(seed)
        return GPT(preset("tiny")).eval(), ByteTokenizer()

    cfg = ServeConfig(port=0, small="tiny-small", large="tiny-large", router=RouterConfig(escalate=0.5))
    s = Server(cfg, lambda: seeded(0), name="router", load_large=lambda: seeded(1)).start(wait_loaded=True)
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="-", max_retries=0)
        routes = [c.completions.create(model="router", prompt=f"question {i}?", max_tokens=4, temperature=0)
                  .choices[0].model_extra["routed_to"] for i in range(12)]
        assert 3 <= routes.count("large") <= 8, routes
    finally:
        s.stop()
    with pytest.raises(ValueError, match="not both"):
        ServeConfig(small="a", large="b", router=RouterConfig(threshold=1.0, escalate=0.2))


def test_out_of_range_seed_is_a_400(server):
    r = post(server, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2, "seed": 2**70})
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed"
    assert post(server, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2, "seed": -1}).status_code == 200
