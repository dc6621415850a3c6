"""What the management API answers with: a key's record as JSON, its status and last use,
a new key and its secret, a page of keys, and the opaque cursor that continues a listing."""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import SecretStr

from keystile import keys
from keystile.exceptions import KeyValidationError
from keystile.models import ApiKey

__all__ = [
    "KEY_ID",
    "RECORD_FIELDS",
    "CreatedKey",
    "KeyInfo",
    "KeyPage",
    "KeyStatus",
    "RotatedKey",
    "decode_cursor",
    "describe",
    "encode_cursor",
    "key_status",
    "record_json",
]

RECORD_FIELDS = (
    "id",
    "name",
    "type",
    "hint",
    "scopes",
    "allowed_origins",
    "allowed_ips",
    "rate_limit",
    "address_rate_limit",
    "token_quota",
    "metadata",
    "project",
    "created_at",
    "expires_at",
    "revoked_at",
    "replaces",
    "replaced_by",
    "status",
    "last_used_at",
)
"""A key record's JSON fields, in the documented order: what is stored, then ``status``
(computed from the record and the clock) and ``last_used_at`` (from the usage counts)."""

_CURSOR_TAG = "k1:"
KEY_ID = re.compile(rf"{keys.KEY_ID_PREFIX}[0-9A-Za-z]{{1,60}}")


class KeyStatus(StrEnum):
    """Where a key stands, computed from its record and the clock: ``revoked`` wins over
    ``expired``, which wins over ``rotated`` (a successor exists; the key is still accepted
    until the end of its grace period, then it is ``expired``); else ``active``."""

    ACTIVE = "active"
    REVOKED = "revoked"
    EXPIRED = "expired"
    ROTATED = "rotated"


def key_status(key: ApiKey, now: datetime) -> KeyStatus:
    """The status of ``key`` at ``now``."""
    if key.revoked:
        return KeyStatus.REVOKED
    if key.expired(now):
        return KeyStatus.EXPIRED
    if key.replaced_by is not None:
        return KeyStatus.ROTATED
    return KeyStatus.ACTIVE


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """A key's record with what is not stored in it: its ``status`` now, and when it was
    last used (``last_used_at``: the last request it made, as of the last usage flush;
    ``None`` when none is recorded)."""

    key: ApiKey
    status: KeyStatus
    last_used_at: datetime | None = None

    def json(self) -> dict[str, Any]:
        """The record as its documented JSON object, ``status`` and ``last_used_at`` too."""
        return record_json(self.key, status=self.status, last_used_at=self.last_used_at)


@dataclass(frozen=True, slots=True)
class CreatedKey:
    """A new key's record and its secret, shown this once (``secret.get_secret_value()``).

    ``repr`` and ``str`` mask the secret.
    """

    key: ApiKey
    secret: SecretStr


@dataclass(frozen=True, slots=True)
class RotatedKey(CreatedKey):
    """The successor of a rotated key, its secret (shown this once), and the ``previous``
    record as it now stands: linked to the successor, expiring at the end of the grace."""

    previous: ApiKey


@dataclass(frozen=True, slots=True)
class KeyPage:
    """One page of a listing; ``next`` is the opaque cursor of the following page, or
    ``None`` when there is none."""

    keys: tuple[ApiKey, ...]
    next: str | None


_READS_AT_ONCE = 50  # concurrent usage reads while describing a page of keys


async def describe(
    records: Iterable[ApiKey],
    now: datetime,
    last_used: Callable[[str], Awaitable[datetime | None]],
) -> list[KeyInfo]:
    """Each record with its status at ``now`` and its last use (``last_used(key_id)``),
    reading at most :data:`_READS_AT_ONCE` last uses at a time."""
    keys: Sequence[ApiKey] = list(records)
    used: list[datetime | None] = []
    for start in range(0, len(keys), _READS_AT_ONCE):
        chunk = keys[start : start + _READS_AT_ONCE]
        used.extend(await asyncio.gather(*(last_used(k.id) for k in chunk)))
    return [KeyInfo(k, key_status(k, now), at) for k, at in zip(keys, used, strict=True)]


def record_json(
    key: ApiKey,
    *,
    status: KeyStatus | None = None,
    last_used_at: datetime | None = None,
) -> dict[str, Any]:
    """A key record as its documented JSON object: times ISO 8601 UTC, absent values null;
    ``status`` defaults to the key's status now."""
    data = key.model_dump(mode="json")
    data["status"] = (status or key_status(key, datetime.now(UTC))).value
    data["last_used_at"] = None if last_used_at is None else _iso(last_used_at)
    return {name: data[name] for name in RECORD_FIELDS}


def _iso(moment: datetime) -> str:
    """As the record's own times are written (pydantic's JSON form)."""
    text = moment.astimezone(UTC).isoformat()
    return text.removesuffix("+00:00") + "Z"


def encode_cursor(key_id: str) -> str:
    """The opaque cursor that resumes a listing after ``key_id``."""
    return base64.urlsafe_b64encode((_CURSOR_TAG + key_id).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """The key id a cursor resumes after; :class:`KeyValidationError` for anything that is
    not a cursor this module made."""
    problem = KeyValidationError.single("cursor", "not a cursor returned by a key listing")
    if not isinstance(cursor, str) or not 0 < len(cursor) <= 128 or not cursor.isascii():
        raise problem
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, ValueError):
        raise problem from None
    key_id = text.removeprefix(_CURSOR_TAG)
    if key_id == text or not KEY_ID.fullmatch(key_id):
        raise problem
    return key_id
