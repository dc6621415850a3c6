"""Security regressions from the issue tracker (#18), one section per item: what an attacker
can make a server hold or reveal, and what a refused request costs."""

from __future__ import annotations

import ast
import contextlib
import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route

from conftest import REDIS_URL, SECRET, Figures, require_redis
from faults.server import Server, child_env, serve_command
from keystile import (
    ApiKey,
    KeyHasher,
    KeyManager,
    KeystileMiddleware,
    KeyValidationError,
    ManualClock,
    MemoryStore,
    generate_key,
)
from keystile.admin import admin_app
from keystile.cli import build_parser, execute
from keystile.clock import to_datetime
from keystile.gate import MAX_ORIGIN_MEMO, Keystile
from keystile.keys import new_key_id
from keystile.models import DEFAULT_POLICY
from keystile.routing import Rule, public
from keystile.stores import CachedStore, KeyStore
from keystile.stores.cache import MAX_CREDENTIAL
from test_middleware import call, make_app, new_key

SRC = Path(__file__).resolve().parent.parent / "src" / "keystile"

# -- item 2: a known key must not pin memory ------------------------------------------------


@pytest.fixture
def memory_gate(clock: ManualClock) -> Keystile:
    """A gate on the in-memory store, on the test's manual clock."""
    return Keystile(store=MemoryStore(), secret=SECRET, clock=clock)


def remembered(gate: Keystile) -> tuple[int, int]:
    """What the cache holds in its credential map: entries, and bytes of credentials."""
    held = gate.store._remembered
    return len(held), sum(len(credential) for credential in held)


def padded(key: str, spaces: int, scheme: bytes = b"Bearer") -> bytes:
    """``Bearer``, ``spaces`` spaces, the key: valid syntax (1*SP), not canonical."""
    return scheme + b" " * spaces + key.encode()


async def refused_key(gate: Keystile, clock: ManualClock, kind: str) -> tuple[str, str]:
    """A key the gate refuses, of one kind; the key and the error code it gets."""
    if kind == "revoked":
        created = await gate.manager.create({"name": "n", "type": "prod"})
        await gate.manager.revoke(created.key.id)
        return created.secret.get_secret_value(), "revoked_api_key"
    if kind == "expired":
        expires = to_datetime(clock.now + 10)
        created = await gate.manager.create({"name": "n", "type": "prod", "expires_at": expires})
        clock.advance(20)
        return created.secret.get_secret_value(), "expired_api_key"
    if kind == "unknown":
        return generate_key("prod_"), "invalid_api_key"
    key = await new_key(gate)  # a known key, its checksum broken
    return key[:-1] + ("A" if key[-1] != "A" else "B"), "invalid_api_key"


REFUSALS = ["revoked", "expired", "unknown", "bad-checksum"]


@pytest.mark.parametrize("spaces", [1, 4096], ids=["canonical", "padded"])
@pytest.mark.parametrize("kind", REFUSALS)
async def test_item2_refused_keys_leave_nothing_remembered(
    memory_gate: Keystile, clock: ManualClock, kind: str, spaces: int
) -> None:
    """Requests with a key that is refused — revoked, expired, unknown, bad checksum; sent
    as ``Bearer <key>`` or padded with spaces, each request's bytes different — are all
    401 and leave the credential map empty: no entries, no bytes."""
    app, seen = make_app(memory_gate)
    key, code = await refused_key(memory_gate, clock, kind)
    for n in range(20):
        response = await call(app, [(b"authorization", padded(key, spaces + n))])
        assert response.status_code == 401
        assert response.json()["error"]["code"] == code
    assert remembered(memory_gate) == (0, 0)
    assert len(seen) == 0


