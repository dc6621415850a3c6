"""How a script's bulky arguments travel: MessagePack where the server's Lua unpacks it
(Redis and Valkey ship ``cmsgpack``), JSON where it does not (fakeredis).

A usage flush sends every row's values to its script. JSON made them text, digit by digit
(a float's shortest repr alone cost a third of a microsecond), and the script parsed the
text back; MessagePack sends a number as its bytes and costs a quarter as much to make.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import msgpack

from keystile.redis.connect import RedisClient

__all__ = ["Pack", "packer", "to_json"]

Pack = Callable[[Any], str | bytes]

# JSON by the C encoder (no check for cycles: what a flush sends has none).
to_json: Pack = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode

# What a flush sends, each kind once: a long text, a time, a missing value, a large count,
# a map. The script hands back what it unpacked, as text (0 when its Lua has no cmsgpack).
_SAMPLE = ["k" * 40, 1764880000.123456, None, 2**40 + 1, {"203.0.113.7": 3}]
_PROBE = """
if type(cmsgpack) ~= 'table' then return 0 end
local v = cmsgpack.unpack(ARGV[1])
return {v[1], string.format('%.17g', v[2]), tostring(v[3]), string.format('%.0f', v[4]),
        tostring(v[5]['203.0.113.7'])}
"""
_UNPACKED = ["k" * 40, "1764880000.123456", "nil", str(2**40 + 1), "3"]


async def packer(client: RedisClient) -> Pack:
    """MessagePack's if the server behind ``client`` unpacks a sample of what is sent just
    as it was packed, else JSON's. An error (the server unreachable, busy, failing over)
    is raised: the next write asks again."""
    reply = await client.eval(_PROBE, 0, msgpack.packb(_SAMPLE))
    if not isinstance(reply, list):  # no cmsgpack: fakeredis
        return to_json
    unpacked = [part.decode() if isinstance(part, bytes) else str(part) for part in reply]
    pack: Pack = msgpack.packb
    return pack if unpacked == _UNPACKED else to_json
