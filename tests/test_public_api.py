"""The public surface: what keygate exports, and that no object shows a secret."""

from __future__ import annotations

import keygate
from keygate import KeyHasher, KeyManager
from keygate.stores import CachedStore


def test_all_is_sorted_and_complete() -> None:
    """__all__ is sorted, and every name in it exists."""
    assert keygate.__all__ == sorted(keygate.__all__)
    for name in keygate.__all__:
        assert hasattr(keygate, name), name


def test_every_error_derives_from_the_root() -> None:
    """Every exception keygate exports derives from KeyGateError."""
    names = [n for n in keygate.__all__ if n.endswith(("Error", "Unavailable"))]
    errors = [getattr(keygate, n) for n in names if n != "FieldError"]
    errors += [keygate.KeyNotFound, keygate.KeyConflict]
    for error in errors:
        assert issubclass(error, keygate.KeyGateError), error


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
