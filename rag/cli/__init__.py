"""The `rag` command: one subcommand per stage, each a thin layer over the library's API.

Each module in `SUBCOMMANDS` has `register(subparsers)`, which adds its parser and sets `func`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ("rag.cli.index", "rag.cli.search", "rag.cli.demo", "rag.cli.ask", "rag.cli.eval", "rag.cli.train",
               "rag.cli.serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rag", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as usage:  # argparse has printed the usage error (or --help): its exit status
        return int(usage.code or 0) if not isinstance(usage.code, str) else 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as error:  # bad input, a missing or unreadable file: a message, no traceback
        print(f"rag: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
