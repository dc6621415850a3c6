"""The management API (docs/management.md): get, list, update, revoke, rotate and usage, on
every backend."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from conftest import SECRET
from keystile import (
    ApiKey,
    KeyChanged,
    KeyConflict,
    KeyHasher,
    KeyManager,
    KeyNotFound,
    KeyStatus,
    KeystileError,
    KeyValidationError,
    ManualClock,
    MemoryStore,
    RedisStore,
    RotationRefused,
    Rule,
    ScopeRefused,
)
from keystile import manager as manager_module
from keystile.backends import backend_for
from keystile.clock import to_datetime
from keystile.gate import Keystile
from keystile.manager import DEFAULT_GRACE
from keystile.middleware import KeystileMiddleware
from keystile.records import decode_cursor, encode_cursor
from keystile.stores import KeyStore
from keystile.usage import (
    UsageOverview,
    UsageReader,
    UsageRecorder,
    UsageReport,
)

ORIGINS = ["https://app.example.com"]
SETTINGS: dict[str, Any] = {
    "name": "search service",
    "type": "prod",
    "scopes": ["vec:read", "kev:*"],
    "allowed_ips": ["10.0.0.0/8"],
    "rate_limit": "50/minute",
    "token_quota": 5000,
    "metadata": {"project": "search", "owner": "ana"},
}
# For requests through the middleware, which would hold the test client to the IP allowlist.
OPEN = {k: v for k, v in SETTINGS.items() if k != "allowed_ips"}


def problems(caught: pytest.ExceptionInfo[KeyValidationError]) -> dict[str, str]:
    return {e.field: e.message for e in caught.value.errors}


@pytest.fixture
async def gate(store: KeyStore, clock: ManualClock) -> AsyncIterator[Keystile]:
    """A gate on each backend, with the manual clock."""
    made = Keystile(store=store, secret=SECRET, clock=clock)
    assert await made.store.start(timeout=2.0)
    yield made
    await made.aclose()


def app_for(gate: Keystile) -> Starlette:
    async def endpoint(request: Request) -> JSONResponse:
        return JSONResponse({"key": request.user.identity})

    return Starlette(
        routes=[Route("/x", endpoint)], middleware=[Middleware(KeystileMiddleware, gate=gate)]
    )


async def status_of(app: Starlette, secret: str) -> tuple[int, str | None]:
    """The status of a request with ``secret``, and the refusal code if any."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        response = await http.get("/x", headers={"Authorization": f"Bearer {secret}"})
    code = response.json()["error"]["code"] if response.status_code >= 400 else None
    return response.status_code, code


# -- get -------------------------------------------------------------------------------------


async def test_get_returns_the_record(manager: KeyManager) -> None:
    """get returns the stored record by its id."""
    created = await manager.create(SETTINGS)
    assert await manager.get(created.key.id) == created.key


@pytest.mark.parametrize("key_id", ["key_0000000000nothinghere", "", "not a key id"])
async def test_get_unknown_id_is_key_not_found(manager: KeyManager, key_id: str) -> None:
    """An id no key has is KeyNotFound, whatever it looks like."""
    with pytest.raises(KeyNotFound):
        await manager.get(key_id)


# -- update ----------------------------------------------------------------------------------


async def test_update_changes_the_given_fields_and_keeps_the_rest(
    manager: KeyManager, clock: ManualClock
) -> None:
    """Each given field replaces the old value; the others, the type and the hint stay."""
    created = await manager.create(SETTINGS)
    expires = to_datetime(clock.now + 3600)
    updated = await manager.update(
        created.key.id,
        {
            "name": "renamed",
            "scopes": ["vec:write"],
            "allowed_ips": ["192.0.2.7"],
            "expires_at": expires,
            "metadata": {"project": "other"},
        },
    )
    assert updated.name == "renamed"
    assert updated.scopes == ("vec:write",)
    assert updated.allowed_ips == ("192.0.2.7",)
    assert updated.expires_at == expires
    assert updated.metadata == {"project": "other"}
    assert (updated.type, updated.hint, updated.id) == (
        created.key.type,
        created.key.hint,
        created.key.id,
    )
    assert (updated.rate_limit, updated.token_quota) == ("50/minute", 5000)
    assert await manager.get(created.key.id) == updated


async def test_update_takes_keywords(manager: KeyManager) -> None:
    """Fields may be given as keywords as well as in a mapping."""
    created = await manager.create(SETTINGS)
    updated = await manager.update(created.key.id, {"name": "a"}, token_quota=7)
    assert (updated.name, updated.token_quota) == ("a", 7)


async def test_update_with_none_clears_optional_fields(
    manager: KeyManager, clock: ManualClock
) -> None:
    """None removes the expiry and puts the rate limit and quota back to the type's defaults."""
    created = await manager.create({**SETTINGS, "expires_at": to_datetime(clock.now + 60)})
    updated = await manager.update(
        created.key.id, {"expires_at": None, "rate_limit": None, "token_quota": None}
    )
    assert (updated.expires_at, updated.rate_limit, updated.token_quota) == (None, None, None)


async def test_update_with_nothing_changes_nothing(manager: KeyManager) -> None:
    """An empty update returns the record as it is."""
    created = await manager.create(SETTINGS)
    assert await manager.update(created.key.id, {}) == created.key


