"""The one management API: create, get, list, revoke (and, as they land, update, rotate
and usage). The admin REST API and the command line are thin shells over this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import SecretStr

from keygate import keys
from keygate.clock import Clock, system_clock, to_datetime
from keygate.exceptions import KeyNotFound
from keygate.models import DEFAULT_POLICY, ApiKey, KeyPolicy, KeySettings
from keygate.stores.protocol import KeyStore

__all__ = ["CreatedKey", "KeyManager"]


@dataclass(frozen=True, slots=True)
class CreatedKey:
    """A new key's record and its secret, shown this once (``secret.get_secret_value()``).

    ``repr`` and ``str`` mask the secret.
    """

    key: ApiKey
    secret: SecretStr


class KeyManager:
    """Issue and manage keys in a store."""

    def __init__(
        self,
        store: KeyStore,
        hasher: keys.KeyHasher,
        *,
        policy: KeyPolicy = DEFAULT_POLICY,
        clock: Clock = system_clock,
    ) -> None:
        self.store = store
        self.hasher = hasher
        self.policy = policy
        self.clock = clock

    async def create(self, settings: KeySettings | Mapping[str, Any]) -> CreatedKey:
        """Validate ``settings``, issue a key, store its record; the secret is returned once."""
        now = self.clock()
        valid = self.policy.validate(settings, now=to_datetime(now))
        prefix = self.policy[valid.type].prefix
        token = keys.generate_key(prefix)
        record = ApiKey(
            id=keys.new_key_id(now),
            hint=keys.key_hint(token, prefix),
            created_at=to_datetime(now),
            **valid.model_dump(),
        )
        await self.store.add(record, self.hasher.digest(token))
        return CreatedKey(record, SecretStr(token))

    async def get(self, key_id: str) -> ApiKey:
        """The record with this id; :class:`KeyNotFound` when there is none."""
        record = await self.store.get(key_id)
        if record is None:
            raise KeyNotFound(f"no key with id {key_id}")
        return record

    async def list(self, *, after: str | None = None, limit: int = 100) -> list[ApiKey]:
        """Records in creation order, ``limit`` at a time after the id ``after``."""
        return await self.store.list_keys(after=after, limit=limit)

    async def revoke(self, key_id: str) -> ApiKey:
        """Revoke a key at once, everywhere. Revoking a revoked key changes nothing."""
        record = await self.get(key_id)
        if record.revoked:
            return record
        revoked = record.model_copy(update={"revoked_at": to_datetime(self.clock())})
        await self.store.replace(revoked)
        return revoked
