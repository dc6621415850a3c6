"""The per-minute totals a Redis usage flush hands to the alert rules, unpacked as read."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence

from keystile.usage.models import ERRORS_4XX, ERRORS_5XX, NFIELDS

__all__ = ["FlushTotals"]

_ZEROS = (0,) * NFIELDS
# A bucket of a reply with a counter after bytes out (the 4xx errors, or a later one).
_ERRORS_KEPT = re.compile("(?:^|;)" + "[^;,]*," * ERRORS_4XX)


class FlushTotals(Mapping[tuple[str, int], Sequence[int]]):
    """(key id, minute) -> the minute's counters after a flush, as the write script's
    replies give them (one per chunk of keys: each bucket's counters comma-separated, the
    buckets joined by ``;``). Kept as the replies' text: a rule that needs only the busy
    minutes (:meth:`at_least`) unpacks no others, and a flush of many keys hands on no
    object per key-minute; read as a mapping, it is unpacked whole, once. The recorder
    hands it so to the callbacks marked ``lazy_totals`` (the alert rules'), the others a
    plain dict (:meth:`whole`), as before."""

    __slots__ = ("_chunks", "_whole")

    def __init__(self) -> None:
        # Per script call: the key and minute of each bucket it wrote, and its reply.
        self._chunks: list[tuple[Sequence[str], Sequence[int], str]] = []
        self._whole: dict[tuple[str, int], Sequence[int]] | None = None

    def add(self, keys: Sequence[str], minutes: Sequence[int], reply: bytes | str) -> None:
        """A script call's reply; the key id and minute of each bucket it wrote."""
        self._chunks.append((keys, minutes, reply.decode() if isinstance(reply, bytes) else reply))
        self._whole = None

    def _parts(self) -> Iterator[Iterator[tuple[str, int, str]]]:
        """Per chunk: (key id, minute, packed counters) of each bucket."""
        for keys, minutes, reply in self._chunks:
            yield zip(keys, minutes, reply.split(";"), strict=True)

    def at_least(
        self, requests: float, failing: float = math.inf
    ) -> Iterator[list[tuple[tuple[str, int], Sequence[int]]]]:
        """Per chunk of the flush, the key-minutes with at least ``requests`` requests, or
        at least ``failing`` of which one failed (4xx or 5xx)."""
        for keys, minutes, reply in self._chunks:
            if requests == math.inf and _ERRORS_KEPT.search(reply) is None:
                # No bucket of the chunk counts past bytes out (so none failed), and no
                # request count is enough: nothing to pick out, found by C in one pass.
                yield []
                continue
            yield [
                ((key_id, minute), unpack(packed))
                for key_id, minute, packed in zip(keys, minutes, reply.split(";"), strict=True)
                if (n := int(packed.partition(",")[0] or 0)) >= requests
                or (n >= failing and packed.count(",") >= ERRORS_4XX and _failed(packed))
            ]

    def whole(self) -> dict[tuple[str, int], Sequence[int]]:
        """Every key-minute's totals, unpacked (once)."""
        if self._whole is None:
            self._whole = {
                (key_id, minute): unpack(packed)
                for part in self._parts()
                for key_id, minute, packed in part
            }
        return self._whole

    def __getitem__(self, bucket: tuple[str, int]) -> Sequence[int]:
        return self.whole()[bucket]

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return iter(self.whole())

    def __len__(self) -> int:
        return len(self.whole())

    def __repr__(self) -> str:
        return f"FlushTotals({self.whole()!r})"


def unpack(packed: str) -> tuple[int, ...]:
    """A minute's counters as the hour hash holds them: comma-separated, trailing zeros
    left out. A tuple of ints: the garbage collector stops tracking it at its next pass."""
    counts = tuple(map(int, packed.split(","))) if packed else ()
    if len(counts) < NFIELDS:
        counts += _ZEROS[len(counts) :]
    return counts


def _failed(packed: str) -> bool:
    """Whether packed counters count a 4xx or 5xx."""
    counts = unpack(packed)
    return bool(counts[ERRORS_4XX] or counts[ERRORS_5XX])