@pytest.mark.parametrize(
    ("scheme", "spaces"),
    [
        pytest.param(b"Bearer", 2, id="two-spaces"),
        pytest.param(b"Bearer", 65_536, id="64-KiB-of-spaces"),
        pytest.param(b"bearer", 1, id="lower-case-scheme"),
        pytest.param(b"BEARER", 3, id="upper-case-scheme-and-spaces"),
    ],
)
async def test_item2_valid_key_spelt_otherwise_is_admitted_but_not_remembered(
    memory_gate: Keystile, scheme: bytes, spaces: int
) -> None:
    """A valid key in a header that is not exactly ``Bearer <key>`` is still admitted on
    every request (case-insensitive scheme, 1*SP), but never remembered: only the
    canonical spelling is, so the map's keys are short whatever the client sends."""
    app, seen = make_app(memory_gate)
    key = await new_key(memory_gate)
    for n in range(5):
        response = await call(app, [(b"authorization", padded(key, spaces + n, scheme))])
        assert response.status_code == 200
    assert remembered(memory_gate) == (0, 0)
    assert len(seen) == 5


async def test_item2_admitted_key_is_remembered_by_its_canonical_header(
    memory_gate: Keystile,
) -> None:
    """``Bearer <key>``, admitted, is remembered once, and repeat requests are answered
    from the map without hashing the key again."""
    app, _ = make_app(memory_gate)
    key = await new_key(memory_gate)
    credential = b"Bearer " + key.encode()
    assert (await call(app, [(b"authorization", credential)])).status_code == 200
    assert remembered(memory_gate) == (1, len(credential))
    assert list(memory_gate.store._remembered) == [credential]
    hits = memory_gate.store.hits
    for _ in range(5):
        assert (await call(app, [(b"authorization", credential)])).status_code == 200
    assert memory_gate.store.hits == hits + 5
    assert remembered(memory_gate) == (1, len(credential))


@pytest.mark.parametrize("ending", ["revoked", "expired"])
async def test_item2_a_remembered_key_is_forgotten_when_it_stops_being_admitted(
    memory_gate: Keystile, clock: ManualClock, ending: str
) -> None:
    """A remembered key that is then revoked, or reaches its expiry, is refused on the next
    request and leaves the map at once, and stays out of it on later requests."""
    app, _ = make_app(memory_gate)
    expires = to_datetime(clock.now + 60)
    created = await memory_gate.manager.create(
        {"name": "n", "type": "prod", "scopes": ["vec:read"], "expires_at": expires}
    )
    credential = b"Bearer " + created.secret.get_secret_value().encode()
    assert (await call(app, [(b"authorization", credential)])).status_code == 200
    assert remembered(memory_gate) == (1, len(credential))
    if ending == "revoked":
        await memory_gate.manager.revoke(created.key.id)
    else:
        clock.advance(61)
    for _ in range(3):
        response = await call(app, [(b"authorization", credential)])
        assert response.status_code == 401
        assert response.json()["error"]["code"] == f"{ending}_api_key"
        assert remembered(memory_gate) == (0, 0)


async def test_item2_the_credential_map_is_bounded_in_bytes() -> None:
    """A credential longer than MAX_CREDENTIAL is never remembered; the map holds at most
    ``max_size`` credentials, hence at most ``max_size * MAX_CREDENTIAL`` bytes of them."""
    store = MemoryStore()
    manager = KeyManager(store, KeyHasher(SECRET))
    cache = CachedStore(store, max_size=4, clock=ManualClock(0.0))
    entries = []
    for n in range(4):
        created = await manager.create({"name": f"k{n}", "type": "dev"})
        entry = await cache.lookup(manager.hasher.digest(created.secret.get_secret_value()))
        assert entry is not None
        entries.append(entry)
    cache.remember(b"B" * (MAX_CREDENTIAL + 1), entries[0])
    assert len(cache._remembered) == 0
    cache.remember(b"B" * MAX_CREDENTIAL, entries[0])
    assert len(cache._remembered) == 1
    for n in range(16):
        cache.remember(f"{n:x}".encode() * MAX_CREDENTIAL, entries[n % 4])
    held = cache._remembered
    assert len(held) == 4
    assert sum(len(c) for c in held) <= 4 * MAX_CREDENTIAL


# -- item 2, in a real server: resident memory after thousands of padded headers ------------

TESTS = Path(__file__).resolve().parent
TOKEN_FILE_ENV = "KS_SECURITY_TOKEN_FILE"


def write_keys(path: str, keys: dict[str, str]) -> None:
    """Write ``keys`` as JSON; the file appears whole, once the app is about to serve."""
    partial = path + ".partial"
    Path(partial).write_text(json.dumps(keys), encoding="ascii")
    os.replace(partial, path)


