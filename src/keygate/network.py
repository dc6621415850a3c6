"""Network rules: IP allowlist entries (SPEC §6).

Entries are single addresses or CIDR networks, IPv4 or IPv6. IPv4-mapped IPv6
(``::ffff:10.0.0.1``) is normalised to IPv4 so one rule covers both spellings.
"""

from __future__ import annotations

import ipaddress

__all__ = ["IPNetwork", "normalize_ip_entry", "parse_ip_entry"]

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
