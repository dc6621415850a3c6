"""One configuration surface: every setting as a keyword argument and as an environment
variable, unknown variables named, bad values in one line, and what start-up says."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from typing import Any

import pytest

from conftest import REDIS_URL, SECRET
from keystile import ConfigurationError, KeyHasher, Keystile, KeystileSettings
from keystile.fallback import failure_cause
from keystile.settings import SettingsOptions, env_name, unknown_variables
from keystile.stores import RedisStore

# A value each setting accepts that is not its default, as Python and as the environment.
VALUES: dict[str, tuple[Any, str]] = {
    "redis_url": ("redis://127.0.0.1:6379/2", "redis://127.0.0.1:6379/2"),
    "secret": ("s" * 32, "s" * 32),
    "namespace": ("shop", "shop"),
    "redis_timeout": (0.75, "0.75"),
    "redis_pool_size": (7, "7"),
    "redis_pool_timeout": (2.5, "2.5"),
    "cache_size": (123, "123"),
    "cache_ttl": (3.0, "3"),
    "negative_cache_size": (9, "9"),
    "negative_cache_ttl": (1.5, "1.5"),
    "rate_limit_timeout": (0.5, "0.5"),
    "usage_flush_interval": (2.0, "2"),
    "usage_max_buckets": (99, "99"),
    "usage_minute_retention": (3600, "3600"),
    "usage_day_retention": (86_400 * 2, "172800"),
    "usage_top_n": (5, "5"),
    "alert_webhook_url": ("https://hooks.example/x", "https://hooks.example/x"),
    "alert_webhook_secret": ("whsec_" + "QUJD" * 8, "whsec_" + "QUJD" * 8),
    "audit_retention": (7 * 86_400, "604800"),
    "cache_announced_ttl": (900.0, "900"),
    "audit_max_events": (5000, "5000"),
    "rate_limit_failure": ("deny", "deny"),
    "rate_limit_trip_after": (4, "4"),
    "rate_limit_backoff": (0.1, "0.1"),
    "rate_limit_backoff_max": (2.0, "2"),
}


def plain(value: Any) -> Any:
    return value.get_secret_value() if hasattr(value, "get_secret_value") else value


def test_the_value_table_and_the_typed_keywords_cover_every_setting() -> None:
    """The keyword arguments Keystile types (SettingsOptions) are exactly the settings but
    the secret, which is its own argument."""
    assert set(VALUES) == set(KeystileSettings.model_fields)
    assert set(SettingsOptions.__annotations__) == set(KeystileSettings.model_fields) - {"secret"}


@pytest.mark.parametrize("name", sorted(VALUES))
def test_every_setting_is_a_keyword_and_an_environment_variable(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keystile(<setting>=value) and KEYSTILE_<SETTING>=value reach the gate's settings."""
    python, text = VALUES[name]
    options: dict[str, Any] = {"store": "memory://"}
    options[name] = python
    if name == "rate_limit_backoff_max":
        options["rate_limit_backoff"] = 0.05
    gate = Keystile(**options)
    monkeypatch.setenv(env_name(name), text)
    from_env = Keystile(store="memory://")
    if name == "secret":  # its own argument: the digests are keyed with it
        expected = KeyHasher(python).digest("dev_x")
        assert gate.hasher.digest("dev_x") == from_env.hasher.digest("dev_x") == expected
        return
    assert plain(getattr(gate.settings, name)) == python
    assert plain(getattr(from_env.settings, name)) == python


