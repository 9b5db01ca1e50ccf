"""The row pool: the rows of the decode state, which are free, what each free row still holds, and
how a sequence gets one (nano-vllm's block manager, with a row per sequence for blocks).

A freed row keeps its state: the next prompt that starts the same reuses it (the prefix cache). A
new sequence takes the free row holding the longest prefix of its prompt, or copies that prefix
from a running row into the emptiest free row, and prefills only the rest. `fork` copies one row
into another (n samples of one prompt, best-of-n). The scheduler owns the pool; besides the
runner, which writes tokens into rows, nothing else touches the rows of the state.
"""

from __future__ import annotations

from typing import Iterable

from lilliput.core.model import DecodeState
from lilliput.infer.sequence import Sequence, common_prefix


class RowPool:
    def __init__(self, state: DecodeState, prefix_cache: bool = True, min_prefix: int = 8):
        self.state, self.prefix_cache, self.min_prefix = state, prefix_cache, min_prefix
        rows = state.rows
        self.free = list(range(rows - 1, -1, -1))
        """Free rows; `take` hands out the last one."""
        self.held: list[list[int]] = [[] for _ in range(rows)]
        """Tokens whose state each free row still holds (empty for rows in use)."""

    def take(self) -> int:
        """Any free row, for a sequence that fills it by `fork`."""
        row = self.free.pop()
        self.held[row] = []
        return row

    def place(self, seq: Sequence, running: Iterable[Sequence]) -> int:
        """Take the row for a new sequence: the free row that holds the longest prefix of its prompt, or
        the emptiest free row with that prefix copied from a running row (`min_prefix` tokens at least).
        Sets seq.computed (and seq.cached_tokens) to the prompt tokens the row already holds."""
        state, free = self.state, self.free
        limit = len(seq.prompt) - 1  # at least one prompt token runs, to give the first logits

        def shared(tokens: list[int]) -> int:
            return common_prefix(tokens, seq.prompt[:limit])

        best, best_n = min(free, key=lambda r: len(self.held[r])), 0  # default: the emptiest row
        if self.prefix_cache:
            # a recurrent layer rewinds only to recent positions: a prefix it cannot reach is no prefix
            for r in free:
                if (n := shared(self.held[r])) > best_n and state.can_truncate(r, n):
                    best, best_n = r, n
            donor, donor_n = None, best_n
            for other in running:
                if other.row is not None and (n := shared(other.tokens[:other.computed])) > max(donor_n, self.min_prefix - 1) \
                        and state.can_truncate(other.row, n):
                    donor, donor_n = other, n
            if donor is not None:  # copy the prefix from a running row into the emptiest free row
                best = min(free, key=lambda r: len(self.held[r]))
                state.copy(donor.row, best)
                best_n = donor_n
        if best_n:
            state.truncate(best, best_n)
        else:
            state.free(best)
        seq.computed = seq.cached_tokens = best_n
        self.held[best] = []
        free.remove(best)
        return best

    def fork(self, src: int, dst: int, keep: int | None = None) -> None:
        """Make row dst (taken) hold what row src holds, or its first `keep` tokens."""
        self.state.copy(src, dst)
        if keep is not None:
            self.state.truncate(dst, keep)
        self.held[dst] = []

    def release(self, seq: Sequence) -> None:
        """seq is done: its row is free, and remembers the tokens its state holds."""
        row = seq.row
        self.held[row] = seq.tokens[:min(seq.computed, self.state.lengths[row])]
        self.free.append(row)
