"""The engine thread: one `Engine` owned by one background thread, fed through a thread-safe queue.

The engine is not thread-safe, so HTTP handlers never touch it: they build a `Job` (token ids,
settings, how many samples) and `submit` it; the thread adds it to the engine between steps and
steps while anything is queued or running. Text deltas and the end of each sample go back to the
handler's asyncio loop with `call_soon_threadsafe`. A client that goes away calls `abort`, and
the job's rows are freed at the next step.

With a router (`Route`), a sample is first answered by the small engine, its text held back;
when its uncertainty is at most the threshold the held text is released, else the sample is
asked again of the large engine, whose text streams as it comes. `job.routes` says which
model answered each sample.

`n` samples share one prefill (`Engine.add_n`: the first prefills, the others copy its state and
draw their first token from the same logits), up to the engine's rows at a time; each sample gets
its own processors (a grammar holds per-sample state).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from lilliput.infer.engine import Engine, EngineConfig
from lilliput.infer.router import EntropyMeter, RollingThreshold, RouterConfig, generation_uncertainty
from lilliput.infer.sequence import GenerationConfig, Sequence, Status

log = logging.getLogger("lilliput.serve")


@dataclass
class Job:
    """One request: n samples of one prompt. Events go to `events` on the handler's loop:
    ("text", index, delta, logprobs) while decoding, ("done", index, seq) per sample,
    ("error", message) if the engine failed. With a router, `routes[index]` is "small" or
    "large" once that sample is done."""

    ids: list[int]
    cfg: GenerationConfig
    n: int = 1
    processors: Callable[[], list] = list
    """Makes a fresh list of logits processors for each sample (processors hold per-sample state)."""
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    arrival: float = field(default_factory=time.perf_counter)
    seqs: list[Sequence] = field(default_factory=list)
    index: dict[int, int] = field(default_factory=dict)  # seq.id -> sample index
    sent_logprobs: dict[int, int] = field(default_factory=dict)
    last_text_at: dict[int, float] = field(default_factory=dict)
    aborted: bool = False
    meters: dict[int, EntropyMeter] = field(default_factory=dict)  # small-model seq.id -> its meter
    held: dict[int, list] = field(default_factory=dict)  # small-model seq.id -> text events held back
    routes: dict[int, str] = field(default_factory=dict)

    def sample_cfg(self, index: int) -> GenerationConfig:
        """Sample i's settings: seed + i (as Engine.add_n seeds its samples)."""
        return self.cfg if self.cfg.seed is None or index == 0 else dataclasses.replace(self.cfg, seed=self.cfg.seed + index)

    def post(self, *event) -> None:
        if self.loop is not None and not self.aborted:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


@dataclass(frozen=True)
class Route:
    """Serve a small/large pair: `load_large` gives the large model (same tokenizer)."""

    load_large: Callable[[], tuple]
    cfg: RouterConfig


