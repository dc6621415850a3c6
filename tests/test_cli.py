"""The `keystile` command line (docs/management.md): every key command, its output, its exit
codes."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from conftest import REDIS_URL, SECRET, within
from keystile import (
    KeyChanged,
    KeyHasher,
    KeyManager,
    KeystileMiddleware,
    ManualClock,
    RedisStore,
)
from keystile.backends import backend_for
from keystile.cli import build_parser, duration, execute, expiry, main
from keystile.clock import to_datetime
from keystile.gate import Keystile
from keystile.manager import RECORD_FIELDS
from keystile.usage import UsageRecorder

KEYSTILE = os.path.join(os.path.dirname(sys.executable), "keystile")
UNKNOWN = "key_0000000000nothinghere"


async def run(manager: KeyManager, *argv: str) -> tuple[int, str, str]:
    """A key command run in process with ``manager``: exit code, stdout, stderr."""
    args = build_parser().parse_args(list(argv))
    out, err = io.StringIO(), io.StringIO()
    code = await execute(args, manager, out, err)
    return code, out.getvalue(), err.getvalue()


async def run_json(manager: KeyManager, *argv: str) -> Any:
    code, out, err = await run(manager, *argv, "--json")
    assert (code, err) == (0, ""), err
    return json.loads(out)


def stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


# -- argument types --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30d", timedelta(days=30)),
        ("24h", timedelta(hours=24)),
        ("90m", timedelta(minutes=90)),
        ("45s", timedelta(seconds=45)),
        ("0s", timedelta(0)),
    ],
)
def test_durations(text: str, expected: timedelta) -> None:
    """Durations are a whole number and one of the units d, h, m, s."""
    assert duration(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2027-01-01T00:00:00Z", datetime(2027, 1, 1, tzinfo=UTC)),
        ("2027-01-01T02:00:00+02:00", datetime(2027, 1, 1, tzinfo=UTC)),
        ("2027-01-01", datetime(2027, 1, 1, tzinfo=UTC)),
        ("2027-01-01T08:30:00", datetime(2027, 1, 1, 8, 30, tzinfo=UTC)),
        ("7d", timedelta(days=7)),
        ("never", "never"),
    ],
    ids=["utc", "offset", "date", "naive-is-utc", "duration", "never"],
)
def test_expiries(text: str, expected: object) -> None:
    """--expires takes a duration, an ISO 8601 time (UTC unless it says otherwise) or never."""
    assert expiry(text) == expected


@pytest.mark.parametrize(
    "argv",
    [
        ["keys", "rotate", "key_x", "--grace", "1.5h"],
        ["keys", "rotate", "key_x", "--grace", "-5d"],
        ["keys", "rotate", "key_x", "--grace", "3w"],
        ["keys", "rotate", "key_x", "--grace", "99999999999d"],
        ["keys", "create", "--name", "n", "--type", "prod", "--expires", "soon"],
        ["keys", "create", "--name", "n", "--type", "dev", "--expires", "9999-12-31T23:00-01:00"],
        ["keys", "update", "key_x", "--expires", "0001-01-01T00:00:00+01:00"],
        ["keys", "create", "--name", "n", "--type", "prod", "--meta", "project"],
        ["keys", "create", "--type", "prod"],
        ["keys", "update", "key_x", "--token-quota", "many"],
        ["keys", "frobnicate"],
        ["keys", "list", "--status", "sleeping"],
    ],
    ids=[
        "fractional",
        "negative",
        "weeks",
        "overflow",
        "bad-expiry",
        "expiry-past-9999-in-utc",
        "expiry-before-year-1-in-utc",
        "bad-meta",
        "no-name",
        "bad-quota",
        "bad-action",
        "bad-status",
    ],
)
def test_malformed_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """A malformed argument is a usage error: exit 2 and a message, no traceback."""
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


def test_keys_without_an_action_prints_help_and_exits_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`keystile keys` alone shows its actions and exits 2."""
    assert main(["keys"]) == 2
    assert "create" in capsys.readouterr().err