def credential_app() -> Starlette:
    """A uvicorn ``--factory``: ``/health`` (public) and ``/x`` (``kev:read``) behind the
    middleware on a memory store. Its lifespan issues one valid and one revoked key and
    writes both, as JSON, to the file named by ``KS_SECURITY_TOKEN_FILE``."""
    gate = Keystile(store="memory://", secret=SECRET)
    token_file = os.environ[TOKEN_FILE_ENV]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        fields = {"name": "n", "type": "prod", "scopes": ["kev:read"]}
        valid = await gate.manager.create(fields)
        revoked = await gate.manager.create(fields)
        await gate.manager.revoke(revoked.key.id)
        keys = {
            "valid": valid.secret.get_secret_value(),
            "revoked": revoked.secret.get_secret_value(),
        }
        write_keys(token_file, keys)
        yield

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def x(request: Request) -> Response:
        return JSONResponse({"id": request.user.identity})

    rules = [public("/health"), Rule("GET", "/x", ["kev:read"])]
    return Starlette(
        routes=[Route("/health", health), Route("/x", x)],
        middleware=[Middleware(KeystileMiddleware, gate=gate, rules=rules)],
        lifespan=lifespan,
    )


def http_flags() -> list[str]:
    """httptools when installed (no header size limit); else h11 with its limit raised."""
    try:
        import httptools  # noqa: F401
    except ImportError:
        return ["--http", "h11", "--h11-max-incomplete-event-size", str(4 * 1024 * 1024)]
    return ["--http", "httptools"]


@contextlib.contextmanager
def credential_server(token_file: Path) -> Iterator[Server]:
    def argv(port: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "test_security:credential_app",
            "--app-dir",
            str(TESTS),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
            *http_flags(),
        ]

    env = child_env(**{TOKEN_FILE_ENV: str(token_file)})
    with serve_command(argv, env, kind=Server) as server:
        yield server


def resident_kib(pid: int) -> int:
    """The process's resident set (VmRSS), in KiB."""
    status = Path(f"/proc/{pid}/status").read_text(encoding="ascii")
    found = re.search(r"^VmRSS:\s+(\d+) kB$", status, re.MULTILINE)
    assert found is not None, status
    return int(found.group(1))


def exchange(sock: socket.socket, authorization: bytes) -> int:
    """One ``GET /x`` on a kept-alive connection; the response status."""
    sock.sendall(b"GET /x HTTP/1.1\r\nHost: test\r\nAuthorization: " + authorization + b"\r\n\r\n")
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection"
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length:\s*(\d+)\r?$", head)
    assert length is not None, head
    while len(body) < int(length.group(1)):
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection"
        body += chunk
    return int(head.split(b" ", 2)[1])


def test_item2_padded_headers_with_a_revoked_key_do_not_grow_the_server(
    tmp_path: Path, figures: Figures
) -> None:
    """A uvicorn process answers 2,000 ``Bearer <64-128 KiB of spaces><revoked key>``
    requests, each header different, with 401, and its resident memory grows by less
    than 40 MB (it grew by the sum of the headers, ~190 MB, when the raw header of any
    key found in the store was remembered)."""
    token_file = tmp_path / "keys.json"
    with credential_server(token_file) as server:
        assert server.process is not None
        keys = json.loads(token_file.read_text(encoding="ascii"))
        pid = server.process.pid
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            # Warm up the parser's and the allocator's buffers with headers of the same sizes.
            for n in range(100):
                assert exchange(sock, padded(generate_key("prod_"), 65_536 + n * 640)) == 401
            before = resident_kib(pid)
            statuses = [
                exchange(sock, padded(keys["revoked"], 65_536 + n * 32)) for n in range(2_000)
            ]
            after = resident_kib(pid)
            assert exchange(sock, b"Bearer " + keys["valid"].encode()) == 200
    assert statuses == [401] * 2_000
    growth = (after - before) / 1024
    figures.add(
        f"item 2: server RSS {before / 1024:.1f} MB -> {after / 1024:.1f} MB "
        f"(+{growth:.1f} MB) after 2,000 padded revoked-key requests"
    )
    assert growth < 40, f"RSS grew by {growth:.1f} MB"