@pytest.mark.parametrize(
    ("changes", "fields"),
    [
        pytest.param({"scopes": ["vec:fly"]}, {"scopes[0]"}, id="unknown-scope"),
        pytest.param({"scopes": ["vec:read", "db:read"]}, {"scopes[1]"}, id="second-scope"),
        pytest.param({"name": ""}, {"name"}, id="empty-name"),
        pytest.param({"name": "x" * 201}, {"name"}, id="long-name"),
        pytest.param({"allowed_ips": ["300.1.2.3"]}, {"allowed_ips[0]"}, id="bad-ip"),
        pytest.param(
            {"allowed_origins": ["https://a.com/x"]}, {"allowed_origins[0]"}, id="bad-origin"
        ),
        pytest.param({"rate_limit": "lots"}, {"rate_limit"}, id="bad-rate-limit"),
        pytest.param({"token_quota": -1}, {"token_quota"}, id="negative-quota"),
        pytest.param({"expires_at": "2020-01-01T00:00:00Z"}, {"expires_at"}, id="past-expiry"),
        pytest.param({"expires_at": "2030-01-01T00:00:00"}, {"expires_at"}, id="naive-expiry"),
        pytest.param({"metadata": {"": "x"}}, {"metadata"}, id="empty-metadata-name"),
        pytest.param({"type": "dev"}, {"type"}, id="type"),
        pytest.param({"secret": "prod_x"}, {"secret"}, id="secret"),
        pytest.param({"revoked_at": None}, {"revoked_at"}, id="revoked-at"),
        pytest.param({"replaced_by": "key_x", "id": "key_y"}, {"replaced_by", "id"}, id="links"),
        pytest.param({"colour": "red"}, {"colour"}, id="unknown-field"),
        pytest.param(
            {"name": "", "allowed_ips": ["10.0.0.1", "nope"], "token_quota": "many"},
            {"name", "allowed_ips[1]", "token_quota"},
            id="several",
        ),
        pytest.param(
            {"scopes": ["nope", "vec:read", "x:y"], "expires_at": "2020-01-01T00:00:00Z"},
            {"scopes[0]", "scopes[2]", "expires_at"},
            id="several-policy",
        ),
    ],
)
async def test_update_validation_names_every_field(
    manager: KeyManager, changes: dict[str, Any], fields: set[str]
) -> None:
    """An invalid update raises one KeyValidationError naming each offending field, and
    changes nothing."""
    created = await manager.create(SETTINGS)
    with pytest.raises(KeyValidationError) as caught:
        await manager.update(created.key.id, changes)
    found = problems(caught)
    assert {f.split(".")[0] if f.startswith("metadata") else f for f in found} == fields
    assert all(found.values())
    assert await manager.get(created.key.id) == created.key


async def test_update_explains_why_the_type_and_secret_are_fixed(manager: KeyManager) -> None:
    """Changing the type or the secret is refused with a message saying what to do instead."""
    created = await manager.create(SETTINGS)
    with pytest.raises(KeyValidationError) as caught:
        await manager.update(created.key.id, {"type": "dev", "secret": "x"})
    found = problems(caught)
    assert "create a new key" in found["type"]
    assert "rotate" in found["secret"]


async def test_update_applies_the_key_type_policy(manager: KeyManager) -> None:
    """A client key cannot lose its origins nor gain an admin scope by an update."""
    created = await manager.create(
        {"name": "web", "type": "client", "scopes": ["vec:read"], "allowed_origins": ORIGINS}
    )
    with pytest.raises(KeyValidationError) as caught:
        await manager.update(
            created.key.id, {"allowed_origins": [], "scopes": ["vec:read", "admin:*"]}
        )
    found = problems(caught)
    assert set(found) == {"allowed_origins", "scopes[1]"}
    assert "may not hold" in found["scopes[1]"]


async def test_update_does_not_rejudge_fields_it_leaves_alone(
    manager: KeyManager, clock: ManualClock
) -> None:
    """An expired key can still be renamed: its past expiry is not re-checked."""
    created = await manager.create({**SETTINGS, "expires_at": to_datetime(clock.now + 10)})
    clock.advance(60)
    updated = await manager.update(created.key.id, name="old service")
    assert updated.name == "old service"
    with pytest.raises(KeyValidationError):
        await manager.update(created.key.id, expires_at=to_datetime(clock.now - 1))


async def test_update_of_an_unknown_key_is_key_not_found(manager: KeyManager) -> None:
    """Updating an id no key has is KeyNotFound."""
    with pytest.raises(KeyNotFound):
        await manager.update("key_0000000000nothinghere", name="x")


async def test_update_keeps_a_revocation(manager: KeyManager) -> None:
    """Updating a revoked key keeps it revoked."""
    created = await manager.create(SETTINGS)
    revoked = await manager.revoke(created.key.id)
    updated = await manager.update(created.key.id, metadata={"reason": "leaked"})
    assert updated.revoked_at == revoked.revoked_at


