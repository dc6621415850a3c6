"""``keystile scan``: find keystile keys in files (a pre-commit hook)."""

from __future__ import annotations

import argparse
from typing import TextIO

from keystile.cli.commands import _config
from keystile.cli.output import dump as _dump
from keystile.cli.parser import CommandLineError
from keystile.keys import generate_key
from keystile.scan import Finding, ScanProblem, scan_paths

__all__ = ["run_scan"]


def run_scan(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Run ``scan``: each key found on ``out``; 1 when any is found, else 2 when a path could
    not be scanned."""
    prefixes = set(_config(args).policy.prefixes)
    for prefix in args.prefix or ():
        try:
            generate_key(prefix)  # checks the prefix's form
        except ValueError as exc:
            raise CommandLineError(str(exc)) from None
        prefixes.add(prefix)
    findings: list[Finding] = []
    problems: list[ScanProblem] = []
    for item in scan_paths(args.paths, prefixes):
        if isinstance(item, Finding):
            findings.append(item)
            if not args.json:
                out.write(f"{item}\n")
        else:
            problems.append(item)
            err.write(f"keystile scan: cannot scan {item}\n")
    if args.json:
        _dump(
            out,
            {
                "findings": [
                    {"path": f.path, "line": f.line, "hint": f.hint, "prefix": f.prefix}
                    for f in findings
                ],
                "problems": [{"path": p.path, "reason": p.reason} for p in problems],
            },
        )
    if findings:
        files = len({f.path for f in findings})
        err.write(
            f"keystile scan: found {len(findings)} key{'s' * (len(findings) != 1)} in {files} "
            f"file{'s' * (files != 1)}. Treat them as leaked: rotate or revoke them, and "
            "remove them from the files.\n"
        )
        return 1
    return 2 if problems else 0