@pytest.mark.parametrize("size", [1024, 1024 * 1024])
async def test_item2_huge_origins_with_a_public_client_key_pin_nothing(
    memory_gate: Keystile, size: int
) -> None:
    """The same class through ``Origin``: a client key is public, so anyone can send it
    with 64 different huge origins. Each is refused 403 (origin_not_allowed) and the key's
    principal remembers no value longer than MAX_ORIGIN_MEMO bytes."""
    created = await memory_gate.manager.create(
        {
            "name": "web",
            "type": "client",
            "scopes": ["vec:read"],
            "allowed_origins": ["https://app.example.com"],
        }
    )
    secret = created.secret.get_secret_value()
    app, _ = make_app(memory_gate)
    for n in range(64):
        origin = b"https://" + str(n).encode() + b"a" * size + b".example.com"
        response = await call(
            app, [(b"authorization", b"Bearer " + secret.encode()), (b"origin", origin)]
        )
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "origin_not_allowed"
    ok = await call(
        app,
        [
            (b"authorization", b"Bearer " + secret.encode()),
            (b"origin", b"https://app.example.com"),
        ],
    )
    assert ok.status_code == 200
    entry = await memory_gate.store.lookup(memory_gate.hasher.digest(secret))
    assert entry is not None
    principal = memory_gate.principal(entry)
    memo = principal._origin_memo
    assert sum(len(value) for value in memo) <= len(memo) * MAX_ORIGIN_MEMO
    assert memo == {b"https://app.example.com": True}


# -- issue #18 item 9: a secret pasted into any field is never echoed ---------------------------

Body = Callable[[str], dict[str, Any]]


def leaked(secret: str, text: str) -> list[str]:
    """The 8-character pieces of ``secret`` that ``text`` contains (its display hint,
    prefix and last 4 characters, holds none)."""
    return [secret[i : i + 8] for i in range(len(secret) - 7) if secret[i : i + 8] in text]


# Invalid values with a key inside, for every writable field, the way a caller may paste
# one: alone, inside other text, glued to it, or as a field's or metadata entry's name.
SETTINGS: list[tuple[str, Body]] = [
    ("name-too-long", lambda k: {"name": k * 6}),
    ("scope", lambda k: {"scopes": [k]}),
    ("scope-action", lambda k: {"scopes": [f"vec:{k}"]}),
    ("scope-service", lambda k: {"scopes": [f"{k}:read"]}),
    ("origin", lambda k: {"allowed_origins": [k]}),
    ("origin-host", lambda k: {"allowed_origins": [f"https://{k}.example.com/"]}),
    ("ip", lambda k: {"allowed_ips": [k]}),
    ("ip-prefix", lambda k: {"allowed_ips": [f"10.0.0.0/{k}"]}),
    ("rate-limit", lambda k: {"rate_limit": k}),
    ("rate-limit-window", lambda k: {"rate_limit": f"100/{k}"}),
    ("quota", lambda k: {"token_quota": k}),
    ("expiry", lambda k: {"expires_at": k}),
    ("expiry-glued", lambda k: {"expires_at": f"2027-01-01T{k}"}),
    ("metadata-name", lambda k: {"metadata": {k + "x" * 40: "v"}}),
    ("metadata-name-of-bad-value", lambda k: {"metadata": {k: "v" * 600}}),
    ("metadata-value", lambda k: {"metadata": {"note": k * 14}}),
    ("unknown-field", lambda k: {k: 1}),
    ("unknown-field-glued", lambda k: {"x" * 63 + k: 1}),
]
CREATE_ONLY: list[tuple[str, Body]] = [("type", lambda k: {"type": k})]
UPDATE_ONLY: list[tuple[str, Body]] = [("type-change", lambda k: {"type": k})]
# Values only JSON can give: no command line spells a list where text belongs.
JSON_ONLY: list[tuple[str, Body]] = [
    ("name-not-text", lambda k: {"name": [k]}),
    ("metadata-value-not-text", lambda k: {"metadata": {"note": [k]}}),
]