# -- the commands, in process, on every backend ----------------------------------------------


async def test_create_prints_the_record_and_the_secret(
    manager: KeyManager, clock: ManualClock
) -> None:
    """keys create issues the key from its options and shows the record and the secret."""
    code, out, err = await run(
        manager,
        *("keys", "create", "--name", "web app", "--type", "client"),
        *("--scope", "vec:read", "--scope", "ai:inference"),
        *("--origin", "https://app.example.com", "--ip", "10.0.0.0/8"),
        *("--rate-limit", "20/minute", "--token-quota", "500", "--expires", "30d"),
        *("--address-rate-limit", "5 per minute"),
        *("--meta", "project=web", "--meta", "owner=ana"),
    )
    assert (code, err) == (0, "")
    secret = out.split("secret", 1)[1].split()[0]
    assert secret.startswith("client_")
    record = await manager.store.find(manager.hasher.digest(secret))
    assert record is not None
    assert record.scopes == ("vec:read", "ai:inference")
    assert record.allowed_origins == ("https://app.example.com",)
    assert record.allowed_ips == ("10.0.0.0/8",)
    assert (record.rate_limit, record.token_quota) == ("20/minute", 500)
    assert record.address_rate_limit == "5/minute"
    assert "per address  5/minute\n" in out
    assert record.expires_at == to_datetime(clock.now) + timedelta(days=30)
    assert record.metadata == {"project": "web", "owner": "ana"}
    assert record.id in out and record.hint in out
    assert out.count(secret) == 1


async def test_create_json_answers_like_the_rest_api(manager: KeyManager) -> None:
    """keys create --json answers {"key": record, "secret": ...}, the record in its documented
    shape."""
    body = await run_json(
        manager, "keys", "create", "--name", "n", "--type", "dev", "--expires", "2030-01-01"
    )
    assert list(body) == ["key", "secret"]
    assert list(body["key"]) == list(RECORD_FIELDS)
    assert body["key"]["expires_at"] == "2030-01-01T00:00:00Z"
    assert body["secret"].startswith("dev_")


async def test_invalid_settings_exit_2_naming_each_field(manager: KeyManager) -> None:
    """Settings the policy refuses exit 2 with one line naming each field; nothing is made."""
    code, out, err = await run(
        manager, "keys", "create", "--name", "web", "--type", "client", "--scope", "admin:*"
    )
    assert (code, out) == (2, "")
    assert len(err.splitlines()) == 1
    assert "scopes[0]" in err and "allowed_origins" in err
    assert (await manager.list()).keys == ()


async def test_a_type_the_policy_lacks_exits_2_naming_the_declared_ones(
    manager: KeyManager,
) -> None:
    """The key types are the app's (its policy's), so an unknown one is refused with them."""
    for action in (("create", "--name", "n"), ("list",)):
        code, out, err = await run(manager, "keys", *action, "--type", "admin")
        assert (code, out) == (2, "")
        assert err.splitlines() == [
            "keystile: invalid input: type: must be one of dev, prod, client"
        ]
    assert (await manager.list()).keys == ()


async def test_list_shows_a_table_filters_and_pages(manager: KeyManager) -> None:
    """keys list shows a table; --type, --status and --meta filter; --limit and --cursor page."""
    made = []
    for n in range(3):
        made.append(
            await run_json(
                manager,
                *("keys", "create", "--name", f"k{n}", "--type", "dev" if n else "prod"),
                *("--meta", f"project={'a' if n < 2 else 'b'}"),
            )
        )
    code, out, _ = await run(manager, "keys", "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        *("ID", "NAME", "TYPE", "HINT", "STATUS", "CREATED", "EXPIRES", "LAST", "USED")
    ]
    assert len(lines) == 4 and all("active" in line for line in lines[1:])
    for body in made:
        assert body["secret"] not in out
    dev = await run_json(manager, "keys", "list", "--type", "dev")
    assert {k["name"] for k in dev["keys"]} == {"k1", "k2"}
    meta = await run_json(manager, "keys", "list", "--meta", "project=a", "--type", "dev")
    assert [k["name"] for k in meta["keys"]] == ["k1"]
    first = await run_json(manager, "keys", "list", "--limit", "2")
    assert len(first["keys"]) == 2 and first["next"]
    rest = await run_json(manager, "keys", "list", "--limit", "2", "--cursor", first["next"])
    assert len(rest["keys"]) == 1 and rest["next"] is None
    code, out, _ = await run(manager, "keys", "list", "--limit", "2")
    assert f"--cursor {first['next']}" in out
    assert (await run(manager, "keys", "list", "--status", "revoked"))[1] == "no keys\n"


