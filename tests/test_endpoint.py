"""A model behind a second `lilliput serve` on loopback scores multiple-choice requests as the same
model does in process: completions with echo + logprobs (lm-evaluation-harness's `local-completions`)."""

import pytest
import torch

from lilliput.core.config import preset
from lilliput.core.model import GPT
from lilliput.core.tokenizer import ByteTokenizer
from lilliput.eval.tasks import endpoint_loglikelihoods, loglikelihoods
from lilliput.infer.endpoint import Endpoint, EndpointError
from lilliput.infer.engine import EngineConfig
from lilliput.infer.prompt_logprobs import prompt_logprobs
from lilliput.serve.app import ServeConfig, Server

REQUESTS = [("The cat sat on the", " mat"), ("The cat sat on the", " moon"), ("Q: 2 + 2 = ?\nA:", " 4"),
            ("Q: 2 + 2 = ?\nA: ", "five"), ("x", "y" * 40),
            ("A long context " * 6, " and its end.")]


def tiny():
    torch.manual_seed(0)
    return GPT(preset("tiny")).eval(), ByteTokenizer()


@pytest.fixture(scope="module")
def server():
    torch.set_num_threads(1)
    s = Server(ServeConfig(port=0, engine=EngineConfig(max_batch=2), quantize=False), tiny, name="tiny-large").start(wait_loaded=True)
    yield s
    s.stop()


def test_served_loglikelihoods_equal_the_in_process_ones(server):
    model, tok = tiny()
    local = loglikelihoods(model, tok, REQUESTS, batch_size=3)  # padded batches, as the bench scores
    served = endpoint_loglikelihoods(Endpoint(server.url), tok, REQUESTS, concurrency=3)
    assert [g for _, g in served] == [g for _, g in local]
    torch.testing.assert_close(torch.tensor([s for s, _ in served]), torch.tensor([s for s, _ in local]),
                               atol=1e-4, rtol=0)


def test_echo_returns_the_prompt_scored_then_the_answer(server):
    model, tok = tiny()
    ids = tok.encode("abcdef", bos=None)
    endpoint = Endpoint(server.url)
    only = endpoint._request("/completions", {"prompt": ids, "echo": True, "logprobs": 2, "max_tokens": 0})
    c = only["choices"][0]
    assert c["text"] == "abcdef" and c["finish_reason"] == "length" and only["usage"]["completion_tokens"] == 0
    assert c["logprobs"]["token_logprobs"][0] is None and c["logprobs"]["top_logprobs"][0] is None
    expect = prompt_logprobs(model, ids, top=2)
    torch.testing.assert_close(torch.tensor(c["logprobs"]["token_logprobs"][1:]),
                               torch.tensor([r["logprob"] for r in expect]), atol=1e-5, rtol=0)
    assert [len(t) for t in c["logprobs"]["top_logprobs"][1:]] == [2] * (len(ids) - 1)
    both = endpoint._request("/completions", {"prompt": "abcdef", "echo": True, "logprobs": 0, "max_tokens": 3,
                                              "temperature": 0})["choices"][0]
    plain = endpoint._request("/completions", {"prompt": "abcdef", "max_tokens": 3, "temperature": 0})["choices"][0]
    assert both["text"] == "abcdef" + plain["text"]
    assert len(both["logprobs"]["token_logprobs"]) == len(ids) + 3
    assert both["logprobs"]["token_logprobs"][1:len(ids)] == c["logprobs"]["token_logprobs"][1:]
    no_lp = endpoint._request("/completions", {"prompt": "abc", "echo": True, "max_tokens": 0})["choices"][0]
    assert no_lp["text"] == "abc" and no_lp["logprobs"] is None


def test_echo_refuses_what_it_cannot_do(server):
    endpoint = Endpoint(server.url)
    for extra in ({"stream": True}, {"best_of": 2}):
        with pytest.raises(EndpointError, match="echo") as e:
            endpoint._request("/completions", {"prompt": "x", "echo": True, "max_tokens": 1, **extra})
        assert e.value.status == 400
    with pytest.raises(EndpointError, match="max_tokens"):  # 0 tokens only with echo
        endpoint._request("/completions", {"prompt": "x", "max_tokens": 0})
    with pytest.raises(EndpointError, match="context_length_exceeded"):
        endpoint._request("/completions", {"prompt": [1] * 10_000, "echo": True, "logprobs": 0, "max_tokens": 0})


def test_a_server_that_refuses_zero_tokens_is_asked_for_one(server, monkeypatch):
    endpoint = Endpoint(server.url)
    real, asked = endpoint._request, []

    def strict(path, body=None):
        asked.append(body["max_tokens"])
        if body["max_tokens"] == 0:
            raise EndpointError("400", 400, '{"error": {"message": "max_tokens must be >= 1", "param": "max_tokens"}}')
        return real(path, body)

    monkeypatch.setattr(endpoint, "_request", strict)
    ids = list(b"hello")
    first = endpoint.prompt_logprobs(ids)
    assert endpoint.prompt_logprobs(ids) == first and asked == [0, 1, 1] and len(first) == len(ids) - 1


def test_bad_urls_and_dead_servers_are_one_line():
    with pytest.raises(ValueError, match="not an http"):
        Endpoint("gpu-box:8000")
    with pytest.raises(RuntimeError, match="not reachable"):
        Endpoint("http://127.0.0.1:9", timeout=5)


@pytest.mark.slow
def test_smollm2_served_scores_equal_the_in_process_ones(smollm):
    import copy

    from lilliput.eval.tasks import TASKS

    model, tok = smollm
    served = copy.deepcopy(model)  # the server's engine routes few-row products to the C kernels
    s = Server(ServeConfig(port=0, engine=EngineConfig(max_batch=2), quantize=False), lambda: (served, tok), name="smollm2").start(
        wait_loaded=True)
    try:
        items = TASKS["piqa"].load(3) + TASKS["arc_easy"].load(3)
        reqs = [p for it in items for p in it.requests()] + [("Hi", " there")]  # a prompt under 8 tokens too
        local, remote = loglikelihoods(model, tok, reqs, 8), endpoint_loglikelihoods(Endpoint(s.url), tok, reqs, 4)
    finally:
        s.stop()
    assert [g for _, g in remote] == [g for _, g in local]
    torch.testing.assert_close(torch.tensor([x for x, _ in remote]), torch.tensor([x for x, _ in local]),
                               atol=1e-4, rtol=0)  # measured: 2.3e-5
