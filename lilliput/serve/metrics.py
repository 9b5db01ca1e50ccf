"""The server's Prometheus metrics: counters, gauges and histograms in the text exposition format.

Written by hand (a few dozen lines) rather than with `prometheus_client`, to keep the server's
dependencies to FastAPI and uvicorn. Names follow vLLM's where one exists (`time_to_first_token`,
`inter_token_latency`), prefixed `lilliput_`.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

HISTOGRAMS = {
    "ttft": ("time_to_first_token_seconds", "Time from arrival to the first token.",
             (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)),
    "itl": ("inter_token_latency_seconds", "Time between two text deltas of one sample.",
            (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1)),
    "batch": ("batch_size", "Sequences decoded together in one engine step.",
              (1, 2, 4, 8, 16, 32, 64)),
}


class Metrics:
    """Thread-safe: the engine thread observes latencies, handlers count requests and tokens."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counters: dict[tuple[str, tuple], float] = defaultdict(float)
        self.buckets = {k: [0] * (len(b) + 1) for k, (_, _, b) in HISTOGRAMS.items()}
        self.sums = {k: 0.0 for k in HISTOGRAMS}

    def inc(self, name: str, value: float = 1, **labels) -> None:
        with self._lock:
            self.counters[(name, tuple(sorted(labels.items())))] += value

    def observe(self, kind: str, value: float) -> None:
        bounds = HISTOGRAMS[kind][2]
        with self._lock:
            self.buckets[kind][bisect.bisect_left(bounds, value)] += 1
            self.sums[kind] += value

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        """The exposition text; `gauges` maps name -> (help, value) read at scrape time."""
        lines = []
        with self._lock:
            names = sorted({n for n, _ in self.counters})
            for name in names:
                lines.append(f"# TYPE lilliput_{name} counter")
                for (n, labels), v in sorted(self.counters.items()):
                    if n == name:
                        lab = ",".join(f'{k}="{val}"' for k, val in labels)
                        lines.append(f"lilliput_{name}{{{lab}}} {v:g}" if lab else f"lilliput_{name} {v:g}")
            for name, (help_, value) in gauges.items():
                lines += [f"# HELP lilliput_{name} {help_}", f"# TYPE lilliput_{name} gauge", f"lilliput_{name} {value:g}"]
            for kind, (name, help_, bounds) in HISTOGRAMS.items():
                lines += [f"# HELP lilliput_{name} {help_}", f"# TYPE lilliput_{name} histogram"]
                total = 0
                for b, c in zip(list(bounds) + ["+Inf"], self.buckets[kind]):
                    total += c
                    lines.append(f'lilliput_{name}_bucket{{le="{b}"}} {total}')
                lines += [f"lilliput_{name}_sum {self.sums[kind]:g}", f"lilliput_{name}_count {total}"]
        return "\n".join(lines) + "\n"
