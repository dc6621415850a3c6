"""What the management API answers with: a key's record as JSON, its status, a new key
and its secret, a page of keys, and the opaque cursor that continues a listing."""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from datetime import datetime
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
    "KeyPage",
    "KeyStatus",
    "RotatedKey",
    "decode_cursor",
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
    "created_at",
    "expires_at",
    "revoked_at",
    "replaces",
    "replaced_by",
)
"""A key record's JSON fields, in the documented order."""

_CURSOR_TAG = "k1:"
KEY_ID = re.compile(rf"{keys.KEY_ID_PREFIX}[0-9A-Za-z]{{1,60}}")


class KeyStatus(StrEnum):
    """Where a key stands: revocation wins over expiry."""

    ACTIVE = "active"
    REVOKED = "revoked"
    EXPIRED = "expired"


def key_status(key: ApiKey, now: datetime) -> KeyStatus:
    """The status of ``key`` at ``now``."""
    if key.revoked:
        return KeyStatus.REVOKED
    if key.expired(now):
        return KeyStatus.EXPIRED
    return KeyStatus.ACTIVE


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


def record_json(key: ApiKey) -> dict[str, Any]:
    """A key record as its documented JSON object: times ISO 8601 UTC, absent values null."""
    data = key.model_dump(mode="json")
    return {name: data[name] for name in RECORD_FIELDS}


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