@pytest.fixture
def pasted() -> str:
    """The secret a user pastes where it does not belong."""
    return generate_key("prod_")


@pytest.fixture
async def rest(
    caplog: pytest.LogCaptureFixture,
) -> AsyncIterator[tuple[httpx.AsyncClient, str, dict[str, str]]]:
    """The admin REST API in memory: a client, a key id to update and admin headers."""
    # The test client logs each URL it requests, pasted key and all: not keystile's logs.
    caplog.set_level(logging.WARNING, logger="httpx")
    gate = Keystile(store=MemoryStore(), secret=SECRET)
    admin = await gate.manager.create({"name": "a", "type": "prod", "scopes": ["*"]})
    target = await gate.manager.create({"name": "t", "type": "prod", "scopes": ["vec:read"]})
    app = Starlette(
        routes=[Mount("/cloud/keys", app=admin_app(gate))],
        middleware=[Middleware(KeystileMiddleware, gate=gate)],
    )
    headers = {"Authorization": f"Bearer {admin.secret.get_secret_value()}"}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield http, target.key.id, headers
    await gate.aclose()


def _ids(cases: list[tuple[str, Body]]) -> list[str]:
    return [name for name, _ in cases]


REST_CREATE = SETTINGS + CREATE_ONLY + JSON_ONLY
REST_UPDATE = SETTINGS + UPDATE_ONLY + JSON_ONLY


@pytest.mark.parametrize(("case", "body"), REST_CREATE, ids=_ids(REST_CREATE))
async def test_item9_rest_create_never_echoes_a_pasted_key(
    rest: tuple[httpx.AsyncClient, str, dict[str, str]], pasted: str, case: str, body: Body
) -> None:
    """POST /cloud/keys with a key pasted into any field answers 422 without the key."""
    http, _, headers = rest
    fields = {"name": "n", "type": "prod", **body(pasted)}
    response = await http.post("/cloud/keys/", json=fields, headers=headers)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "validation_failed"
    assert leaked(pasted, response.text) == []


@pytest.mark.parametrize(("case", "body"), REST_UPDATE, ids=_ids(REST_UPDATE))
async def test_item9_rest_update_never_echoes_a_pasted_key(
    rest: tuple[httpx.AsyncClient, str, dict[str, str]], pasted: str, case: str, body: Body
) -> None:
    """PATCH /cloud/keys/{id} with a key pasted into any field answers 422 without the key."""
    http, key_id, headers = rest
    response = await http.patch(f"/cloud/keys/{key_id}", json=body(pasted), headers=headers)
    assert response.status_code == 422, response.text
    assert leaked(pasted, response.text) == []


async def test_item9_rest_shows_the_hint_in_place_of_the_key(
    rest: tuple[httpx.AsyncClient, str, dict[str, str]], pasted: str
) -> None:
    """The message still says which value was wrong: the key's display hint stands in."""
    http, key_id, headers = rest
    response = await http.patch(
        f"/cloud/keys/{key_id}", json={"scopes": [pasted], pasted: 1}, headers=headers
    )
    assert response.status_code == 422
    hint = f"prod_...{pasted[-4:]}"
    fields = response.json()["error"]["fields"]
    assert {f["field"] for f in fields} == {hint}  # the unknown field, named by its hint
    assert hint in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/cloud/keys/{target}/rotate"),
        ("GET", "/cloud/keys/?{key}=1"),
        ("GET", "/cloud/keys/usage?{key}=1"),
        ("GET", "/cloud/keys/{target}/usage?start={key}"),
    ],
    ids=["rotate-field", "list-parameter", "usage-parameter", "usage-start"],
)
async def test_item9_rest_parameters_never_echo_a_pasted_key(
    rest: tuple[httpx.AsyncClient, str, dict[str, str]], pasted: str, method: str, path: str
) -> None:
    """Unknown body fields and query parameters named or valued with a key answer 422
    without it."""
    http, key_id, headers = rest
    url = path.format(target=key_id, key=pasted)
    body = {pasted: 1} if method == "POST" else None
    response = await http.request(method, url, json=body, headers=headers)
    assert response.status_code == 422, response.text
    assert leaked(pasted, response.text) == []


