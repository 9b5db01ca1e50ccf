"""What every command shares: the parser class, the model flags, loading, text files."""

from __future__ import annotations

import argparse
from pathlib import Path

from lilliput.core.options import add_config_args, config_from_args


class Parser(argparse.ArgumentParser):
    """Usage errors are one line on stderr and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"lilliput: error: {message} (see {self.prog} --help)\n")


def model_args(p: argparse.ArgumentParser) -> None:
    from lilliput.core.checkpoint import LoadConfig

    add_config_args(p, LoadConfig)


def load(ns):
    from lilliput.core.checkpoint import LoadConfig

    return config_from_args(LoadConfig, ns).load()


def read_text(path: str) -> str:
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
