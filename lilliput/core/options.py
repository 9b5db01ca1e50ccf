"""Command-line options made from config dataclasses: field names, defaults and attribute docstrings
become flags and help, so the CLI repeats no default."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from functools import lru_cache
from pathlib import Path
from typing import Any


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass: the string literal right after each field."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs, body = {}, tree.body[0].body
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _base_type(tp: Any) -> tuple[type, bool]:
    """(scalar type, is_tuple) for annotations like `int | None` or `tuple[str, ...]`."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if typing.get_origin(tp) is tuple:
        return typing.get_args(tp)[0], True
    return tp, False


def add_config_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one `--field-name` flag per dataclass field of `cls`."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        tp, many = _base_type(hints[f.name])
        if tp not in (int, float, str, bool, Path):
            continue  # nested configs (e.g. calibration) keep their defaults on the command line
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
        help_ = docs.get(f.name, "") + (" (required)" if required else f" (default: {default})")
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif many:
            parser.add_argument(flag, dest=f.name, default=None, metavar="A,B", help=help_,
                                type=lambda s, t=tp: tuple(t(x) for x in s.split(",") if x))
        else:
            parser.add_argument(flag, dest=f.name, type=tp, default=None, help=help_, required=required)


def config_from_args(cls: type, ns: argparse.Namespace, base: Any = None, **overrides: Any):
    """Build `cls` from the flags the user gave; fields not given keep the dataclass default (or
    `base`'s value, when a base instance is passed)."""
    given = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)
             if getattr(ns, f.name, None) is not None}
    if base is not None:
        return dataclasses.replace(base, **{**given, **overrides})
    return cls(**{**given, **overrides})