def _options(fields: dict[str, Any]) -> list[str]:
    """The command-line options that give ``fields``."""
    flags = {
        "name": "--name",
        "scopes": "--scope",
        "allowed_origins": "--origin",
        "allowed_ips": "--ip",
        "rate_limit": "--rate-limit",
        "token_quota": "--token-quota",
        "expires_at": "--expires",
        "type": "--type",
    }
    argv: list[str] = []
    for name, value in fields.items():
        if name == "metadata":
            argv += [a for k, v in value.items() for a in ("--meta", f"{k}={v}")]
        elif name in flags:
            values = value if isinstance(value, list) else [value]
            argv += [a for v in values for a in (flags[name], str(v))]
        else:
            argv += [f"--{name}", "1"]  # an unknown option
    return argv


# What only a command line can get wrong: its own argument types and choices.
CLI_ONLY: list[tuple[str, list[str]]] = [
    ("meta-without-equals", ["keys", "create", "--name", "n", "--type", "prod", "--meta", "{k}"]),
    ("list-limit", ["keys", "list", "--limit", "{k}"]),
    ("list-status", ["keys", "list", "--status", "{k}"]),
    ("list-type", ["keys", "list", "--type", "{k}"]),
    ("list-cursor", ["keys", "list", "--cursor", "{k}"]),
    ("list-meta", ["keys", "list", "--meta", "{k}"]),
    ("rotate-grace", ["keys", "rotate", "{id}", "--grace", "{k}"]),
    ("show-by-secret", ["keys", "show", "{k}"]),
    ("revoke-by-secret", ["keys", "revoke", "{k}"]),
    ("extra-argument", ["keys", "update", "{id}", "{k}"]),
    ("unknown-command", ["keys", "{k}"]),
]


@pytest.fixture
async def cli_manager() -> tuple[KeyManager, str]:
    """A key manager in memory, and the id of a key to update."""
    manager = KeyManager(MemoryStore(), KeyHasher(SECRET))
    target = await manager.create({"name": "t", "type": "prod", "scopes": ["vec:read"]})
    return manager, target.key.id


