"""The ``keystile`` command line: a thin shell over :class:`~keystile.manager.KeyManager`.

::

    keystile keys create --name "search service" --type prod --scope vec:read --expires 90d
    keystile keys list [--type prod] [--status active] [--meta project=search]
    keystile keys show|revoke KEY_ID
    keystile keys update KEY_ID [--name ...] [--scope ...] [--expires 30d|2027-01-01|never]
    keystile keys rotate KEY_ID [--grace 24h]
    keystile usage [KEY_ID]
    keystile scan [PATH ...]
    keystile demo

The key commands work on the shared store the app uses: ``--redis URL`` or
``KEYSTILE_REDIS_URL``, the server secret from ``KEYSTILE_SECRET`` and the namespace from
``KEYSTILE_NAMESPACE`` (default ``keystile``), so a key created here works in the app at once.
Every command but ``demo`` takes ``--json``.

Exit codes: 0 ok, 1 not found / refused (also: the store cannot be reached, keys found by
``scan``), 2 usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn, TextIO
from urllib.parse import urlsplit, urlunsplit

from pydantic import ValidationError

from keystile import __version__
from keystile.exceptions import (
    KeyConflict,
    KeyNotFound,
    KeyValidationError,
    RotationRefused,
    StoreError,
    StoreUnavailable,
)
from keystile.keys import KeyHasher, generate_key, redact_keys
from keystile.manager import CreatedKey, KeyManager, key_status, record_json
from keystile.models import DEFAULT_POLICY, ApiKey
from keystile.scan import Finding, ScanProblem, scan_paths
from keystile.settings import KeystileSettings
from keystile.stores import RedisStore
from keystile.usage import UsageOverview

__all__ = ["build_parser", "execute", "main"]

_DURATION = re.compile(r"([0-9]{1,9})([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
_STORE_SCHEMES = ("redis", "rediss", "unix")
NEVER = "never"
DEFAULT = "default"


class CommandLineError(Exception):
    """A command line that cannot be run as given (exit 2)."""


# -- argument types ----------------------------------------------------------------------


def duration(text: str) -> timedelta:
    """``30d``, ``24h``, ``90m`` or ``45s`` as a timedelta."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration: use a whole number and a unit, e.g. 30d, 24h, 90m, 45s"
        )
    try:
        return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    except OverflowError:
        raise argparse.ArgumentTypeError(f"{text!r} is too long a duration") from None


def expiry(text: str) -> timedelta | datetime | str:
    """A duration from now (``30d``), a moment (``2027-01-01T00:00:00Z``; a date, or a time
    without a zone, is taken as UTC), or ``never``."""
    if text.strip().lower() == NEVER:
        return NEVER
    if _DURATION.fullmatch(text.strip()):
        return duration(text)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a duration (30d, 24h, 90m, 45s), an ISO 8601 time "
            "(2027-01-01T00:00:00Z) nor 'never'"
        ) from None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is out of range in UTC (years 1 to 9999)"
        ) from None


def metadata_entry(text: str) -> tuple[str, str]:
    """``name=value``."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not name=value")
    return name.strip(), value


def quota(text: str) -> int | str:
    """A whole number of tokens, or ``default``."""
    if text.strip().lower() == DEFAULT:
        return DEFAULT
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number or 'default'") from None


# -- the parser --------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors that never repeat a key: argparse quotes the value it
    refused (``invalid choice: 'prod_...'``), and a secret may have been pasted there."""

    def error(self, message: str) -> NoReturn:
        super().error(redact_keys(message))


def _shared(*, store: bool) -> _Parser:
    options = _Parser(add_help=False)
    if store:
        options.add_argument(
            "--redis",
            metavar="URL",
            default=None,
            help="the Redis that the app's keys live in (default: $KEYSTILE_REDIS_URL)",
        )
    options.add_argument("--json", action="store_true", help="answer in JSON")
    return options


