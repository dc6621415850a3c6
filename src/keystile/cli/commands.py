"""The ``keystile`` commands: ``keys create|list|show|update|revoke|rotate``, ``usage``,
``audit``, ``projects list|show|rename``, ``alerts rules show|set|clear`` and ``scan``, and
how they print their answers.

:func:`execute` runs a parsed ``keys`` or ``usage`` command with a
:class:`~keystile.manager.KeyManager`; :func:`run_with_store` first opens the shared store the
environment names; :func:`run_scan` needs no store. Errors are one line, never a traceback.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Coroutine
from datetime import datetime, timedelta
from typing import Any, TextIO
from urllib.parse import urlsplit

from keystile.audit import Actor
from keystile.backends import backend_for
from keystile.cli.output import dump as _dump
from keystile.cli.output import table as _table
from keystile.cli.output import when as _when
from keystile.cli.parser import DEFAULT, NEVER, CommandLineError
from keystile.cli.projects import project_rename, project_show, projects, rules
from keystile.config import AppConfig, load_config, load_object
from keystile.exceptions import (
    ConfigurationError,
    KeyConflict,
    KeyNotFound,
    KeyValidationError,
    RotationRefused,
    StoreError,
    StoreMisconfigured,
    StoreUnavailable,
)
from keystile.gate import Keystile
from keystile.keys import KeyHasher
from keystile.manager import KeyManager, key_status, record_json
from keystile.middleware import KeystileMiddleware
from keystile.models import ApiKey
from keystile.redis.connect import redacted_url
from keystile.settings import KeystileSettings
from keystile.stores import RedisStore
from keystile.usage import UsageOverview

__all__ = ["execute", "run_with_store"]

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


def _details(
    out: TextIO, key: ApiKey, manager: KeyManager, last_used: datetime | None = None
) -> None:
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
        ("type", _type_text(key, manager)),
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
        ("last used", _when(last_used, "never")),
    ]
    unknown = policy.catalogue.unknown(key.scopes)
    if unknown:
        rows.insert(6, ("not in app", f"{', '.join(unknown)} (the catalogue lacks them)"))
    for label, value in rows:
        out.write(f"{label:<13}{value}\n")


def _type_text(key: ApiKey, manager: KeyManager) -> str:
    """The key's type, marked when the policy no longer declares it (the key is refused)."""
    if manager.policy.declares(key.type):
        return str(key.type)
    return f"{key.type} (not declared: refused)"


def _secret(out: TextIO, secret: str) -> None:
    out.write(f"\nsecret       {secret}\n")
    out.write("(shown this once: keystile keeps only a keyed hash of it)\n")


def _new(key: ApiKey, manager: KeyManager) -> dict[str, Any]:
    """A key just made, as JSON: never used yet."""
    return record_json(key, status=key_status(key, manager.now()))


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
    created = await manager.create(fields, by=Actor.command_line(), project=args.project)
    secret = created.secret.get_secret_value()
    if args.json:
        _dump(out, {"key": _new(created.key, manager), "secret": secret})
    else:
        _details(out, created.key, manager)
        _secret(out, secret)
    return 0


async def _list(args: argparse.Namespace, manager: KeyManager, out: TextIO) -> int:
    page = await manager.list(
        project=args.project,
        type=args.type,
        status=args.status,
        metadata=dict(args.meta or ()),
        cursor=args.cursor,
        limit=args.limit,
        undeclared=args.undeclared,
    )
    described = await manager.describe(page.keys)
    if args.json:
        _dump(out, {"keys": [i.json() for i in described], "next": page.next})
        return 0
    if described:
        _table(
            out,
            ("ID", "NAME", "TYPE", "HINT", "STATUS", "CREATED", "EXPIRES", "LAST USED"),
            [
                (
                    i.key.id,
                    i.key.name if len(i.key.name) <= 40 else i.key.name[:39] + "…",
                    _type_text(i.key, manager),
                    i.key.hint,
                    i.status.value,
                    _when(i.key.created_at),
                    _when(i.key.expires_at, "never"),
                    _when(i.last_used_at, "never"),
                )
                for i in described
            ],
        )
    else:
        out.write("no keys\n")
    for key in page.keys:
        if unknown := manager.policy.catalogue.unknown(key.scopes):
            out.write(
                f"note: {key.id} holds scopes the app's catalogue lacks: {', '.join(unknown)} "
                "(they grant only themselves)\n"
            )
    if page.next is not None:
        out.write(f"more: keystile keys list --cursor {page.next}\n")
    return 0