async def test_a_concurrent_update_never_undoes_a_revocation(manager: KeyManager) -> None:
    """Updates and revocations racing through one manager never lose the revocation."""
    for n in range(10):
        created = await manager.create(SETTINGS)
        await asyncio.gather(
            manager.update(created.key.id, name=f"renamed {n}"),
            manager.revoke(created.key.id),
            manager.update(created.key.id, token_quota=n),
        )
        final = await manager.get(created.key.id)
        assert final.revoked
        assert (final.name, final.token_quota) == (f"renamed {n}", n)


async def test_an_update_takes_effect_on_the_next_request(gate: Keystile) -> None:
    """Scopes removed by an update no longer open a route on the very next request."""
    created = await gate.manager.create({"name": "n", "type": "prod", "scopes": ["vec:read"]})
    app = Starlette(
        routes=[Route("/x", lambda request: JSONResponse({}))],
        middleware=[
            Middleware(
                KeystileMiddleware,
                gate=gate,
                rules=[Rule("GET", "/x", ["vec:read"])],
            )
        ],
    )
    secret = created.secret.get_secret_value()
    assert (await status_of(app, secret))[0] == 200
    await gate.manager.update(created.key.id, scopes=["kev:read"])
    assert await status_of(app, secret) == (403, "insufficient_scope")


# -- list ------------------------------------------------------------------------------------


async def test_list_pages_through_every_key_in_creation_order(manager: KeyManager) -> None:
    """Following the cursor visits every key once, in id (creation) order, then stops."""
    ids = sorted(
        [(await manager.create({"name": f"k{n}", "type": "dev"})).key.id for n in range(7)]
    )
    seen: list[str] = []
    cursor = None
    sizes = []
    while True:
        page = await manager.list(limit=3, cursor=cursor)
        sizes.append(len(page.keys))
        seen += [k.id for k in page.keys]
        if page.next is None:
            break
        cursor = page.next
    assert seen == ids
    assert sizes == [3, 3, 1]


async def test_a_page_that_ends_the_listing_has_no_cursor(manager: KeyManager) -> None:
    """When the keys fit one page exactly, that page's next is None."""
    for n in range(3):
        await manager.create({"name": f"k{n}", "type": "dev"})
    page = await manager.list(limit=3)
    assert len(page.keys) == 3 and page.next is None
    assert (await manager.list()).next is None


async def test_list_of_an_empty_store(manager: KeyManager) -> None:
    """An empty store lists no keys and no cursor."""
    page = await manager.list()
    assert page.keys == () and page.next is None


async def test_list_filters_by_type_status_and_metadata(
    manager: KeyManager, clock: ManualClock
) -> None:
    """type, status and metadata filters each keep exactly the matching keys, and combine."""
    dev = await manager.create({"name": "d", "type": "dev", "metadata": {"project": "a"}})
    prod = await manager.create({"name": "p", "type": "prod", "metadata": {"project": "b"}})
    client = await manager.create(
        {
            "name": "c",
            "type": "client",
            "allowed_origins": ORIGINS,
            "metadata": {"project": "a", "team": "web"},
        }
    )
    revoked = await manager.create({"name": "r", "type": "prod", "metadata": {"project": "a"}})
    await manager.revoke(revoked.key.id)
    expiring = await manager.create(
        {"name": "e", "type": "dev", "expires_at": to_datetime(clock.now + 5)}
    )
    clock.advance(10)

    async def ids(**filters: Any) -> set[str]:
        return {k.id for k in (await manager.list(**filters)).keys}

    assert await ids(type="dev") == {dev.key.id, expiring.key.id}
    assert await ids(type="prod") == {prod.key.id, revoked.key.id}
    assert await ids(status="active") == {dev.key.id, prod.key.id, client.key.id}
    assert await ids(status=KeyStatus.REVOKED) == {revoked.key.id}
    assert await ids(status="expired") == {expiring.key.id}
    assert await ids(metadata={"project": "a"}) == {dev.key.id, client.key.id, revoked.key.id}
    assert await ids(metadata={"project": "a", "team": "web"}) == {client.key.id}
    assert await ids(metadata={"project": "a"}, status="active", type="dev") == {dev.key.id}
    assert await ids(metadata={"project": "zzz"}) == set()


async def test_filtered_pages_follow_the_cursor(manager: KeyManager) -> None:
    """A filtered listing pages with its cursor like an unfiltered one."""
    wanted = set()
    for n in range(9):
        created = await manager.create({"name": f"k{n}", "type": "dev" if n % 3 else "prod"})
        if n % 3:
            wanted.add(created.key.id)
    seen: list[str] = []
    cursor = None
    while True:
        page = await manager.list(type="dev", limit=2, cursor=cursor)
        assert len(page.keys) <= 2
        seen += [k.id for k in page.keys]
        if page.next is None:
            break
        cursor = page.next
    assert sorted(seen) == seen and set(seen) == wanted and len(seen) == len(wanted)


