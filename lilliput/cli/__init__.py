"""The `lilliput` command: a thin adapter from flags to the Job dataclasses of the command table
(commands.py) to their job functions."""

from __future__ import annotations

import argparse
import os
import sys

from lilliput.cli.commands import COMMANDS, GROUPS, Command
from lilliput.core.options import add_config_args, config_from_args


class Parser(argparse.ArgumentParser):
    """Usage errors are one line on stderr and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"lilliput: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """One subcommand per entry of the command table, its flags made from its Job dataclass."""
    parser = Parser(prog="lilliput", description="Make language models small, fast and trustworthy.")
    groups = {"": parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")}

    def group(words: list[str]):
        """The subparsers under `words` (a group's parser made at its first command)."""
        name = " ".join(words)
        if name not in groups:
            help_, metavar = GROUPS[name]
            p = group(words[:-1]).add_parser(words[-1], help=help_)
            groups[name] = p.add_subparsers(dest="_" + name.replace(" ", "_"), required=True, parser_class=Parser,
                                            metavar=metavar)
        return groups[name]

    for c in COMMANDS:
        *words, leaf = c.name.split()
        p = group(words).add_parser(leaf, help=c.help, description=c.description)
        add_config_args(p, c.job)
        p.set_defaults(entry=c)
    return parser


def run(c: Command, ns: argparse.Namespace) -> int:
    """Build the command's job from the flags given, run it, print what it says."""
    base = c.quick() if c.quick is not None and getattr(ns, "quick", None) else None
    result = c.run(config_from_args(c.job, ns, base=base))
    if c.say is not None:
        print(c.say(result))
    return 0


def _one_line(e: BaseException) -> str:
    """The first line of an exception's message (torch and safetensors write several)."""
    text = str(e.args[0] if isinstance(e, KeyError) and e.args else e).strip()
    lines = text.splitlines()
    if not lines:
        return type(e).__name__
    return lines[0] + (" (LILLIPUT_DEBUG=1 shows the rest)" if len(lines) > 1 else "")


def main(argv: list[str] | None = None) -> int:
    """Expected failures (bad input, missing files, out of memory) are one line on stderr and exit
    status 2; other exceptions are bugs and keep their traceback. LILLIPUT_DEBUG=1 re-raises all."""
    ns = build_parser().parse_args(argv)
    try:
        return run(ns.entry, ns)
    except (ValueError, KeyError, OSError, RuntimeError) as e:  # FileNotFoundError is an OSError
        if os.environ.get("LILLIPUT_DEBUG") == "1":
            raise
        print(f"lilliput: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
