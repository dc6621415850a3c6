"""Origins: parsing, normalising and matching.

Matching is on the parsed scheme, host and port, never on strings. An allowed-origin
entry is an exact origin (``https://app.example.com``, ``http://localhost:5173``) or a
wildcard over subdomains (``https://*.example.com``: any depth, never the apex itself).
Hosts are compared in lower case and in their ASCII (punycode) form; a default port is the
same as no port (``https://a.com`` is ``https://a.com:443``).

:class:`PatternIndex` answers "does any of these entries match?" for the union of every
key's entries in time that does not grow with their number; :func:`wildcard_public_suffix`
tells a wildcard over a public suffix (``https://*.co.uk``), which no key may hold.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import idna
from publicsuffixlist import PublicSuffixList

__all__ = [
    "Origin",
    "OriginPattern",
    "PatternIndex",
    "origin_allowed",
    "parse_origin",
    "parse_origin_pattern",
    "wildcard_public_suffix",
]

_MAX_ORIGIN_LENGTH = 2048
_SCHEME = re.compile(r"[a-z][a-z0-9+.\-]*\Z")
_HOST = re.compile(r"[a-z0-9](?:[a-z0-9\-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9\-]*[a-z0-9])?)*\Z")
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


@dataclass(frozen=True, slots=True)
class Origin:
    """A parsed origin: scheme, ASCII lower-case host, port (``None`` when unknown)."""

    scheme: str
    host: str
    port: int | None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.port is None or self.port == _DEFAULT_PORTS.get(self.scheme):
            return f"{self.scheme}://{host}"
        return f"{self.scheme}://{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class OriginPattern:
    """An allowed-origin entry: an exact origin, or any subdomain of ``origin.host``."""

    origin: Origin
    subdomains: bool = False

    def matches(self, origin: Origin) -> bool:
        want = self.origin
        if origin.scheme != want.scheme or origin.port != want.port:
            return False
        if not self.subdomains:
            return origin.host == want.host
        # An IP literal has no subdomains, whatever its text ends with.
        return origin.host.endswith("." + want.host) and not _is_ip(origin.host)

    def __str__(self) -> str:
        if not self.subdomains:
            return str(self.origin)
        text = str(self.origin)
        scheme, _, rest = text.partition("://")
        return f"{scheme}://*.{rest}"


def _is_ip(host: str) -> bool:
    if ":" not in host and not host[-1:].isdigit():
        return False  # neither IPv6 nor dotted IPv4: spares ipaddress's two exceptions
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _split(text: str, *, pattern: bool) -> tuple[Origin, bool]:
    if len(text) > _MAX_ORIGIN_LENGTH:
        raise ValueError("the origin is too long")
    if text.strip() != text or not text:
        raise ValueError(f"{text!r} has surrounding whitespace or is empty")
    if text == "null":
        raise ValueError("the 'null' origin never matches anything")
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep or not _SCHEME.match(scheme):
        raise ValueError(f"{text!r} is not an origin: it needs a scheme, as in https://host")
    if any(c in rest for c in "/?#\\"):
        if rest.endswith("/") and not any(c in rest[:-1] for c in "/?#\\"):
            raise ValueError(f"{text!r} has a trailing '/': an origin has no path")
        raise ValueError(f"{text!r} has a path, query or fragment: an origin has none")
    if "@" in rest:
        raise ValueError(f"{text!r} has user information: an origin has none")
    port_text = ""
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0:
            raise ValueError(f"{text!r} has an unclosed IPv6 bracket")
        host, after = rest[1:end], rest[end + 1 :]
        if after and not after.startswith(":"):
            raise ValueError(f"{text!r} has text after its IPv6 address")
        port_text = after[1:]
        try:
            host = ipaddress.IPv6Address(host).compressed
        except ValueError:
            raise ValueError(f"{text!r} has an invalid IPv6 address") from None
        wildcard = False
    else:
        host, colon, port_text = rest.partition(":")
        if colon and not port_text:
            raise ValueError(f"{text!r} has an empty port")
        host = host.lower()
        wildcard = host.startswith("*.")
        if wildcard:
            if not pattern:
                raise ValueError(f"{text!r}: a wildcard is not an origin")
            host = host[2:]
        if host.endswith("."):
            raise ValueError(f"{text!r} has a trailing dot in its host")
        if not host.isascii():
            try:
                # UTS #46, non-transitional: what browsers send ("faß.de" is not "fass.de").
                host = idna.encode(host, uts46=True, transitional=False).decode("ascii")
            except (idna.IDNAError, UnicodeError):
                raise ValueError(f"{text!r} has an invalid internationalised host") from None
        if not _HOST.match(host) or any(len(label) > 63 for label in host.split(".")):
            raise ValueError(f"{text!r} has an invalid host")
        if wildcard and ("." not in host and host != "localhost"):
            raise ValueError(
                f"{text!r}: a wildcard must cover a registrable domain, not all of {host!r}"
            )
        if wildcard and host.rsplit(".", 1)[-1].isdigit():
            raise ValueError(f"{text!r}: a wildcard covers domain names, not IP addresses")
    if port_text:
        if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
            raise ValueError(f"{text!r} has an invalid port")
        port: int | None = int(port_text)
    else:
        port = _DEFAULT_PORTS.get(scheme)
    return Origin(scheme, host, port), wildcard


def parse_origin(text: str | bytes) -> Origin | None:
    """Parse an ``Origin`` request header; ``None`` for anything that is not an origin.

    Browsers send ASCII, lower-case serialisations; a host in any other form is still
    compared case-insensitively, but an opaque ``null``, non-ASCII bytes, a trailing dot, a
    path or user information never match.
    """
    if isinstance(text, bytes):
        if len(text) > _MAX_ORIGIN_LENGTH or not text.isascii():
            return None
        text = text.decode("ascii")
    elif not text.isascii():
        return None
    try:
        origin, _ = _split(text, pattern=False)
    except ValueError:
        return None
    return origin


def parse_origin_pattern(text: str) -> OriginPattern:
    """Parse an allowed-origin entry; ``ValueError`` with a clear message when malformed."""
    if not isinstance(text, str):
        raise ValueError("an origin must be a string")
    origin, wildcard = _split(text, pattern=True)
    return OriginPattern(origin, wildcard)


def origin_allowed(origin: Origin, patterns: Iterable[OriginPattern]) -> bool:
    """Whether any of ``patterns`` matches ``origin``."""
    return any(p.matches(origin) for p in patterns)


def wildcard_public_suffix(pattern: OriginPattern) -> str | None:
    """The public suffix a wildcard entry covers whole (``co.uk`` for ``https://*.co.uk``,
    ``vercel.app`` for ``https://*.vercel.app``), or ``None``: anyone can register a site
    under a public suffix, so such a wildcard allows strangers' sites. Judged by the Public
    Suffix List, its private section included; ``*.localhost`` stays allowed (loopback)."""
    host = pattern.origin.host
    if not pattern.subdomains or host == "localhost" or _is_ip(host):
        return None
    return host if _public_suffix_list().is_public(host) else None


@functools.cache
def _public_suffix_list() -> PublicSuffixList:
    # The copy the package ships (no network); parsed once, on first use (~80 ms).
    return PublicSuffixList()


class _Holders:
    """How many entries hold one pattern, by expiry, and the latest of those expiries."""

    __slots__ = ("counts", "latest")

    def __init__(self) -> None:
        self.counts: dict[float, int] = {}
        self.latest = -math.inf

    def add(self, until: float) -> None:
        self.counts[until] = self.counts.get(until, 0) + 1
        if until > self.latest:
            self.latest = until

    def discard(self, until: float) -> bool:
        """Drop one holder that expires at ``until``; whether any holder is left."""
        left = self.counts[until] - 1
        if left:
            self.counts[until] = left
            return True
        del self.counts[until]
        if until == self.latest:
            self.latest = max(self.counts, default=-math.inf)
        return bool(self.counts)


_Key = tuple[str, str, int | None]  # scheme, host, port


class PatternIndex:
    """A multiset of allowed-origin entries, each held until a time (``math.inf``: for
    ever), answering :meth:`matches` like :func:`origin_allowed` over the entries still
    held, at a cost that does not grow with their number.

    Exact entries are a dict keyed by (scheme, host, port). A wildcard lives under the
    (scheme, host, port) of its base (``https://*.example.com`` under ``("https",
    "example.com", 443)``): a lookup probes the origin's host's last label, its last two
    and so on — as many probes as the deepest base has labels, never more. Each entry
    counts its holders by expiry, so :meth:`discard` undoes :meth:`add` exactly.
    """

    __slots__ = ("_depth", "_depths", "_exact", "_wild")

    def __init__(self, entries: Iterable[tuple[OriginPattern, float]] = ()) -> None:
        self._exact: dict[_Key, _Holders] = {}
        self._wild: dict[_Key, _Holders] = {}
        self._depths: dict[int, int] = {}  # labels of a wildcard base -> how many bases
        self._depth = 0
        for pattern, until in entries:
            self.add(pattern, until)

    def add(self, pattern: OriginPattern, until: float = math.inf) -> None:
        """Hold ``pattern`` once more, until ``until``."""
        want = pattern.origin
        key = (want.scheme, want.host, want.port)
        table = self._wild if pattern.subdomains else self._exact
        holders = table.get(key)
        if holders is None:
            holders = table[key] = _Holders()
            if pattern.subdomains:
                labels = want.host.count(".") + 1
                self._depths[labels] = self._depths.get(labels, 0) + 1
                self._depth = max(self._depth, labels)
        holders.add(until)

    def discard(self, pattern: OriginPattern, until: float = math.inf) -> None:
        """Undo one :meth:`add` of ``pattern`` with the same ``until``; ``KeyError`` when
        there was none."""
        want = pattern.origin
        key = (want.scheme, want.host, want.port)
        table = self._wild if pattern.subdomains else self._exact
        if table[key].discard(until):
            return
        del table[key]
        if pattern.subdomains:
            labels = want.host.count(".") + 1
            if self._depths[labels] > 1:
                self._depths[labels] -= 1
            else:
                del self._depths[labels]
                self._depth = max(self._depths, default=0)

    def matches(self, origin: Origin, now: float = -math.inf) -> bool:
        """Whether an entry held past ``now`` matches ``origin``."""
        scheme, host, port = origin.scheme, origin.host, origin.port
        holders = self._exact.get((scheme, host, port))
        if holders is not None and holders.latest > now:
            return True
        wild = self._wild
        end = len(host)
        for _ in range(self._depth):
            # The host's last label, then its last two, ...: each has a label before it,
            # so the origin is a proper subdomain of every base probed.
            end = host.rfind(".", 0, end)
            if end < 0:
                return False
            holders = wild.get((scheme, host[end + 1 :], port))
            if holders is not None and holders.latest > now:
                # An IP literal has no subdomains, whatever its text ends with.
                return not _is_ip(host)
        return False
