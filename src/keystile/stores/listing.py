"""The listing index: which keys a filtered listing reads, without reading the others.

Every store keeps, per project and per key type (and once more over every project), the
ids of its keys by status, in id order (ids sort in creation order): ``active``,
``rotated``, ``revoked`` and ``expired``. A key's stored state (active, rotated or revoked)
is set when its record is written; whether its expiry has passed depends on the clock, so
the keys that have an expiry are also held by that expiry (``ends-*`` while live,
``gone-*`` once expired), and a listing first *settles* them: it moves the keys whose
expiry has passed by the caller's clock to ``expired`` (and back, for a clock that went
back). Each key moves once, so settling costs what expired since the last listing, and a
page of ``n`` reads about ``n`` ids per set it merges (at most 12: 3 types x 4 statuses).

The index only narrows the reading: every record read is checked against the filters
(:func:`matches`), so an entry the index holds wrongly (a crash between a record's write
and its index's, on a Redis Cluster where they live in different slots) is never listed
under the wrong status; an entry whose record is gone is taken out.
"""

from __future__ import annotations

import bisect
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta

from keystile.models import ApiKey
from keystile.records import KeyStatus, key_status

__all__ = [
    "PARTS",
    "SETTLE_BOUND",
    "MemoryListing",
    "matches",
    "micros",
    "positions",
    "select",
    "stored_state",
]

PARTS = (
    "active",
    "rotated",
    "revoked",
    "expired",
    "ends-active",
    "ends-rotated",
    "gone-active",
    "gone-rotated",
)
"""The sets of one key type in one project, in the order the Lua scripts number them."""

SETTLE_BOUND = 1000  # keys settled per set and call, so no one call holds Redis long

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_STATUS_PARTS = {
    KeyStatus.ACTIVE: (1,),
    KeyStatus.ROTATED: (2,),
    KeyStatus.REVOKED: (3,),
    KeyStatus.EXPIRED: (4,),
}


def micros(moment: datetime) -> int:
    """A time as whole microseconds since the epoch (exact in a Redis score)."""
    return (moment - _EPOCH) // timedelta(microseconds=1)


def stored_state(key: ApiKey) -> str:
    """What the record says, apart from the clock: ``revoked``, ``rotated`` or ``active``."""
    if key.revoked:
        return "revoked"
    return "rotated" if key.replaced_by is not None else "active"


def positions(status: KeyStatus | None) -> tuple[int, ...]:
    """The sets (1-based, in :data:`PARTS`) a listing of ``status`` reads."""
    return (1, 2, 3, 4) if status is None else _STATUS_PARTS[status]


def matches(
    key: ApiKey,
    *,
    now: datetime,
    project: str | None,
    key_type: str | None,
    status: KeyStatus | None,
) -> bool:
    """Whether ``key`` belongs in a listing with these filters at ``now``."""
    return (
        (project is None or key.project == project)
        and (key_type is None or key.type == key_type)
        and (status is None or key_status(key, now) is status)
    )


# A page of ids: (settling stopped at its bound, the ids after ``after`` in id order).
PageOfIds = Callable[[str | None, int], Awaitable[tuple[bool, list[str]]]]


async def select(
    page: PageOfIds,
    read: Callable[[list[str]], Awaitable[Sequence[ApiKey | None]]],
    prune: Callable[[list[str]], Awaitable[None]],
    keep: Callable[[ApiKey], bool],
    *,
    after: str | None,
    limit: int,
) -> list[ApiKey]:
    """Up to ``limit`` records the index lists after ``after`` that ``keep`` keeps:
    ids a page at a time from ``page``, records by ``read``; ids whose record is gone are
    handed to ``prune``."""
    found: list[ApiKey] = []
    while len(found) < limit:
        wanted = limit - len(found)
        unsettled, ids = await page(after, wanted)
        if unsettled:
            continue  # the settling goes on first (bounded per call)
        if not ids:
            break
        records = await read(ids)
        gone = [i for i, record in zip(ids, records, strict=True) if record is None]
        if gone:
            await prune(gone)
        found.extend(r for r in records if r is not None and keep(r))
        if len(ids) < wanted:
            break
        after = ids[-1]
    return found


