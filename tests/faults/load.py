"""Keys made in bulk, and a bounded load generator over raw ASGI."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from faults.asgi import App, Outcome, bearer, call
from keystile import KeyHasher, KeyManager, RedisStore
from keystile.stores import CachedStore


@dataclass(frozen=True)
class Key:
    """A key a test made: its secret and its public id."""

    secret: str
    id: str


async def make_keys(
    url: str, namespace: str, secret: str, settings: dict[str, Any], count: int
) -> list[Key]:
    """``count`` keys with ``settings``, made through a manager of their own, so that no
    gate under test has looked any of them up."""
    store = CachedStore(RedisStore.from_url(url, namespace=namespace, timeout=5.0))
    manager = KeyManager(store, KeyHasher(secret))
    made: list[Key] = []
    try:
        for start in range(0, count, 100):
            batch = await asyncio.gather(
                *(
                    manager.create({"name": f"k{i}", **settings})
                    for i in range(start, min(count, start + 100))
                )
            )
            made += [Key(c.secret.get_secret_value(), c.key.id) for c in batch]
    finally:
        await store.close()
    return made


_NO_HEADERS: dict[str, str] = {}

Pick = Callable[[random.Random], tuple[str, Sequence[tuple[bytes, bytes]], str]]


@dataclass
class Load:
    """``concurrency`` tasks calling ``app`` back to back, each request chosen by
    ``pick(rng)`` as (label, headers, path), until :meth:`stop` — or ``max_requests``
    or ``max_seconds``, whichever comes first (every loop is bounded)."""

    app: App
    pick: Pick
    concurrency: int
    budget: float
    max_requests: int = 600_000  # a memory bound: the time bound comes first
    max_seconds: float = 60.0
    outcomes: list[Outcome] = field(default_factory=list)
    inflight: int = 0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Future[Any] | None = None

    def start(self) -> None:
        deadline = time.monotonic() + self.max_seconds

        async def user(seed: int) -> None:
            rng = random.Random(seed)
            while (
                not self._stop.is_set()
                and len(self.outcomes) < self.max_requests
                and time.monotonic() < deadline
            ):
                label, headers, path = self.pick(rng)
                self.inflight += 1
                try:
                    outcome = await call(self.app, path, headers, label=label, budget=self.budget)
                finally:
                    self.inflight -= 1
                if outcome.status == 200:
                    outcome.headers = _NO_HEADERS  # kept by the hundred thousand: keep less
                self.outcomes.append(outcome)
                await asyncio.sleep(0)  # a fully cached request never yields otherwise

        self._task = asyncio.gather(*(user(i) for i in range(self.concurrency)))

    async def in_flight(self, least: int, within: float) -> int:
        """The requests in flight at the first event-loop iteration (within ``within``
        seconds) that finds ``least`` of them; the most seen if none does. How many are in
        flight at one moment swings with how the replies of a batch come back: a user
        whose request just ended is between requests until it runs again."""
        most = self.inflight
        deadline = time.monotonic() + within
        while most < least and time.monotonic() < deadline:
            await asyncio.sleep(0)
            most = max(most, self.inflight)
        return most

    def change(self, pick: Pick) -> None:
        """Choose requests differently from now on (requests in flight carry on)."""
        self.pick = pick

    async def stop(self) -> list[Outcome]:
        self._stop.set()
        assert self._task is not None
        await asyncio.wait_for(self._task, self.budget + 10.0)
        return self.outcomes


def keyed(label: str, keys: Sequence[Key], path: str = "/x") -> Pick:
    """Requests with one of ``keys``, labelled ``<label>|<key id>``."""

    prepared = [(f"{label}|{key.id}", bearer(key.secret)) for key in keys]

    def pick(rng: random.Random) -> tuple[str, Sequence[tuple[bytes, bytes]], str]:
        labelled, headers = rng.choice(prepared)
        return labelled, headers, path

    return pick


def mixed(*choices: tuple[float, Pick]) -> Pick:
    """One of several picks, by weight."""
    weights = [w for w, _ in choices]
    picks = [p for _, p in choices]

    def pick(rng: random.Random) -> tuple[str, Sequence[tuple[bytes, bytes]], str]:
        return rng.choices(picks, weights)[0](rng)

    return pick


def public_path(label: str, path: str = "/health") -> Pick:
    """Requests without a key to a public path."""

    def pick(rng: random.Random) -> tuple[str, Sequence[tuple[bytes, bytes]], str]:
        return f"{label}|", [], path

    return pick


def kind(outcome: Outcome) -> str:
    return outcome.label.partition("|")[0]


def presented(outcome: Outcome) -> str:
    """The id of the key a request presented."""
    return outcome.label.partition("|")[2]