async def _show(args: argparse.Namespace, manager: KeyManager, out: TextIO) -> int:
    info = await manager.info(args.key_id, project=args.project)
    if args.json:
        _dump(out, {"key": info.json()})
    else:
        _details(out, info.key, manager, info.last_used_at)
    return 0


async def _update(args: argparse.Namespace, manager: KeyManager, out: TextIO) -> int:
    fields = _settings(args, manager)
    if args.name is not None:
        fields["name"] = args.name
    if args.type is not None:
        fields["type"] = args.type  # refused by the manager, with the reason
    if args.meta or args.unset_meta:
        metadata = dict((await manager.get(args.key_id, project=args.project)).metadata)
        metadata.update(args.meta or ())
        for name in args.unset_meta or ():
            metadata.pop(name, None)
        fields["metadata"] = metadata
    if not fields:
        raise CommandLineError("nothing to change: give an option such as --name or --scope")
    record = await manager.update(
        args.key_id, fields, by=Actor.command_line(), project=args.project
    )
    [info] = await manager.describe([record])
    if args.json:
        _dump(out, {"key": info.json()})
    else:
        _details(out, record, manager, info.last_used_at)
    return 0


async def _reindex(args: argparse.Namespace, manager: KeyManager, out: TextIO) -> int:
    store = manager.store
    store = getattr(store, "store", store)  # behind a CachedStore
    reindex = getattr(store, "reindex", None)
    if reindex is None:
        out.write("this store's listing index is always complete: nothing to do\n")
        return 0
    count = await reindex()
    if args.json:
        _dump(out, {"indexed": count})
    else:
        out.write(f"stored keys indexed for listing: {count}\n")
    return 0


async def _revoke(args: argparse.Namespace, manager: KeyManager, out: TextIO) -> int:
    record = await manager.revoke(args.key_id, by=Actor.command_line(), project=args.project)
    if args.json:
        [info] = await manager.describe([record])
        _dump(out, {"key": info.json()})
    else:
        out.write(f"revoked {record.id} ({record.hint}) at {_when(record.revoked_at)}\n")
    return 0


