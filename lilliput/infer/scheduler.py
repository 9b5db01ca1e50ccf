"""Which sequences run in each engine step: continuous batching over a fixed pool of rows.

Sequences wait in arrival order; one is admitted as soon as a row is free (the row pool picks
which: the one already holding the longest prefix of its prompt). Each step decodes one token for
every sequence past its prompt, and prefills at most `prefill_chunk` prompt tokens (oldest
first), so a long prompt delays the running sequences by a bounded time per step. After the model
ran, `prefilled` starts the sequences whose prompt is done (and their followers), `postprocess`
takes the sampled tokens, and `retire` frees the rows of finished sequences.
"""

from __future__ import annotations

import time
from collections import deque

from lilliput.infer.row_pool import RowPool
from lilliput.infer.sequence import Sequence, Status


class Scheduler:
    def __init__(self, pool: RowPool, prefill_chunk: int):
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.pool = pool
        self.prefill_chunk = prefill_chunk
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admitted: prefilling or decoding

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _admit(self) -> None:
        """Give free rows to waiting sequences, in arrival order (a sequence and its followers together)."""
        pool = self.pool
        while self.waiting and len(pool.free) > len(self.waiting[0].followers):
            seq = self.waiting.popleft()
            seq.status, seq.computed = Status.PREFILL, 0
            seq.row = pool.place(seq, self.running)
            self.running.append(seq)
            for f in seq.followers:  # rows reserved now, filled when seq's prefill is done
                f.row = pool.take()
                self.running.append(f)

    def schedule(self) -> tuple[list[Sequence], list[tuple[Sequence, int]]]:
        """Admit what fits, then this step's work: the sequences that decode one token, and
        (sequence, n) prompt chunks."""
        self._admit()
        decode = [s for s in self.running if s.status is Status.RUNNING]
        chunks, budget = [], self.prefill_chunk
        for s in self.running:
            if s.status is Status.PREFILL and budget > 0:
                n = min(budget, len(s.prompt) - s.computed)
                chunks.append((s, n))
                budget -= n
        return decode, chunks

    def prefilled(self, seq: Sequence) -> list[Sequence]:
        """seq's prompt is in its row: it decodes from now on, and so do its followers (still waiting
        to start) on copies of its row. Returns them all, seq first: they sample from its logits."""
        seq.status = Status.RUNNING
        group = [seq]
        for f in seq.followers:
            if f.status is not Status.WAITING:
                continue  # aborted meanwhile
            self.pool.fork(seq.row, f.row)
            f.computed, f.status = seq.computed, Status.RUNNING
            group.append(f)
        return group

    def fork(self, seq: Sequence, forks: list[Sequence]) -> None:
        """Start `forks` on copies of seq's prefilled row, its last prompt token pending."""
        if len(forks) > len(self.pool.free):
            raise ValueError(f"{len(forks)} forks need {len(forks)} free rows, {len(self.pool.free)} are free")
        keep = len(seq.prompt) - 1  # the last prompt token is pending: the next step samples
        for f in forks:
            f.row, f.status = self.pool.take(), Status.RUNNING
            self.pool.fork(seq.row, f.row, keep)
            f.computed = keep
            self.running.append(f)

    @staticmethod
    def postprocess(seqs: list[Sequence], tokens: list[int | None]) -> None:
        """Each sequence takes its sampled token (None: nothing was allowed, it stops)."""
        for s, tok in zip(seqs, tokens):
            if s.first_token_at is None:
                s.first_token_at = time.perf_counter()
            if tok is None:
                s.finish("stop")
            else:
                s.append(tok)

    def retire(self) -> list[Sequence]:
        """Remove finished sequences and free their rows."""
        done = [s for s in self.running if s.status is Status.FINISHED]
        for s in done:
            self.running.remove(s)
            self.pool.release(s)
        return done

    def abort(self, seq: Sequence) -> None:
        if seq in self.waiting:
            self.waiting.remove(seq)
        for s in [seq] + [f for f in seq.followers if f.status is Status.WAITING]:
            if not s.finished:  # followers that never started end with their leader
                s.finish("abort")
