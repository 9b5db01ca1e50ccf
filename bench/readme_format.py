"""The tables' registry and formatting, shared by bench/readme.py and bench/readme_data.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

TABLES: dict[str, Callable[[Path], str | None]] = {}
"""Block name -> fn(results folder) -> markdown (None when its results file is absent)."""


def table(name: str):
    def register(fn):
        TABLES[name] = fn
        return fn
    return register


def load(results: Path, name: str) -> dict | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.{digits}g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def md(head: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def source(rec: dict, name: str) -> str:
    """The line under every table: which file, which command, when, where."""
    m = rec.get("machine") or {}
    return (f"From `bench/results/{name}.json`: `{rec.get('command', '?')}`, {str(rec.get('created', '?'))[:10]}, "
            f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, git {str(rec.get('git_sha') or '?')[:10]}"
            + (" (dirty)" if rec.get("git_dirty") else "") + ".")


def mb(b) -> str:
    return "-" if b is None else f"{b / 1e6:,.0f} MB"