class _Sorted:
    """A sorted set in process: members by (score, member)."""

    __slots__ = ("order", "scores")

    def __init__(self) -> None:
        self.scores: dict[str, int] = {}
        self.order: list[tuple[int, str]] = []

    def add(self, member: str, score: int = 0) -> None:
        self.discard(member)
        self.scores[member] = score
        bisect.insort(self.order, (score, member))

    def discard(self, member: str) -> None:
        score = self.scores.pop(member, None)
        if score is not None:
            del self.order[bisect.bisect_left(self.order, (score, member))]

    def after(self, member: str | None, count: int) -> list[str]:
        """Members of a set of score 0 after ``member``, in order."""
        start = 0 if member is None else bisect.bisect_right(self.order, (0, member))
        return [m for _, m in self.order[start : start + count]]

    def up_to(self, score: int, count: int) -> list[tuple[str, int]]:
        end = bisect.bisect_right(self.order, (score, "\U0010ffff"))
        return [(m, s) for s, m in self.order[: min(end, count)]]

    def above(self, score: int, count: int) -> list[tuple[str, int]]:
        start = bisect.bisect_right(self.order, (score, "\U0010ffff"))
        return [(m, s) for s, m in self.order[start : start + count]]

    def __len__(self) -> int:
        return len(self.scores)


class MemoryListing:
    """The listing index in process, for :class:`~keystile.stores.MemoryStore`: the sets
    and moves of the Redis scripts (``key_place.lua``, ``key_select.lua``)."""

    def __init__(self) -> None:
        self._sets: dict[tuple[str | None, str], list[_Sorted]] = {}

    def _block(self, project: str | None, key_type: str) -> list[_Sorted]:
        block = self._sets.get((project, key_type))
        if block is None:
            block = self._sets[project, key_type] = [_Sorted() for _ in PARTS]
        return block

    def place(self, key: ApiKey) -> None:
        """Index ``key`` as its record now stands (every write of a record calls this)."""
        state = stored_state(key)
        ends = None if key.expires_at is None or key.revoked else micros(key.expires_at)
        for project in (key.project, None):
            block = self._block(project, key.type)
            for part in block:
                part.discard(key.id)
            if state == "revoked":
                block[2].add(key.id)
            else:
                s = 0 if state == "active" else 1
                block[s].add(key.id)
                if ends is not None:
                    block[4 + s].add(key.id, ends)

    def sizes(self) -> dict[str, int]:
        """How many ids each set holds (for tests: the index never outgrows the records)."""
        return {
            f"{project or '*'}:{key_type}:{name}": len(part)
            for (project, key_type), block in self._sets.items()
            for name, part in zip(PARTS, block, strict=True)
        }

    def page(
        self,
        *,
        now: datetime | None,
        project: str | None,
        key_type: str | None,
        status: KeyStatus | None,
        after: str | None,
        count: int,
    ) -> list[str]:
        """Ids in id order after ``after``, settled at ``now`` (``None``: no status asked)."""
        if key_type is None:  # every type a key was ever indexed with
            blocks = [b for (p, _), b in self._sets.items() if p == project]
        else:
            blocks = [b for b in (self._sets.get((project, key_type)),) if b is not None]
        if now is not None:
            at = micros(now)
            for block in blocks:
                self._settle(block, at)
        ids = sorted(
            {i for b in blocks for p in positions(status) for i in b[p - 1].after(after, count)}
        )
        return ids[:count]

    @staticmethod
    def _settle(block: list[_Sorted], now: int) -> None:
        for s in (0, 1):
            live, ends, gone = block[s], block[4 + s], block[6 + s]
            for member, score in ends.up_to(now, len(ends)):
                ends.discard(member)
                gone.add(member, score)
                live.discard(member)
                block[3].add(member)
            for member, score in gone.above(now, len(gone)):
                gone.discard(member)
                ends.add(member, score)
                block[3].discard(member)
                live.add(member)
