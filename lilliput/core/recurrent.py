"""The decode state of a recurrent mixer (Mamba, mLSTM): fixed-size tensors per row, plus snapshots
of the last forward's positions so that rejected drafts can be rewound.

A recurrent layer's state after n tokens is a few tensors of fixed shape, whatever n: memory does
not grow with the sequence, but the state cannot be rewound by subtraction. `RecurrentState`
therefore keeps, for each row, the states at the positions its last forward passed through (at
most `SNAPSHOTS` + 1 of them, the state before the forward's last `SNAPSHOTS` tokens included).
That covers what the engine does: `commit` after `verify` (k + 1 tokens), `fork` (back one token),
a decode step (back one token). Rewinding further back raises a ValueError.

A step that advances rows without the torch modules (the fused C step of lilliput.infer) writes the
states in place and their snapshots into `snapshot_slots()`, then reports with `advanced`.
"""

from __future__ import annotations

import torch

from lilliput.core.parts import MixerState, Step

SNAPSHOTS = 16
"""Most tokens of one forward whose states are kept for `truncate` (the last ones of the forward)."""


class RecurrentState(MixerState):
    """Named per-row tensors {name: (rows, *shape)}, each row's length, and its snapshots.

    Costs, per row and layer, with S the bytes of one row's state and w = min(T, SNAPSHOTS) for a
    forward of T tokens: the state itself (S); snapshots (w + 1) * S, replaced by each forward (a
    decode step keeps 2 * S: the state before and after it); `truncate` to a kept position copies
    S; `copy_row` copies S and shares the (never modified) snapshot tensors; `reset` zero-fills S;
    `grow` is free (the size does not depend on the length). With `snapshot_slots()` (the fused
    step's), (SNAPSHOTS + 1) * S more per row, for good; `copy_row` then copies the slots in use too.

    A mixer's forward reads the states of its batch rows with `read(step)`, and hands back with
    `write(step, before, tail)` the state before its last w = `window(T)` tokens and the states
    after each of them (the last being the new state).
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], rows: int, max_len: int, device, dtype,
                 fills: dict[str, float] | None = None, name: str = "recurrent"):
        if dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32  # a state sums over every token so far: keep it in float32
        self.fills = {k: 0.0 for k in shapes} | (fills or {})
        self.tensors = {k: torch.full((rows, *s), self.fills[k], device=device, dtype=dtype) for k, s in shapes.items()}
        self.lengths = [0] * rows
        # (first position, {name: (w+1, *shape)}), or (first position, None) for states in `slots`
        self.snaps: list[tuple[int, dict[str, torch.Tensor] | None] | None] = [None] * rows
        self.slots: dict[str, torch.Tensor] | None = None  # {name: (rows, SNAPSHOTS + 1, *shape)}
        self.limit, self.name = max_len, name

    @property
    def max_len(self) -> int:
        return self.limit  # a recurrent state holds any number of tokens: DecodeState never grows it

    @staticmethod
    def window(T: int) -> int:
        return min(T, SNAPSHOTS)

    def read(self, step: Step) -> dict[str, torch.Tensor]:
        """The states (B, *shape) of the step's rows."""
        for r, s in zip(step.rows.tolist(), step.start.tolist()):
            if self.lengths[r] != s:
                raise ValueError(f"{self.name} state row {r} holds {self.lengths[r]} tokens, the step starts at {s}")
        return {k: t[step.rows] for k, t in self.tensors.items()}

    def write(self, step: Step, before: dict[str, torch.Tensor], tail: dict[str, torch.Tensor]) -> None:
        """before {name: (B, *shape)}: the state before the last w tokens; tail {name: (B, w, *shape)}."""
        w = next(iter(tail.values())).shape[1]
        for k, t in self.tensors.items():
            t[step.rows] = tail[k][:, -1].to(t.dtype)
        for b, (r, s) in enumerate(zip(step.rows.tolist(), step.start.tolist())):
            self.lengths[r] = s + step.T
            self.snaps[r] = (s + step.T - w, {k: torch.cat([before[k][b:b + 1], tail[k][b]]).detach().to(t.dtype)
                                               for k, t in self.tensors.items()})

    def snapshot_slots(self) -> dict[str, torch.Tensor]:
        """{name: (rows, SNAPSHOTS + 1, *shape)}: where a step that advances rows in place keeps their
        snapshots (allocated on first call: SNAPSHOTS + 1 states per row, held for good)."""
        if self.slots is None:
            self.slots = {k: t.new_empty((t.shape[0], SNAPSHOTS + 1, *t.shape[1:])) for k, t in self.tensors.items()}
        return self.slots

    def advanced(self, counts: dict[int, int]) -> None:
        """Rows advanced in place by another step: row r by counts[r] tokens, the state before the last
        w = window(counts[r]) of them in `snapshot_slots()` slot 0, after each but the last in slots
        1..w-1 (after the last: the state itself, which `truncate` to the row's length never reads)."""
        for r, k in counts.items():
            self.lengths[r] += k
            self.snaps[r] = (self.lengths[r] - self.window(k), None)

    def truncate(self, row: int, n: int) -> None:
        length = self.lengths[row]
        if n == length:
            return
        if n == 0:
            return self.reset(row)
        snap = self.snaps[row]
        if snap is None or not snap[0] <= n <= length:
            kept = f"positions {snap[0]}..{length}" if snap else "no earlier positions"
            raise ValueError(f"cannot rewind the {self.name} state of row {row} from {length} to {n} tokens: it keeps "
                             f"{kept} (the last forward's, at most {SNAPSHOTS} tokens back)")
        p0, states = snap
        for k, t in self.tensors.items():
            t[row] = (self.slots[k][row] if states is None else states[k])[n - p0]
        self.snaps[row] = (p0, None if states is None else {k: s[:n - p0 + 1] for k, s in states.items()})
        self.lengths[row] = n

    def can_truncate(self, row: int, n: int) -> bool:
        snap = self.snaps[row]
        return n in (0, self.lengths[row]) or (snap is not None and snap[0] <= n <= self.lengths[row])

    def copy_row(self, src: int, dst: int, n: int) -> None:
        for t in self.tensors.values():
            t[dst] = t[src]
        snap = self.snaps[src]
        if snap is not None and snap[1] is None:  # slots are rewritten in place: dst needs its own copy
            for s in self.slots.values():
                s[dst, :self.lengths[src] - snap[0] + 1] = s[src, :self.lengths[src] - snap[0] + 1]
        self.snaps[dst], self.lengths[dst] = self.snaps[src], self.lengths[src]
        self.truncate(dst, n)

    def reset(self, row: int) -> None:
        for k, t in self.tensors.items():
            t[row] = self.fills[k]
        self.lengths[row], self.snaps[row] = 0, None

    def grow(self, max_len: int) -> None:
        pass

    def nbytes(self) -> int:
        held = sum(t.numel() * t.element_size() for t in self.tensors.values())
        snaps = sum(s.numel() * s.element_size() for snap in self.snaps if snap and snap[1] for s in snap[1].values())
        slots = sum(s.numel() * s.element_size() for s in (self.slots or {}).values())
        return held + snaps + slots

