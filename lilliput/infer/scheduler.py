"""Which sequences run in each engine step: continuous batching over a fixed pool of rows.

Sequences wait in arrival order; one is admitted as soon as a row is free (which row is the
engine's choice: the one already holding the longest prefix of its prompt). Each step decodes one
token for every sequence past its prompt, and prefills at most `prefill_chunk` prompt tokens
(oldest first), so a long prompt delays the running sequences by a bounded time per step.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from lilliput.infer.sequence import Sequence, Status


class Scheduler:
    def __init__(self, rows: int, prefill_chunk: int):
        if rows < 1 or prefill_chunk < 1:
            raise ValueError(f"rows and prefill_chunk must be >= 1, got {rows} and {prefill_chunk}")
        self.free_rows = list(range(rows - 1, -1, -1))
        self.prefill_chunk = prefill_chunk
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admitted: prefilling or decoding

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def admit(self, place: Callable[[Sequence, list[int]], int] | None = None) -> list[Sequence]:
        """Give free rows to waiting sequences, in arrival order. `place(seq, free_rows)` picks the
        row (and may set seq.computed to prompt tokens it already holds); default: any free row."""
        admitted = []
        while self.waiting and len(self.free_rows) > len(self.waiting[0].followers):
            seq = self.waiting.popleft()
            seq.status, seq.computed = Status.PREFILL, 0
            seq.row = place(seq, self.free_rows) if place else self.free_rows[-1]
            self.free_rows.remove(seq.row)
            self.running.append(seq)
            admitted.append(seq)
            for f in seq.followers:  # rows reserved now, filled when seq's prefill is done
                f.row = self.free_rows.pop()
                self.running.append(f)
        return admitted

    def schedule(self) -> tuple[list[Sequence], list[tuple[Sequence, int]]]:
        """This step's work: the sequences that decode one token, and (sequence, n) prompt chunks."""
        decode = [s for s in self.running if s.status is Status.RUNNING]
        chunks, budget = [], self.prefill_chunk
        for s in self.running:
            if s.status is Status.PREFILL and budget > 0:
                n = min(budget, len(s.prompt) - s.computed)
                chunks.append((s, n))
                budget -= n
        return decode, chunks

    def retire(self) -> list[Sequence]:
        """Remove finished sequences and free their rows."""
        done = [s for s in self.running if s.status is Status.FINISHED]
        for s in done:
            self.running.remove(s)
            self.free_rows.append(s.row)
        return done

    def abort(self, seq: Sequence) -> None:
        if seq in self.waiting:
            self.waiting.remove(seq)
        for s in [seq] + [f for f in seq.followers if f.status is Status.WAITING]:
            if not s.finished:  # followers that never started end with their leader
                s.finish("abort")
