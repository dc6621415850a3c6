"""The Lua scripts keystile runs in Redis, one file each under ``lua/``."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

__all__ = ["lua"]


@cache
def lua(name: str) -> str:
    """The source of ``lua/<name>.lua``."""
    return (files("keystile.redis") / "lua" / f"{name}.lua").read_text(encoding="utf-8")