async def _rotate(args: argparse.Namespace, manager: KeyManager, out: TextIO) -> int:
    rotated = await manager.rotate(
        args.key_id, grace=args.grace, by=Actor.command_line(), project=args.project
    )
    secret = rotated.secret.get_secret_value()
    if args.json:
        _dump(
            out,
            {
                "key": _new(rotated.key, manager),
                "secret": secret,
                "previous": (await manager.describe([rotated.previous]))[0].json(),
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
    report = await manager.usage(args.key_id, project=args.project)
    if args.json:
        _dump(out, report.model_dump(mode="json"))
        return 0
    if isinstance(report, UsageOverview):
        out.write(f"usage of all keys ({len(report.keys)} with recorded usage)\n")
        out.write(
            f"{'key':<26}{'name':<25}{'requests':>10}{'errors':>9}{'tokens':>12}  last used\n"
        )
        for item in report.keys:
            totals = item.totals
            errors = totals.errors_4xx + totals.errors_5xx
            name = "(deleted)" if item.name is None else item.name
            name = name if len(name) <= 24 else name[:23] + "…"
            out.write(
                f"{item.key_id:<26}{name:<25}{totals.requests:>10,}{errors:>9,}"
                f"{totals.tokens:>12,}  {_when(item.last_use.at, 'never')}\n"
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


async def _audit(args: argparse.Namespace, manager: KeyManager, out: TextIO) -> int:
    page = await manager.history(
        project=args.project,
        key_id=args.key,
        action=args.event_action,
        outcome=args.outcome,
        actor=args.actor,
        cursor=args.cursor,
        limit=args.limit,
    )
    if args.json:
        events = [event.model_dump(mode="json") for event in page.events]
        _dump(out, {"events": events, "next": page.next})
        return 0
    if not page.events:
        out.write("no events\n")
    for event in page.events:
        target = event.key_id or (f"project {event.project}" if event.project else "-")
        what = f"{event.action} {target}"
        if event.outcome == "refused":
            what += f" REFUSED: {event.reason}"
        elif event.changes:
            what += ": " + "; ".join(
                f"{name} {old!r} -> {new!r}" for name, (old, new) in event.changes.items()
            )
        address = f" from {event.actor.address}" if event.actor.address else ""
        out.write(f"{_when(event.at)}  {event.actor}{address}  {what}\n")
    if page.next is not None:
        out.write(f"more: keystile audit --cursor {page.next}\n")
    return 0


Command = Callable[[argparse.Namespace, KeyManager, TextIO], Coroutine[Any, Any, int]]
_COMMANDS: dict[tuple[str, str | None], Command] = {
    ("keys", "create"): _create,
    ("keys", "list"): _list,
    ("keys", "show"): _show,
    ("keys", "reindex"): _reindex,
    ("keys", "update"): _update,
    ("keys", "revoke"): _revoke,
    ("keys", "rotate"): _rotate,
    ("usage", None): _usage,
    ("audit", None): _audit,
    ("projects", "list"): projects,
    ("projects", "show"): project_show,
    ("projects", "rename"): project_rename,
    ("alerts", "show"): rules,
    ("alerts", "set"): rules,
    ("alerts", "clear"): rules,
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


def _config(args: argparse.Namespace) -> AppConfig:
    try:
        return load_config(args.config)
    except ConfigurationError as exc:
        raise CommandLineError(str(exc)) from None


def _gate_of(found: Any, spec: str) -> Keystile:
    """The Keystile that ``--app`` names: itself, or the gate of an app's middleware."""
    if isinstance(found, Keystile):
        return found
    for middleware in getattr(found, "user_middleware", None) or ():
        if getattr(middleware, "cls", None) is KeystileMiddleware:
            gate = middleware.kwargs.get("gate")
            if isinstance(gate, Keystile):
                return gate
    raise CommandLineError(
        f"{spec} is neither a Keystile nor an app with KeystileMiddleware(gate=...)"
    )


async def _run_with_app(args: argparse.Namespace, spec: str, out: TextIO, err: TextIO) -> int:
    try:
        gate = _gate_of(load_object(spec), spec)
    except ConfigurationError as exc:
        raise CommandLineError(f"--app {spec}: {exc}") from None
    if args.redis is not None:
        raise CommandLineError("--app brings the app's own store: leave --redis out")
    if not backend_for(gate.store).shared:
        raise CommandLineError(
            f"{spec} keeps its keys in memory, which would vanish when this command exits: "
            "give the app a Redis store (KEYSTILE_REDIS_URL)"
        )
    where = repr(gate.store.store)
    try:
        return await execute(args, gate.manager, out, err, where=where)
    finally:
        await gate.aclose()


async def run_with_store(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Run the command on the app's own Keystile (``--app``, or the configuration file's
    ``app``), else on the shared store named by ``--redis`` or the environment with the
    configuration file's scopes and key types."""
    config = _config(args)
    spec = args.app or config.app
    if spec:
        return await _run_with_app(args, spec, out, err)
    try:
        settings = KeystileSettings()
    except ConfigurationError as exc:
        raise CommandLineError(str(exc)) from None
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
        manager = KeyManager(store, hasher, policy=config.policy)
        return await execute(args, manager, out, err, where=where)
    finally:
        await store.close()