async def test_a_sparse_metadata_filter_reads_a_bounded_number_of_records(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A metadata filter (not indexed) that matches little returns a short page with a
    cursor once it has read its budget of records, and the cursor finds the rest."""
    monkeypatch.setattr(manager_module, "_SCAN_BUDGET", 10)
    manager = KeyManager(MemoryStore(), KeyHasher(SECRET))
    ids = [(await manager.create({"name": f"k{n}", "type": "dev"})).key.id for n in range(30)]
    rare = await manager.create({"name": "rare", "type": "dev", "metadata": {"team": "x"}})
    first = await manager.list(metadata={"team": "x"}, limit=5)
    assert first.keys == () and first.next is not None
    found: list[ApiKey] = []
    cursor: str | None = first.next
    calls = 1
    while cursor is not None:
        page = await manager.list(metadata={"team": "x"}, limit=5, cursor=cursor)
        found += page.keys
        cursor = page.next
        calls += 1
    assert [k.id for k in found] == [rare.key.id]
    assert calls <= len(ids) // 10 + 3


async def test_a_sparse_type_filter_answers_from_the_index(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A type filter that matches one key among many finds it on the first page, with no
    cursor: the listing index answers it, no budget of records is read first."""
    monkeypatch.setattr(manager_module, "_SCAN_BUDGET", 10)
    manager = KeyManager(MemoryStore(), KeyHasher(SECRET))
    for n in range(30):
        await manager.create({"name": f"k{n}", "type": "dev"})
    rare = await manager.create({"name": "rare", "type": "prod"})
    page = await manager.list(type="prod", limit=5)
    assert [k.id for k in page.keys] == [rare.key.id] and page.next is None


@pytest.mark.parametrize(
    ("filters", "fields"),
    [
        pytest.param({"type": "admin"}, {"type"}, id="type"),
        pytest.param({"status": "gone"}, {"status"}, id="status"),
        pytest.param({"limit": 0}, {"limit"}, id="limit-0"),
        pytest.param({"limit": 1001}, {"limit"}, id="limit-1001"),
        pytest.param({"limit": True}, {"limit"}, id="limit-bool"),
        pytest.param({"cursor": "garbage!"}, {"cursor"}, id="cursor"),
        pytest.param({"cursor": encode_cursor("not-a-key")}, {"cursor"}, id="cursor-id"),
        pytest.param({"type": "x", "status": "y", "limit": -1}, {"type", "status", "limit"}),
    ],
)
async def test_list_validation_names_every_field(
    manager: KeyManager, filters: dict[str, Any], fields: set[str]
) -> None:
    """Invalid filters raise one KeyValidationError naming each of them."""
    with pytest.raises(KeyValidationError) as caught:
        await manager.list(**filters)
    assert set(problems(caught)) == fields


def test_cursors_are_opaque_and_round_trip() -> None:
    """A cursor does not show the id in clear, and decodes back to it."""
    cursor = encode_cursor("key_0Q2xY7kE3bT9aLmZpQ1w")
    assert "key_" not in cursor
    assert decode_cursor(cursor) == "key_0Q2xY7kE3bT9aLmZpQ1w"


# -- revoke ----------------------------------------------------------------------------------


async def test_revoking_twice_keeps_the_first_revocation(
    manager: KeyManager, clock: ManualClock
) -> None:
    """Revoking a revoked key changes nothing: the first revocation time stays."""
    created = await manager.create(SETTINGS)
    first = await manager.revoke(created.key.id)
    clock.advance(60)
    assert await manager.revoke(created.key.id) == first
    assert first.revoked_at == to_datetime(clock.now - 60)


async def test_revoking_an_unknown_key_is_key_not_found(manager: KeyManager) -> None:
    """Revoking an id no key has is KeyNotFound."""
    with pytest.raises(KeyNotFound):
        await manager.revoke("key_0000000000nothinghere")


# -- rotate ----------------------------------------------------------------------------------


async def test_rotation_issues_a_linked_successor_with_the_same_settings(
    manager: KeyManager, clock: ManualClock
) -> None:
    """The successor has the old key's settings, a new secret and id, and the two records
    link to each other; the old key now expires at the end of the 24-hour grace."""
    created = await manager.create(SETTINGS)
    rotated = await manager.rotate(created.key.id)
    old, new = rotated.previous, rotated.key
    settings = ("name", "type", "scopes", "allowed_origins", "allowed_ips")
    settings += ("rate_limit", "token_quota", "expires_at", "metadata")
    assert {f: getattr(new, f) for f in settings} == {f: getattr(created.key, f) for f in settings}
    assert rotated.secret.get_secret_value() != created.secret.get_secret_value()
    assert new.id != old.id and new.hint != old.hint
    assert (old.replaced_by, new.replaces) == (new.id, old.id)
    assert old.expires_at == to_datetime(clock.now) + DEFAULT_GRACE
    assert new.created_at == to_datetime(clock.now)
    assert await manager.get(old.id) == old
    assert await manager.get(new.id) == new
    digest = manager.hasher.digest(rotated.secret.get_secret_value())
    assert await manager.store.find(digest) == new


async def test_rotation_grace_ends_on_time(gate: Keystile, clock: ManualClock) -> None:
    """The old key works until the grace period ends and is refused as expired from that
    instant; the new key works throughout."""
    created = await gate.manager.create(OPEN)
    rotated = await gate.manager.rotate(created.key.id, grace=timedelta(hours=2))
    app = app_for(gate)
    old, new = created.secret.get_secret_value(), rotated.secret.get_secret_value()
    assert await status_of(app, old) == (200, None)
    assert await status_of(app, new) == (200, None)
    clock.advance(2 * 3600 - 0.001)
    assert await status_of(app, old) == (200, None)
    clock.advance(0.001)
    assert await status_of(app, old) == (401, "expired_api_key")
    assert await status_of(app, new) == (200, None)


async def test_rotation_with_zero_grace_refuses_the_old_key_at_once(gate: Keystile) -> None:
    """With a zero grace the old key is refused on the very next request."""
    created = await gate.manager.create(OPEN)
    app = app_for(gate)
    assert await status_of(app, created.secret.get_secret_value()) == (200, None)
    rotated = await gate.manager.rotate(created.key.id, grace=0)
    assert await status_of(app, created.secret.get_secret_value()) == (401, "expired_api_key")
    assert await status_of(app, rotated.secret.get_secret_value()) == (200, None)


@pytest.mark.parametrize(
    ("grace", "seconds"),
    [(timedelta(minutes=5), 300), (90, 90), (0.5, 0.5)],
    ids=["timedelta", "int", "float"],
)
async def test_rotation_grace_takes_durations_and_seconds(
    manager: KeyManager, clock: ManualClock, grace: timedelta | float, seconds: float
) -> None:
    """The grace may be a timedelta or a number of seconds."""
    created = await manager.create(SETTINGS)
    rotated = await manager.rotate(created.key.id, grace=grace)
    assert rotated.previous.expires_at == to_datetime(clock.now + seconds)


async def test_rotation_never_extends_an_earlier_expiry(
    manager: KeyManager, clock: ManualClock
) -> None:
    """A key that expires before the grace would end keeps its own expiry, and so does its
    successor."""
    expires = to_datetime(clock.now + 600)
    created = await manager.create({**SETTINGS, "expires_at": expires})
    rotated = await manager.rotate(created.key.id)
    assert rotated.previous.expires_at == expires
    assert rotated.key.expires_at == expires


async def test_rotating_a_successor_continues_the_chain(manager: KeyManager) -> None:
    """The successor can itself be rotated; each record links to its neighbours."""
    first = await manager.create(SETTINGS)
    second = await manager.rotate(first.key.id)
    third = await manager.rotate(second.key.id)
    assert third.previous.replaces == first.key.id
    assert third.previous.replaced_by == third.key.id
    assert third.key.replaces == second.key.id


async def test_rotating_a_revoked_key_is_refused(manager: KeyManager) -> None:
    """A revoked key cannot be rotated, and nothing is issued."""
    created = await manager.create(SETTINGS)
    await manager.revoke(created.key.id)
    with pytest.raises(RotationRefused, match="revoked") as caught:
        await manager.rotate(created.key.id)
    assert caught.value.reason == "revoked"
    assert [k.id for k in (await manager.list()).keys] == [created.key.id]


async def test_rotating_a_rotated_key_is_refused(manager: KeyManager) -> None:
    """A key that already has a successor cannot be rotated again; the message names the
    successor."""
    created = await manager.create(SETTINGS)
    rotated = await manager.rotate(created.key.id)
    with pytest.raises(RotationRefused) as caught:
        await manager.rotate(created.key.id)
    assert caught.value.reason == "rotated"
    assert rotated.key.id in str(caught.value)
    assert len((await manager.list()).keys) == 2


async def test_rotating_an_expired_key_is_refused(manager: KeyManager, clock: ManualClock) -> None:
    """An expired key cannot be rotated: its successor would be born expired."""
    created = await manager.create({**SETTINGS, "expires_at": to_datetime(clock.now + 1)})
    clock.advance(1)
    with pytest.raises(RotationRefused) as caught:
        await manager.rotate(created.key.id)
    assert caught.value.reason == "expired"


async def test_rotating_an_unknown_key_is_key_not_found(manager: KeyManager) -> None:
    """Rotating an id no key has is KeyNotFound."""
    with pytest.raises(KeyNotFound):
        await manager.rotate("key_0000000000nothinghere")


@pytest.mark.parametrize(
    "grace",
    [-1, timedelta(seconds=-1), timedelta(days=366), float("nan"), float("inf"), True, "24h"],
    ids=["negative", "negative-timedelta", "too-long", "nan", "inf", "bool", "text"],
)
async def test_rotation_grace_is_validated(manager: KeyManager, grace: Any) -> None:
    """A negative, endless, too long or non-numeric grace is a KeyValidationError on grace."""
    created = await manager.create(SETTINGS)
    with pytest.raises(KeyValidationError) as caught:
        await manager.rotate(created.key.id, grace=grace)
    assert set(problems(caught)) == {"grace"}


async def test_rotation_logs_never_show_a_secret(
    manager: KeyManager, caplog: pytest.LogCaptureFixture
) -> None:
    """Creating, updating, rotating and revoking log ids and hints, never a secret."""
    caplog.set_level(logging.DEBUG)
    created = await manager.create(SETTINGS)
    await manager.update(created.key.id, name="renamed")
    rotated = await manager.rotate(created.key.id)
    await manager.revoke(rotated.key.id)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert created.key.id in text and rotated.key.id in text
    for secret in (created.secret, rotated.secret):
        assert secret.get_secret_value() not in text
        assert secret.get_secret_value()[5:20] not in text


# -- usage -----------------------------------------------------------------------------------


async def test_usage_reads_what_was_recorded(manager: KeyManager, clock: ManualClock) -> None:
    """usage(id) reports what the recorder counted for that key (flushed first); usage()
    lists every key with recorded usage."""
    # As the gate wires it: the manager reads through its recorder's reader.
    recorder = UsageRecorder(backend_for(manager.store).usage_store(clock), clock=clock)
    manager = KeyManager(manager.store, manager.hasher, clock=clock, usage=recorder.reader())
    created = await manager.create(SETTINGS)
    other = await manager.create(SETTINGS)
    for status in (200, 200, 404, 503):
        recorder.record(created.key.id, status, 10, 100, ip="10.0.0.1", now=clock())
    recorder.record(other.key.id, 200, 1, 2, now=clock())
    one = await manager.usage(created.key.id)
    assert isinstance(one, UsageReport)
    assert (one.key_id, one.totals.requests, one.all_time.requests) == (created.key.id, 4, 4)
    assert (one.all_time.errors_4xx, one.all_time.errors_5xx) == (1, 1)
    assert (one.all_time.bytes_in, one.all_time.bytes_out) == (40, 400)
    assert one.last_use.ip == "10.0.0.1"
    assert len(one.series) == 1
    everything = await manager.usage()
    assert isinstance(everything, UsageOverview)
    assert {k.key_id for k in everything.keys} >= {created.key.id, other.key.id}
    days = await manager.usage(created.key.id, granularity="day")
    assert isinstance(days, UsageReport)
    assert days.totals.requests == 4
    with pytest.raises(KeyValidationError, match="granularity"):
        await manager.usage(created.key.id, granularity="week")  # type: ignore[arg-type]


async def test_usage_of_an_unknown_key_is_key_not_found(manager: KeyManager) -> None:
    """The usage of an id no key has is KeyNotFound."""
    with pytest.raises(KeyNotFound):
        await manager.usage("key_0000000000nothinghere")


async def test_a_manager_without_a_gate_reads_usage_and_records_none(gate: Keystile) -> None:
    """A manager of its own (another process, the command line) reads usage through a
    reader and builds no recorder (no buffer, no flush task); on Redis it reads what the
    gate recorded, as the gate's manager does (which flushes the gate's buffer first)."""
    created = await gate.manager.create(SETTINGS)
    gate.usage.record(created.key.id, 200, 1, 2, ip="10.0.0.1")
    alone = KeyManager(gate.store, gate.hasher, clock=gate.clock)
    assert isinstance(alone.usage_reader, UsageReader)
    assert not [v for v in vars(alone).values() if isinstance(v, UsageRecorder)]
    report = await gate.manager.usage(created.key.id)
    assert isinstance(report, UsageReport) and report.all_time.requests == 1
    shared = isinstance(getattr(gate.store, "store", None), RedisStore)
    seen = await alone.usage(created.key.id)
    assert isinstance(seen, UsageReport)
    assert seen.all_time.requests == (1 if shared else 0)


# -- writers in other processes: compare and set -----------------------------------------------


def racing(gate: Keystile, monkeypatch: pytest.MonkeyPatch, meanwhile: Any) -> KeyManager:
    """The gate's manager, whose first read of a record is followed — before it writes
    back — by ``meanwhile(other)``: what another process's manager (same store, a lock of
    its own) does in that moment."""
    other = KeyManager(gate.store, gate.hasher, clock=gate.clock)
    read = gate.manager.get
    done = False

    async def get_then_race(key_id: str, project: str | None = None) -> ApiKey:
        nonlocal done
        record = await read(key_id, project=project)
        if not done:
            done = True
            await meanwhile(other)
        return record

    monkeypatch.setattr(gate.manager, "get", get_then_race)
    return gate.manager


async def test_an_update_never_undoes_a_revocation_made_meanwhile(
    gate: Keystile, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process revokes the key between this update's read and its write: the
    update is redone on the revoked record — renamed, and still revoked."""
    created = await gate.manager.create(OPEN)
    key_id = created.key.id
    manager = racing(gate, monkeypatch, lambda other: other.revoke(key_id))
    updated = await manager.update(key_id, name="renamed")
    stored = await gate.store.get(key_id)
    assert stored == updated
    assert stored is not None and stored.name == "renamed" and stored.revoked_at is not None


async def test_a_rotation_racing_a_revocation_is_refused_and_leaves_no_live_successor(
    gate: Keystile, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process revokes the key while it is being rotated: the rotation is refused
    (revoked), the key stays revoked, and the successor it had issued is withdrawn
    (revoked) — no live key descends from a revoked one."""
    created = await gate.manager.create(OPEN)
    key_id = created.key.id
    manager = racing(gate, monkeypatch, lambda other: other.revoke(key_id))
    with pytest.raises(RotationRefused) as refused:
        await manager.rotate(key_id)
    assert refused.value.reason == "revoked"
    page = await gate.manager.list()
    successors = [k for k in page.keys if k.replaces == key_id]
    assert len(successors) == 1 and successors[0].revoked_at is not None
    stored = await gate.store.get(key_id)
    assert stored is not None and stored.revoked_at is not None and stored.replaced_by is None


async def test_a_key_that_keeps_changing_is_a_clear_conflict(
    gate: Keystile, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record some other writer changes before every write-back: after a bounded number
    of attempts, KeyChanged (a KeyConflict: 409 in the admin API); nothing written."""
    created = await gate.manager.create(OPEN)
    key_id = created.key.id

    async def always_changed(key: ApiKey, *, expected: ApiKey | None = None) -> None:
        raise KeyChanged(f"key {key.id} changed meanwhile")

    monkeypatch.setattr(gate.manager.store, "replace", always_changed)
    with pytest.raises(KeyChanged):
        await gate.manager.update(key_id, name="renamed")
    assert isinstance(KeyChanged("x"), KeyConflict)
    stored = await gate.store.get(key_id)
    assert stored is not None and stored.name == OPEN["name"]


# -- the calling key's bounds (issue #18 item 3) ---------------------------------------------

DEPUTY: dict[str, Any] = {
    "name": "deputy",
    "type": "prod",
    "scopes": ["admin:manage_keys", "vec:*"],
}
WITHIN = {**SETTINGS, "scopes": ["vec:read"]}  # a key the deputy may manage


@pytest.mark.parametrize(
    ("scopes", "missing"),
    [
        (["*"], ("*",)),
        (["kev:read"], ("kev:read",)),
        (["vec:read", "admin:*"], ("admin:*",)),
        (["admin:view_usage", "kev:*", "vec:write"], ("admin:view_usage", "kev:*")),
    ],
    ids=["star", "other-service", "service-wildcard", "two-missing"],
)
async def test_item3_an_actor_grants_only_scopes_it_holds(
    manager: KeyManager, scopes: list[str], missing: tuple[str, ...]
) -> None:
    """With an actor, create and update refuse scopes it does not hold with ScopeRefused
    naming exactly those, and store nothing."""
    actor = (await manager.create(DEPUTY)).key
    target = (await manager.create(WITHIN)).key
    with pytest.raises(ScopeRefused) as created:
        await manager.create({**WITHIN, "scopes": scopes}, actor=actor)
    with pytest.raises(ScopeRefused) as updated:
        await manager.update(target.id, scopes=scopes, actor=actor)
    assert created.value.missing == updated.value.missing == missing
    assert all(scope in str(created.value) for scope in missing)
    assert {k.id for k in (await manager.list()).keys} == {actor.id, target.id}
    assert await manager.get(target.id) == target


async def test_item3_held_wildcards_cover_what_an_actor_grants_and_manages(
    manager: KeyManager,
) -> None:
    """An actor holding ``vec:*`` may grant ``vec:read`` and ``vec:*`` and scopes it holds
    itself, and update and rotate keys within them."""
    actor = (await manager.create(DEPUTY)).key
    for scopes in (["vec:read", "vec:delete"], ["vec:*"], ["admin:manage_keys"]):
        created = await manager.create({**WITHIN, "scopes": scopes}, actor=actor)
        assert list(created.key.scopes) == scopes
    target = (await manager.create(WITHIN, actor=actor)).key
    updated = await manager.update(target.id, scopes=["vec:*"], name="wider", actor=actor)
    assert (list(updated.scopes), updated.name) == (["vec:*"], "wider")
    rotated = await manager.rotate(target.id, actor=actor)
    assert list(rotated.key.scopes) == ["vec:*"]


@pytest.mark.parametrize(
    ("held", "missing"),
    [
        (["*"], ("*",)),
        (["vec:read", "kev:read"], ("kev:read",)),
        (["admin:view_usage"], ("admin:view_usage",)),
    ],
    ids=["star", "one-more", "other-admin-scope"],
)
async def test_item3_an_actor_cannot_update_or_rotate_a_key_holding_more(
    manager: KeyManager, held: list[str], missing: tuple[str, ...]
) -> None:
    """An actor may not update (even rename, or narrow) nor rotate a key holding scopes it
    lacks: ScopeRefused, the record unchanged and no successor issued."""
    actor = (await manager.create(DEPUTY)).key
    victim = (await manager.create({"name": "root", "type": "prod", "scopes": held})).key
    attempts = [
        manager.update(victim.id, name="mine", actor=actor),
        manager.update(victim.id, allowed_ips=["10.0.0.0/8"], actor=actor),
        manager.update(victim.id, scopes=["vec:read"], actor=actor),
        manager.update(victim.id, {}, actor=actor),
        manager.rotate(victim.id, grace=timedelta(days=365), actor=actor),
    ]
    for attempt in attempts:
        with pytest.raises(ScopeRefused) as caught:
            await attempt
        assert caught.value.missing == missing
        assert victim.id in str(caught.value)
    assert {k.id for k in (await manager.list()).keys} == {actor.id, victim.id}
    assert await manager.get(victim.id) == victim


@pytest.mark.parametrize(
    "changes",
    [
        {"scopes": ["admin:manage_keys"]},
        {"scopes": ["admin:manage_keys", "vec:*", "vec:read"]},
        {"allowed_ips": []},
        {"allowed_ips": ["0.0.0.0/0"]},
        {"allowed_origins": ["https://elsewhere.example"]},
        {"expires_at": None},
        {"expires_at": "2030-01-01T00:00:00Z"},
        {"expires_at": "2027-02-01T00:00:00Z"},
        {"name": "renamed", "allowed_ips": ["10.0.0.0/8", "192.168.0.0/16"]},
        {"rate_limit": "1000000/minute"},
        {"address_rate_limit": "1000/second"},
        {"token_quota": 10**12},
    ],
    ids=[
        "narrow-scopes",
        "restate-scopes",
        "lift-ips",
        "open-ips",
        "add-origin",
        "no-expiry",
        "later-expiry",
        "earlier-expiry",
        "with-a-rename",
        "raise-rate-limit",
        "raise-address-share",
        "raise-token-quota",
    ],
)
async def test_item3_an_actor_cannot_change_its_own_scopes_allowlists_or_expiry(
    manager: KeyManager, changes: dict[str, Any]
) -> None:
    """A key without ``*`` cannot change its own scopes, allowlists or expiry, even within
    what it holds: ScopeRefused naming ``*``, and its record unchanged."""
    actor = (
        await manager.create(
            {**DEPUTY, "allowed_ips": ["10.0.0.0/8"], "expires_at": "2027-06-01T00:00:00Z"}
        )
    ).key
    with pytest.raises(ScopeRefused) as caught:
        await manager.update(actor.id, changes, actor=actor)
    assert caught.value.missing == ("*",)
    assert "its own" in str(caught.value)
    assert await manager.get(actor.id) == actor


async def test_item3_an_actor_may_rename_itself_and_restate_its_settings(
    manager: KeyManager,
) -> None:
    """A key may change its own name and metadata, and give its scopes, allowlists and
    expiry as they are."""
    actor = (await manager.create({**DEPUTY, "allowed_ips": ["10.0.0.0/8"]})).key
    same = {"scopes": actor.scopes, "allowed_ips": actor.allowed_ips, "expires_at": None}
    updated = await manager.update(
        actor.id, {**same, "name": "renamed", "metadata": {"team": "x"}}, actor=actor
    )
    assert updated == actor.model_copy(update={"name": "renamed", "metadata": {"team": "x"}})


async def test_item3_a_star_actor_and_the_operator_are_not_bounded(manager: KeyManager) -> None:
    """A ``*`` key, and no actor at all (Python code, the command line), may grant ``*``,
    change their own settings, and update and rotate any key."""
    root = (await manager.create({"name": "root", "type": "prod", "scopes": ["*"]})).key
    for actor in (root, None):
        other = (
            await manager.create({"name": "o", "type": "prod", "scopes": ["*"]}, actor=actor)
        ).key
        await manager.update(other.id, scopes=["*", "vec:read"], actor=actor)
        await manager.rotate(other.id, actor=actor)
    changed = await manager.update(
        root.id, allowed_ips=["10.0.0.0/8"], expires_at="2030-01-01T00:00:00Z", actor=root
    )
    assert list(changed.allowed_ips) == ["10.0.0.0/8"]
    assert list((await manager.update(root.id, scopes=["admin:*"])).scopes) == ["admin:*"]


def test_item3_scope_refused_is_a_keystile_error_naming_what_is_missing() -> None:
    """ScopeRefused is a KeystileError (not an OSError, which store failures are caught as)
    and carries the missing scopes."""
    refused = ScopeRefused(("vec:write",), "lacks vec:write")
    assert isinstance(refused, KeystileError) and not isinstance(refused, OSError)
    assert refused.missing == ("vec:write",)


# -- a rotated-out key stays out (issue #18 item 8) ------------------------------------------


@pytest.mark.parametrize("grace", [0, 3600], ids=["no-grace", "an-hour"])
@pytest.mark.parametrize(
    "later", [None, 1, 365 * 86_400], ids=["no-expiry", "a-second-later", "a-year-later"]
)
async def test_item8_a_rotated_out_key_cannot_be_revived(
    gate: Keystile, clock: ManualClock, grace: int, later: int | None
) -> None:
    """Removing or extending a rotated key's expiry is a KeyValidationError naming
    ``expires_at`` and the successor; the record is unchanged and the old secret is refused
    once the grace ends."""
    created = await gate.manager.create(OPEN)
    rotated = await gate.manager.rotate(created.key.id, grace=grace)
    ends = rotated.previous.expires_at
    assert ends is not None
    wanted = None if later is None else ends + timedelta(seconds=later)
    with pytest.raises(KeyValidationError) as caught:
        await gate.manager.update(created.key.id, expires_at=wanted, name="revived")
    assert set(problems(caught)) == {"expires_at"}
    assert rotated.key.id in problems(caught)["expires_at"]
    assert await gate.manager.get(created.key.id) == rotated.previous
    clock.advance(grace)
    old = created.secret.get_secret_value()
    assert await status_of(app_for(gate), old) == (401, "expired_api_key")


async def test_item8_a_rotated_out_keys_expiry_may_move_earlier(
    gate: Keystile, clock: ManualClock
) -> None:
    """A rotated key's expiry may be restated or brought forward, and its other settings
    still change."""
    created = await gate.manager.create(OPEN)
    rotated = await gate.manager.rotate(created.key.id, grace=3600)
    same = await gate.manager.update(created.key.id, expires_at=rotated.previous.expires_at)
    assert same == rotated.previous
    sooner = to_datetime(clock.now + 60)
    updated = await gate.manager.update(created.key.id, expires_at=sooner, name="winding down")
    assert (updated.expires_at, updated.name) == (sooner, "winding down")
    clock.advance(60)
    old = created.secret.get_secret_value()
    assert await status_of(app_for(gate), old) == (401, "expired_api_key")