async def _cli(manager: KeyManager, argv: list[str], capsys: pytest.CaptureFixture[str]) -> Any:
    """``keystile ARGV`` with the real parser, run on ``manager``: exit code and all output."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        captured = capsys.readouterr()
        return exc.code, captured.out + captured.err
    out, err = io.StringIO(), io.StringIO()
    code = await execute(args, manager, out, err)
    return code, out.getvalue() + err.getvalue()


@pytest.mark.parametrize(
    ("action", "case", "body"),
    [("create", n, b) for n, b in SETTINGS + CREATE_ONLY]
    + [("update", n, b) for n, b in SETTINGS + UPDATE_ONLY],
    ids=[f"create-{n}" for n in _ids(SETTINGS + CREATE_ONLY)]
    + [f"update-{n}" for n in _ids(SETTINGS + UPDATE_ONLY)],
)
async def test_item9_cli_never_echoes_a_pasted_key(
    cli_manager: tuple[KeyManager, str],
    capsys: pytest.CaptureFixture[str],
    pasted: str,
    action: str,
    case: str,
    body: Body,
) -> None:
    """`keystile keys create|update` with a key pasted into any option exits 2 with one
    message that does not contain the key."""
    manager, key_id = cli_manager
    fields = body(pasted)
    if action == "create":
        argv = ["keys", "create", *_options({"name": "n", "type": "prod", **fields})]
    else:
        argv = ["keys", "update", key_id, *_options(fields)]
    code, text = await _cli(manager, argv, capsys)
    assert code == 2, text
    assert "Traceback" not in text
    assert leaked(pasted, text) == []


@pytest.mark.parametrize(("case", "argv"), CLI_ONLY, ids=[n for n, _ in CLI_ONLY])
async def test_item9_cli_arguments_never_echo_a_pasted_key(
    cli_manager: tuple[KeyManager, str],
    capsys: pytest.CaptureFixture[str],
    pasted: str,
    case: str,
    argv: list[str],
) -> None:
    """A key pasted where a command line wants another value is refused without it."""
    manager, key_id = cli_manager
    code, text = await _cli(manager, [a.format(k=pasted, id=key_id) for a in argv], capsys)
    assert code in (1, 2), text
    assert leaked(pasted, text) == []


# -- item 7: a wildcard origin may not cover a public suffix -----------------------------------

PUBLIC_SUFFIX_WILDCARDS = [
    pytest.param("https://*.co.uk", "co.uk", id="co-uk"),
    pytest.param("https://*.vercel.app", "vercel.app", id="vercel-app-private"),
    pytest.param("https://*.github.io", "github.io", id="github-io-private"),
    pytest.param("https://*.com", "com", id="com"),
    pytest.param("https://*.uk", "uk", id="uk"),
    pytest.param("https://*.example.co.uk", None, id="example-co-uk"),
    pytest.param("https://*.myapp.vercel.app", None, id="myapp-vercel-app"),
    pytest.param("https://*.example.com", None, id="example-com"),
]


def client_settings(*origins: str) -> dict[str, Any]:
    return {"name": "web", "type": "client", "scopes": ["vec:read"], "allowed_origins": origins}


@pytest.mark.parametrize(("entry", "suffix"), PUBLIC_SUFFIX_WILDCARDS)
def test_item7_a_wildcard_over_a_public_suffix_is_refused(entry: str, suffix: str | None) -> None:
    """A new key's wildcard origin over a public suffix (ICANN or private section of the
    list) is a validation error on that entry naming the suffix; one under a registrable
    domain is accepted."""
    settings = client_settings("https://app.example.com", entry)
    if suffix is None:
        made = DEFAULT_POLICY.validate(settings, now=to_datetime(0))
        assert made.allowed_origins[1] == entry
        return
    with pytest.raises(KeyValidationError) as refused:
        DEFAULT_POLICY.validate(settings, now=to_datetime(0))
    [error] = refused.value.errors
    assert error.field == "allowed_origins[1]"
    assert f"{suffix!r}" in error.message


@pytest.fixture
async def admin_http(store: KeyStore, clock: ManualClock) -> Any:
    """An HTTP client on the admin API (each backend), with a key allowed to manage keys."""
    gate = Keystile(store=store, secret=SECRET, clock=clock)
    app = Starlette(
        routes=[Mount("/cloud/keys", app=admin_app(gate))],
        middleware=[Middleware(KeystileMiddleware, gate=gate)],
    )
    created = await gate.manager.create(
        {"name": "admin", "type": "prod", "scopes": ["admin:manage_keys", "vec:*"]}
    )
    token = created.secret.get_secret_value()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://test/cloud/keys",
        headers={"Authorization": f"Bearer {token}"},
    ) as http:
        yield http
    await gate.aclose()


def refusal_fields(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 422, response.text
    return {f["field"]: f["message"] for f in response.json()["error"]["fields"]}


async def test_item7_the_admin_api_answers_422_naming_the_suffix(admin_http: Any) -> None:
    """POST and PATCH with a wildcard over a public suffix answer 422 naming the entry and
    the suffix; nothing is created, the key is left as it was."""
    http: httpx.AsyncClient = admin_http
    fields = refusal_fields(await http.post("/", json=client_settings("https://*.vercel.app")))
    assert list(fields) == ["allowed_origins[0]"]
    assert "'vercel.app'" in fields["allowed_origins[0]"]
    assert len((await http.get("/")).json()["keys"]) == 1  # the admin key alone

    made = await http.post("/", json=client_settings("https://*.myapp.vercel.app"))
    assert made.status_code == 201, made.text
    key = made.json()["key"]
    origins = ["https://app.example.com", "https://*.github.io"]
    fields = refusal_fields(await http.patch(f"/{key['id']}", json={"allowed_origins": origins}))
    assert list(fields) == ["allowed_origins[1]"]
    assert "'github.io'" in fields["allowed_origins[1]"]
    assert (await http.get(f"/{key['id']}")).json()["key"] == key


async def test_item7_the_command_line_refuses_with_one_line(manager: KeyManager) -> None:
    """keys create and keys update with a wildcard over a public suffix exit 2 with one line
    naming the suffix, and change nothing."""

    async def run(*argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = await execute(build_parser().parse_args(list(argv)), manager, out, err)
        return code, out.getvalue(), err.getvalue()

    create = ("keys", "create", "--name", "web", "--type", "client", "--scope", "vec:read")
    code, out, err = await run(*create, "--origin", "https://*.co.uk")
    assert (code, out) == (2, "")
    assert len(err.splitlines()) == 1 and "allowed_origins[0]" in err and "'co.uk'" in err
    assert (await manager.list()).keys == ()

    code, out, err = await run(*create, "--origin", "https://*.example.co.uk")
    assert code == 0, err
    [key] = (await manager.list()).keys
    code, out, err = await run("keys", "update", key.id, "--origin", "https://*.github.io")
    assert (code, out) == (2, "")
    assert len(err.splitlines()) == 1 and "'github.io'" in err
    assert await manager.get(key.id) == key


async def test_item7_a_key_stored_before_the_rule_still_loads(
    manager: KeyManager, clock: ManualClock
) -> None:
    """A key that already holds such a wildcard (stored before the rule) still loads and can
    be renamed — only settings being changed are judged — but it cannot be rotated into a
    new key, nor be given the wildcard again."""
    record = ApiKey(
        id=new_key_id(clock()),
        name="old",
        type="client",
        hint="client_...old1",
        scopes=("vec:read",),
        allowed_origins=("https://*.vercel.app",),
        created_at=to_datetime(clock()),
    )
    await manager.store.add(record, "0" * 64)
    renamed = await manager.update(record.id, name="renamed")
    assert (renamed.name, renamed.allowed_origins) == ("renamed", ("https://*.vercel.app",))
    with pytest.raises(KeyValidationError, match=re.escape("'vercel.app'")):
        await manager.rotate(record.id)
    with pytest.raises(KeyValidationError, match=re.escape("'vercel.app'")):
        await manager.update(record.id, allowed_origins=["https://*.vercel.app"])
    assert await manager.get(record.id) == renamed


# -- item 0: no assert on a runtime condition, and nothing that only works on asyncio's loop --


def test_item0_no_assert_statement_in_the_library() -> None:
    """``python -O`` strips asserts, and an assert that fires is a 500 with a bare
    AssertionError (as uvloop's transports once caused): the library raises real errors."""
    modules = sorted(SRC.rglob("*.py"))
    assert len(modules) > 20
    found = [
        f"{path.relative_to(SRC.parent)}:{node.lineno}"
        for path in modules
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path)))
        if isinstance(node, ast.Assert)
    ]
    assert found == [], f"assert statements in src/keystile: {found}"


