"""How usage counts the client addresses a key's requests come from, by key type.

A leaf module: :mod:`keystile.principal` decides a key's mode once, and the usage
recorder reads it on every request, without either importing the other.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["BY_CLIENT", "WATCH_IPS", "AddressMode"]


class AddressMode(IntEnum):
    """What usage does with the address (and origin) of each request a key makes."""

    IGNORE = 0  # nothing (development keys)
    BY_CLIENT = 1  # count requests by IP and by origin (client keys)
    WATCH_IPS = 2  # note the addresses used, for the new-IP alert (production keys)


# The names usage has always exported, for ``record(ip_mode=...)``.
BY_CLIENT = AddressMode.BY_CLIENT
WATCH_IPS = AddressMode.WATCH_IPS
