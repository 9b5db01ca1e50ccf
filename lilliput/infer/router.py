"""The hybrid router: a small model answers, and the request escalates to a large model when the
small model's answer looks uncertain.

Uncertainty signals (higher = less sure):
- of a generated answer: `mean_logprob` and `min_logprob` of its tokens (negated), and the mean
  `entropy` of the next-token distributions it was sampled from (`EntropyMeter` records them);
- of a multiple-choice answer: the `margin` between the two most likely choices (negated), the
  `entropy` over the choices, and the chosen answer's `mean_logprob`.

`fit_signal` learns one signal from several: a logistic regression of "the small answer is wrong"
on items both models have scored. The threshold is calibrated on held-out items, for a target share of escalations
(`threshold_for_share`) or a target quality (`threshold_for_quality`). Routing curves (quality
against the share sent to the large model), their random and oracle lines, the area under the
gap recovered (RouteLLM's APGR) and the share needed for a given part of the gap (CPT) are pure
functions over per-item correctness, so a benchmark scores the models once and routes offline.

`RoutedEngine` serves a pair with one engine's interface (add_n, step, abort, stats): requests are
batched continuously on the small engine, each small answer's text is held back until its verdict,
then released, or the request is asked again of the large engine, whose text streams as it comes.
The server's worker drives it as it drives a plain `Engine`.

    router = RoutedEngine(Engine(small, tok), Engine(large, tok), RouterConfig(signal="mean_logprob", threshold=1.2))
    answer = router.generate("What is 2 + 2?", GenerationConfig(max_new_tokens=16))
    answer.model  # "small" or "large"
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence as Seq

import torch

from lilliput.infer.engine import Engine, EngineStats
from lilliput.infer.sampling import LogitsProcessor
from lilliput.infer.sequence import GenerationConfig, Sequence

GENERATION_SIGNALS = ("mean_logprob", "min_logprob", "entropy")
CHOICE_SIGNALS = ("margin", "entropy", "mean_logprob")


class EntropyMeter(LogitsProcessor):
    """Records the entropy (nats) of each next-token distribution; leaves the logits as they are.
    Put it last in a chain to measure what the sampler draws from (before temperature)."""

    def __init__(self):
        self.entropies: list[float] = []

    def __call__(self, ids: list[int], prompt_len: int, logits: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits.float(), -1)
        self.entropies.append(float(-(logp.exp() * logp).nan_to_num().sum()))
        return logits


def generation_uncertainty(seq: Sequence, entropies: Seq[float] = ()) -> dict[str, float]:
    """Signals of a finished sequence sampled with `logprobs` on (higher = less sure)."""
    lps = [r["logprob"] for r in seq.logprobs[:max(len(seq.output), 1)]]
    if not lps:
        raise ValueError("the sequence has no log-probabilities: generate with GenerationConfig(logprobs=0)")
    out = {"mean_logprob": -sum(lps) / len(lps), "min_logprob": -min(lps)}
    if entropies:
        out["entropy"] = sum(entropies) / len(entropies)
    return out


def choice_uncertainty(scores: Seq[float]) -> dict[str, float]:
    """Signals of a multiple-choice answer from its choices' (length-normalized) log-likelihoods."""
    if len(scores) < 2:
        raise ValueError(f"a multiple-choice answer needs at least 2 choices, got {len(scores)}")
    s = torch.tensor([float(x) for x in scores], dtype=torch.float64)
    p = torch.softmax(s, 0)
    top = torch.topk(p, 2).values
    return {"margin": -float(top[0] - top[1]), "entropy": float(-(p * p.log()).sum()), "mean_logprob": -float(s.max())}


# --- calibration ------------------------------------------------------------------------------------

def threshold_for_share(uncertainty: Seq[float], share: float) -> float:
    """The threshold that escalates `share` of these (held-out) items: those with u > threshold."""
    if not 0 <= share <= 1:
        raise ValueError(f"share must be in [0, 1], got {share}")
    u = sorted(uncertainty, reverse=True)
    k = round(share * len(u))
    if k == 0:
        return math.inf
    return u[k] if k < len(u) else -math.inf  # ties at u[k] stay with the small model


def routed_accuracy(uncertainty: Seq[float], small_correct: Seq[bool], large_correct: Seq[bool],
                    threshold: float) -> tuple[float, float]:
    """(accuracy, escalated share) when items with u > threshold go to the large model."""
    esc = [u > threshold for u in uncertainty]
    acc = sum(lc if e else sc for e, sc, lc in zip(esc, small_correct, large_correct)) / len(esc)
    return acc, sum(esc) / len(esc)


