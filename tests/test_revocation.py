"""Revocation across processes sharing one Redis (docs/management.md: within 100 ms)."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REDIS_URL, Figures, budget
from keystile import KeyHasher, KeyManager, RedisStore
from keystile.stores import CachedStore

TRIALS = 50


@pytest.mark.timing
async def test_another_process_refuses_a_revoked_key_within_100_ms(
    redis_namespace: str, hasher: KeyHasher, figures: Figures
) -> None:
    """Over 50 trials, a second process refuses a revoked key it had cached within 100 ms
    of the revocation being acknowledged."""
    watcher = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).with_name("revocation_watcher.py")),
            REDIS_URL,
            redis_namespace,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert watcher.stdin is not None and watcher.stdout is not None
    store = CachedStore(RedisStore.from_url(REDIS_URL, namespace=redis_namespace))
    manager = KeyManager(store, hasher)
    delays = []
    try:
        assert watcher.stdout.readline().strip() == "ready"
        for _ in range(TRIALS):
            created = await manager.create({"name": "watched", "type": "prod"})
            digest = hasher.digest(created.secret.get_secret_value())
            watcher.stdin.write(f"watch {digest}\n")
            watcher.stdin.flush()
            assert watcher.stdout.readline().strip() == "watching"
            await manager.revoke(created.key.id)
            acknowledged = time.monotonic()
            answer, _, seen = watcher.stdout.readline().strip().partition(" ")
            assert answer == "revoked"
            delays.append(max(0.0, float(seen) - acknowledged))
    finally:
        watcher.stdin.close()
        watcher.wait(timeout=10)
        watcher.stdout.close()
        await store.close()
    median, worst = statistics.median(delays), max(delays)
    figures.add(
        f"cross-process revocation over {TRIALS} trials: "
        f"median {median * 1000:.2f} ms, max {worst * 1000:.2f} ms"
    )
    assert worst < budget(0.100), f"max delay {worst * 1000:.1f} ms"
