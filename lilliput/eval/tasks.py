"""Zero-shot multiple-choice and LAMBADA evaluation by log-likelihood (lm-evaluation-harness style).

Each choice becomes a (context, continuation) request. Tokenization follows the harness's
`_encode_pair`: trailing spaces of the context move to the front of the continuation, then
`whole = encode(context + continuation)`, `ctx = encode(context)` and the continuation tokens
are `whole[len(ctx):]` (BOS only where `tokenizer.add_bos` says so; an empty context is
replaced by one BOS, or EOS, token). The model reads `(ctx + cont)[:-1]`, truncated on the
left to its `max_seq_len`, and a request's score is the sum of log-probabilities of its
continuation tokens; `is_greedy` says whether argmax decoding reproduces them all.
`endpoint_loglikelihoods` scores the same token ids with a model behind an OpenAI-compatible server.

Metrics: `acc` = argmax of the summed log-prob; `acc_norm` = argmax of summed log-prob divided
by the length in characters of the choice text (harness `acc_norm`; for WinoGrande's partial
scoring the continuation is the same for every choice, so `acc_norm == acc`). LAMBADA: `acc` =
fraction of last words reproduced greedily, `ppl` = exp(-mean over passages of the last word's
summed log-prob) (harness `lambada_openai` perplexity: per word, not per token).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from tqdm import tqdm

from lilliput.eval import task_sets
from lilliput.eval.task_sets import Item, lambada_passages

__all__ = ["TASKS", "Task", "TaskConfig", "endpoint_loglikelihoods", "evaluate_tasks", "lambada_passages",
           "loglikelihoods"]


@dataclass(frozen=True)
class TaskConfig:
    tasks: tuple[str, ...] = ("hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande",
                              "boolq", "openbookqa", "sciq", "lambada")
    """Task names, keys of `TASKS`."""
    limit: int | None = None
    """Score only the first N items of each task (deterministic); None scores all."""
    batch_size: int = 8
    """Sequences (one per choice) per forward pass."""


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids), split at the context boundary (harness convention)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        return [prefix], tokenizer.encode(continuation, bos=False)
    whole = tokenizer.encode(context + continuation, bos=None)
    ctx = tokenizer.encode(context, bos=None)
    return ctx, whole[len(ctx):]


def _request_ids(tokenizer, requests: list[tuple[str, str]], max_len: int | None) -> list[tuple[list[int], list[int]]]:
    """(input ids, continuation ids) of each (context, continuation): the model reads the input and
    scores the continuation's tokens, the input's last len(continuation) positions predicting them."""
    seqs = []
    for context, continuation in requests:
        ctx, cont = _encode_pair(tokenizer, context, continuation)
        if not cont:
            raise ValueError(f"continuation {continuation!r} encodes to no tokens after {context[-40:]!r}")
        tokens = ctx + cont if max_len is None else (ctx + cont)[-(max_len + 1):]  # left-truncated to the context
        seqs.append((tokens[:-1], cont[-(len(tokens) - 1):]))  # a cut continuation keeps its tail
    return seqs


def loglikelihoods(
    model: torch.nn.Module,
    tokenizer,
    requests: list[tuple[str, str]],
    batch_size: int = 8,
    progress=None,
) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), is_greedy) for each (context, continuation).
    `progress.update(n)` (a tqdm bar, say) hears 0 once the requests are tokenized, then each
    batch's request count once it is scored."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    seqs = _request_ids(tokenizer, requests, model.config.max_seq_len)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))  # longest first: less padding
    out: list[tuple[float, bool] | None] = [None] * len(seqs)
    if progress is not None:
        progress.update(0)  # all tokenized: a timer of the batches starts here
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            T = len(seqs[chunk[0]][0])
            idx = torch.zeros(len(chunk), T, dtype=torch.long)  # right-padded: causal, harmless
            for b, i in enumerate(chunk):
                idx[b, : len(seqs[i][0])] = torch.tensor(seqs[i][0])
            # models with `features` (lilliput's GPT) pay the output layer only where scored
            feats = model.features(idx.to(device)) if hasattr(model, "features") else model(idx.to(device))
            for b, i in enumerate(chunk):
                inp, cont = seqs[i]
                n = len(inp)
                scored = feats[b, n - len(cont) : n]
                if hasattr(model, "features"):
                    scored = model.logits(scored)
                logp = torch.log_softmax(scored.float(), dim=-1)  # (C, V)
                target = torch.tensor(cont, device=logp.device)
                score = logp.gather(1, target[:, None]).sum().item()
                greedy = bool((logp.argmax(-1) == target).all())
                out[i] = (score, greedy)
            if progress is not None:
                progress.update(len(chunk))
    return out  # type: ignore[return-value]


def endpoint_loglikelihoods(endpoint, tokenizer, requests: list[tuple[str, str]], concurrency: int = 8,
                            max_len: int | None = None, progress=None) -> list[tuple[float, bool]]:
    """`loglikelihoods` of a model behind an OpenAI-compatible server (`lilliput.infer.endpoint.Endpoint`):
    the same token ids, tokenized here with the served model's tokenizer, each request's whole
    (context + continuation) scored by the server (completions with echo + logprobs), its continuation's
    log-probabilities summed; greedy where each continuation token is the server's likeliest.
    `concurrency` requests in flight; `max_len` left-truncates as a local model's context does."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    seqs = _request_ids(tokenizer, requests, max_len)

    def one(seq: tuple[list[int], list[int]]) -> tuple[float, bool]:
        inp, cont = seq
        scored = endpoint.prompt_logprobs(inp + cont[-1:])[-len(cont):]  # (logprob, best logprob) per token
        return sum(lp for lp, _ in scored), all(lp >= best for lp, best in scored)

    if progress is not None:
        progress.update(0)
    out = []
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for r in pool.map(one, seqs):
            out.append(r)
            if progress is not None:
                progress.update(1)
    return out


