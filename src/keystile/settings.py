"""Configuration from keyword arguments and the environment (``KEYSTILE_`` prefix).

Example::

    KEYSTILE_REDIS_URL=redis://127.0.0.1:6379/0
    KEYSTILE_SECRET=...  # python -c "import secrets; print(secrets.token_urlsafe(32))"
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["KeystileSettings"]


class KeystileSettings(BaseSettings):
    """Every knob keystile reads from the environment."""

    model_config = SettingsConfigDict(env_prefix="KEYSTILE_", extra="ignore", frozen=True)

    redis_url: str | None = Field(
        default=None,
        description="Redis URL (redis://, rediss://, unix://, redis+sentinel://); unset means "
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
