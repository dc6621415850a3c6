"""The Lua scripts keystile runs in Redis, one file each in ``keystile/redis/lua/``.

Each script's file opens with what it takes (``KEYS``, ``ARGV``) and what it returns; the
names it touches are in :mod:`keystile.redis.schema`.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

__all__ = ["lua"]


@cache
def lua(name: str) -> str:
    """The text of ``keystile/redis/lua/<name>.lua`` (read once)."""
    return (files("keystile.redis") / "lua" / f"{name}.lua").read_text(encoding="utf-8")