class Worker:
    """Loads the model and runs the engine loop in a daemon thread. `ready` is set once loaded;
    `error` holds the reason when loading failed."""

    def __init__(self, load: Callable[[], tuple], engine_cfg: EngineConfig, metrics=None, route: Route | None = None):
        self.load, self.engine_cfg, self.metrics, self.route = load, engine_cfg, metrics, route
        self.large: Engine | None = None
        self.rule = RollingThreshold(route.cfg) if route is not None else None
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.ready = threading.Event()
        self.error: str | None = None
        self.engine: Engine | None = None
        self.tokenizer = None
        self.max_len = 0
        self.running = self.waiting = 0  # gauges, written by the engine thread after each step
        self._jobs: dict[int, Job] = {}  # seq.id -> job
        self._stop = False
        self.thread = threading.Thread(target=self._run, name="lilliput-engine", daemon=True)

    def start(self) -> "Worker":
        self.thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop = True
        self.inbox.put(("stop", None))
        self.thread.join(timeout)

    def submit(self, job: Job) -> None:
        self.inbox.put(("add", job))

    def abort(self, job: Job) -> None:
        job.aborted = True
        self.inbox.put(("abort", job))

    # --- the engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            model, self.tokenizer = self.load()
            self.engine = Engine(model, self.tokenizer, self.engine_cfg)
            self.max_len = self.engine.max_len
            if self.route is not None:
                large, large_tok = self.route.load_large()
                if large_tok.vocab_size != self.tokenizer.vocab_size or large.config.vocab_size != model.config.vocab_size:
                    raise ValueError("the small and large models must share a tokenizer and vocabulary")
                self.large = Engine(large, large_tok, self.engine_cfg)
                self.max_len = min(self.max_len, self.large.max_len)
        except Exception as e:  # reported by /health; the server stays up to say so
            self.error = f"{type(e).__name__}: {e}"
            log.error("loading the model failed: %s", self.error)
            return
        self.ready.set()
        while not self._stop:
            idle = not self._busy()
            try:
                try:
                    self._handle(*self.inbox.get(block=idle))
                    while True:
                        self._handle(*self.inbox.get_nowait())
                except queue.Empty:
                    pass
                if self._stop:
                    break
                if self._busy():
                    self._step()
            except Exception as e:  # this thread must outlive any one request
                log.exception("engine loop failed")
                self._fail_all(f"engine error: {type(e).__name__}: {e}")

    def _busy(self) -> bool:
        return self.engine.has_work() or (self.large is not None and self.large.has_work())

    def _engines(self) -> list[Engine]:
        return [self.engine] + ([self.large] if self.large is not None else [])

    def _handle(self, what: str, job: Job | None) -> None:
        if what == "add":
            rows = self.engine.cfg.max_batch
            for first in range(0, job.n, rows):  # samples share a prefill, a row-pool at a time
                self._add(job, first, min(rows, job.n - first))
        elif what == "abort":
            for seq in job.seqs:
                self._jobs.pop(seq.id, None)  # one still waiting is never returned by a step
                for engine in self._engines():  # a waiting seq leaves only its own engine's queue
                    engine.abort(seq)

    def _add(self, job: Job, first: int, n: int) -> None:
        """Samples first .. first + n - 1 of the job, sharing one prefill."""
        if job.aborted:
            return
        meters: list[EntropyMeter] = []

        def processors() -> list:
            procs = job.processors()
            if self.large is not None:  # the small model's answer is judged by its log-probabilities
                procs.append(meter := EntropyMeter())
                meters.append(meter)
            return procs

        cfg = job.sample_cfg(first)
        if self.large is not None:
            cfg = dataclasses.replace(cfg, logprobs=cfg.logprobs or 0)
        try:
            seqs = self.engine.add_n(job.ids, cfg, n, processors, on_text=lambda s, t: self._on_text(job, s, t))
        except Exception as e:  # the handler checks lengths and settings first; this is a last line
            job.post("error", f"{type(e).__name__}: {e}")
            return
        for i, seq in enumerate(seqs):
            self._track(job, seq, first + i)
            if meters:
                job.meters[seq.id] = meters[i]

    def _track(self, job: Job, seq: Sequence, index: int) -> None:
        job.seqs.append(seq)
        job.index[seq.id] = index
        job.sent_logprobs[seq.id] = 0
        self._jobs[seq.id] = job

    def _on_text(self, job: Job, seq: Sequence, text: str) -> None:
        now = time.perf_counter()
        if self.metrics is not None and seq.id in job.last_text_at:
            self.metrics.observe("itl", now - job.last_text_at[seq.id])
        job.last_text_at[seq.id] = now
        k = job.sent_logprobs.get(seq.id, 0)
        new = seq.logprobs[k:len(seq.output)]
        job.sent_logprobs[seq.id] = k + len(new)
        if seq.id in job.meters:  # a small answer waits for the router's verdict
            job.held.setdefault(seq.id, []).append(("text", job.index[seq.id], text, new))
        else:
            job.post("text", job.index[seq.id], text, new)

    def _step(self) -> None:
        try:
            finished = [s for e in self._engines() if e.has_work() for s in e.step()]
        except Exception as e:  # fail what is in flight, keep serving
            log.exception("engine step failed")
            self._fail_all(f"engine error: {type(e).__name__}: {e}")
            return
        scheds = [e.scheduler for e in self._engines()]
        self.running, self.waiting = sum(len(s.running) for s in scheds), sum(len(s.waiting) for s in scheds)
        if self.metrics is not None:
            self.metrics.observe("batch", len([s for s in scheds[0].running if s.status is Status.RUNNING]))
        for seq in finished:
            if self.metrics is not None:
                self.metrics.inc("finished_total", reason=seq.finish_reason)
            job = self._jobs.pop(seq.id, None)
            if job is None:
                continue
            if seq.id in job.meters and not job.aborted:
                self._judge(job, seq)
                continue
            if self.metrics is not None and seq.first_token_at is not None:
                self.metrics.observe("ttft", seq.first_token_at - job.arrival)
            if self.large is not None:
                job.routes[job.index[seq.id]] = "large"
                if self.metrics is not None:
                    self.metrics.inc("routed_total", model="large")
            job.post("done", job.index[seq.id], seq)

    def _judge(self, job: Job, seq: Sequence) -> None:
        """The small model's sample is done: release it, or ask the large model instead."""
        meter, index, rc = job.meters.pop(seq.id), job.index[seq.id], self.route.cfg
        u = generation_uncertainty(seq, meter.entropies).get(rc.signal, 0.0) if seq.output else 0.0
        if seq.finish_reason == "abort" or not self.rule.escalates(u):
            for event in job.held.pop(seq.id, []):
                job.post(*event)
            job.routes[index] = "small"
            if self.metrics is not None:
                self.metrics.inc("routed_total", model="small")
                if seq.first_token_at is not None:
                    self.metrics.observe("ttft", seq.first_token_at - job.arrival)
            job.post("done", index, seq)
            return
        job.held.pop(seq.id, None)
        try:
            big = self.large.add(job.ids, job.sample_cfg(index), job.processors(),
                                 on_text=lambda s, t: self._on_text(job, s, t))
        except Exception as e:
            job.post("error", f"{type(e).__name__}: {e}")
            return
        self._track(job, big, index)

    def _fail_all(self, message: str) -> None:
        for job in {id(j): j for j in self._jobs.values()}.values():
            job.post("error", message)
            for seq in job.seqs:
                for engine in self._engines():
                    engine.abort(seq)
        self._jobs.clear()
        for name in ("engine", "large"):
            engine = getattr(self, name)
            if engine is None:
                continue
            try:
                engine.step()  # retire the aborted rows
            except Exception:
                log.exception("engine could not retire aborted rows; starting a fresh engine")
                setattr(self, name, Engine(engine.model, engine.tokenizer, self.engine_cfg))
