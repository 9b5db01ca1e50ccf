"""Flags from config dataclasses (core/options.py): nested configs flattened, defaults written once."""

import argparse
import dataclasses
from dataclasses import dataclass, field

import pytest

from lilliput.core.options import add_config_args, config_from_args, flag, nested, options


@dataclass(frozen=True)
class Inner:
    lr: float = 3e-4
    """Peak learning rate."""
    max_steps: int | None = None
    """Steps."""
    max_tokens: int | None = None
    """Tokens."""
    out: str | None = None
    """Folder."""

    def __post_init__(self):
        if self.max_steps is None and self.max_tokens is None:
            raise ValueError("give a budget")


@dataclass(frozen=True)
class Outer:
    files: tuple[str, ...] = field(metadata=flag(positional=True))
    """Inputs."""
    out: str = "o"
    """Output folder."""
    train: Inner = field(default=Inner(lr=1e-3, max_steps=200),
                         metadata=nested(skip=("out",), names={"max_tokens": ("tokens", "max_tokens")},
                                         one_of=("max_steps", "max_tokens")))
    """How to train."""
    extra: Inner = field(default=Inner(max_steps=1), metadata=nested(prefix="extra_", only=("lr",)))
    plain: Inner = Inner(max_steps=5)
    """Not nested: no flags."""
    json: bool = field(default=False, metadata=flag(action="store_true"))
    """Print JSON."""
    model: tuple[str, ...] | None = field(default=None, metadata=flag(action="append"))
    """A model (repeat)."""


def parse(cls, argv, **kw):
    p = argparse.ArgumentParser(exit_on_error=False)
    add_config_args(p, cls)
    return config_from_args(cls, p.parse_args(argv), **kw), p


def test_nested_fields_are_flags_with_the_nested_defaults():
    job, p = parse(Outer, ["a", "b", "--lr", "0.01", "--extra-lr", "0.5"])
    assert job.files == ("a", "b") and job.out == "o"
    assert job.train == Inner(lr=0.01, max_steps=200) and job.extra == Inner(lr=0.5, max_steps=1)
    assert job.plain == Inner(max_steps=5) and job.json is False and job.model is None
    help_ = {o.dest: o.help for o in options(Outer)}
    assert help_["lr"] == "Peak learning rate. (default: 0.001)"  # the nested default, not Inner's
    assert "max_steps" in help_ and "out" not in {o.path[-1] for o in options(Outer) if o.path[0] == "train"}
    assert [o.dest for o in options(Outer) if o.path[0] == "extra"] == ["extra_lr"]
    assert not any(o.path[0] == "plain" for o in options(Outer))


def test_one_of_replaces_the_default_budget_and_renamed_flags():
    job, _ = parse(Outer, ["a", "--tokens", "64"])
    assert (job.train.max_steps, job.train.max_tokens, job.train.lr) == (None, 64, 1e-3)
    job, _ = parse(Outer, ["a", "--max-tokens", "64", "--max-steps", "3"])
    assert (job.train.max_steps, job.train.max_tokens) == (3, 64)


def test_switches_repeatable_options_and_overrides():
    job, p = parse(Outer, ["a", "--json", "--model", "x", "--model", "y"], out="z")
    assert job.json is True and job.model == ("x", "y") and job.out == "z"
    with pytest.raises(SystemExit):
        p.parse_args(["a", "--no-json"])  # a switch has no --no- twin


def test_base_instance_and_nested_without_default():
    @dataclass(frozen=True)
    class Job:
        train: Inner = field(metadata=nested())

    base = Outer(files=("q",), train=Inner(max_tokens=9))
    job, _ = parse(Outer, ["a", "--lr", "0.1"], base=base)
    assert job.train == Inner(lr=0.1, max_tokens=9)
    assert parse(Job, ["--max-steps", "2"])[0].train == Inner(max_steps=2)
    with pytest.raises(ValueError, match="give a budget"):  # built from Inner's own defaults
        parse(Job, [])
    assert dataclasses.fields(Job)[0].metadata["nested"].prefix == ""


def test_config_from_flags_takes_flag_names_and_refuses_others():
    from lilliput.core.options import config_from_flags, flag_names

    job = config_from_flags(Outer, {"files": ["a"], "lr": 0.5, "max_tokens": 7, "extra": Inner(max_steps=2)})
    assert job.files == ("a",) and job.train == Inner(lr=0.5, max_tokens=7) and job.extra == Inner(max_steps=2)
    assert {"lr", "extra_lr", "train", "plain"} <= set(flag_names(Outer))
    with pytest.raises(TypeError, match="bogus"):
        config_from_flags(Outer, {"files": ("a",), "bogus": 1})
