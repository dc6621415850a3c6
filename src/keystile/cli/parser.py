"""The ``keystile`` command line's arguments: their types and the parser.

:func:`build_parser` knows every command and option; the types (:func:`duration`,
:func:`expiry`, :func:`metadata_entry`, :func:`quota`) turn a word into a value or into a
usage error, and no usage error repeats a key that was pasted on the command line.
"""

from __future__ import annotations

import argparse
import re
from datetime import UTC, datetime, timedelta
from typing import NoReturn

from keystile import __version__
from keystile.audit import ACTIONS
from keystile.keys import redact_keys
from keystile.records import KeyStatus

__all__ = [
    "DEFAULT",
    "NEVER",
    "CommandLineError",
    "build_parser",
    "duration",
    "expiry",
    "metadata_entry",
    "quota",
    "rule_entry",
]

_DURATION = re.compile(r"([0-9]{1,9})([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
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


def rule_entry(text: str) -> tuple[str, object]:
    """``rule=value``: ``off`` (or ``none``) turns a threshold off, ``on``/``off`` for a
    rule without one, numbers as numbers, ``0.8,0.9`` a list of thresholds."""
    name, sep, raw = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not rule=value")
    word = raw.strip().lower()
    value: object
    if word in ("off", "none", "null"):
        value = False if name.strip() in _SWITCHES else None
    elif word in ("on", "true", "yes"):
        value = True
    elif word in ("false", "no"):
        value = False
    elif "," in word or name.strip() == "quota_thresholds":
        value = [_number(part) for part in word.split(",") if part.strip()]
    else:
        value = _number(word)
    return name.strip(), value


_SWITCHES = ("inactive_key_in_use", "new_ip_for_prod", "rotation_due")


def _number(word: str) -> object:
    for kind in (int, float):
        try:
            return kind(word)
        except ValueError:
            continue
    return word  # refused by the manager, which names the rule


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
        options.add_argument(
            "--app",
            metavar="MODULE:ATTR",
            default=None,
            help="the app's own Keystile (or an app with KeystileMiddleware), loaded as uvicorn "
            "loads apps: its store, secret, scopes and key types (default: the configuration "
            "file's app)",
        )
    if store:
        options.add_argument(
            "--project",
            metavar="NAME",
            default=None,
            help="work within this project only (create: make the key in it); default: all "
            "projects (create: 'default')",
        )
    options.add_argument(
        "--config",
        metavar="PATH",
        default=None,
        help="the app's keystile.toml or pyproject.toml (default: $KEYSTILE_CONFIG, else "
        "./keystile.toml, else ./pyproject.toml's [tool.keystile])",
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
    create.add_argument(
        "--type", required=True, help="a key type the app declares (default: dev, prod, client)"
    )
    _settings_options(create, update=False)

    listing = actions.add_parser("list", parents=[shared], help="list keys")
    listing.add_argument("--type", help="only keys of this type")
    listing.add_argument(
        "--undeclared",
        action="store_true",
        help="only keys of a type the app no longer declares (they are refused)",
    )
    listing.add_argument("--status", choices=[s.value for s in KeyStatus])
    listing.add_argument(
        "--meta",
        action="append",
        type=metadata_entry,
        metavar="NAME=VALUE",
        help="only keys with this metadata entry (repeat to require more)",
    )
    listing.add_argument("--limit", type=int, default=100, help="keys per page (1-1000)")
    listing.add_argument("--cursor", help="continue a listing where the previous page ended")

    actions.add_parser(
        "reindex",
        parents=[shared],
        help="index every stored key for listing (keys an older keystile stored; the first "
        "listing does it by itself)",
    )

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

    audit = commands.add_parser(
        "audit", parents=[shared], help="who created, changed, rotated or revoked which key"
    )
    audit.add_argument("--key", metavar="KEY_ID", help="only events about this key")
    # Not "action": that names the `keys` subcommand.
    audit.add_argument("--action", dest="event_action", choices=list(ACTIONS))
    audit.add_argument("--outcome", choices=["ok", "refused"])
    audit.add_argument("--actor", metavar="WHO", help="a key id, 'command line' or 'python'")
    audit.add_argument("--limit", type=int, default=50, help="events per page (1-1000)")
    audit.add_argument("--cursor", help="continue where the previous page ended")

    projects = commands.add_parser(
        "projects",
        help="list projects, show or rename one",
        description="Projects group keys; each has a name (its id until it is renamed).",
    )
    project_actions = projects.add_subparsers(dest="action", metavar="ACTION")
    projects.set_defaults(print_help=projects.print_help)
    project_actions.add_parser(
        "list", parents=[shared], help="every project, with how many keys it holds"
    )
    project_actions.add_parser("show", parents=[shared], help="one project (--project)")
    rename = project_actions.add_parser(
        "rename", parents=[shared], help="give a project (--project) a display name"
    )
    rename.add_argument("name", metavar="NAME", nargs="?", help="the new display name")
    rename.add_argument("--description", help="what the project is for")

    alerts = commands.add_parser(
        "alerts",
        help="the alert rules of a project or a key",
        description="Alert rules: a key's overrides, else its project's, else the app's.",
    )
    alert_groups = alerts.add_subparsers(dest="group", metavar="GROUP")
    alerts.set_defaults(print_help=alerts.print_help)
    rules = alert_groups.add_parser("rules", help="show, set or clear alert rules")
    rules.set_defaults(print_help=rules.print_help)
    rule_actions = rules.add_subparsers(dest="action", metavar="ACTION")
    for name, text in (
        ("show", "the rules of a project (--project) or a key (--key)"),
        ("set", "set rules, e.g. requests_per_minute=100 error_rate=off"),
        ("clear", "remove a project's rules or a key's overrides"),
    ):
        action = rule_actions.add_parser(name, parents=[shared], help=text)
        action.add_argument("--key", metavar="KEY_ID", help="a key's overrides, not the project's")
        if name == "set":
            action.add_argument(
                "rules",
                nargs="+",
                type=rule_entry,
                metavar="RULE=VALUE",
                help="a rule and its value: a number, on/off, or thresholds such as 0.8,1.0",
            )
            action.add_argument(
                "--replace",
                action="store_true",
                help="the rules given are all this level sets (the others are inherited)",
            )

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
        help="keep keys in this Redis (default: KEYSTILE_REDIS_URL, else in memory), "
        "under KEYSTILE_NAMESPACE as apps and the key commands do",
    )
    return parser
