"""A text file a user names on the command line: its contents, or one clear error."""

from __future__ import annotations

from pathlib import Path


def read_text(path: str) -> str:
    """The UTF-8 text of `path`; a missing, non-UTF-8 or empty file is a user error."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text file {path!r} not found")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    if not text.strip():
        raise ValueError(f"text file {path} is empty")
    return text
