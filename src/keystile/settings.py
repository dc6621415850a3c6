"""Configuration from keyword arguments and the environment (``KEYSTILE_`` prefix).

Every setting is a keyword argument of :class:`~keystile.gate.Keystile` (and of
:class:`KeystileSettings`) and an environment variable; a keyword argument wins::

    KEYSTILE_REDIS_URL=redis://127.0.0.1:6379/0
    KEYSTILE_SECRET=...  # python -c "import secrets; print(secrets.token_urlsafe(32))"

A value a setting cannot take raises :class:`~keystile.exceptions.ConfigurationError`, one
line naming the variable (or keyword) and what it allows. A ``KEYSTILE_*`` variable that is
no setting is logged as a warning naming the closest one (``KEYSTILE_CONFIG`` names the
configuration file, :mod:`keystile.config`; ``KEYSTILE_TEST_*`` belongs to the test suite;
both are left alone).
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Collection, Mapping
from typing import Any, Literal, TypedDict, get_args, get_origin

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, SettingsConfigDict

from keystile.exceptions import ConfigurationError
from keystile.logs import fields

__all__ = [
    "ENV_PREFIX",
    "KeystileSettings",
    "SettingsOptions",
    "settings_table",
    "unknown_variables",
]

logger = logging.getLogger("keystile")

ENV_PREFIX = "KEYSTILE_"
_OWN_PREFIXES = ("KEYSTILE_TEST_",)  # the test suite's switches, not settings
_MAX_WARNED = 100
_warned: set[str] = set()  # unknown variables already warned about (at most _MAX_WARNED)


class KeystileSettings(BaseSettings):
    """Every knob keystile reads from the environment."""

    model_config = SettingsConfigDict(env_prefix="KEYSTILE_", extra="ignore", frozen=True)

    redis_url: str | None = Field(
        default=None,
        description="Redis URL (redis://, rediss://, unix://, redis+sentinel://, "
        "redis+cluster://); unset means "
        "the in-memory store.",
    )
    secret: SecretStr | None = Field(
        default=None, description="Server secret keyed into every key digest (HMAC-SHA256)."
    )
    namespace: str = Field(default="keystile", description="Prefix of every Redis key name.")
    redis_timeout: float = Field(default=0.5, gt=0, description="Seconds per Redis command.")
    redis_pool_size: int = Field(default=50, ge=1, description="Redis connections at most.")
    redis_pool_timeout: float = Field(
        default=1.0, gt=0, description="Seconds to wait for a free pooled connection."
    )
    cache_size: int = Field(default=10_000, ge=1, description="Key records cached in process.")
    cache_ttl: float = Field(
        default=10.0,
        gt=0,
        description="Seconds a cached record lives while key-change announcements are not "
        "arriving (their connection is down): how stale a record may then be.",
    )
    cache_announced_ttl: float = Field(
        default=600.0,
        gt=0,
        description="Seconds a cached record lives while key-change announcements arrive "
        "(a change drops it at once); never less than cache_ttl.",
    )
    negative_cache_size: int = Field(default=10_000, ge=0, description="Unknown digests kept.")
    negative_cache_ttl: float = Field(
        default=2.0, ge=0, description="Seconds an unknown digest is remembered."
    )
    rate_limit_timeout: float = Field(
        default=0.25, gt=0, description="Seconds the rate limiter may wait for Redis."
    )
    usage_flush_interval: float = Field(
        default=1.0, gt=0, description="Seconds between usage flushes (one pipeline each)."
    )
    usage_max_buckets: int = Field(
        default=50_000, ge=1, description="Key-minutes the usage buffer holds at most."
    )
    # At most what one report reads back from Redis (2000 hours; 400 days, less a margin).
    usage_minute_retention: int = Field(
        default=86_400,
        ge=60,
        le=30 * 86_400,
        description="Seconds per-minute usage buckets are kept (30 days at most).",
    )
    usage_day_retention: int = Field(
        default=90 * 86_400,
        ge=86_400,
        le=366 * 86_400,
        description="Seconds per-day usage buckets are kept (366 days at most).",
    )
    usage_top_n: int = Field(
        default=100, ge=1, description="Busiest client IPs and origins kept per client key."
    )
    alert_webhook_url: str | None = Field(
        default=None, description="Where alerts are POSTed as JSON (optional)."
    )
    audit_retention: int = Field(
        default=90 * 86_400,
        ge=3600,
        description="Seconds audit-trail events are kept (90 days by default).",
    )
    audit_max_events: int = Field(
        default=100_000, ge=100, description="Audit-trail events kept at most."
    )
    alert_webhook_secret: SecretStr | None = Field(
        default=None,
        description="Signs alert webhooks (Standard Webhooks): whsec_ + base64 of 16+ bytes.",
    )
    rate_limit_failure: Literal["allow", "deny"] = Field(
        default="allow",
        description="When the limiter cannot decide: admit (and count, and log) or refuse.",
    )
    rate_limit_trip_after: int = Field(
        default=3,
        ge=1,
        description="Failed rate-limit (or quota) decisions in a row before backing off.",
    )
    rate_limit_backoff: float = Field(
        default=0.05, gt=0, description="Seconds of the first back-off from a failing Redis."
    )
    rate_limit_backoff_max: float = Field(
        default=1.0, gt=0, description="Seconds the back-off doubles up to."
    )

    def __init__(self, **values: Any) -> None:
        """Read the environment, with ``values`` (keyword arguments) taking precedence;
        ``TypeError`` naming the closest setting for a keyword that is none."""
        fields = type(self).model_fields
        for name in values:
            if name not in fields and not name.startswith("_"):  # _env_file & co: pydantic's
                close = closest_setting(name, fields)
                hint = f"; did you mean {close!r}?" if close else ""
                raise TypeError(f"unknown setting {name!r}{hint}")
        warn_unknown_variables()
        try:
            super().__init__(**values)
        except ValidationError as exc:
            problems = [_problem(e, values) for e in exc.errors(include_url=False)]
            raise ConfigurationError("; ".join(problems)) from None

    @model_validator(mode="after")
    def _backoff_in_order(self) -> KeystileSettings:
        if self.rate_limit_backoff > self.rate_limit_backoff_max:
            raise ValueError("rate_limit_backoff must not exceed rate_limit_backoff_max")
        return self

    @property
    def fallback_options(self) -> dict[str, Any]:
        """The failure mode and back-off, as RedisLimiter and Quotas take them."""
        return {
            "failure": self.rate_limit_failure,
            "trip_after": self.rate_limit_trip_after,
            "backoff": (self.rate_limit_backoff, self.rate_limit_backoff_max),
        }


class SettingsOptions(TypedDict, total=False):
    """The settings as keyword arguments of :class:`~keystile.gate.Keystile` (typed, so
    that ``mypy`` catches a misspelt one); each is described on :class:`KeystileSettings`."""

    redis_url: str | None
    namespace: str
    redis_timeout: float
    redis_pool_size: int
    redis_pool_timeout: float
    cache_size: int
    cache_ttl: float
    cache_announced_ttl: float
    negative_cache_size: int
    negative_cache_ttl: float
    rate_limit_timeout: float
    usage_flush_interval: float
    usage_max_buckets: int
    usage_minute_retention: int
    usage_day_retention: int
    usage_top_n: int
    alert_webhook_url: str | None
    alert_webhook_secret: SecretStr | str | None
    audit_retention: int
    audit_max_events: int
    rate_limit_failure: Literal["allow", "deny"]
    rate_limit_trip_after: int
    rate_limit_backoff: float
    rate_limit_backoff_max: float


def settings_table() -> str:
    """Every setting as a Markdown table — keyword argument, environment variable, default,
    meaning — as the configuration page of the documentation shows it (a test keeps the two
    equal)."""
    lines = [
        "| keyword argument | environment variable | default | allowed | meaning |",
        "|---|---|---|---|---|",
    ]
    for name, field in KeystileSettings.model_fields.items():
        default = field.default
        if default is None:
            shown = "unset"
        elif isinstance(default, str):
            shown = f'`"{default}"`'
        else:
            shown = f"`{default:_}`" if isinstance(default, int) else f"`{default}`"
        meaning = (field.description or "").replace("|", "\\|")
        allowed = _allowed(field.annotation, field.metadata)
        lines.append(f"| `{name}` | `{env_name(name)}` | {shown} | {allowed} | {meaning} |")
    return "\n".join(lines) + "\n"


def _allowed(annotation: Any, metadata: list[Any]) -> str:
    """What a setting takes, in words: its literal values, or its type and bounds."""
    choices = get_args(annotation) if get_origin(annotation) is Literal else ()
    if choices:
        return " or ".join(f'`"{c}"`' for c in choices)
    kinds = [a for a in get_args(annotation) or (annotation,) if a is not type(None)]
    words = {int: "whole number", float: "number", str: "text", SecretStr: "text (secret)"}
    text = " or ".join(words.get(k, getattr(k, "__name__", str(k))) for k in kinds)
    for bound, sign in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤")):
        for item in metadata:
            value = getattr(item, bound, None)
            if value is not None:
                text += f" {sign} {value:_}" if isinstance(value, int) else f" {sign} {value}"
    return text


def env_name(field: str) -> str:
    """The environment variable of a setting: ``namespace`` -> ``KEYSTILE_NAMESPACE``."""
    return ENV_PREFIX + field.upper()


def closest_setting(name: str, candidates: Collection[str]) -> str | None:
    """The candidate ``name`` most likely misspells (difflib), or ``None``."""
    close = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=0.6)
    return close[0] if close else None


def unknown_variables(environ: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """The ``KEYSTILE_*`` variables of ``environ`` (default: the process's) that are no
    setting, each with the closest setting's variable (``None`` when none is close)."""
    environ = os.environ if environ is None else environ
    # KEYSTILE_CONFIG names the configuration file (keystile.config), not a setting.
    known = {env_name(name) for name in KeystileSettings.model_fields} | {"KEYSTILE_CONFIG"}
    found: dict[str, str | None] = {}
    for name in environ:
        upper = name.upper()  # the environment is read case-insensitively
        own = upper.startswith(_OWN_PREFIXES)
        if upper.startswith(ENV_PREFIX) and upper not in known and not own:
            found[name] = closest_setting(upper, known)
    return found


def warn_unknown_variables() -> None:
    """Log each unknown ``KEYSTILE_*`` variable once per process: a misspelt
    ``KEYSTILE_REDIS_URL`` would otherwise run the app on the memory store unnoticed."""
    for name, close in unknown_variables().items():
        if name in _warned or len(_warned) >= _MAX_WARNED:
            continue
        _warned.add(name)
        logger.warning(
            "the environment variable %s is not a keystile setting and is ignored%s",
            name,
            f": did you mean {close}?" if close else " (see keystile.KeystileSettings)",
            extra=fields("config.unknown_variable"),
        )


def _problem(error: ErrorDetails, given: Collection[str]) -> str:
    """One problem of a validation error, as ``KEYSTILE_X='value' is not valid: ...``."""
    message = error["msg"].removeprefix("Value error, ")
    if not error["loc"]:
        return f"the settings are not consistent: {message}"
    field = str(error["loc"][0])
    where = field if field in given else env_name(field)
    value = error.get("input")
    if field != "secret" and isinstance(value, str | int | float):
        text = repr(value)
        where += "=" + (text if len(text) <= 60 else text[:57] + "...")
    return f"{where} is not valid: {message}"