SHUTDOWN = """
import asyncio, sys
from redis.asyncio import Redis
from keystile import RedisStore
from keystile.stores.cache import CachedStore

async def main():
    client = Redis.from_url(sys.argv[2])
    store = RedisStore(client, namespace=sys.argv[3])
    assert await CachedStore(store).start()  # following key changes
    await client.aclose()  # the app forgets to close the store itself

factory = None
if sys.argv[1] == "uvloop":
    import uvloop
    factory = uvloop.new_event_loop
for _ in range(5):  # five rounds, in case the race goes the other way once
    with asyncio.Runner(loop_factory=factory) as runner:  # cancels what is left, then waits
        runner.run(main())
print("shut down")
"""


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_item0_a_store_left_open_does_not_hang_the_event_loops_shutdown(
    loop: str, redis_namespace: str
) -> None:
    """An app that stops with the store's change listener still running (its client closed
    under it): the event loop's shutdown cancels the listener, and it ends — on uvloop the
    cancel used to arrive as a lost connection, which the listener retried for ever."""
    require_redis()
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    code = textwrap.dedent(SHUTDOWN)
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, loop, REDIS_URL, redis_namespace],
            capture_output=True,
            text=True,
            timeout=20,
            env={"PYTHONPATH": str(SRC.parent), "PATH": ""},
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the event loop ({loop}) never finished shutting down")
    assert done.returncode == 0 and done.stdout == "shut down\n", done.stderr[-2000:]
