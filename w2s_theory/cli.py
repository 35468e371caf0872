"""``w2s-theory``: the command line. Each subcommand lives in :mod:`w2s_theory.commands` and registers itself.

Errors from bad input are one line on stderr with exit code 2 (no traceback); ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .validation import InputError

#: Subcommand modules, in the order ``--help`` lists them.
COMMANDS = ["check", "fit", "sweep", "export", "figures", "study", "bench", "audit_constant", "phase"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="w2s-theory",
        description="Verify weak-to-strong generalization theory numerically, and simulate it at scale.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"w2s_theory.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"w2s_theory.commands.{name}":
                continue  # a command not built yet is simply absent from the CLI
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (InputError, FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        if args.debug:
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"w2s-theory {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"w2s-theory {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
