"""The ``keygate`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from keygate import __version__

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keygate", description=__doc__)
    parser.add_argument("--version", action="version", version=f"keygate {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return 0  # pragma: no cover - every command returns from its own branch