def threshold_for_quality(uncertainty: Seq[float], small_correct: Seq[bool], large_correct: Seq[bool],
                          retain: float) -> float:
    """The threshold escalating the fewest items whose routed accuracy is >= retain x the large model's."""
    goal = retain * sum(large_correct) / len(large_correct)
    for share, acc in routing_curve(uncertainty, small_correct, large_correct):
        if acc >= goal - 1e-12:
            return threshold_for_share(uncertainty, share)
    return -math.inf


# --- a learned signal ------------------------------------------------------------------------------

@dataclass(frozen=True)
class LearnedSignal:
    """Logistic regression of "the small answer is wrong" on several signals (RouteLLM trains its
    routers the same way, on items scored by both models). Its uncertainty is that probability,
    so it routes with the same thresholds and curves as any single signal."""

    names: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]  # one per name, then the intercept

    def __call__(self, signals: dict[str, float]) -> float:
        z = self.weights[-1] + sum(w * (signals[n] - m) / s
                                   for n, m, s, w in zip(self.names, self.mean, self.scale, self.weights))
        return 1.0 / (1.0 + math.exp(-max(min(z, 60.0), -60.0)))


def fit_signal(signals: Seq[dict[str, float]], small_correct: Seq[bool], names: Seq[str] = CHOICE_SIGNALS,
               l2: float = 1e-2, iterations: int = 50) -> LearnedSignal:
    """Fit a LearnedSignal on calibration items by Newton's method (L2-regularized, float64)."""
    if len(signals) != len(small_correct) or len(signals) < 2:
        raise ValueError("fit_signal needs one small_correct per item and at least 2 items")
    x = torch.tensor([[s[n] for n in names] for s in signals], dtype=torch.float64)
    mean, scale = x.mean(0), x.std(0).clamp_min(1e-12)
    x = torch.cat([(x - mean) / scale, torch.ones(len(x), 1, dtype=torch.float64)], 1)  # (n, d + 1)
    y = torch.tensor([0.0 if c else 1.0 for c in small_correct], dtype=torch.float64)
    w = torch.zeros(x.shape[1], dtype=torch.float64)
    reg = torch.full_like(w, l2)
    reg[-1] = 0.0  # the intercept is not shrunk
    for _ in range(iterations):
        p = torch.sigmoid(x @ w)
        grad = x.T @ (p - y) / len(y) + reg * w
        hess = (x.T * (p * (1 - p))) @ x / len(y) + torch.diag(reg)
        step = torch.linalg.solve(hess, grad)
        w = w - step
        if float(step.abs().max()) < 1e-10:
            break
    return LearnedSignal(tuple(names), tuple(mean.tolist()), tuple(scale.tolist()), tuple(w.tolist()))


# --- curves -------------------------------------------------------------------------------------------

def routing_curve(uncertainty: Seq[float], small_correct: Seq[bool], large_correct: Seq[bool]) -> list[tuple[float, float]]:
    """(escalated share, accuracy) escalating the k most uncertain items, k = 0..n."""
    n = len(uncertainty)
    if not n == len(small_correct) == len(large_correct):
        raise ValueError("uncertainty, small_correct and large_correct must have one entry per item")
    order = sorted(range(n), key=lambda i: -uncertainty[i])
    correct = sum(small_correct)
    curve = [(0.0, correct / n)]
    for k, i in enumerate(order, start=1):
        correct += int(large_correct[i]) - int(small_correct[i])
        curve.append((k / n, correct / n))
    return curve


def oracle_curve(small_correct: Seq[bool], large_correct: Seq[bool]) -> list[tuple[float, float]]:
    """Escalating exactly the items the large model gets right and the small one wrong, first."""
    gain = [float(lc) - float(sc) for sc, lc in zip(small_correct, large_correct)]
    return routing_curve(gain, small_correct, large_correct)


def random_curve(small_correct: Seq[bool], large_correct: Seq[bool], points: int = 11) -> list[tuple[float, float]]:
    """The expected accuracy of escalating a random share s: small + s * (large - small)."""
    a, b = sum(small_correct) / len(small_correct), sum(large_correct) / len(large_correct)
    return [(s / (points - 1), a + s / (points - 1) * (b - a)) for s in range(points)]


