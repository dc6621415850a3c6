"""The ``keystile`` command line: a thin shell over :class:`~keystile.manager.KeyManager`.

::

    keystile keys create --name "search service" --type prod --scope vec:read --expires 90d
    keystile keys list [--type prod] [--status active] [--meta project=search]
    keystile keys show|revoke KEY_ID
    keystile keys update KEY_ID [--name ...] [--scope ...] [--expires 30d|2027-01-01|never]
    keystile keys rotate KEY_ID [--grace 24h]
    keystile usage [KEY_ID]
    keystile audit [--key KEY_ID] [--action revoke] [--outcome refused] [--actor WHO]
    keystile projects list | show [--project P] | rename NAME [--project P]
    keystile alerts rules show|clear [--project P | --key KEY_ID]
    keystile alerts rules set requests_per_minute=100 error_rate=off [--key KEY_ID] [--replace]
    keystile scan [PATH ...]
    keystile demo

The key commands work on the shared store the app uses: ``--redis URL`` or
``KEYSTILE_REDIS_URL``, the server secret from ``KEYSTILE_SECRET`` and the namespace from
``KEYSTILE_NAMESPACE`` (default ``keystile``), so a key created here works in the app at once.
Every command but ``demo`` takes ``--json``.

Exit codes: 0 ok, 1 not found / refused (also: the store cannot be reached, keys found by
``scan``), 2 usage error.

The arguments are parsed in :mod:`keystile.cli.parser`, the commands run in
:mod:`keystile.cli.commands`, and ``demo`` runs :mod:`keystile.demo_server`.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence

from keystile.cli.commands import execute, run_with_store
from keystile.cli.parser import (
    CommandLineError,
    build_parser,
    duration,
    expiry,
    metadata_entry,
    quota,
)
from keystile.cli.scanning import run_scan

__all__ = [
    "CommandLineError",
    "build_parser",
    "duration",
    "execute",
    "expiry",
    "main",
    "metadata_entry",
    "quota",
]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        # Imported here: the key commands need neither the demo app nor its server.
        from keystile.demo_server import run_demo

        return run_demo(args.host, args.port, args.redis)
    try:
        if args.command == "scan":
            return run_scan(args, sys.stdout, sys.stderr)
        if args.command in ("keys", "projects", "alerts") and not getattr(args, "action", None):
            args.print_help(sys.stderr)
            return 2
        if args.command in ("keys", "usage", "audit", "projects", "alerts"):
            return asyncio.run(run_with_store(args, sys.stdout, sys.stderr))
    except CommandLineError as exc:
        sys.stderr.write(f"keystile: {exc}\n")
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader (e.g. `| head`) went away: stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    parser.print_help(sys.stderr)
    return 2
