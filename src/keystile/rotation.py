"""The rules of rotation: how long a grace may be, which keys can be rotated, and how a
rotated-out key's expiry may change (only earlier: else its secret comes back to life)."""

from __future__ import annotations

import math
from datetime import datetime, timedelta

from keystile.exceptions import FieldError, KeyValidationError, RotationRefused
from keystile.models import ApiKey

__all__ = ["DEFAULT_GRACE", "MAX_GRACE", "check_rotatable", "grace_seconds", "rotated_expiry"]

DEFAULT_GRACE = timedelta(hours=24)
"""How long a rotated key keeps working by default."""
MAX_GRACE = timedelta(days=365)
"""The longest grace a rotation may give the old key."""


def grace_seconds(grace: timedelta | float) -> float:
    if isinstance(grace, bool) or not isinstance(grace, timedelta | int | float):
        raise KeyValidationError.single("grace", "must be a duration or a number of seconds")
    try:
        seconds = grace.total_seconds() if isinstance(grace, timedelta) else float(grace)
    except OverflowError:  # an int past any float
        seconds = math.inf if grace > 0 else -math.inf  # type: ignore[operator]
    if math.isnan(seconds) or seconds < 0:
        raise KeyValidationError.single("grace", "must be zero or more seconds")
    if seconds > MAX_GRACE.total_seconds():
        raise KeyValidationError.single(
            "grace", f"must be at most {MAX_GRACE.days} days ({int(MAX_GRACE.total_seconds())} s)"
        )
    return seconds


def check_rotatable(key: ApiKey, moment: datetime) -> None:
    """:class:`RotationRefused` unless ``key`` can be rotated at ``moment``."""
    if key.revoked:
        raise RotationRefused(
            "revoked", f"key {key.id} is revoked and cannot be rotated; create a new key instead"
        )
    if key.replaced_by is not None:
        raise RotationRefused(
            "rotated",
            f"key {key.id} was already rotated: its successor is {key.replaced_by}; "
            "rotate that key instead",
        )
    if key.expired(moment):
        raise RotationRefused(
            "expired",
            f"key {key.id} has expired and cannot be rotated; create a new key, or "
            "extend its expiry first",
        )


def rotated_expiry(record: ApiKey, updated: ApiKey) -> list[FieldError]:
    """The problem with ``updated``'s expiry when ``record`` was rotated out: its expiry
    may only move earlier, or the old key (and its secret) would come back to life."""
    ends = record.expires_at
    if record.replaced_by is None or ends is None:
        return []
    if updated.expires_at is not None and updated.expires_at <= ends:
        return []
    return [
        FieldError(
            "expires_at",
            f"key {record.id} was rotated to {record.replaced_by}: its expiry can only move "
            f"earlier than {ends.isoformat()}, not later or away",
        )
    ]