def _settings_options(parser: argparse.ArgumentParser, *, update: bool) -> None:
    parser.add_argument(
        "--scope",
        dest="scopes",
        action="append",
        metavar="SCOPE",
        help="a scope such as vec:read or vec:* (repeat for more)"
        + ("; replaces the key's scopes" if update else ""),
    )
    parser.add_argument(
        "--origin",
        dest="origins",
        action="append",
        metavar="ORIGIN",
        help="an allowed browser origin, e.g. https://app.example.com (repeat for more)"
        + ("; replaces the list" if update else ""),
    )
    parser.add_argument(
        "--ip",
        dest="ips",
        action="append",
        metavar="IP",
        help="an allowed client address or CIDR (repeat for more)"
        + ("; replaces the list" if update else ""),
    )
    parser.add_argument(
        "--rate-limit",
        metavar="LIMIT",
        help="e.g. 100/minute" + ("; 'default' for the type's" if update else ""),
    )
    parser.add_argument(
        "--address-rate-limit",
        metavar="LIMIT",
        help="each client address's share, e.g. 20/minute"
        + ("; 'default' for the type's" if update else ""),
    )
    parser.add_argument(
        "--token-quota",
        type=quota,
        metavar="TOKENS",
        help="AI tokens per hour" + ("; 'default' for the type's" if update else ""),
    )
    parser.add_argument(
        "--expires",
        type=expiry,
        metavar="WHEN",
        help="30d, 24h, 90m, 45s from now, or a time such as 2027-01-01T00:00:00Z (UTC if no "
        "zone is given)" + ("; 'never' to remove the expiry" if update else ""),
    )
    parser.add_argument(
        "--meta",
        dest="meta",
        action="append",
        type=metadata_entry,
        metavar="NAME=VALUE",
        help="a metadata entry, e.g. project=search (repeat for more)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="keystile", description="API keys for Starlette and FastAPI apps.")
    parser.add_argument("--version", action="version", version=f"keystile {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    shared = _shared(store=True)

    keys = commands.add_parser(
        "keys",
        help="create, list, show, update, revoke and rotate keys",
        description="Manage the keys of the shared store (--redis or KEYSTILE_REDIS_URL; "
        "KEYSTILE_SECRET; KEYSTILE_NAMESPACE, default keystile).",
    )
    actions = keys.add_subparsers(dest="action", metavar="ACTION")
    keys.set_defaults(print_help=keys.print_help)

    create = actions.add_parser("create", parents=[shared], help="issue a key")
    create.add_argument("--name", required=True, help="what the key is for")
    create.add_argument("--type", required=True, choices=["dev", "prod", "client"])
    _settings_options(create, update=False)

    listing = actions.add_parser("list", parents=[shared], help="list keys")
    listing.add_argument("--type", choices=["dev", "prod", "client"])
    listing.add_argument("--status", choices=["active", "revoked", "expired"])
    listing.add_argument(
        "--meta",
        action="append",
        type=metadata_entry,
        metavar="NAME=VALUE",
        help="only keys with this metadata entry (repeat to require more)",
    )
    listing.add_argument("--limit", type=int, default=100, help="keys per page (1-1000)")
    listing.add_argument("--cursor", help="continue a listing where the previous page ended")

    show = actions.add_parser("show", parents=[shared], help="show one key")
    show.add_argument("key_id", metavar="KEY_ID")

    update = actions.add_parser(
        "update", parents=[shared], help="change a key's settings (never its type or secret)"
    )
    update.add_argument("key_id", metavar="KEY_ID")
    update.add_argument("--name", help="a new name")
    # Accepted only to be refused with the manager's explanation.
    update.add_argument("--type", help=argparse.SUPPRESS)
    _settings_options(update, update=True)
    update.add_argument("--clear-scopes", action="store_true", help="remove every scope")
    update.add_argument("--clear-origins", action="store_true", help="remove every origin")
    update.add_argument("--clear-ips", action="store_true", help="remove the IP allowlist")
    update.add_argument(
        "--unset-meta", action="append", metavar="NAME", help="remove a metadata entry"
    )

    revoke = actions.add_parser("revoke", parents=[shared], help="revoke a key, everywhere, now")
    revoke.add_argument("key_id", metavar="KEY_ID")

    rotate = actions.add_parser(
        "rotate",
        parents=[shared],
        help="issue a successor; the old key works for a grace period, then expires",
    )
    rotate.add_argument("key_id", metavar="KEY_ID")
    rotate.add_argument(
        "--grace",
        type=duration,
        default=timedelta(hours=24),
        help="how long the old key keeps working: 24h (default), 7d, 0s, ...",
    )

    usage = commands.add_parser("usage", parents=[shared], help="usage of one key or of all")
    usage.add_argument("key_id", metavar="KEY_ID", nargs="?")

    scan = commands.add_parser(
        "scan",
        parents=[_shared(store=False)],
        help="find keystile keys in files (exit 1 when any is found)",
        description="Find keystile keys with valid checksums in files and folders; prints "
        "file:line: hint for each and exits 1 when any is found. A pre-commit hook.",
    )
    scan.add_argument("paths", nargs="*", default=["."], metavar="PATH", help="default: .")
    scan.add_argument(
        "--prefix",
        action="append",
        metavar="PREFIX",
        help="look for keys with this prefix too (e.g. a custom key type's 'sk_')",
    )

    demo = commands.add_parser("demo", help="serve the demo API and print keys to try")
    demo.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    demo.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    demo.add_argument(
        "--redis",
        metavar="URL",
        default=None,
        help="keep keys in this Redis (namespace keystile-demo) instead of in memory",
    )
    return parser


def _print_keys(out: TextIO, base: str, keys: dict[str, CreatedKey], store: str) -> None:
    from keystile.demo import DEMO_ORIGINS

    def secret(name: str) -> str:
        return keys[name].secret.get_secret_value()

    out.write(f"keystile demo on {base}  (store: {store})\n\n")
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
        "The client key is limited to 100 requests a minute, 20 of them from any one address\n"
        "(RateLimit headers on every answer; the 21st from your address gets 429 with\n"
        'Retry-After, naming the policy "client-ip"), and its AI token budget is 10,000 an\n'
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
    )
    out.flush()


async def _demo(host: str, port: int, redis_url: str | None) -> int:
    try:
        import uvicorn
    except ImportError:
        sys.stderr.write("the demo needs uvicorn: pip install 'keystile[demo]'\n")
        return 2
    import os
    import secrets

    from keystile.alerts import AlertRules
    from keystile.demo import build_demo_app, seed_demo_keys
    from keystile.exceptions import StoreError
    from keystile.gate import Keystile
    from keystile.settings import KeystileSettings

    # Alerts (and other keystile warnings) to stderr, beside uvicorn's own log.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("keystile:  %(levelname)s %(message)s"))
    keystile_log = logging.getLogger("keystile")
    keystile_log.addHandler(handler)
    keystile_log.setLevel(logging.INFO)
    # Thresholds low enough to see an alert fire while trying the demo.
    rules = AlertRules(requests_per_minute=60, error_rate=0.5, error_min_requests=10)
    if redis_url:
        settings = KeystileSettings(namespace="keystile-demo")
        secret = os.environ.get("KEYSTILE_SECRET") or secrets.token_urlsafe(32)
        gate = Keystile(store=redis_url, secret=secret, settings=settings, alert_rules=rules)
    else:
        gate = Keystile(store="memory://", alert_rules=rules)
    try:
        keys = await seed_demo_keys(gate)
    except StoreError as exc:
        sys.stderr.write(f"keystile demo: cannot use the store: {exc}\n")
        await gate.aclose()
        return 1
    await gate.startup()
    app = build_demo_app(gate)
    shown_host = f"[{host}]" if ":" in host else host
    _print_keys(
        sys.stdout, f"http://{shown_host}:{port}", dict(keys), "redis" if redis_url else "memory"
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


# -- output ------------------------------------------------------------------------------


def _when(moment: datetime | None, empty: str = "-") -> str:
    return empty if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _dump(out: TextIO, data: Any) -> None:
    json.dump(data, out, indent=2)
    out.write("\n")


def _table(out: TextIO, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    for row in (headers, *rows):
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")


def _details(out: TextIO, key: ApiKey, manager: KeyManager) -> None:
    policy = manager.policy
    rate = key.rate_limit or f"{policy.rate_limit(key, key.type) or 'none'} (type default)"
    per_address = policy.address_rate_limit(key, key.type) or "none"
    if key.address_rate_limit is None:
        per_address += " (type default)"
    tokens = policy.token_quota(key, key.type)
    quota_text = "none" if tokens is None else f"{tokens:,} / hour"
    if key.token_quota is None:
        quota_text += " (type default)"
    rows = [
        ("id", key.id),
        ("name", key.name),
        ("type", key.type.value),
        ("hint", key.hint),
        ("status", key_status(key, manager.now()).value),
        ("scopes", ", ".join(key.scopes) or "-"),
        ("origins", ", ".join(key.allowed_origins) or "-"),
        ("ips", ", ".join(key.allowed_ips) or "-"),
        ("rate limit", rate),
        ("per address", per_address),
        ("token quota", quota_text),
        ("metadata", ", ".join(f"{k}={v}" for k, v in key.metadata.items()) or "-"),
        ("created", _when(key.created_at)),
        ("expires", _when(key.expires_at, "never")),
        ("revoked", _when(key.revoked_at)),
        ("replaces", key.replaces or "-"),
        ("replaced by", key.replaced_by or "-"),
    ]
    for label, value in rows:
        out.write(f"{label:<13}{value}\n")


def _secret(out: TextIO, secret: str) -> None:
    out.write(f"\nsecret       {secret}\n")
    out.write("(shown this once: keystile keeps only a keyed hash of it)\n")


# -- the commands ------------------------------------------------------------------------


def _resolve_expiry(value: timedelta | datetime | str, now: datetime) -> datetime | None:
    if value == NEVER:
        return None
    if isinstance(value, timedelta):
        try:
            return now + value
        except OverflowError:
            raise KeyValidationError.single("expires_at", "is too far in the future") from None
    if not isinstance(value, datetime):
        raise KeyValidationError.single("expires_at", "is not a date, a duration or 'never'")
    return value


def _settings(args: argparse.Namespace, manager: KeyManager) -> dict[str, Any]:
    """The settings given on the command line, as the manager's field names."""
    fields: dict[str, Any] = {}
    for option, field, clear in (
        ("scopes", "scopes", "clear_scopes"),
        ("origins", "allowed_origins", "clear_origins"),
        ("ips", "allowed_ips", "clear_ips"),
    ):
        values, cleared = getattr(args, option), getattr(args, clear, False)
        if values is not None and cleared:
            flag = option.removesuffix("s")
            raise CommandLineError(f"give --{flag} or --{clear.replace('_', '-')}, not both")
        if values is not None:
            fields[field] = values
        elif cleared:
            fields[field] = []
    for field in ("rate_limit", "address_rate_limit"):
        text = getattr(args, field)
        if text is not None:
            fields[field] = None if text.lower() == DEFAULT else text
    if args.token_quota is not None:
        fields["token_quota"] = None if args.token_quota == DEFAULT else args.token_quota
    if args.expires is not None:
        fields["expires_at"] = _resolve_expiry(args.expires, manager.now())
    return fields


async def _create(args: argparse.Namespace, manager: KeyManager, out: TextIO) -> int:
    fields = {"name": args.name, "type": args.type, **_settings(args, manager)}
    if args.meta:
        fields["metadata"] = dict(args.meta)
    created = await manager.create(fields)
    secret = created.secret.get_secret_value()
    if args.json:
        _dump(out, {"key": record_json(created.key), "secret": secret})
    else:
        _details(out, created.key, manager)
        _secret(out, secret)
    return 0


async def _list(args: argparse.Namespace, manager: KeyManager, out: TextIO) -> int:
    page = await manager.list(
        type=args.type,
        status=args.status,
        metadata=dict(args.meta or ()),
        cursor=args.cursor,
        limit=args.limit,
    )
    if args.json:
        _dump(out, {"keys": [record_json(k) for k in page.keys], "next": page.next})
        return 0
    now = manager.now()
    if page.keys:
        _table(
            out,
            ("ID", "NAME", "TYPE", "HINT", "STATUS", "CREATED", "EXPIRES"),
            [
                (
                    k.id,
                    k.name if len(k.name) <= 40 else k.name[:39] + "…",
                    k.type.value,
                    k.hint,
                    key_status(k, now).value,
                    _when(k.created_at),
                    _when(k.expires_at, "never"),
                )
                for k in page.keys
            ],
        )
    else:
        out.write("no keys\n")
    if page.next is not None:
        out.write(f"more: keystile keys list --cursor {page.next}\n")
    return 0


async def _show(args: argparse.Namespace, manager: KeyManager, out: TextIO) -> int:
    record = await manager.get(args.key_id)
    if args.json:
        _dump(out, {"key": record_json(record)})
    else:
        _details(out, record, manager)
    return 0


async def _update(args: argparse.Namespace, manager: KeyManager, out: TextIO) -> int:
    fields = _settings(args, manager)
    if args.name is not None:
        fields["name"] = args.name
    if args.type is not None:
        fields["type"] = args.type  # refused by the manager, with the reason
    if args.meta or args.unset_meta:
        metadata = dict((await manager.get(args.key_id)).metadata)
        metadata.update(args.meta or ())
        for name in args.unset_meta or ():
            metadata.pop(name, None)
        fields["metadata"] = metadata
    if not fields:
        raise CommandLineError("nothing to change: give an option such as --name or --scope")
    record = await manager.update(args.key_id, fields)
    if args.json:
        _dump(out, {"key": record_json(record)})
    else:
        _details(out, record, manager)
    return 0


async def _revoke(args: argparse.Namespace, manager: KeyManager, out: TextIO) -> int:
    record = await manager.revoke(args.key_id)
    if args.json:
        _dump(out, {"key": record_json(record)})
    else:
        out.write(f"revoked {record.id} ({record.hint}) at {_when(record.revoked_at)}\n")
    return 0


async def _rotate(args: argparse.Namespace, manager: KeyManager, out: TextIO) -> int:
    rotated = await manager.rotate(args.key_id, grace=args.grace)
    secret = rotated.secret.get_secret_value()
    if args.json:
        _dump(
            out,
            {
                "key": record_json(rotated.key),
                "secret": secret,
                "previous": record_json(rotated.previous),
            },
        )
        return 0
    old, new = rotated.previous, rotated.key
    out.write(f"rotated {old.id} ({old.hint}) -> {new.id} ({new.hint})\n")
    out.write(f"the old key works until {_when(old.expires_at)}, then it is refused\n\n")
    _details(out, new, manager)
    _secret(out, secret)
    return 0


async def _usage(args: argparse.Namespace, manager: KeyManager, out: TextIO) -> int:
    report = await manager.usage(args.key_id)
    if args.json:
        _dump(out, report.model_dump(mode="json"))
        return 0
    if isinstance(report, UsageOverview):
        out.write(f"usage of all keys ({len(report.keys)} with recorded usage)\n")
        out.write(f"{'key':<26}{'requests':>10}{'errors':>9}{'tokens':>12}  last used\n")
        for item in report.keys:
            totals = item.totals
            errors = totals.errors_4xx + totals.errors_5xx
            out.write(
                f"{item.key_id:<26}{totals.requests:>10,}{errors:>9,}{totals.tokens:>12,}"
                f"  {_when(item.last_use.at, 'never')}\n"
            )
        return 0
    out.write(f"usage of {report.key_id} (all time; the last hour by minute: --json)\n")
    for name, value in report.all_time.model_dump().items():
        out.write(f"{name.replace('_', ' '):<18}{value:,}\n")
    last = report.last_use
    where = ", ".join(x for x in (last.ip, last.origin) if x)
    out.write(f"{'last used':<18}{_when(last.at, 'never')}{f' from {where}' if where else ''}\n")
    if last.inactive_attempt_at is not None:
        out.write(f"{'last refused try':<18}{_when(last.inactive_attempt_at, 'never')}\n")
    for title, table in (("busiest IPs", report.top_ips), ("busiest origins", report.top_origins)):
        if table:
            out.write(f"{title}: " + ", ".join(f"{k} ({v:,})" for k, v in table.items()) + "\n")
    return 0


Command = Callable[[argparse.Namespace, KeyManager, TextIO], Coroutine[Any, Any, int]]
_COMMANDS: dict[tuple[str, str | None], Command] = {
    ("keys", "create"): _create,
    ("keys", "list"): _list,
    ("keys", "show"): _show,
    ("keys", "update"): _update,
    ("keys", "revoke"): _revoke,
    ("keys", "rotate"): _rotate,
    ("usage", None): _usage,
}


async def execute(
    args: argparse.Namespace,
    manager: KeyManager,
    out: TextIO,
    err: TextIO,
    *,
    where: str = "the key store",
) -> int:
    """Run a parsed ``keys`` or ``usage`` command with ``manager``; its exit code. Errors are
    one line on ``err``, never a traceback."""
    command = _COMMANDS[(args.command, getattr(args, "action", None))]
    try:
        return await command(args, manager, out)
    except CommandLineError as exc:
        err.write(f"keystile: {exc}\n")
        return 2
    except KeyValidationError as exc:
        err.write(f"keystile: invalid input: {exc}\n")
        return 2
    except (KeyNotFound, RotationRefused, KeyConflict) as exc:  # KeyChanged: a conflict
        err.write(f"keystile: {exc}\n")
        return 1
    except StoreUnavailable as exc:
        err.write(f"keystile: cannot reach {where}: {exc}\n")
        return 1
    except StoreError as exc:
        err.write(f"keystile: {where} failed: {exc}\n")
        return 1


def _redacted(url: str) -> str:
    """The URL to show in messages: no password, no query string."""
    parts = urlsplit(url)
    user, at, host = parts.netloc.rpartition("@")
    if at and ":" in user:
        user = user.partition(":")[0] + ":***"
    return urlunsplit((parts.scheme, f"{user}{at}{host}", parts.path, "", ""))


async def _managed(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Open the shared store named by ``--redis`` or the environment, and run the command."""
    try:
        settings = KeystileSettings()
    except ValidationError as exc:
        problem = exc.errors(include_url=False, include_input=False)[0]
        name = "KEYSTILE_" + str(problem["loc"][0]).upper() if problem["loc"] else "KEYSTILE_*"
        raise CommandLineError(f"{name} is not valid: {problem['msg']}") from None
    url = args.redis or settings.redis_url
    if not url:
        raise CommandLineError(
            "a shared store is needed: pass --redis URL or set KEYSTILE_REDIS_URL to the Redis "
            "your app uses (keys kept in memory would vanish when this command exits)"
        )
    try:
        scheme = urlsplit(url).scheme
    except ValueError:
        scheme = ""
    if scheme not in _STORE_SCHEMES:
        raise CommandLineError(
            "the store must be a redis://, rediss:// or unix:// URL shared with your app "
            "(keys kept in memory would vanish when this command exits)"
        )
    where = _redacted(url)
    if settings.secret is None:
        raise CommandLineError(
            "KEYSTILE_SECRET is not set: set it to your app's server secret (keys are stored "
            "as HMACs under it, so keys made with another secret would not work in the app)"
        )
    try:
        hasher = KeyHasher(settings.secret.get_secret_value())
    except ValueError as exc:
        raise CommandLineError(f"KEYSTILE_SECRET is not usable: {exc}") from None
    try:
        store = RedisStore.from_url(
            url,
            namespace=settings.namespace,
            pool_size=4,
            pool_timeout=settings.redis_pool_timeout,
            timeout=settings.redis_timeout,
            client_name="keystile-cli",
        )
    except ValueError as exc:
        reason = f"cannot use {where} (namespace {settings.namespace!r}): {exc}"
        raise CommandLineError(reason) from None
    try:
        return await execute(args, KeyManager(store, hasher), out, err, where=where)
    finally:
        await store.close()


def _scan(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    prefixes = set(DEFAULT_POLICY.prefixes)
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        try:
            return asyncio.run(_demo(args.host, args.port, args.redis))
        except KeyboardInterrupt:
            return 0
    try:
        if args.command == "scan":
            return _scan(args, sys.stdout, sys.stderr)
        if args.command == "keys" and args.action is None:
            args.print_help(sys.stderr)
            return 2
        if args.command in ("keys", "usage"):
            return asyncio.run(_managed(args, sys.stdout, sys.stderr))
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


if __name__ == "__main__":
    sys.exit(main())
