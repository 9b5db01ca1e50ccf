"""Command-line options made from config dataclasses: field names, defaults and attribute docstrings
become flags and help, so the CLI repeats no default.

A field whose type is another config and whose metadata is `nested()` lends that config's fields
as flags of the outer one (`--lr` sets `train.lr`), its defaults being the nested default's. A
field's `flag()` metadata says what its type alone does not: a positional argument, a switch, a
repeatable option. Any other nested config keeps its defaults on the command line.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

SCALARS = (int, float, str, bool, Path)


@dataclass(frozen=True)
class Flag:
    """How a field appears on the command line where its type does not say it all."""

    positional: bool = False
    """An argument, not an option (a tuple field takes one or more)."""
    action: str | None = None
    """store_true: a switch (no --no- twin); append or extend: a repeatable option of a tuple field."""
    nargs: str | None = None
    """argparse's nargs of a repeatable option ("+": `--input A B`)."""
    metavar: str | None = None
    """The value's name in --help."""
    choices: tuple[str, ...] | None = None
    """The values accepted."""
    help: str | None = None
    """Help instead of a docstring (a field made by a function that several jobs share)."""


@dataclass(frozen=True)
class Nested:
    """A nested config whose fields are flags of the outer one."""

    prefix: str = ""
    """Before each flag's name: "lora_" makes `rank` --lora-rank."""
    only: tuple[str, ...] | None = None
    """The nested fields that are flags (None: all but `skip`)."""
    skip: tuple[str, ...] = ()
    """Nested fields that are not flags (the outer config sets them, or they keep their default)."""
    names: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    """Flag names instead of a field's own: {"max_tokens": ("tokens",)} gives --tokens."""
    help: dict[str, str] = dataclasses.field(default_factory=dict)
    """Help instead of a field's docstring, where the outer config gives the field a narrower meaning."""
    one_of: tuple[str, ...] = ()
    """Fields that are one choice (a training budget): a flag given for any of them unsets the others' defaults."""


def flag(**kwargs: Any) -> dict:
    """Field metadata: `field(default=False, metadata=flag(action="store_true"))`."""
    return {"flag": Flag(**kwargs)}


def nested(**kwargs: Any) -> dict:
    """Field metadata: `field(default=TrainConfig(max_steps=100), metadata=nested(skip=("out",)))`."""
    names = {k: (v,) if isinstance(v, str) else tuple(v) for k, v in kwargs.pop("names", {}).items()}
    return {"nested": Nested(names=names, **kwargs)}


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


def _default(f: dataclasses.Field) -> Any:
    """A field's default value, MISSING when it has none."""
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return f.default


@dataclass(frozen=True)
class Option:
    """One flag of a config: where its value goes and how argparse reads it."""

    path: tuple[str, ...]
    """Field names from the outer config down: ("config", "train", "lr")."""
    dest: str
    """The namespace attribute."""
    names: tuple[str, ...]
    """Option strings (none for a positional argument)."""
    type: type
    many: bool
    """A tuple field."""
    default: Any
    """What an unset flag leaves (MISSING: required)."""
    help: str
    flag: Flag


def options(cls: type, skip: tuple[str, ...] = (), base: Any = None) -> list[Option]:
    """The flags of `cls`, nested configs flattened; defaults are `base`'s values when given."""
    return list(_options(cls, base, skip, (), "", Nested()))


def _options(cls, base, skip, path, prefix, outer: Nested):
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        default = getattr(base, f.name) if base is not None else _default(f)
        sub = f.metadata.get("nested")
        if sub is not None:
            hidden = sub.skip + tuple(n.name for n in dataclasses.fields(hints[f.name])
                                      if sub.only is not None and n.name not in sub.only)
            yield from _options(hints[f.name], None if default is dataclasses.MISSING else default, hidden,
                                path + (f.name,), prefix + sub.prefix, sub)
            continue
        tp, many = _base_type(hints[f.name])
        if tp not in SCALARS:
            continue  # a config not marked nested keeps its defaults on the command line
        fl = f.metadata.get("flag", Flag())
        dest = prefix + f.name
        names = outer.names.get(f.name, (f.name,))
        flags = () if fl.positional else tuple("--" + (prefix + n).replace("_", "-") for n in names)
        doc = outer.help.get(f.name) or fl.help or docs.get(f.name, "")
        if fl.positional or fl.action == "store_true" or "(default:" in doc:
            help_ = doc
        else:
            help_ = doc + (" (required)" if default is dataclasses.MISSING else f" (default: {default})")
        yield Option(path + (f.name,), dest, flags, tp, many, default, help_, fl)


