"""The ``keystile`` commands: ``keys create|list|show|update|revoke|rotate``, ``usage`` and
``scan``, and how they print their answers.

:func:`execute` runs a parsed ``keys`` or ``usage`` command with a
:class:`~keystile.manager.KeyManager`; :func:`run_with_store` first opens the shared store the
environment names; :func:`run_scan` needs no store. Errors are one line, never a traceback.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO
from urllib.parse import urlsplit

from pydantic import ValidationError

from keystile.backends import backend_for
from keystile.cli.parser import DEFAULT, NEVER, CommandLineError
from keystile.exceptions import (
    KeyConflict,
    KeyNotFound,
    KeyValidationError,
    RotationRefused,
    StoreError,
    StoreMisconfigured,
    StoreUnavailable,
)
from keystile.keys import KeyHasher, generate_key
from keystile.manager import KeyManager, key_status, record_json
from keystile.models import DEFAULT_POLICY, ApiKey
from keystile.redis.connect import redacted_url
from keystile.scan import Finding, ScanProblem, scan_paths
from keystile.settings import KeystileSettings
from keystile.stores import RedisStore
from keystile.usage import UsageOverview

__all__ = ["execute", "run_scan", "run_with_store"]

_STORE_SCHEMES = (
    "redis",
    "rediss",
    "unix",
    "redis+sentinel",
    "rediss+sentinel",
    "redis+cluster",
    "rediss+cluster",
)


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


async def run_with_store(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
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
            "the store must be a redis://, rediss://, unix://, redis+sentinel:// or "
            "redis+cluster:// URL shared "
            "with your app "
            "(keys kept in memory would vanish when this command exits)"
        )
    where = redacted_url(url)
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
        try:
            await backend_for(store).check()
        except StoreMisconfigured as exc:
            raise CommandLineError(f"cannot use {where}: {exc}") from None
        except StoreError:
            pass  # down: the command itself says so, in its own words
        return await execute(args, KeyManager(store, hasher), out, err, where=where)
    finally:
        await store.close()


def run_scan(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Run ``scan``: each key found on ``out``; 1 when any is found, else 2 when a path could
    not be scanned."""
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