async def test_show_displays_one_key_without_its_secret(manager: KeyManager) -> None:
    """keys show displays the record (as text or JSON) and never the secret; an unknown id
    exits 1."""
    created = await run_json(manager, "keys", "create", "--name", "n", "--type", "prod")
    key_id = created["key"]["id"]
    code, out, _ = await run(manager, "keys", "show", key_id)
    assert code == 0 and key_id in out and "1,000,000 / hour (type default)" in out
    assert created["secret"] not in out
    assert await run_json(manager, "keys", "show", key_id) == {"key": created["key"]}
    code, out, err = await run(manager, "keys", "show", UNKNOWN)
    assert (code, out) == (1, "") and UNKNOWN in err and len(err.splitlines()) == 1


async def test_update_changes_only_what_it_is_told(manager: KeyManager) -> None:
    """keys update replaces lists, merges and removes metadata entries, clears optional
    values, and leaves everything else alone."""
    created = await run_json(
        manager,
        *("keys", "create", "--name", "n", "--type", "prod", "--scope", "vec:read"),
        *("--ip", "10.0.0.1", "--meta", "project=a", "--meta", "owner=ana"),
        *("--rate-limit", "5/second", "--token-quota", "9", "--expires", "1d"),
        *("--address-rate-limit", "1/second"),
    )
    key_id = created["key"]["id"]
    body = await run_json(
        manager,
        *("keys", "update", key_id, "--scope", "kev:read", "--scope", "kev:write"),
        *("--meta", "team=x", "--unset-meta", "owner", "--clear-ips"),
        *("--rate-limit", "default", "--token-quota", "default", "--expires", "never"),
        *("--address-rate-limit", "DEFAULT"),
    )
    record = body["key"]
    assert record["scopes"] == ["kev:read", "kev:write"]
    assert record["metadata"] == {"project": "a", "team": "x"}
    assert record["allowed_ips"] == []
    assert (record["rate_limit"], record["token_quota"], record["expires_at"]) == (None,) * 3
    assert record["address_rate_limit"] is None
    assert (record["name"], record["type"]) == ("n", "prod")
    renamed = await run_json(manager, "keys", "update", key_id, "--name", "renamed")
    assert renamed["key"] == {**record, "name": "renamed"}


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--type", "dev"], "type cannot be changed"),
        (["--scope", "vec:fly"], "scopes[0]"),
        (["--expires", "2020-01-01T00:00:00Z"], "expires_at"),
        (["--scope", "vec:read", "--clear-scopes"], "not both"),
        ([], "nothing to change"),
    ],
    ids=["type", "scope", "expiry", "conflicting", "nothing"],
)
async def test_invalid_updates_exit_2(manager: KeyManager, argv: list[str], fragment: str) -> None:
    """An update the rules refuse exits 2 with one line saying why, and changes nothing."""
    created = await run_json(manager, "keys", "create", "--name", "n", "--type", "prod")
    code, out, err = await run(manager, "keys", "update", created["key"]["id"], *argv)
    assert (code, out) == (2, "")
    assert fragment in err and len(err.splitlines()) == 1
    stored = (await manager.get(created["key"]["id"])).model_dump(mode="json")
    assert {**stored, "status": "active", "last_used_at": None} == created["key"]