def add_config_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per dataclass field of `cls` (`--field-name`), nested configs flattened."""
    for o in options(cls, skip):
        fl, required = o.flag, o.default is dataclasses.MISSING
        name = o.names[0][2:].replace("-", "_") if o.names else o.dest
        metavar = fl.metavar
        if metavar is None and o.many and fl.action is None and not fl.positional:
            metavar = "A,B"
        elif metavar is None and name != o.dest:  # a renamed flag's value: --tokens TOKENS, not MAX_TOKENS
            metavar = name.upper()
        if fl.positional:
            parser.add_argument(o.dest, nargs="+" if o.many else None, type=o.type, metavar=metavar, help=o.help)
        elif o.type is bool:
            action = fl.action or argparse.BooleanOptionalAction
            parser.add_argument(*o.names, dest=o.dest, action=action, default=None, help=o.help)
        elif fl.action in ("append", "extend"):
            parser.add_argument(*o.names, dest=o.dest, action=fl.action, nargs=fl.nargs, type=o.type, default=None,
                                required=required, metavar=metavar, help=o.help)
        elif o.many:
            parser.add_argument(*o.names, dest=o.dest, default=None, required=required, metavar=metavar, help=o.help,
                                type=lambda s, t=o.type: tuple(t(x) for x in s.split(",") if x))
        else:
            parser.add_argument(*o.names, dest=o.dest, type=o.type, default=None, required=required,
                                metavar=metavar, choices=fl.choices, help=o.help)


def config_from_args(cls: type, ns: argparse.Namespace, base: Any = None, **overrides: Any):
    """Build `cls` from the flags the user gave; fields not given keep the dataclass default (or
    `base`'s value, when a base instance is passed). `overrides` set fields of `cls` itself."""
    given = {o.dest: getattr(ns, o.dest) for o in options(cls) if getattr(ns, o.dest, None) is not None}
    return config_from_flags(cls, given | overrides, base)


def config_from_flags(cls: type, values: dict[str, Any], base: Any = None):
    """Build `cls` from values named as its flags are (`lr` sets train.lr when `train` is nested), else
    as its own fields (a nested config given whole); lists become tuples. A name that is neither is a
    TypeError."""
    paths = _paths(cls)
    unknown = sorted(set(values) - set(paths))
    if unknown:
        raise TypeError(f"{cls.__name__} has no field or flag {', '.join(unknown)}")
    given = {paths[k]: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return _assemble(cls, given, base, (), None)


def flag_names(cls: type) -> list[str]:
    """Every name `config_from_flags` takes for `cls`."""
    return sorted(_paths(cls))


def _paths(cls: type) -> dict[str, tuple[str, ...]]:
    """Name `config_from_flags` takes -> the path of the field it sets (a flag's name wins over a field's)."""
    return {f.name: (f.name,) for f in dataclasses.fields(cls) if f.init} | {o.dest: o.path for o in options(cls)}


def _assemble(cls, given: dict[tuple[str, ...], Any], base, path, sub: Nested | None):
    hints, values = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        p = path + (f.name,)
        if p in given:
            values[f.name] = given[p]
        elif "nested" in f.metadata:
            default = getattr(base, f.name) if base is not None else _default(f)
            if default is dataclasses.MISSING or any(k[:len(p)] == p for k in given):
                values[f.name] = _assemble(hints[f.name], given, None if default is dataclasses.MISSING else default,
                                           p, f.metadata["nested"])
    if sub is not None and any(path + (n,) in given for n in sub.one_of):
        values = {**dict.fromkeys(sub.one_of), **values}
    return dataclasses.replace(base, **values) if base is not None else cls(**values)
