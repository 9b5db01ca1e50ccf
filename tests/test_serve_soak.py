"""A small soak of the server, in-process: rounds of mixed requests (well-formed, malformed, clients that
leave mid-stream or before a non-streamed answer) leave nothing of theirs behind. After each round no
job, sequence or row is held, no task waits, /metrics has the same series, the grammar's tokenizer cache
is at its bound, and the checkpoint's weights are in memory rather than a mapping of the file that
fills in as new token ids arrive (issue 22: a server that runs for weeks). bench/serve_load.py --soak
measures the same over 10,000 requests, with RSS."""

import asyncio
import gc
import http.client
import json
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch

from lilliput.core.checkpoint import LoadConfig, save_checkpoint
from lilliput.core.config import preset
from lilliput.core.model import GPT
from lilliput.core.tokenizer import ByteTokenizer
from lilliput.infer import grammar
from lilliput.infer.sequence import Sequence
from lilliput.infer.engine import EngineConfig
from lilliput.serve.app import ServeConfig, Server
from lilliput.serve.worker import Job

ROUND = 40
"""Requests per round (4 clients)."""
BAD = [b"{not json", {"model": "tiny"}, {"model": "tiny", "prompt": "x", "max_tokens": 0},
       {"model": "tiny", "prompt": "x", "temperature": "hot"}, [1, 2],
       {"model": "tiny", "prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 7}}}}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    return save_checkpoint(GPT(preset("tiny")).eval(), ByteTokenizer(), tmp_path_factory.mktemp("soak") / "tiny")


@pytest.fixture(scope="module")
def server(checkpoint):
    """`lilliput serve --model FOLDER`'s path: loaded from disk, quantized on load."""
    def load():
        model, tok = LoadConfig(str(checkpoint), "cpu").load()
        tok.eos_ids = {0}  # NUL ends a sequence: a grammar needs an end token
        return model, tok

    torch.set_num_threads(1)
    s = Server(ServeConfig(port=0, engine=EngineConfig(max_batch=4), max_body_bytes=4096), load, name="tiny").start(wait_loaded=True)
    engine = s.worker.engine
    step = engine.step
    engine.step = lambda: (time.sleep(0.002), step())[1]  # slow enough for a client to leave mid-answer
    yield s
    s.stop()


def send(server, i: int) -> tuple[str, int]:
    """Request i of a fixed mix -> (kind, HTTP status; 0 when the client left)."""
    kind = ["bad", "bad", "leave", "leave", "leave_unstreamed", "json", "logprobs", "chat", "stream", "n"][i % 10]
    path, body = "/v1/completions", {"model": "tiny", "prompt": f"request {i}: ", "max_tokens": 6, "temperature": 1.0,
                                     "seed": i}
    if kind == "bad":
        path, body = ("/v1/completions", "/v1/chat/completions")[i % 2], BAD[i % len(BAD)]
    elif kind.startswith("leave"):
        body.update(max_tokens=200, stream=kind == "leave", n=1 + i % 2)
    elif kind == "json":  # a new schema each time: nothing may be kept per schema
        body.update(max_tokens=40, logprobs=3, stream=i % 2 == 0, response_format={"type": "json_schema", "json_schema": {
            "name": "s", "schema": {"type": "object", "properties": {f"k{i}": {"type": "integer"}}, "required": [f"k{i}"]}}})
    elif kind == "logprobs":
        body.update(logprobs=2, n=2)
    elif kind == "chat":
        path, body = "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": f"hi {i}"}],
                                              "max_tokens": 6, "stream": i % 2 == 0}
    elif kind == "n":
        body.update(n=3, stream=True, stream_options={"include_usage": True})
    else:
        body.update(stream=True)
    u = urlparse(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.request("POST", path, body if isinstance(body, bytes) else json.dumps(body).encode(),
                     {"Content-Type": "application/json"})
        if kind == "leave_unstreamed":
            time.sleep(0.15)  # the answer is still being made
            return kind, 0
        resp = conn.getresponse()
        if kind == "leave":
            for line in iter(resp.readline, b""):
                if line.startswith(b"data: {") and b'"text": ""' not in line:
                    break  # leave after the first text chunk
            return kind, 0
        text = resp.read()
        if resp.status >= 400 and set(json.loads(text).get("error", {})) != {"message", "type", "param", "code"}:
            return kind, -resp.status  # an error without OpenAI's error object
        return kind, resp.status
    finally:
        conn.close()


def soak_round(server, first: int) -> list[tuple[str, int]]:
    out, todo, lock = [], iter(range(first, first + ROUND)), threading.Lock()

    def client():
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            try:
                out.append(send(server, i))
            except Exception as e:  # a connection failure, or a body that is not JSON
                out.append((f"request {i}: {type(e).__name__}: {e}", -1))

    clients = [threading.Thread(target=client) for _ in range(4)]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    return out


def left_behind(server, collect: bool = True) -> dict:
    """What the server holds once every request of a round has ended (with `collect`, after a full
    collection of reference cycles)."""
    worker, t0 = server.worker, time.time()
    while (worker.engine.has_work() or worker._jobs) and time.time() - t0 < 10:
        time.sleep(0.02)
    time.sleep(0.3)  # the handlers' last steps after the engine's
    if collect:
        gc.collect()
    live = gc.get_objects()
    sched = worker.engine.scheduler
    series = [line.split(" ")[0] for line in get(server, "/metrics") if not line.startswith("#")]
    return {"jobs": len(worker._jobs), "waiting": len(sched.waiting), "running": len(sched.running),
            "free_rows": len(sched.pool.free), "sequences": sum(type(o) is Sequence for o in live),
            "job_objects": sum(type(o) is Job for o in live),
            "pending_tasks": sum(type(o) is asyncio.Task and not o.done() for o in live),
            "metric_series": sorted(series),
            "ll_tokenizers": grammar._ll_tokenizer.cache_info().currsize}


def get(server, path: str) -> list[str]:
    u = urlparse(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode().splitlines()
    finally:
        conn.close()


def test_rounds_of_requests_leave_no_state_behind(server, checkpoint):
    first = soak_round(server, 0)
    after_one = left_behind(server)
    second = soak_round(server, ROUND)
    after_two = left_behind(server)
    assert len(first) == len(second) == ROUND
    for kind, status in first + second:
        if kind == "bad":
            assert 400 <= status < 500, kind
        elif not kind.startswith("leave"):
            assert status == 200, kind  # a 5xx or a dropped connection on a well-formed request is an error
    assert after_two == after_one  # nothing grows from round to round (live objects: the whole process's)
    assert after_two["jobs"] == after_two["waiting"] == after_two["running"] == 0 and after_two["free_rows"] == 4
    metrics = dict(line.rsplit(" ", 1) for line in get(server, "/metrics") if not line.startswith("#"))
    assert float(metrics["lilliput_requests_aborted_total"]) >= 8  # clients did leave mid-answer
    weights = str((Path(checkpoint) / "model.safetensors").resolve())
    maps = Path("/proc/self/maps")
    if maps.exists():  # the weights are in memory: RSS does not fill in as new token ids arrive
        assert not [line for line in maps.read_text().splitlines() if line.endswith(weights)]


@pytest.mark.parametrize("kinds", [(5, 6, 7, 8, 9), (2, 3, 4)], ids=["answered", "left"])
def test_a_request_is_freed_without_the_cycle_collector(server, kinds):
    """A request's job and sequences die with their last reference, not at the next full collection: a
    server holding ~330k long-lived objects collects fully only after ~80k more survive, so a cycle per
    request (job -> sequence -> on_text closure -> job, before) piled up between collections."""
    gc.collect()
    gc.disable()
    try:
        for i in range(3 * ROUND, 3 * ROUND + 20):
            if i % 10 in kinds:
                send(server, i)
        left_behind_counts = left_behind(server, collect=False)
    finally:
        gc.enable()
    assert left_behind_counts["sequences"] == left_behind_counts["job_objects"] == 0
