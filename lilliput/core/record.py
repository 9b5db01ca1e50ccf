"""The self-describing record written beside every artifact: `run.json`."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import lilliput


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(lilliput.__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def git_dirty() -> bool | None:
    """True when the checkout has uncommitted changes to anything but bench/results (the package,
    bench scripts, README: a benchmark run after another has not committed the other's results
    yet; None outside git)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                              ":(top,exclude)bench/results"], capture_output=True, text=True, timeout=10,
                             cwd=Path(lilliput.__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform()}


def run_record(command: str, **fields: Any) -> dict[str, Any]:
    """A record of what produced an artifact: command, lilliput version, git SHA, machine, time."""
    return {"command": command, "lilliput": lilliput.__version__, "git_sha": git_sha(), "git_dirty": git_dirty(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(), **fields}


def write_json(path: Path | str, data: Any) -> Path:
    """Write JSON atomically: a crash never leaves a half-written file where a good one was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def read_json(path: Path | str, missing: str) -> Any:
    """A JSON file's content; one clear error when it is absent (`missing` says what it should be) or
    not JSON."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent} has no {path.name}: {missing}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
