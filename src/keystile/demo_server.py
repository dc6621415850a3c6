"""What ``keystile demo`` runs: the demo API (:mod:`keystile.demo`) on a gate of its own,
seeded with one key of each type and an admin key, whose secrets it prints with ``curl``
lines to try, then served with uvicorn until interrupted.

Keys live in memory, or in the Redis given by ``--redis`` or ``KEYSTILE_REDIS_URL``, under
``KEYSTILE_NAMESPACE`` (default ``keystile``, as apps and the command line) and
``KEYSTILE_SECRET`` (or a secret made up for the run): with the same settings, a key the
command line makes works in the demo, and ``keystile usage`` reads what the demo counted.
Every other ``KEYSTILE_*`` setting applies too. Alerts and keystile's warnings print to
stderr beside uvicorn's log. Needs the ``demo`` extra (uvicorn).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import sys
from typing import TextIO

from keystile import demo
from keystile.alerts import AlertRules
from keystile.exceptions import ConfigurationError, StoreError
from keystile.gate import Keystile, store_description
from keystile.manager import CreatedKey
from keystile.settings import KeystileSettings

__all__ = ["demo_gate", "print_keys", "run_demo", "serve_demo"]


def run_demo(host: str, port: int, redis_url: str | None) -> int:
    """Serve the demo until interrupted (Ctrl-C is a normal end); the exit code."""
    try:
        return asyncio.run(serve_demo(host, port, redis_url))
    except KeyboardInterrupt:
        return 0


def print_keys(out: TextIO, base: str, keys: dict[str, CreatedKey], store: str) -> None:
    """The demo's keys (by name: dev, prod, client, admin) and what to try with them, for a
    server at ``base`` (``http://127.0.0.1:8000``)."""

    def secret(name: str) -> str:
        return keys[name].secret.get_secret_value()

    out.write(f"keystile demo on {base}  (store: {store})\n\n")
    out.write("Keys (shown once; they work until the demo stops):\n")
    for name, note in (
        ("dev", "vec:* kev:* data:read ai:inference files:*"),
        ("prod", "vec:* kev:* data:read ai:inference files:*"),
        ("client", f"vec:read kev:read ai:inference; origins {', '.join(demo.DEMO_ORIGINS)}"),
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
        "The client key is limited to 100 requests a minute, 20 of them from any one address\n"
        "(RateLimit headers on each answer past the scope check, so not on that 403; its\n"
        "21st GET of /cloud/vec/databases from your address gets 429 with Retry-After,\n"
        'naming the policy "client-ip"), and its AI token budget is 10,000 an\n'
        f"hour: curl -s -X POST {base}/cloud/ai/infer -H 'Authorization: Bearer "
        f'{secret("client")}\' -d \'{{"model": "demo", "messages": '
        '[{"role": "user", "content": "hi"}]}\' -i\n'
    )
    out.write(
        "\nFrom a browser: serve any page on an allowed origin (python3 -m http.server 5173,\n"
        "then open http://localhost:5173) and run in its console:\n"
        f"  fetch('{base}/cloud/vec/databases', {{headers: {{Authorization: "
        f"'Bearer {secret('client')}'}}}}).then(r => r.json()).then(console.log)\n"
        "The same call from any other origin is refused (403 origin_not_allowed).\n"
    )
    admin, dev = secret("admin"), keys["dev"]
    out.write(
        "\nUsage is counted per key and flushed every second; alerts (more than 60 requests\n"
        "a minute, half the answers errors, a revoked key still in use...) print below.\n"
        "Manage keys and read usage with the admin key (the admin REST API, /cloud/keys):\n"
        f"  curl -s {base}/cloud/keys/ -H 'Authorization: Bearer {admin}'\n"
        f"  curl -s {base}/cloud/keys/{dev.key.id}/usage -H 'Authorization: Bearer {admin}'\n"
        f"  curl -s -X POST {base}/cloud/keys/{dev.key.id}/revoke"
        f" -H 'Authorization: Bearer {admin}'\n"
        f"\nThe console: open {base}/console and sign in with the admin key.\n"
    )
    out.flush()


def _log_to_stderr() -> None:
    """Alerts (and other keystile warnings) to stderr, beside uvicorn's own log."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("keystile:  %(levelname)s %(message)s"))
    keystile_log = logging.getLogger("keystile")
    keystile_log.addHandler(handler)
    keystile_log.setLevel(logging.INFO)


def demo_gate(redis_url: str | None = None) -> Keystile:
    """The demo's gate: the store ``redis_url`` (``--redis``) names, else the settings' (the
    environment's), else memory; every other setting from the environment."""
    # Thresholds low enough to see an alert fire while trying the demo.
    rules = AlertRules(requests_per_minute=60, error_rate=0.5, error_min_requests=10)
    settings = KeystileSettings()
    url = redis_url or settings.redis_url or "memory://"
    secret = None
    if not url.startswith("memory:") and settings.secret is None:
        secret = secrets.token_urlsafe(32)  # the demo's keys work for this run only
    return Keystile(store=url, secret=secret, settings=settings, alert_rules=rules)


async def serve_demo(host: str, port: int, redis_url: str | None) -> int:
    """Seed the keys, print them and serve the demo API on ``host:port``; the exit code (1
    when the store cannot be used, 2 without uvicorn)."""
    try:
        import uvicorn
    except ImportError:
        sys.stderr.write("the demo needs uvicorn: pip install 'keystile[demo]'\n")
        return 2
    _log_to_stderr()
    try:
        gate = demo_gate(redis_url)
    except (ConfigurationError, ValueError) as exc:
        sys.stderr.write(f"keystile demo: {exc}\n")
        return 2
    try:
        # Looked up when called, so that a test server may wrap the seeding.
        keys = await demo.seed_demo_keys(gate)
    except StoreError as exc:
        sys.stderr.write(f"keystile demo: cannot use the store: {exc}\n")
        await gate.aclose()
        return 1
    await gate.startup()
    app = demo.build_demo_app(gate)
    shown_host = f"[{host}]" if ":" in host else host
    print_keys(
        sys.stdout, f"http://{shown_host}:{port}", dict(keys), store_description(gate.store.store)
    )
    # proxy_headers=False: uvicorn would otherwise rewrite the client address from
    # X-Forwarded-For for requests from 127.0.0.1, behind keystile's back.
    config = uvicorn.Config(
        app, host=host, port=port, proxy_headers=False, log_level="info", access_log=True
    )
    try:
        await uvicorn.Server(config).serve()
    finally:
        await gate.aclose()
    return 0
