"""``python -m keystile.redis [namespace]``: print every Redis name keystile uses."""

from __future__ import annotations

import sys

from keystile.redis.schema import table


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1:
        print("usage: python -m keystile.redis [namespace]", file=sys.stderr)
        return 2
    print(table(args[0] if args else "keystile"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
