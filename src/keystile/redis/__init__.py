"""keystile's Redis layer: the key schema (:mod:`keystile.redis.schema`) and the rate
limiter's lean connection (:mod:`keystile.redis.lean`)."""

from __future__ import annotations

from keystile.redis.schema import NAMES, Name, RedisSchema

__all__ = ["NAMES", "Name", "RedisSchema"]
