"""The engine thread: one engine owned by one background thread, fed through a thread-safe queue.

The engine is not thread-safe, so HTTP handlers never touch it: they build a `Job` (token ids,
settings, how many samples) and `submit` it; the thread adds it to the engine between steps and
steps while anything is queued or running. Text deltas and the end of each sample go back to the
handler's asyncio loop with `call_soon_threadsafe`. A client that goes away calls `abort`, and
the job's rows are freed at the next step.

With a router (`Route`), the engine is a `RoutedEngine` (infer/router.py), driven the same way:
it holds a small answer's text back until its verdict and asks the large model again when
needed; `job.routes` says which model answered each sample.

A `Score` (a completions request with `echo` and `logprobs`) asks for the log-probabilities of the
prompt's own tokens: the thread computes them between steps with one forward of the model
(infer/prompt_logprobs.py) and settles the handler's future.

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
from lilliput.infer.prompt_logprobs import prompt_logprobs
from lilliput.infer.router import RoutedEngine, RouterConfig
from lilliput.infer.sequence import GenerationConfig, Sequence

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
    routes: dict[int, str] = field(default_factory=dict)

    def sample_cfg(self, index: int) -> GenerationConfig:
        """Sample i's settings: seed + i (as Engine.add_n seeds its samples)."""
        return self.cfg if self.cfg.seed is None or index == 0 else dataclasses.replace(self.cfg, seed=self.cfg.seed + index)

    def post(self, *event) -> None:
        if self.loop is not None and not self.aborted:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


@dataclass
class Score:
    """Log-probabilities of a prompt's tokens (with the `top` likeliest alternatives), for `future`."""

    ids: list[int]
    top: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future

    def settle(self, records: list[dict] | None, error: Exception | None) -> None:
        def put():
            if self.future.done():  # cancelled: the client left
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(records)
        self.loop.call_soon_threadsafe(put)


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
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.ready = threading.Event()
        self.error: str | None = None
        self.engine: Engine | RoutedEngine | None = None
        self.tokenizer = None
        self.max_len = self.vocab_size = 0
        self.running = self.waiting = 0  # gauges, written by the engine thread after each step
        self._jobs: dict[int, Job] = {}  # seq.id (of the sample's first answer) -> job
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

    async def score(self, ids: list[int], top: int) -> list[dict]:
        """Records of ids[1:] under the model (`prompt_logprobs`), computed on the engine thread."""
        loop = asyncio.get_running_loop()
        job = Score(ids, top, loop, loop.create_future())
        self.inbox.put(("score", job))
        return await job.future

    # --- the engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            model, self.tokenizer = self.load()
            engine = Engine(model, self.tokenizer, self.engine_cfg)
            if self.route is not None:
                large, large_tok = self.route.load_large()
                engine = RoutedEngine(engine, Engine(large, large_tok, self.engine_cfg), self.route.cfg)
            self.engine, self.max_len, self.vocab_size = engine, engine.max_len, engine.vocab_size
        except Exception as e:  # reported by /health; the server stays up to say so
            self.error = f"{type(e).__name__}: {e}"
            log.error("loading the model failed: %s", self.error)
            return
        self.ready.set()
        while not self._stop:
            idle = not self.engine.has_work()
            try:
                try:
                    self._handle(*self.inbox.get(block=idle))
                    while True:
                        self._handle(*self.inbox.get_nowait())
                except queue.Empty:
                    pass
                if self._stop:
                    break
                if self.engine.has_work():
                    self._step()
            except Exception as e:  # this thread must outlive any one request
                log.exception("engine loop failed")
                self._fail_all(f"engine error: {type(e).__name__}: {e}")

    def _handle(self, what: str, job: Job | Score | None) -> None:
        if what == "score":
            try:  # the plain engine's model: a routed pair refuses echo before it gets here
                job.settle(prompt_logprobs(self.engine.model, job.ids, job.top), None)
            except Exception as e:
                job.settle(None, e)
        elif what == "add":
            rows = self.engine_cfg.max_batch
            for first in range(0, job.n, rows):  # samples share a prefill, a row-pool at a time
                self._add(job, first, min(rows, job.n - first))
        elif what == "abort":
            for seq in job.seqs:
                self._jobs.pop(seq.id, None)  # one still waiting is never returned by a step
                self.engine.abort(seq)

    def _add(self, job: Job, first: int, n: int) -> None:
        """Samples first .. first + n - 1 of the job, sharing one prefill."""
        if job.aborted:
            return
        try:
            # a bound method, not a closure over the job: job -> seqs -> closure -> job would be a cycle,
            # freed only by a full collection (and a request's garbage then waits for one)
            seqs = self.engine.add_n(job.ids, job.sample_cfg(first), n, job.processors, on_text=self._on_text)
        except Exception as e:  # the handler checks lengths and settings first; this is a last line
            job.post("error", f"{type(e).__name__}: {e}")
            return
        for i, seq in enumerate(seqs):
            job.seqs.append(seq)
            job.index[seq.id] = first + i
            self._jobs[seq.id] = job

    def _on_text(self, seq: Sequence, text: str) -> None:
        job = self._jobs.get((seq.origin or seq).id)
        if job is None:  # aborted: no one reads it
            return
        now = time.perf_counter()
        if self.metrics is not None and seq.id in job.last_text_at:
            self.metrics.observe("itl", now - job.last_text_at[seq.id])
        job.last_text_at[seq.id] = now
        k = job.sent_logprobs.get(seq.id, 0)
        new = seq.logprobs[k:seq.streamed]
        job.sent_logprobs[seq.id] = k + len(new)
        job.post("text", job.index[(seq.origin or seq).id], text, new)

    def _step(self) -> None:
        try:
            finished = self.engine.step()
        except Exception as e:  # fail what is in flight, keep serving
            log.exception("engine step failed")
            self._fail_all(f"engine error: {type(e).__name__}: {e}")
            return
        stats = self.engine.stats()
        self.running, self.waiting = stats.running, stats.waiting
        if self.metrics is not None:
            self.metrics.observe("batch", stats.decoding)
        for seq in finished:
            if self.metrics is not None:
                self.metrics.inc("finished_total", reason=seq.finish_reason)
            sample = seq.origin or seq
            job = self._jobs.pop(sample.id, None)
            if job is None:
                continue
            index = job.index[sample.id]
            if self.metrics is not None and seq.first_token_at is not None:
                self.metrics.observe("ttft", seq.first_token_at - job.arrival)
            if self.route is not None:
                job.routes[index] = "small" if seq.origin is None else "large"
                if self.metrics is not None:
                    self.metrics.inc("routed_total", model=job.routes[index])
            job.post("done", index, seq)

    def _fail_all(self, message: str) -> None:
        for job in {id(j): j for j in self._jobs.values()}.values():
            job.post("error", message)
            for seq in job.seqs:
                self.engine.abort(seq)
        self._jobs.clear()
        try:
            self.engine.step()  # retire the aborted rows
        except Exception:
            log.exception("engine could not retire aborted rows; starting a fresh engine")
            self.engine = self.engine.restarted()
