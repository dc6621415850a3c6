"""The key format: generate, check and hash API keys.

A key is ``prefix + body + checksum`` (the GitHub token scheme):

- ``prefix`` names the key type, e.g. ``prod_``;
- ``body`` is 27 base62 characters drawn from :mod:`secrets` (62**27 > 2**160);
- ``checksum`` is the CRC32 of ``prefix + body``, as 6 base62 characters.

The checksum lets :func:`parse_key` refuse typos, truncations and look-alikes with pure
code, before any store is consulted. Stores only ever see :meth:`KeyHasher.digest`, an
HMAC-SHA256 of the key under the server secret.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
import zlib
from collections.abc import Container, Iterator

from keystile.exceptions import KeyFormatError

__all__ = [
    "BASE62",
    "BODY_LENGTH",
    "CHECKSUM_LENGTH",
    "KeyHasher",
    "checksum",
    "find_keys",
    "generate_key",
    "key_hint",
    "new_key_id",
    "parse_key",
    "redact_keys",
]

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
BODY_LENGTH = 27
CHECKSUM_LENGTH = 6
_TAIL_LENGTH = BODY_LENGTH + CHECKSUM_LENGTH
# The longest prefix we accept: anything longer is refused before it is even split.
MAX_PREFIX_LENGTH = 32
_MAX_TOKEN_LENGTH = MAX_PREFIX_LENGTH + _TAIL_LENGTH
KEY_ID_PREFIX = "key_"
_KEY_ID_TIME_LENGTH = 8  # milliseconds since the epoch: 62**8 ms is about 6,900 years
_KEY_ID_RANDOM_LENGTH = 12


def _random_base62(length: int) -> str:
    return "".join(secrets.choice(BASE62) for _ in range(length))


def _base62(value: int, width: int) -> str:
    digits = []
    for _ in range(width):
        value, rem = divmod(value, 62)
        digits.append(BASE62[rem])
    return "".join(reversed(digits))


# Two base62 digits at a time: the checksum is computed on every first sight of a key.
_PAIRS = [a + b for a in BASE62 for b in BASE62]


def checksum(text: str) -> str:
    """The 6-character base62 CRC32 of ``text`` (62**6 > 2**32, so no value is lost)."""
    value = zlib.crc32(text.encode("ascii"))
    high, rest = divmod(value, 3844**2)
    middle, low = divmod(rest, 3844)
    return _PAIRS[high] + _PAIRS[middle] + _PAIRS[low]


def generate_key(prefix: str) -> str:
    """A fresh key with ``prefix`` (e.g. ``"prod_"``): 160+ random bits and a checksum."""
    _check_prefix(prefix)
    head = prefix + _random_base62(BODY_LENGTH)
    return head + checksum(head)


def _check_prefix(prefix: str) -> None:
    name = prefix[:-1]
    if (
        not prefix.endswith("_")
        or not name
        or len(prefix) > MAX_PREFIX_LENGTH
        or not (name.isascii() and name.isalnum())
    ):
        raise ValueError(f"a key prefix is 1-31 ASCII letters or digits then '_', not {prefix!r}")


def parse_key(token: str, prefixes: Container[str]) -> str:
    """Check that ``token`` is a well-formed key with one of ``prefixes``; return its prefix.

    Raises :class:`KeyFormatError` (and nothing else) for any other input, whatever its
    type or content. The message never repeats the token.
    """
    if not isinstance(token, str):
        raise KeyFormatError("a key must be a string")
    if len(token) > _MAX_TOKEN_LENGTH:
        raise KeyFormatError("the key is too long")
    name, sep, tail = token.partition("_")
    if not sep:
        raise KeyFormatError("the key has no type prefix")
    prefix = name + sep
    if prefix not in prefixes:
        raise KeyFormatError("the key's prefix is not a known key type")
    if len(tail) != _TAIL_LENGTH:
        raise KeyFormatError("the key has the wrong length")
    # isalnum() alone would accept non-ASCII letters and digits.
    if not (tail.isascii() and tail.isalnum()):
        raise KeyFormatError("the key has characters outside base62")
    head = token[:-CHECKSUM_LENGTH]
    if not hmac.compare_digest(checksum(head), tail[BODY_LENGTH:]):
        raise KeyFormatError("the key's checksum does not match")
    return prefix


def key_hint(token: str, prefix: str) -> str:
    """The display hint: the prefix and the last 4 characters, e.g. ``prod_...x7Qa``."""
    return f"{prefix}...{token[-4:]}"


# Where a key may end: a "_" (the end of its prefix) and then its 33-character tail.
_TAIL_AFTER = re.compile(rf"_(?=[0-9A-Za-z]{{{_TAIL_LENGTH}}})")
# The prefix's name: the letters and digits right before the "_" (at most 31 of them).
_NAME_BEFORE = re.compile(rf"[0-9A-Za-z]{{1,{MAX_PREFIX_LENGTH - 1}}}\Z")


def find_keys(text: str) -> Iterator[tuple[int, int, str]]:
    """Where keys of any prefix are in ``text``: ``(start, end, prefix)`` of each run that
    is ``prefix + body + checksum`` with a checksum that holds, whatever is glued to it
    on either side (the checksum tells where a key starts in ``xprod_...``)."""
    end = 0
    for mark in _TAIL_AFTER.finditer(text):
        sep = mark.start()
        name = _NAME_BEFORE.search(text, max(end, sep - MAX_PREFIX_LENGTH + 1), sep)
        if name is None:
            continue
        tail = text[sep + 1 : sep + 1 + _TAIL_LENGTH]
        body, check = tail[:BODY_LENGTH], tail[BODY_LENGTH:]
        for start in range(name.start(), sep):
            if checksum(text[start:sep] + "_" + body) == check:
                end = sep + 1 + _TAIL_LENGTH
                yield start, end, text[start : sep + 1]
                break


def redact_keys(text: str) -> str:
    """``text`` with every key in it (see :func:`find_keys`) replaced by its display hint:
    for messages that echo what a caller typed, where a secret may have been pasted."""
    if "_" not in text:
        return text
    out, last = [], 0
    for start, end, prefix in find_keys(text):
        out.append(text[last:start])
        out.append(key_hint(text[start:end], prefix))
        last = end
    if not out:
        return text
    out.append(text[last:])
    return "".join(out)


def new_key_id(now: float | None = None) -> str:
    """A public key id, e.g. ``key_0Q2xY7kE3bT9aLmZpQ1w``, unrelated to the secret.

    It starts with the creation time in base62, so ids sort in creation order (which is
    what list pagination walks); 12 random characters (71 bits) follow.
    """
    millis = int((time.time() if now is None else now) * 1000)
    return (
        KEY_ID_PREFIX
        + _base62(millis, _KEY_ID_TIME_LENGTH)
        + _random_base62(_KEY_ID_RANDOM_LENGTH)
    )


class KeyHasher:
    """HMAC-SHA256 of keys under the server secret; the only digest stores ever see.

    RFC 2104 spelled out with precomputed inner and outer SHA-256 states (what
    :mod:`hmac` does, without its per-call Python wrappers). The secret is held privately
    and never shown by ``repr``.
    """

    __slots__ = ("_inner", "_outer")

    def __init__(self, secret: str | bytes) -> None:
        raw = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
        if len(raw) < 16:
            raise ValueError("the server secret must be at least 16 bytes long")
        block = hashlib.sha256().block_size
        if len(raw) > block:
            raw = hashlib.sha256(raw).digest()
        raw = raw.ljust(block, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in raw))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in raw))

    def digest(self, token: str) -> str:
        """The hex HMAC-SHA256 of ``token``."""
        inner = self._inner.copy()
        inner.update(token.encode("ascii"))
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest()

    def __repr__(self) -> str:
        return "KeyHasher(secret=<hidden>)"