def apgr(curve: Seq[tuple[float, float]], small_acc: float, large_acc: float) -> float | None:
    """Average performance gap recovered (RouteLLM): the area under (acc - small) / (large - small)
    over the escalated share in [0, 1], by trapezoids. None when the models tie."""
    gap = large_acc - small_acc
    if abs(gap) < 1e-12:
        return None
    pgr = [(s, (a - small_acc) / gap) for s, a in curve]
    return sum((s1 - s0) * (p0 + p1) / 2 for (s0, p0), (s1, p1) in zip(pgr, pgr[1:]))


def call_performance_threshold(curve: Seq[tuple[float, float]], small_acc: float, large_acc: float,
                               part: float) -> float | None:
    """CPT(part): the least escalated share whose accuracy recovers `part` of the gap (None: never)."""
    goal = small_acc + part * (large_acc - small_acc)
    return next((s for s, a in curve if a >= goal - 1e-12), None)


# --- serving --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RouterConfig:
    signal: str = "mean_logprob"
    """Uncertainty signal of the small model's answer: mean_logprob, min_logprob or entropy."""
    threshold: float | None = None
    """Escalate when the signal is above this (calibrate it with threshold_for_share/quality)."""
    escalate: float | None = None
    """Instead of a fixed threshold: escalate this share of requests, the threshold following the
    signals of the last `window` small answers (`RollingThreshold`)."""
    window: int = 256
    """Small answers remembered to place the threshold for `escalate`."""

    def __post_init__(self):
        if self.signal not in GENERATION_SIGNALS:
            raise ValueError(f"signal must be one of {GENERATION_SIGNALS}, got {self.signal!r}")
        if self.threshold is not None and self.escalate is not None:
            raise ValueError("give a threshold or a share to escalate, not both")
        if self.escalate is not None and not 0 <= self.escalate <= 1:
            raise ValueError(f"escalate must be in [0, 1], got {self.escalate}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")


class RollingThreshold:
    """Escalates a target share of a stream: an answer escalates when its signal is above the
    threshold that would escalate that share of the recent answers, itself included."""

    def __init__(self, cfg: RouterConfig):
        self.cfg = cfg
        self.recent: deque[float] = deque(maxlen=cfg.window)

    def escalates(self, u: float) -> bool:
        if self.cfg.escalate is None:
            return self.cfg.threshold is not None and u > self.cfg.threshold
        self.recent.append(u)
        return u > threshold_for_share(self.recent, self.cfg.escalate)


@dataclass
class RoutedAnswer:
    text: str
    model: str  # "small" or "large"
    uncertainty: dict[str, float]
    sequence: Sequence


def answer_uncertainty(seq: Sequence, meter: EntropyMeter) -> dict[str, float]:
    """The signals of a finished small answer; none for an empty one (its signal then reads 0)."""
    return generation_uncertainty(seq, meter.entropies) if seq.output else {}


@dataclass
class _Pending:
    """A small answer in flight, and what asking the large engine again takes."""

    meter: EntropyMeter
    cfg: GenerationConfig
    processors: Callable[[], Iterable[LogitsProcessor]]
    on_text: Callable[[Sequence, str], None] | None


