"""The audit trail: who did what to which key, when and from where — kept in the store.

Every management action — create, update (with each changed field, old → new), rotate,
revoke, a project renamed (``update_project``), alert rules set or cleared (``alert_rules``,
a project's or, with its ``key_id``, a key's) — and every refused attempt (a scope the
caller lacks, invalid settings, an id that does not exist, a key that cannot be rotated)
is one :class:`AuditEvent` naming its :class:`Actor`: the calling key (id and hint, and
the client address), the command line (the operating-system user and host), or Python
code. Events never hold a secret: records carry none, and refusals are described by
messages that never echo one.

On a Redis store the trail is one stream (``<ns>:audit``), trimmed to ``retention``
seconds and at most ``max_events`` entries as it is written; on the memory store, a bounded
list in this process. :meth:`AuditTrail.read` pages newest first, with filters.
"""

from __future__ import annotations

import getpass
import json
import math
import re
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict

from keystile.clock import Clock, system_clock, to_datetime
from keystile.models import ApiKey
from keystile.redis.connect import RedisClient
from keystile.redis.errors import translated
from keystile.redis.schema import RedisSchema

__all__ = [
    "Actor",
    "AuditEvent",
    "AuditPage",
    "AuditTrail",
    "MemoryAuditTrail",
    "RedisAuditTrail",
]

Action = Literal["create", "update", "rotate", "revoke", "update_project", "alert_rules"]
ACTIONS: tuple[Action, ...] = (
    "create",
    "update",
    "rotate",
    "revoke",
    "update_project",  # a project's name or description
    "alert_rules",  # a project's alert rules, or a key's overrides (with its key_id)
)
#: What a cursor looks like: a stream entry id (Redis) or a position (memory).
AUDIT_CURSOR = re.compile(r"[0-9]{1,20}(-[0-9]{1,20})?")
Outcome = Literal["ok", "refused"]
_SCAN_BUDGET = 10  # entries read per entry asked for, at most, when filters skip most