def test_keywords_take_precedence_over_a_settings_object_and_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A keyword wins over the environment and over settings=; the rest is kept."""
    monkeypatch.setenv("KEYSTILE_NAMESPACE", "from-env")
    settings = KeystileSettings(cache_size=42)
    gate = Keystile(store="memory://", settings=settings, namespace="from-kwarg")
    assert gate.settings.namespace == "from-kwarg"
    assert gate.settings.cache_size == 42
    assert gate.store.max_size == 42
    assert Keystile(store="memory://", settings=settings).settings is settings


async def test_namespace_and_redis_url_keywords_open_that_store(redis_namespace: str) -> None:
    """Keystile(namespace=..., redis_url=...) keeps keys in that Redis under that prefix."""
    gate = Keystile(redis_url=REDIS_URL, namespace=redis_namespace, secret=SECRET)
    try:
        store = gate.store.store
        assert isinstance(store, RedisStore) and store.namespace == redis_namespace
        created = await gate.manager.create({"name": "n", "type": "dev"})
        client = store.client
        assert await client.exists(f"{redis_namespace}:key:{{{created.key.id}}}")
    finally:
        await gate.aclose()


def test_a_misspelt_keyword_is_refused_naming_the_setting() -> None:
    with pytest.raises(TypeError, match=r"unknown setting 'namspace'; did you mean 'namespace'"):
        Keystile(namspace="x")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"unknown setting 'cache_tl'; did you mean 'cache_ttl'"):
        KeystileSettings(cache_tl=3)


def test_a_misspelt_variable_is_a_warning_naming_the_closest_setting(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("KEYSTILE_REDIS_ULR", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("KEYSTILE_TEST_SOMETHING", "1")  # the test suite's own: not warned
    assert unknown_variables() == {"KEYSTILE_REDIS_ULR": "KEYSTILE_REDIS_URL"}
    caplog.set_level(logging.WARNING, logger="keystile")
    KeystileSettings()
    KeystileSettings()
    warned = [r.getMessage() for r in caplog.records if "KEYSTILE_REDIS_ULR" in r.getMessage()]
    assert warned == [
        "the environment variable KEYSTILE_REDIS_ULR is not a keystile setting and is "
        "ignored: did you mean KEYSTILE_REDIS_URL?"
    ]


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        (
            "KEYSTILE_RATE_LIMIT_FAILURE",
            "maybe",
            "KEYSTILE_RATE_LIMIT_FAILURE='maybe' is not valid: Input should be 'allow' or 'deny'",
        ),
        (
            "KEYSTILE_CACHE_SIZE",
            "lots",
            "KEYSTILE_CACHE_SIZE='lots' is not valid: Input should be a valid integer",
        ),
        (
            "KEYSTILE_REDIS_TIMEOUT",
            "0",
            "KEYSTILE_REDIS_TIMEOUT='0' is not valid: Input should be greater than 0",
        ),
    ],
)
def test_a_bad_value_is_one_line_naming_the_variable(
    variable: str, value: str, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError) as raised:
        Keystile(store="memory://")
    message = str(raised.value)
    assert message.startswith(expected)
    assert "\n" not in message
    assert isinstance(raised.value, ValueError)


def test_a_bad_keyword_is_named_as_the_keyword() -> None:
    with pytest.raises(ConfigurationError, match=r"^cache_ttl=-1 is not valid: Input should be"):
        Keystile(store="memory://", cache_ttl=-1)


def test_the_command_line_prints_a_bad_value_in_one_line() -> None:
    """No pydantic traceback: one line naming the variable, exit 2."""
    env = {**os.environ, "KEYSTILE_RATE_LIMIT_FAILURE": "sometimes"}
    env["KEYSTILE_SECRET"] = SECRET
    done = subprocess.run(
        [sys.executable, "-m", "keystile.cli", "keys", "list", "--redis", REDIS_URL],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr == (
        "keystile: KEYSTILE_RATE_LIMIT_FAILURE='sometimes' is not valid: "
        "Input should be 'allow' or 'deny'\n"
    )


async def test_startup_names_the_store_and_never_the_password(
    redis_namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="keystile")
    host_port = REDIS_URL.split("//", 1)[1].split("/", 1)[0]
    url = f"redis://default:hunter2-not-logged@{host_port}/0"
    gate = Keystile(redis_url=url, namespace=redis_namespace, secret=SECRET)
    try:
        await gate.startup()
    finally:
        await gate.aclose()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("keys are kept")]
    assert lines == [
        f"keys are kept in Redis at {host_port}, database 0, namespace '{redis_namespace}'"
    ]
    assert all("hunter2" not in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if "MEMORY STORE" in r.getMessage()]


async def test_startup_warns_loudly_on_the_memory_store_with_a_made_up_secret(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="keystile")
    gate = Keystile(store="memory://")
    await gate.startup()
    await gate.startup()  # as `keystile demo` does before its app's lifespan starts it again
    await gate.aclose()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len([r for r in warnings if "MEMORY STORE" in r.getMessage()]) == 1  # said once
    kept = [r for r in caplog.records if r.getMessage().startswith("keys are kept in")]
    assert len(kept) == 1
    assert "KEYSTILE_REDIS_URL" in warnings[-1].getMessage()
    caplog.clear()
    with_secret = Keystile(store="memory://", secret=SECRET)
    await with_secret.startup()
    await with_secret.aclose()
    assert not [r for r in caplog.records if "MEMORY STORE" in r.getMessage()]
    assert [r.getMessage() for r in caplog.records] == [
        "keys are kept in the memory store (keys live and die with this process)"
    ]


def test_failure_causes_are_named() -> None:
    """Refused, DNS and timeout are told apart, through redis-py's wrapping."""
    import socket

    import redis.exceptions

    def wrapped(original: BaseException, outer: BaseException) -> BaseException:
        try:
            try:
                raise original
            except BaseException:
                raise outer  # noqa: B904 - chained implicitly, as redis-py does
        except BaseException as exc:
            return exc

    refused = wrapped(
        ConnectionRefusedError(111, "Connection refused"), redis.ConnectionError("x")
    )
    dns = wrapped(socket.gaierror(-2, "Name or service not known"), redis.ConnectionError("y"))
    assert failure_cause(refused).startswith("connection refused (")
    assert failure_cause(dns).startswith("host name not found (DNS) (")
    assert failure_cause(redis.exceptions.TimeoutError("Timeout connecting")).startswith(
        "timed out"
    )
    assert failure_cause(ValueError("odd")) == "ValueError: odd"