class RoutedEngine:
    """Answers with the small engine and re-asks the large one when the small answer is unsure,
    behind one engine's interface. Both engines are stepped here: one RoutedEngine belongs to one
    thread, like an Engine."""

    def __init__(self, small: Engine, large: Engine, cfg: RouterConfig = RouterConfig()):
        if large.tokenizer.vocab_size != small.tokenizer.vocab_size or large.vocab_size != small.vocab_size:
            raise ValueError("the small and large models must share a tokenizer and vocabulary")
        self.small, self.large, self.cfg = small, large, cfg
        self.rule = RollingThreshold(cfg)
        self.max_len = min(small.max_len, large.max_len)
        self.tokenizer, self.vocab_size = small.tokenizer, small.vocab_size
        self._pending: dict[int, _Pending] = {}  # small seq.id -> what its verdict needs
        self._asked: dict[int, Sequence] = {}  # small seq.id -> its large answer, until that finishes

    def restarted(self) -> "RoutedEngine":
        """Fresh engines over the same models; the rolling threshold carries on."""
        fresh = RoutedEngine(self.small.restarted(), self.large.restarted(), self.cfg)
        fresh.rule = self.rule
        return fresh

    # --- requests ---------------------------------------------------------------------------------

    def add_n(self, prompt: str | list[int], cfg: GenerationConfig, n: int,
              processors: Callable[[], Iterable[LogitsProcessor]] | None = None,
              on_text: Callable[[Sequence, str], None] | None = None, bos: bool | None = None) -> list[Sequence]:
        """n samples of one prompt on the small engine (`Engine.add_n`), their log-probabilities and
        entropies recorded for the verdict, their text held back until it. Sample i, asked again,
        samples with seed + i on the large engine, with fresh `processors()`."""
        ids = self.tokenizer.encode(prompt, bos=bos) if isinstance(prompt, str) else [int(t) for t in prompt]
        if len(ids) + cfg.max_new_tokens > self.large.max_len:
            raise ValueError(f"prompt ({len(ids)}) + max_new_tokens ({cfg.max_new_tokens}) exceeds the large model's "
                             f"context of {self.large.max_len} tokens")
        make = processors or list
        meters: list[EntropyMeter] = []

        def small_processors() -> list[LogitsProcessor]:
            meters.append(meter := EntropyMeter())  # last: it measures what the sampler draws from
            return [*make(), meter]

        seqs = self.small.add_n(ids, dataclasses.replace(cfg, logprobs=cfg.logprobs or 0), n, small_processors, on_text)
        for i, (seq, meter) in enumerate(zip(seqs, meters)):
            if seq.finished:  # nothing to generate: it never reaches a step
                continue
            seq.hold()
            large_cfg = cfg if cfg.seed is None else dataclasses.replace(cfg, seed=cfg.seed + i)
            self._pending[seq.id] = _Pending(meter, large_cfg, make, on_text)
        return seqs

    def add(self, prompt: str | list[int], cfg: GenerationConfig = GenerationConfig(),
            processors: Callable[[], Iterable[LogitsProcessor]] | None = None,
            on_text: Callable[[Sequence, str], None] | None = None, bos: bool | None = None) -> Sequence:
        return self.add_n(prompt, cfg, 1, processors, on_text, bos)[0]

    def abort(self, seq: Sequence) -> None:
        """Stop a request (a small answer, with its large one if it was asked again)."""
        self._pending.pop(seq.id, None)
        for s in (seq, self._asked.pop(seq.id, None)):
            if s is not None:
                self.small.abort(s)
                self.large.abort(s)

    def has_work(self) -> bool:
        return self.small.has_work() or self.large.has_work()

    def stats(self) -> EngineStats:
        a, b = self.small.stats(), self.large.stats()
        return EngineStats(a.waiting + b.waiting, a.running + b.running, a.decoding + b.decoding)

    # --- one step ---------------------------------------------------------------------------------

    def step(self) -> list[Sequence]:
        """A step of each engine with work. Returns the answers finished in it: small answers that
        stand (their held text released), aborted ones, and large answers (`seq.origin` is the small
        answer each replaces)."""
        small = self.small.step() if self.small.has_work() else []
        large = self.large.step() if self.large.has_work() else []
        done = []
        for seq in small:
            pending = self._pending.pop(seq.id, None)
            if pending is not None and seq.finish_reason != "abort" and \
                    self.rule.escalates(answer_uncertainty(seq, pending.meter).get(self.cfg.signal, 0.0)):
                big = self.large.add(list(seq.prompt), pending.cfg, pending.processors(), pending.on_text)
                big.origin = seq
                self._asked[seq.id] = big
                continue
            if pending is not None:
                seq.release()
            done.append(seq)
        for seq in large:
            if seq.origin is not None:
                self._asked.pop(seq.origin.id, None)
            done.append(seq)
        return done

    def generate(self, prompt: str | list[int], cfg: GenerationConfig = GenerationConfig(),
                 processors: Callable[[], list[LogitsProcessor]] = list, bos: bool | None = None) -> RoutedAnswer:
        """One answer, stepping until it is done. `processors()` makes each model's own logits
        processors (a grammar holds state)."""
        seq = self.add(prompt, cfg, processors, bos=bos)
        pending = self._pending.get(seq.id)
        if pending is None:
            return RoutedAnswer(seq.text, "small", {}, seq)
        while True:
            for answer in self.step():
                if answer is seq or answer.origin is seq:
                    return RoutedAnswer(answer.text, "small" if answer is seq else "large",
                                        answer_uncertainty(seq, pending.meter), answer)
