"""Which sequences run in each engine step: continuous batching over a fixed pool of rows.

Sequences wait in arrival order; one is admitted as soon as a row is free. Each step decodes one
token for every sequence past its prompt, and prefills at most `prefill_chunk` prompt tokens
(oldest first), so a long prompt delays the running sequences by a bounded time per step.
"""

from __future__ import annotations

from collections import deque

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

    def admit(self) -> list[Sequence]:
        """Give free rows to waiting sequences; returns those admitted (their rows must be reset)."""
        admitted = []
        while self.waiting and self.free_rows:
            seq = self.waiting.popleft()
            seq.row, seq.status, seq.computed = self.free_rows.pop(), Status.PREFILL, 0
            self.running.append(seq)
            admitted.append(seq)
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
        if not seq.finished:
            seq.finish("abort")
