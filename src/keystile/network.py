"""Network rules: IP allowlist entries and the client's address.

Entries are single addresses or CIDR networks, IPv4 or IPv6. IPv4-mapped IPv6
(``::ffff:10.0.0.1``) is normalised to IPv4 so one rule covers both spellings.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from starlette.types import Scope

__all__ = [
    "ClientAddress",
    "IPAddress",
    "IPNetwork",
    "allowed",
    "budget_address",
    "normalize_ip_entry",
    "parse_address",
    "parse_ip_entry",
    "single_header",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_ip_entry(text: str) -> IPNetwork:
    """Parse one allowlist entry; ``ValueError`` with a clear message when malformed."""
    if not isinstance(text, str) or not text or len(text) > 64 or not text.isascii():
        raise ValueError(f"{text!r} is not an IP address or CIDR network")
    try:
        network = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        if "has host bits set" in str(exc):
            fixed = ipaddress.ip_network(text.strip(), strict=False)
            raise ValueError(f"{text!r} has host bits set; did you mean {fixed}?") from None
        raise ValueError(f"{text!r} is not an IP address or CIDR network") from None
    if isinstance(network, ipaddress.IPv6Network):
        mapped = network.network_address.ipv4_mapped
        if mapped is not None and network.prefixlen >= 96:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def normalize_ip_entry(text: str) -> str:
    """The canonical spelling of an allowlist entry: ``10.0.0.1`` or ``10.0.0.0/8``."""
    network = parse_ip_entry(text)
    if network.num_addresses == 1:
        return str(network.network_address)
    return str(network)


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_LONGEST = 80  # parse_address refuses a text longer than 64 once stripped


def parse_address(text: str) -> IPAddress | None:
    """One address as a client or proxy hop gives it (``10.0.0.1``, ``::1``,
    ``[2001:db8::1]:443``, ``10.0.0.1:8080``); IPv4-mapped IPv6 becomes IPv4. ``None``
    for anything else."""
    text = text.strip()
    if not text or len(text) > 64 or not text.isascii():
        return None
    port: str | None = None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        text, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                return None
            port = rest[1:]
    elif text.count(":") == 1:  # IPv4 with a port
        text, _, port = text.partition(":")
    if port is not None and not (port.isdigit() and int(port) < 65536):
        return None  # an empty or malformed port makes the whole hop malformed
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class ClientAddress:
    """Where a request comes from.

    The ASGI ``client`` — unless that peer is one of ``trusted_proxies``: then
    ``X-Forwarded-For`` is read from the right, skipping trusted hops, and the first
    untrusted hop is the client. Nothing is taken from ``X-Forwarded-For`` by default, and a
    malformed hop ends the walk with no address (so no allowlist admits it).

    Mind the server in front: uvicorn rewrites the ASGI ``client`` from
    ``X-Forwarded-For`` for peers in its ``--forwarded-allow-ips`` (127.0.0.1 by default)
    unless started with ``--no-proxy-headers``; do that, and list the proxies here.
    """

    #: Address texts (peers', proxy hops') whose reading is remembered, at most: a request
    #: from an address seen lately costs a dict lookup, not a parse (~2 µs).
    max_remembered = 10_000

    def __init__(self, trusted_proxies: Iterable[str] = ()) -> None:
        self.trusted = tuple(parse_ip_entry(p) for p in trusted_proxies)
        # address text -> (the address, its budget name); None: not an address
        self._read: dict[str, tuple[IPAddress, str] | None] = {}

    def _reading(self, text: str) -> tuple[IPAddress, str] | None:
        read = self._read
        if text in read:
            return read[text]
        address = parse_address(text)
        found = None if address is None else (address, budget_address(address))
        if len(text) <= _LONGEST:  # a longer text is never an address: no place for it
            if len(read) >= self.max_remembered:  # bounded: start again
                read.clear()
            read[text] = found
        return found

    def _trusted(self, address: IPAddress) -> bool:
        return any(address in network for network in self.trusted)

    def __call__(self, scope: Scope) -> IPAddress | None:
        found = self.read(scope)
        return None if found is None else found[0]

    def read(self, scope: Scope) -> tuple[IPAddress, str] | None:
        """The client's address and the name its per-address budget goes by
        (:func:`budget_address`); ``None`` when there is no address to go by."""
        client = scope.get("client")
        peer = self._reading(str(client[0])) if client else None
        if peer is None or not self.trusted or not self._trusted(peer[0]):
            return peer
        hops: list[str] = []
        for name, value in scope["headers"]:
            if name == b"x-forwarded-for":
                hops.extend(value.decode("latin-1").split(","))
        address = peer
        for hop in reversed(hops):
            parsed = self._reading(hop.strip())
            if parsed is None:
                return None
            address = parsed
            if not self._trusted(address[0]):
                return address
        return address  # every hop was a trusted proxy: the leftmost one is the client


def allowed(address: IPAddress | None, networks: Iterable[IPNetwork]) -> bool:
    """Whether ``address`` is in one of ``networks`` (an unknown address never is)."""
    return address is not None and any(address in network for network in networks)


# An IPv6 host is usually given a whole /64: counting its addresses one by one would let one
# client spend a per-address budget 2**64 times.
IPV6_BUDGET_PREFIX = 64


def budget_address(address: IPAddress) -> str:
    """The name under which ``address`` shares a per-address budget: the IPv4 address
    itself, or the IPv6 /64 it belongs to (``2001:db8:1:2::/64``)."""
    if isinstance(address, ipaddress.IPv4Address):
        return str(address)
    return str(ipaddress.IPv6Network((address, IPV6_BUDGET_PREFIX), strict=False))


def single_header(scope: Scope, name: bytes) -> bytes | None:
    """The value of a header sent once; ``None`` if absent or repeated (ambiguous)."""
    found = None
    for key, value in scope["headers"]:
        if key == name:
            if found is not None:
                return None
            found = value
    return found