async def test_a_lost_events_channel_is_logged_once_naming_host_and_cause(
    unused_redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis down: the listener retries many times, but says so once (not once a retry),
    with the host and the cause."""
    caplog.set_level(logging.WARNING, logger="keystile.store")
    store = RedisStore.from_url(unused_redis_url, namespace="kstest-down", timeout=0.2)
    tries = 0
    make_pubsub = store.client.pubsub

    def counting_pubsub(**kwargs: Any) -> Any:
        nonlocal tries
        tries += 1
        return make_pubsub(**kwargs)

    store.client.pubsub = counting_pubsub  # type: ignore[method-assign]

    class Listener:
        def resync(self) -> None: ...
        def key_changed(self, key_id: str, digest: str | None) -> None: ...
        def connection_lost(self) -> None: ...

    try:
        store.add_listener(Listener())
        for _ in range(2000):
            if tries >= 5:
                break
            await asyncio.sleep(0.01)
        assert tries >= 5
    finally:
        await store.close()
    lost = [r.getMessage() for r in caplog.records if "events channel" in r.getMessage()]
    port = unused_redis_url.rsplit(":", 1)[1].split("/")[0]
    assert len(lost) == 1, lost
    assert f"at 127.0.0.1:{port} (connection refused" in lost[0]


async def test_an_unreachable_store_is_named_with_its_cause_at_start_and_on_lookups(
    unused_redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Start-up and failing key lookups (503) name the host and why, and the lookups' log
    is one line for many refusals."""
    import httpx
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from keystile import KeystileMiddleware, generate_key

    async def endpoint(request: Any) -> JSONResponse:
        return JSONResponse({})

    caplog.set_level(logging.WARNING, logger="keystile")
    gate = Keystile(redis_url=unused_redis_url, secret=SECRET, redis_timeout=0.2)
    app = KeystileMiddleware(Starlette(routes=[Route("/x", endpoint)]), gate=gate)
    port = unused_redis_url.rsplit(":", 1)[1].split("/")[0]
    try:
        await gate.startup()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as http:
            for _ in range(5):
                token = generate_key("dev_")
                answer = await http.get("/x", headers={"Authorization": f"Bearer {token}"})
                assert answer.status_code == 503
    finally:
        await gate.aclose()
    messages = [r.getMessage() for r in caplog.records]
    [started] = [m for m in messages if m.startswith("cannot reach the key store")]
    assert f"Redis at 127.0.0.1:{port}, database 0" in started
    assert ": connection refused (" in started
    lookups = [m for m in messages if m.startswith("key lookups failing")]
    assert len(lookups) == 1
    assert lookups[0].startswith(f"key lookups failing at 127.0.0.1:{port} (connection refused")


async def test_the_startup_line_names_a_sentinel_service_without_its_password() -> None:
    from keystile.gate import store_description

    url = "redis+sentinel://:hunter2@127.0.0.1:1,127.0.0.1:2/mymaster?db=2"
    gate = Keystile(redis_url=url, secret=SECRET, namespace="shop")
    try:
        described = store_description(gate.store.store)
    finally:
        await gate.aclose()
    assert described == (
        "Redis at the master of Sentinel service 'mymaster', database 2, namespace 'shop'"
    )
