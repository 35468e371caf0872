"""``w2s-theory``: the command line. Each subcommand lives in :mod:`w2s_theory.commands` and registers itself.

Exit codes: 0 success; 1 a result that failed (a check not met, a violation found); 2 bad input or an
environment the command cannot work in (one line on stderr, no traceback; ``--debug`` shows tracebacks);
130 interrupted; 141 (128 + SIGPIPE) when stdout was closed early (``w2s-theory fit ... | head``): every
output file is written before anything is printed, so it is complete even then.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sqlite3
import sys

from .validation import InputError

#: Subcommand modules, in the order ``--help`` lists them.
COMMANDS = ["check", "fit", "sweep", "export", "figures", "study", "bench", "audit_constant", "phase"]

#: Exit status of a command whose stdout was closed by the reader (the shell's 128 + SIGPIPE).
EXIT_BROKEN_PIPE = 141


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


def _message(exc: BaseException) -> str:
    if isinstance(exc, MemoryError):
        return "out of memory" + (f" ({str(exc).splitlines()[0]})" if str(exc) else "") + \
            "; use smaller sizes (fewer samples, features, classes or students)"
    if isinstance(exc, sqlite3.DatabaseError):
        return f"the results store cannot be read or written (SQLite: {exc}); is it damaged?"
    if isinstance(exc, OSError) and not isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)) \
            and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def _silence_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so that Python's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = int(args.handler(args) or 0)
        sys.stdout.flush()  # a reader that went away is noticed here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except (InputError, OSError, MemoryError, sqlite3.DatabaseError) as exc:
        if args.debug:
            raise
        print(f"w2s-theory {args.command}: error: {_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"w2s-theory {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