def choice_correct(items: list[Item], results: list[tuple[float, bool]]) -> list[tuple[bool, bool]]:
    """(acc, acc_norm) of each item, from per-request results laid out item by item, choice by choice:
    whether the highest log-probability, and the highest per character of the answer, is the gold one."""
    out, k = [], 0
    for item in items:
        scores = [score for score, _ in results[k : k + len(item.choices)]]
        k += len(item.choices)
        if item.continuation is None:
            lengths = [len(choice) for choice in item.choices]
        else:
            lengths = [len(item.continuation)] * len(item.choices)
        normed = [s / max(n, 1) for s, n in zip(scores, lengths)]
        out.append((max(range(len(scores)), key=scores.__getitem__) == item.gold,
                    max(range(len(normed)), key=normed.__getitem__) == item.gold))
    return out


def multiple_choice_metrics(items: list[Item], results: list[tuple[float, bool]]) -> dict:
    """acc and acc_norm from per-request results laid out item by item, choice by choice."""
    correct = choice_correct(items, results)
    n = len(items)
    return {"acc": sum(a for a, _ in correct) / n, "acc_norm": sum(b for _, b in correct) / n, "n": n}


def last_word_metrics(items: list[Item], results: list[tuple[float, bool]]) -> dict:
    """LAMBADA: greedy last-word accuracy and per-word perplexity of the target."""
    n = len(items)
    return {
        "acc": sum(greedy for _, greedy in results) / n,
        "ppl": math.exp(-sum(score for score, _ in results) / n),
        "n": n,
    }


@dataclass(frozen=True)
class Task:
    """An evaluation set: how to load its items and how to turn their scores into metrics."""

    load: Callable[[int | None], list[Item]]
    """limit -> the first `limit` items (None: all)."""
    metrics: Callable[[list[Item], list[tuple[float, bool]]], dict] = multiple_choice_metrics
    """(items, per-request (log-prob, is_greedy)) -> {"acc": ..., ..., "n": ...}."""


