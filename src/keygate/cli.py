"""The ``keygate`` command line.

Exit codes: 0 ok, 1 not found / refused, 2 usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import TextIO

from keygate import __version__

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keygate", description="API keys for Starlette and FastAPI apps."
    )
    parser.add_argument("--version", action="version", version=f"keygate {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser("demo", help="serve the demo API and print keys to try")
    demo.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    demo.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    demo.add_argument(
        "--redis",
        metavar="URL",
        default=None,
        help="keep keys in this Redis (namespace keygate-demo) instead of in memory",
    )
    return parser


def _print_keys(out: TextIO, base: str, keys: dict[str, object], store: str) -> None:
    from keygate.demo import DEMO_ORIGINS
    from keygate.manager import CreatedKey

    def secret(name: str) -> str:
        created = keys[name]
        assert isinstance(created, CreatedKey)
        return created.secret.get_secret_value()

    out.write(f"keygate demo on {base}  (store: {store})\n\n")
    out.write("Keys (shown once; they work until the demo stops):\n")
    for name, note in (
        ("dev", "vec:* kev:* data:read ai:inference files:*"),
        ("prod", "vec:* kev:* data:read ai:inference files:*"),
        ("client", f"vec:read kev:read ai:inference; origins {', '.join(DEMO_ORIGINS)}"),
        ("admin", "* (every scope)"),
    ):
        out.write(f"  {name:<7} {secret(name)}\n          {note}\n")
    out.write("\nTry:\n")
    out.write(f"  curl -s {base}/cloud/vec/databases -H 'Authorization: Bearer {secret('dev')}'\n")
    out.write(f"  curl -s {base}/cloud/vec/databases\n")
    out.write(
        f"  curl -s -X PUT {base}/cloud/kev/greeting -d hello"
        f" -H 'Authorization: Bearer {secret('client')}'\n"
    )
    out.write("\n(200 with the dev key; 401 without a key; 403: the client key lacks kev:write)\n")
    out.write(
        "The client key is limited to 100 requests a minute (RateLimit headers on every\n"
        "answer; the 101st gets 429 with Retry-After), and its AI token budget is 10,000 an\n"
        f"hour: curl -s -X POST {base}/cloud/ai/infer -H 'Authorization: Bearer "
        f'{secret("client")}\' -d \'{{"model": "demo", "messages": '
        '[{"role": "user", "content": "hi"}]}\' -i\n'
    )
    out.flush()


async def _demo(host: str, port: int, redis_url: str | None) -> int:
    try:
        import uvicorn
    except ImportError:
        sys.stderr.write("the demo needs uvicorn: pip install 'keygate[demo]'\n")
        return 2
    import os
    import secrets

    from keygate.demo import build_demo_app, seed_demo_keys
    from keygate.exceptions import StoreError
    from keygate.gate import KeyGate
    from keygate.settings import KeyGateSettings

    if redis_url:
        settings = KeyGateSettings(namespace="keygate-demo")
        secret = os.environ.get("KEYGATE_SECRET") or secrets.token_urlsafe(32)
        gate = KeyGate(store=redis_url, secret=secret, settings=settings)
    else:
        gate = KeyGate(store="memory://")
    try:
        keys = await seed_demo_keys(gate)
    except StoreError as exc:
        sys.stderr.write(f"keygate demo: cannot use the store: {exc}\n")
        await gate.aclose()
        return 1
    await gate.startup()
    app = build_demo_app(gate)
    shown_host = f"[{host}]" if ":" in host else host
    _print_keys(
        sys.stdout, f"http://{shown_host}:{port}", dict(keys), "redis" if redis_url else "memory"
    )
    # proxy_headers=False: uvicorn would otherwise rewrite the client address from
    # X-Forwarded-For for requests from 127.0.0.1, behind keygate's back.
    config = uvicorn.Config(
        app, host=host, port=port, proxy_headers=False, log_level="info", access_log=True
    )
    try:
        await uvicorn.Server(config).serve()
    finally:
        await gate.aclose()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        try:
            return asyncio.run(_demo(args.host, args.port, args.redis))
        except KeyboardInterrupt:
            return 0
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
