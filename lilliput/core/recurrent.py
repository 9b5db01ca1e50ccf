"""The decode state of a recurrent mixer (Mamba, mLSTM): fixed-size tensors per row, plus snapshots
of the last forward's positions so that rejected drafts can be rewound.

A recurrent layer's state after n tokens is a few tensors of fixed shape, whatever n: memory does
not grow with the sequence, but the state cannot be rewound by subtraction. `RecurrentState`
therefore keeps, for each row, the states at the positions its last forward passed through (at
most `SNAPSHOTS` + 1 of them, the state before the forward's last `SNAPSHOTS` tokens included).
That covers what the engine does: `commit` after `verify` (k + 1 tokens), `fork` (back one token),
a decode step (back one token). Rewinding further back raises a ValueError.
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
    `grow` is free (the size does not depend on the length).

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
        self.snaps: list[tuple[int, dict[str, torch.Tensor]] | None] = [None] * rows  # (first position, (w+1, *shape))
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
            t[row] = states[k][n - p0]
        self.snaps[row] = (p0, {k: s[:n - p0 + 1] for k, s in states.items()})
        self.lengths[row] = n

    def can_truncate(self, row: int, n: int) -> bool:
        snap = self.snaps[row]
        return n in (0, self.lengths[row]) or (snap is not None and snap[0] <= n <= self.lengths[row])

    def copy_row(self, src: int, dst: int, n: int) -> None:
        for t in self.tensors.values():
            t[dst] = t[src]
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
        snaps = sum(s.numel() * s.element_size() for snap in self.snaps if snap for s in snap[1].values())
        return held + snaps

