"""Security properties the rest of the suite does not pin down on its own: what an attacker
can make a server hold, and for how long."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from conftest import SECRET, Figures
from faults.server import Server, child_env, serve_command
from keystile import KeyHasher, KeyManager, ManualClock, MemoryStore, generate_key
from keystile.clock import to_datetime
from keystile.gate import MAX_ORIGIN_MEMO, Keystile
from keystile.middleware import KeystileMiddleware
from keystile.routing import Rule, public
from keystile.stores import CachedStore
from keystile.stores.cache import MAX_CREDENTIAL
from test_middleware import call, make_app, new_key

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