class Actor(BaseModel):
    """Who acted: a key (through the admin API), the command line, or Python code."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["key", "command line", "python"]
    key_id: str | None = None
    hint: str | None = None
    user: str | None = None
    host: str | None = None
    address: str | None = None  # the client address of the request

    @classmethod
    def python(cls) -> Actor:
        return cls(kind="python")

    @classmethod
    def command_line(cls) -> Actor:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):  # no name for this uid (a container)
            user = None
        return cls(kind="command line", user=user, host=socket.gethostname())

    @classmethod
    def of_key(cls, key: ApiKey, address: str | None = None) -> Actor:
        return cls(kind="key", key_id=key.id, hint=key.hint, address=address)

    def __str__(self) -> str:
        if self.kind == "key":
            return f"key {self.key_id} ({self.hint})"
        if self.kind == "command line":
            return f"{self.user or '?'}@{self.host or '?'} (command line)"
        return "python"


class AuditEvent(BaseModel):
    """One management action, or one refused attempt at one."""

    model_config = ConfigDict(frozen=True)

    id: str = ""  # assigned by the trail (its position; a paging cursor)
    at: datetime
    action: Action
    outcome: Outcome
    actor: Actor
    key_id: str | None = None
    project: str | None = None  # the key's project (or the caller's, for a refusal)
    changes: dict[str, list[Any]] = {}  # field -> [old, new]
    reason: str | None = None  # why it was refused


@dataclass(frozen=True, slots=True)
class AuditPage:
    events: list[AuditEvent]
    next: str | None  # the cursor of the next (older) page, if there may be one


Filter = Callable[[AuditEvent], bool]


def matcher(
    *,
    key_id: str | None = None,
    action: str | None = None,
    outcome: str | None = None,
    actor: str | None = None,
    project: str | None = None,
) -> Filter:
    """Events about ``key_id``, of ``action`` and ``outcome``, by ``actor`` (a key id, or
    ``"command line"`` / ``"python"``)."""

    def matches(event: AuditEvent) -> bool:
        by = event.actor.key_id if event.actor.kind == "key" else event.actor.kind
        return (
            (key_id is None or event.key_id == key_id)
            and (action is None or event.action == action)
            and (outcome is None or event.outcome == outcome)
            and (actor is None or by == actor)
            and (project is None or event.project == project)
        )

    return matches


class AuditTrail(Protocol):
    async def append(self, event: AuditEvent) -> None: ...

    async def read(
        self, matches: Filter, *, cursor: str | None = None, limit: int = 100
    ) -> AuditPage:
        """Events that ``matches``, newest first, from ``cursor`` (a previous page's
        ``next``) on."""


class MemoryAuditTrail:
    """The trail in this process: at most ``max_events``, none older than ``retention``."""

    def __init__(
        self,
        *,
        clock: Clock = system_clock,
        retention: float = 90 * 86_400,
        max_events: int = 100_000,
    ) -> None:
        self.clock = clock
        self.retention = retention
        self._events: deque[AuditEvent] = deque(maxlen=max_events)
        self._next = 0

    async def append(self, event: AuditEvent) -> None:
        self._next += 1
        self._events.append(event.model_copy(update={"id": str(self._next)}))
        oldest = to_datetime(self.clock() - self.retention)
        while self._events and self._events[0].at < oldest:
            self._events.popleft()

    async def read(
        self, matches: Filter, *, cursor: str | None = None, limit: int = 100
    ) -> AuditPage:
        before = int(cursor) if cursor and cursor.isdigit() else None
        found: list[AuditEvent] = []
        for event in reversed(self._events):
            if before is not None and int(event.id) >= before:
                continue
            if matches(event):
                found.append(event)
                if len(found) == limit:
                    return AuditPage(found, event.id)
        return AuditPage(found, None)


class RedisAuditTrail:
    """The trail as one Redis stream, trimmed as it is written."""

    def __init__(
        self,
        client: RedisClient,
        *,
        namespace: str = "keystile",
        clock: Clock = system_clock,
        retention: float = 90 * 86_400,
        max_events: int = 100_000,
    ) -> None:
        self.client = client
        self.name = RedisSchema(namespace).audit
        self.clock = clock
        self.retention = retention
        self.max_events = max_events

    @translated("writing the audit trail")
    async def append(self, event: AuditEvent) -> None:
        oldest = int((self.clock() - self.retention) * 1000)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.xadd(self.name, {"e": event.model_dump_json(exclude={"id"})})
            # Exact trims: each entry is removed once, so a write costs O(1), amortised.
            pipe.xtrim(self.name, minid=oldest, approximate=False)
            pipe.xtrim(self.name, maxlen=self.max_events, approximate=False)
            # Its newest event outlives the retention by nothing: neither does the stream.
            pipe.expire(self.name, max(1, math.ceil(self.retention)))
            await pipe.execute()

    @translated("reading the audit trail")
    async def read(
        self, matches: Filter, *, cursor: str | None = None, limit: int = 100
    ) -> AuditPage:
        found: list[AuditEvent] = []
        high = f"({cursor}" if cursor else "+"
        budget = max(limit * _SCAN_BUDGET, 100)
        while budget > 0:
            entries = await self.client.xrevrange(self.name, max=high, min="-", count=100)
            if not entries:
                return AuditPage(found, None)
            for raw_id, fields in entries:
                entry_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
                high = f"({entry_id}"
                budget -= 1
                raw: Any = (fields or {}).get(b"e") or (fields or {}).get("e") or "{}"
                data: dict[str, Any] = json.loads(raw)
                event = AuditEvent.model_validate({**data, "id": entry_id})
                if matches(event):
                    found.append(event)
                    if len(found) == limit:
                        return AuditPage(found, entry_id)
        # Scanned as far as one page may: the caller continues from here.
        return AuditPage(found, high[1:])