async def test_a_key_that_keeps_changing_exits_1_with_one_line(
    manager: KeyManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An update that other writers keep beating exits 1 with one line (try again), no
    traceback."""
    created = await run_json(manager, "keys", "create", "--name", "n", "--type", "prod")

    async def always_changed(key: Any, *, expected: Any = None) -> None:
        raise KeyChanged(f"key {key.id} changed meanwhile")

    monkeypatch.setattr(manager.store, "replace", always_changed)
    code, out, err = await run(manager, "keys", "update", created["key"]["id"], "--name", "m")
    assert (code, out) == (1, "")
    assert "try again" in err and len(err.splitlines()) == 1


async def test_revoke_then_show_says_revoked(manager: KeyManager, clock: ManualClock) -> None:
    """keys revoke revokes at once (twice is harmless) and show reports the status."""
    created = await run_json(manager, "keys", "create", "--name", "n", "--type", "prod")
    key_id = created["key"]["id"]
    code, out, _ = await run(manager, "keys", "revoke", key_id)
    assert code == 0 and f"revoked {key_id}" in out and stamp(to_datetime(clock.now)) in out
    assert (await run(manager, "keys", "revoke", key_id))[0] == 0
    assert "status       revoked" in (await run(manager, "keys", "show", key_id))[1]
    assert (await run(manager, "keys", "revoke", UNKNOWN))[0] == 1


async def test_rotate_prints_the_new_secret_and_the_old_keys_last_moment(
    manager: KeyManager, clock: ManualClock
) -> None:
    """keys rotate --grace issues the successor, prints its secret once and when the old key
    stops working; rotating it again, or a revoked key, exits 1."""
    created = await run_json(manager, "keys", "create", "--name", "n", "--type", "prod")
    key_id = created["key"]["id"]
    code, out, err = await run(manager, "keys", "rotate", key_id, "--grace", "90m")
    assert (code, err) == (0, "")
    old = await manager.get(key_id)
    assert old.expires_at == to_datetime(clock.now + 5400)
    assert stamp(old.expires_at) in out
    secret = out.split("secret", 1)[1].split()[0]
    new = await manager.store.find(manager.hasher.digest(secret))
    assert new is not None and new.replaces == key_id and old.replaced_by == new.id
    code, _, err = await run(manager, "keys", "rotate", key_id)
    assert code == 1 and "already rotated" in err and new.id in err
    await manager.revoke(new.id)
    code, _, err = await run(manager, "keys", "rotate", new.id)
    assert code == 1 and "revoked" in err


async def test_rotate_json_and_default_grace(manager: KeyManager, clock: ManualClock) -> None:
    """keys rotate --json answers key, secret and previous; the default grace is 24 hours."""
    created = await run_json(manager, "keys", "create", "--name", "n", "--type", "dev")
    body = await run_json(manager, "keys", "rotate", created["key"]["id"])
    assert list(body) == ["key", "secret", "previous"]
    assert body["previous"]["expires_at"] == stamp(to_datetime(clock.now + 86_400))
    assert body["key"]["replaces"] == created["key"]["id"]


async def test_usage_shows_what_was_recorded(manager: KeyManager) -> None:
    """usage KEY prints the key's all-time figures; usage lists keys; unknown keys exit 1."""
    # As the gate wires it: the manager reads through its recorder's reader.
    recorder = UsageRecorder(
        backend_for(manager.store).usage_store(manager.clock), clock=manager.clock
    )
    manager = KeyManager(
        manager.store, manager.hasher, clock=manager.clock, usage=recorder.reader()
    )
    created = await run_json(manager, "keys", "create", "--name", "n", "--type", "dev")
    key_id = created["key"]["id"]
    recorder.record(key_id, 200, 5, 50, ip="10.9.8.7")
    recorder.record(key_id, 500, 0, 0, ip="10.9.8.7")
    code, out, _ = await run(manager, "usage", key_id)
    assert code == 0
    assert "requests          2" in out
    assert "errors 5xx        1" in out
    assert "10.9.8.7" in out
    everything = await run_json(manager, "usage")
    assert key_id in [k["key_id"] for k in everything["keys"]]
    assert (await run(manager, "usage", UNKNOWN))[0] == 1


async def test_an_unreachable_store_is_one_line_and_exit_1(unused_redis_url: str) -> None:
    """When Redis does not answer, a command exits 1 with one line and no traceback."""
    store = RedisStore.from_url(unused_redis_url, namespace="kstest-unreachable")
    manager = KeyManager(store, KeyHasher(SECRET))
    try:
        code, out, err = await run(manager, "keys", "list")
    finally:
        await store.close()
    assert (code, out) == (1, "")
    assert len(err.splitlines()) == 1 and "cannot reach" in err


# -- the whole command, with its environment --------------------------------------------------


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No KEYSTILE_ variable but the ones a test sets."""
    for name in list(os.environ):
        if name.startswith("KEYSTILE_"):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.mark.parametrize(
    ("env", "argv", "fragment"),
    [
        ({"KEYSTILE_SECRET": SECRET}, [], "a shared store is needed"),
        ({"KEYSTILE_SECRET": SECRET, "KEYSTILE_REDIS_URL": "memory://"}, [], "vanish"),
        ({"KEYSTILE_SECRET": SECRET}, ["--redis", "memory://"], "vanish"),
        ({"KEYSTILE_SECRET": SECRET}, ["--redis", "http://x"], "redis://"),
        ({}, ["--redis", REDIS_URL], "KEYSTILE_SECRET is not set"),
        ({"KEYSTILE_SECRET": "short"}, ["--redis", REDIS_URL], "16 bytes"),
        (
            {"KEYSTILE_SECRET": SECRET, "KEYSTILE_NAMESPACE": "a b"},
            ["--redis", REDIS_URL],
            "namespace",
        ),
        (
            {"KEYSTILE_SECRET": SECRET, "KEYSTILE_REDIS_TIMEOUT": "soon"},
            [],
            "KEYSTILE_REDIS_TIMEOUT",
        ),
        (
            {"KEYSTILE_SECRET": SECRET},
            ["--redis", "redis://:hunter2@127.0.0.1:1/0?bogus=1"],
            "unexpected keyword argument 'bogus'",
        ),
    ],
    ids=[
        "no-store",
        "memory-env",
        "memory-option",
        "not-redis",
        "no-secret",
        "short-secret",
        "bad-namespace",
        "bad-env",
        "unknown-url-option",
    ],
)
def test_configuration_problems_exit_2_with_one_line(
    environment: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    argv: list[str],
    fragment: str,
) -> None:
    """Without a shared store or a usable secret, key commands explain what is missing in
    one line and exit 2."""
    for name, value in env.items():
        environment.setenv(name, value)
    assert main(["keys", "list", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert fragment in captured.err and len(captured.err.splitlines()) == 1
    assert "hunter2" not in captured.err


def test_an_unreachable_redis_exits_1_without_showing_its_password(
    environment: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], unused_redis_url: str
) -> None:
    """An unreachable Redis is one line on stderr and exit 1; the URL's password is hidden."""
    environment.setenv("KEYSTILE_SECRET", SECRET)
    url = unused_redis_url.replace("redis://", "redis://:hunter2@")
    assert main(["keys", "show", "key_x", "--redis", url]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "cannot reach" in err
    assert "hunter2" not in err and ":***@" in err


def keystile(namespace: str, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The installed `keystile` command, on the real Redis under ``namespace``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KEYSTILE_")}
    return subprocess.run(
        [KEYSTILE, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, "KEYSTILE_SECRET": SECRET, "KEYSTILE_NAMESPACE": namespace, **env},
    )


@pytest.fixture
async def app_gate(redis_namespace: str) -> AsyncIterator[Keystile]:
    """A running app's gate on the real Redis, sharing the namespace and the secret."""
    gate = Keystile(store=RedisStore.from_url(REDIS_URL, namespace=redis_namespace), secret=SECRET)
    assert await gate.store.start(timeout=5.0)
    yield gate
    await gate.aclose()


@pytest.mark.timing
async def test_a_key_made_on_the_command_line_works_in_a_running_app(
    redis_namespace: str, app_gate: Keystile
) -> None:
    """A key created by `keystile keys create` authenticates at once in an app sharing the
    Redis and the secret; `keystile keys revoke` gets it refused within 100 ms."""

    async def endpoint(request: Request) -> JSONResponse:
        return JSONResponse({"key": request.user.identity})

    app = Starlette(
        routes=[Route("/x", endpoint)], middleware=[Middleware(KeystileMiddleware, gate=app_gate)]
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
        before = await http.get("/x", headers={"Authorization": "Bearer dev_x"})
        assert before.status_code == 401
        made = keystile(
            redis_namespace,
            *("keys", "create", "--redis", REDIS_URL, "--json"),
            *("--name", "from the shell", "--type", "prod", "--scope", "vec:read"),
        )
        assert made.returncode == 0, made.stderr
        body = json.loads(made.stdout)
        headers = {"Authorization": f"Bearer {body['secret']}"}
        admitted = await http.get("/x", headers=headers)
        assert admitted.status_code == 200
        assert admitted.json() == {"key": body["key"]["id"]}

        revoked = keystile(
            redis_namespace, "keys", "revoke", body["key"]["id"], "--redis", REDIS_URL
        )
        assert revoked.returncode == 0, revoked.stderr

        async def refused() -> bool:
            response = await http.get("/x", headers=headers)
            return response.status_code == 401 and response.json()["error"]["code"] == (
                "revoked_api_key"
            )

        await within(0.1, refused)


async def test_the_command_reads_the_store_from_the_environment(
    redis_namespace: str, app_gate: Keystile
) -> None:
    """With KEYSTILE_REDIS_URL set, no --redis is needed: a key made by the app is listed,
    rotated and shown by the command, and its hint is never followed by its secret."""
    created = await app_gate.manager.create({"name": "app-made", "type": "dev"})
    listed = keystile(redis_namespace, "keys", "list", KEYSTILE_REDIS_URL=REDIS_URL)
    assert listed.returncode == 0, listed.stderr
    assert created.key.id in listed.stdout and created.key.hint in listed.stdout
    rotated = keystile(
        redis_namespace,
        *("keys", "rotate", created.key.id, "--grace", "0s", "--json"),
        KEYSTILE_REDIS_URL=REDIS_URL,
    )
    assert rotated.returncode == 0, rotated.stderr
    body = json.loads(rotated.stdout)
    assert body["previous"]["replaced_by"] == body["key"]["id"]
    assert created.secret.get_secret_value() not in listed.stdout + rotated.stdout
    assert (await app_gate.manager.get(created.key.id)).replaced_by == body["key"]["id"]


def test_the_installed_command_reports_an_unreachable_redis_plainly(
    unused_redis_url: str,
) -> None:
    """The installed command, given a Redis where nothing listens, prints one line and exits
    1 — no traceback."""
    result = keystile("kstest-nowhere", "keys", "list", "--redis", unused_redis_url)
    assert result.returncode == 1
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr


async def test_reindex_indexes_the_stored_keys(manager: KeyManager) -> None:
    """keys reindex places every stored key in the listing index and says how many (on a
    memory store, whose index is always complete, that there is nothing to do)."""
    created = await run_json(manager, "keys", "create", "--name", "n", "--type", "prod")
    code, out, err = await run(manager, "keys", "reindex")
    assert code == 0 and err == ""
    if "nothing to do" not in out:
        assert out == "stored keys indexed for listing: 1\n"
        assert await run_json(manager, "keys", "reindex") == {"indexed": 1}
    listed = await run_json(manager, "keys", "list", "--status", "active")
    assert [k["id"] for k in listed["keys"]] == [created["key"]["id"]]
