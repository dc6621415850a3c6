"""keystile's Redis layer: the key schema (:mod:`keystile.redis.schema`)."""

from __future__ import annotations

from keystile.redis.schema import NAMES, Name, RedisSchema

__all__ = ["NAMES", "Name", "RedisSchema"]
