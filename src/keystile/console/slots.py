"""Secrets waiting for the one page that shows them: a new or rotated key's secret, kept
in this process's memory (bounded in number and time, tied to one session) between the
form's POST and the page the browser is redirected to, then forgotten."""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

from keystile.models import ApiKey

__all__ = ["SecretSlots", "Slot"]

SLOTS = 256
#: A project's share of :data:`SLOTS`: an admin making keys in a loop pushes out its own
#: project's oldest secret, never one another project's admin is about to be shown.
PROJECT_SLOTS = 16
SLOT_SECONDS = 600


@dataclass(slots=True)
class Slot:
    """A secret to show once: the session it is for, until when, and its key."""

    sid: str
    project: str
    until: float
    key_id: str
    name: str
    secret: str


class SecretSlots:
    """At most :data:`SLOTS` secrets (:data:`PROJECT_SLOTS` of one project's keys), each
    for :data:`SLOT_SECONDS`, each taken once."""

    def __init__(self) -> None:
        self._slots: OrderedDict[str, Slot] = OrderedDict()

    def __len__(self) -> int:
        return len(self._slots)

    def keep(self, sid: str, key: ApiKey, secret: str) -> str:
        """Keep ``secret`` for session ``sid``; the slot's id (for the page's URL). The
        project's oldest slot makes room when it has its share, else the oldest of all."""
        now = time.monotonic()
        for ident in [i for i, s in self._slots.items() if s.until <= now]:
            del self._slots[ident]
        own = [i for i, s in self._slots.items() if s.project == key.project]
        for ident in own[: max(len(own) - PROJECT_SLOTS + 1, 0)]:
            del self._slots[ident]
        while len(self._slots) >= SLOTS:
            self._slots.popitem(last=False)
        ident = secrets.token_urlsafe(16)
        self._slots[ident] = Slot(sid, key.project, now + SLOT_SECONDS, key.id, key.name, secret)
        return ident

    def take(self, ident: str, sid: str, *, keep: bool = False) -> Slot | None:
        """The slot, removed (left in place with ``keep``: a HEAD request shows nothing);
        ``None`` when there is none for this session (any more)."""
        slot = self._slots.get(ident)
        if slot is None or slot.sid != sid or slot.until <= time.monotonic():
            return None
        if not keep:
            del self._slots[ident]
        return slot
