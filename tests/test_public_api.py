"""The public surface: what keystile exports, and that no object shows a secret."""

from __future__ import annotations

import keystile
from keystile import KeyHasher, KeyManager
from keystile.stores import CachedStore


def test_all_is_sorted_and_complete() -> None:
    """__all__ is sorted, and every name in it exists."""
    assert keystile.__all__ == sorted(keystile.__all__)
    for name in keystile.__all__:
        assert hasattr(keystile, name), name


def test_every_error_derives_from_the_root() -> None:
    """Every exception keystile exports derives from KeystileError."""
    names = [n for n in keystile.__all__ if n.endswith(("Error", "Unavailable"))]
    errors = [getattr(keystile, n) for n in names if n != "FieldError"]
    errors += [keystile.KeyNotFound, keystile.KeyConflict]
    for error in errors:
        assert issubclass(error, keystile.KeystileError), error


async def test_no_repr_or_str_shows_the_secret(manager: KeyManager, cached: CachedStore) -> None:
    """The created-key result, its record, the cache entry and the hasher never show the key."""
    created = await manager.create({"name": "n", "type": "prod"})
    secret = created.secret.get_secret_value()
    entry = await cached.lookup(manager.hasher.digest(secret))
    shown = [
        repr(created),
        str(created),
        repr(created.key),
        str(created.key),
        created.key.model_dump_json(),
        repr(created.secret),
        str(created.secret),
        repr(entry),
        repr(cached),
        repr(manager.hasher),
        repr(KeyHasher(secret)),
    ]
    for text in shown:
        assert secret not in text
        assert secret[5:13] not in text
