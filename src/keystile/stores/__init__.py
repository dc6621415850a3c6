"""Key stores: one protocol, an in-memory and a Redis implementation, and a cache."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

from keystile.settings import KeystileSettings
from keystile.stores.cache import CachedStore, CacheEntry
from keystile.stores.memory import MemoryStore
from keystile.stores.protocol import KeyStore, StoreListener
from keystile.stores.redis import RedisStore

__all__ = [
    "CacheEntry",
    "CachedStore",
    "KeyStore",
    "MemoryStore",
    "RedisStore",
    "StoreListener",
    "open_store",
]


def _memory(url: str, settings: KeystileSettings) -> KeyStore:
    return MemoryStore()


def _redis(url: str, settings: KeystileSettings) -> KeyStore:
    return RedisStore.from_url(
        url,
        namespace=settings.namespace,
        pool_size=settings.redis_pool_size,
        pool_timeout=settings.redis_pool_timeout,
        timeout=settings.redis_timeout,
    )


BACKENDS: dict[str, Callable[[str, KeystileSettings], KeyStore]] = {
    "memory": _memory,
    "redis": _redis,
    "rediss": _redis,
    "unix": _redis,
    "redis+sentinel": _redis,
    "rediss+sentinel": _redis,
    "redis+cluster": _redis,
    "rediss+cluster": _redis,
}


def open_store(url: str | None = None, settings: KeystileSettings | None = None) -> CachedStore:
    """The store a URL names (``memory://``, ``redis://…``, ``rediss://…``, ``unix://…``,
    ``redis+sentinel://…``, ``redis+cluster://…``; default: ``settings.redis_url``, else
    memory), behind the in-process cache."""
    settings = settings or KeystileSettings()
    url = url or settings.redis_url or "memory://"
    scheme = urlsplit(url).scheme
    try:
        backend = BACKENDS[scheme]
    except KeyError:
        known = ", ".join(f"{s}://" for s in BACKENDS)
        raise ValueError(f"unknown store URL scheme {scheme!r} (known: {known})") from None
    return CachedStore(
        backend(url, settings),
        max_size=settings.cache_size,
        ttl=settings.cache_ttl,
        announced_ttl=settings.cache_announced_ttl,
        negative_size=settings.negative_cache_size,
        negative_ttl=settings.negative_cache_ttl,
    )