TASKS: dict[str, Task] = {
    "hellaswag": Task(task_sets.hellaswag),
    "piqa": Task(task_sets.piqa),
    "arc_easy": Task(task_sets.arc_easy),
    "arc_challenge": Task(task_sets.arc_challenge),
    "winogrande": Task(task_sets.winogrande),
    "boolq": Task(task_sets.boolq),
    "openbookqa": Task(task_sets.openbookqa),
    "sciq": Task(task_sets.sciq),
    "lambada": Task(task_sets.lambada, last_word_metrics),
}


def _duration(seconds: float) -> str:
    """3 s, 12 min, 2.5 h: a human-sized duration."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class _Clock:
    """Times scoring and estimates the time left from seconds per request character (items
    differ more across tasks than characters do: a BoolQ passage is ten PIQA goals).
    `update(n)` is what `loglikelihoods` calls after each batch, like tqdm's."""

    first_batches = 3
    """Batches timed before the first estimate: the first one also pays warm-up."""

    def __init__(self, total_chars: int, log: Callable[[str], None], hint: str):
        self.left, self.log, self.hint = total_chars, log, hint
        self.seconds = self.chars = 0.0  # scored so far, in all finished batches
        self.batches = 0
        self.bar, self.lengths, self.start = None, [], 0.0

    def begin(self, bar: tqdm, requests: list[tuple[str, str]]) -> None:
        # loglikelihoods scores the longest requests (in tokens) first: characters in about that order
        self.bar, self.lengths = bar, sorted((len(c) + len(x) for c, x in requests), reverse=True)
        self.start = time.perf_counter()

    def update(self, n: int) -> None:
        self.bar.update(n)
        now = time.perf_counter()
        if n == 0:  # tokenizing came before: seconds of a task are 1% of its scoring, but 10 batches
            self.start = now
            return
        chars, self.lengths = sum(self.lengths[:n]), self.lengths[n:]
        self.seconds, self.chars, self.left = self.seconds + now - self.start, self.chars + chars, self.left - chars
        self.start, self.batches = now, self.batches + 1
        if self.batches == self.first_batches and self.left > 0:
            self.log(f"about {_duration(self.eta())} to go ({self.seconds * 1e3 / self.chars:.2f} ms per "
                     f"character over the first {self.batches} batches){self.hint}")

    def eta(self) -> float:
        return self.left * self.seconds / max(self.chars, 1)


def evaluate_tasks(model: torch.nn.Module, tokenizer, cfg: TaskConfig,
                   log: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Score `model` zero-shot on each task of `cfg`: {task: {"acc", "acc_norm" | "ppl", "n"}}.

    `log` (e.g. print to stderr) hears the item counts before scoring starts, an estimate of the
    time it takes after the first batch, and the time left after each task."""
    unknown = [name for name in cfg.tasks if name not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}: choose from {sorted(TASKS)}")
    if cfg.limit is not None and cfg.limit < 1:
        raise ValueError(f"limit must be >= 1 (or None for all items), got {cfg.limit}")
    items = {name: TASKS[name].load(cfg.limit) for name in cfg.tasks}
    requests = {name: [pair for item in items[name] for pair in item.requests()] for name in cfg.tasks}
    log = log or (lambda message: None)
    n_items, n_requests = sum(map(len, items.values())), sum(map(len, requests.values()))
    log(f"scoring {n_items:,} items ({n_requests:,} requests): "
        + ", ".join(f"{name} {len(items[name]):,}" for name in cfg.tasks))
    hint = "; --limit N scores only the first N items of each task" if cfg.limit is None else ""
    clock = _Clock(sum(len(c) + len(x) for reqs in requests.values() for c, x in reqs), log, hint)
    was_training = model.training
    model.eval()
    results = {}
    try:
        for k, name in enumerate(cfg.tasks):
            with tqdm(total=len(requests[name]), desc=name, unit="req", file=sys.stderr,
                      disable=not sys.stderr.isatty()) as bar:
                clock.begin(bar, requests[name])
                scores = loglikelihoods(model, tokenizer, requests[name], cfg.batch_size, clock)
            results[name] = TASKS[name].metrics(items[name], scores)
            if k + 1 < len(cfg.tasks):
                log(f"{name} done; {_duration(clock.seconds)} so far, about {_duration(clock.eta())} to go")
    finally:
        model.train(was_training)
    return results
