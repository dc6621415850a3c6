"""The demo API: a small model of the platform's services behind keystile.

``keystile demo`` serves it (in memory by default) and prints one key of each type, an
admin key and ``curl`` lines to try. The handlers keep real state in memory: a PUT then a
GET returns what was put.

Anyone holding a demo key can reach it, so it is bounded: the key-value and file stores
hold at most so many entries and bytes (beyond them a PUT is refused with 507 Insufficient
Storage, RFC 4918 §11.5: the server cannot store it, whatever the request's own size;
nothing is evicted), and SQL queries run in a worker thread, one at a time, each stopped
after a second of wall-clock time (a 400), so a slow query never holds up other requests.
"""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from keystile.admin import admin_mount, admin_rules
from keystile.console import console_mount, console_rules
from keystile.gate import Keystile
from keystile.manager import CreatedKey
from keystile.middleware import KeystileMiddleware
from keystile.routing import Rule, public

__all__ = [
    "DEMO_ORIGINS",
    "DEMO_RULES",
    "DemoState",
    "DemoStore",
    "build_demo_app",
    "seed_demo_keys",
]

DEMO_ORIGINS = ("http://localhost:5173", "http://127.0.0.1:5173")

# The central rule table: every route of the demo, and the scope each needs.
DEMO_RULES = (
    public("/health"),
    Rule("GET", "/cloud/vec/databases", ["vec:read"]),
    Rule("POST", "/cloud/vec/databases", ["vec:write"]),
    Rule("DELETE", "/cloud/vec/databases/{name}", ["vec:delete"]),
    Rule("GET", "/cloud/kev/{key}", ["kev:read"]),
    Rule("PUT", "/cloud/kev/{key}", ["kev:write"]),
    Rule("DELETE", "/cloud/kev/{key}", ["kev:delete"]),
    Rule("POST", "/cloud/data/query", ["data:read"]),
    Rule("POST", "/cloud/ai/infer", ["ai:inference"]),
    Rule("GET", "/cloud/files/{path:path}", ["files:read"]),
    Rule("PUT", "/cloud/files/{path:path}", ["files:write"]),
)

_MAX_BODY = 1 << 20


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


async def _body(request: Request) -> bytes | Response:
    """The request body, or a 413 answer when it is larger than 1 MiB."""
    body = b""
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > _MAX_BODY:
                return _error(413, "too_large", "The body is larger than 1 MiB.")
    except ClientDisconnect:
        # The client went away mid-body: nobody will read an answer; say so plainly.
        return _error(400, "client_disconnected", "The request body did not arrive whole.")
    return body


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def _json_body(request: Request) -> Any:
    body = await _body(request)
    if isinstance(body, Response):
        return body
    try:
        value = json.loads(body, parse_constant=_no_constant)
        # Escapes of lone surrogates ("\ud800") parse, but are no text to answer with.
        json.dumps(value, ensure_ascii=False).encode()
    except (ValueError, UnicodeError, RecursionError):  # RecursionError: [[[[...]]]]
        return _error(400, "invalid_json", "The body is not valid JSON (UTF-8 text).")
    return value


# What a demo query may do: read. Everything else (writes, PRAGMA, ATTACH) is refused by
# SQLite's authorizer, whatever the SQL says; a runaway query is interrupted.
_READING = frozenset(
    {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
)
QUERY_SECONDS = 1.0  # wall-clock time one query may run
# SQLite sees an interrupt only between VM instructions, and one instruction can be long:
# instr() over two 1 MiB strings ran 8 s, a GLOB with a 40,000-character pattern 11 s.
# With these limits no one instruction measured more than about 50 ms.
_MAX_VALUE = 1 << 16  # bytes in one string or blob
_MAX_PATTERN = 200  # characters in a LIKE or GLOB pattern
_MAX_RESULT = 4 << 20  # characters of strings and hex in one answer
_MAX_PENDING = 16  # queries running or waiting for their turn; more are a 503
# What the demo services may hold (names and values, as sent).
MAX_KEV_ENTRIES, MAX_KEV_BYTES = 1000, 8 << 20
MAX_FILES, MAX_FILE_BYTES = 256, 32 << 20
MAX_DATABASES = 1000


def _reading_only(action: int, *_: Any) -> int:
    return sqlite3.SQLITE_OK if action in _READING else sqlite3.SQLITE_DENY


def _json_value(value: Any) -> Any:
    """A result value as JSON can carry it: a blob as hex text; a non-finite number is an
    error (JSON has none)."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"the result holds {value}, which JSON cannot carry")
    return value


V = TypeVar("V")


class DemoStore(Generic[V]):
    """A demo service's entries, bounded: at most ``max_entries`` of them and ``max_bytes``
    in all (each entry counted as its name's UTF-8 bytes and the size it was given)."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.size = 0
        self._entries: dict[str, tuple[V, int]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> V | None:
        entry = self._entries.get(name)
        return None if entry is None else entry[0]

    def put(self, name: str, value: V, size: int) -> bool:
        """Store ``value`` (replacing any under ``name``) if it fits; whether it did."""
        size += len(name.encode("utf-8", "surrogatepass"))
        old = self._entries.get(name)
        freed = 0 if old is None else old[1]
        count = len(self._entries) + (old is None)
        if count > self.max_entries or self.size - freed + size > self.max_bytes:
            return False
        self._entries[name] = (value, size)
        self.size += size - freed
        return True

    def pop(self, name: str) -> V | None:
        entry = self._entries.pop(name, None)
        if entry is None:
            return None
        self.size -= entry[1]
        return entry[0]


@dataclass
class DemoState:
    """What the demo services hold."""

    # (project, name) -> database: each project sees its own (the key's project).
    databases: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    kev: DemoStore[str] = field(default_factory=lambda: DemoStore(MAX_KEV_ENTRIES, MAX_KEV_BYTES))
    files: DemoStore[bytes] = field(default_factory=lambda: DemoStore(MAX_FILES, MAX_FILE_BYTES))
    query_seconds: float = QUERY_SECONDS
    sql_lock: anyio.Lock = field(default_factory=anyio.Lock)
    queries_pending: int = 0


def _project(request: Request) -> str:
    """The calling key's project: every demo service keeps each project's data apart."""
    project: str = request.state.keystile_project
    return project


def _scoped(request: Request, name: str) -> str:
    """``name`` within the caller's project (a project id holds no ``/``)."""
    return f"{_project(request)}/{name}"


def _demo_database() -> sqlite3.Connection:
    db = sqlite3.connect(":memory:", check_same_thread=False)
    db.executescript(
        """
        CREATE TABLE regions (code TEXT PRIMARY KEY, name TEXT, latency_ms INTEGER);
        INSERT INTO regions VALUES ('eu-west', 'Europe (Dublin)', 12),
            ('us-east', 'US East (Virginia)', 85), ('ap-south', 'Asia (Mumbai)', 140);
        """
    )
    db.execute("PRAGMA query_only = ON")  # data:read means read
    # A connection's first json_each/json_tree registers the virtual table (a write the
    # authorizer would refuse): do it before, so queries may use them.
    db.execute("SELECT * FROM json_each('[]'), json_tree('[]')").fetchall()
    db.set_authorizer(_reading_only)
    db.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, _MAX_VALUE)
    db.setlimit(sqlite3.SQLITE_LIMIT_LIKE_PATTERN_LENGTH, _MAX_PATTERN)
    return db


def _full(what: str) -> JSONResponse:
    return _error(507, "storage_full", f"The demo's {what} is full: delete something first.")


def _run_query(sql: str, seconds: float) -> JSONResponse:
    """Run one query (in a worker thread) on a fresh copy of the demo database, closed when
    the query ends — no connection outlives its query, whether or not the app is shut down
    — and interrupted after ``seconds``."""
    with contextlib.closing(_demo_database()) as db:
        return _query(db, sql, seconds)


def _query(db: sqlite3.Connection, sql: str, seconds: float) -> JSONResponse:
    guard = threading.Lock()
    running, stopped = True, False

    def stop() -> None:
        nonlocal stopped
        with guard:  # never interrupt the next query, should this one end meanwhile
            if running:
                stopped = True
                db.interrupt()

    timer = threading.Timer(seconds, stop)
    timer.daemon = True
    timer.start()
    try:
        cursor = db.execute(sql)
        columns = [c[0] for c in cursor.description or ()]
        rows, size = [], 0
        for row in cursor.fetchmany(1000):
            rows.append(values := [_json_value(v) for v in row])
            size += sum(len(v) for v in values if isinstance(v, str))
            if size > _MAX_RESULT:
                raise ValueError("the result is larger than 4 MiB")
        cursor.close()
    except (sqlite3.Error, ValueError) as exc:
        message = str(exc)
        if stopped:
            message = f"The query ran too long: it was stopped after {seconds:g} s."
        return _error(400, "invalid_query", message)
    finally:
        with guard:
            running = False
        timer.cancel()
    return JSONResponse({"columns": columns, "rows": rows})


def build_demo_app(gate: Keystile, state: DemoState | None = None) -> Starlette:
    """The demo API behind KeystileMiddleware with :data:`DEMO_RULES`."""
    state = state or DemoState()

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def list_databases(request: Request) -> Response:
        project = _project(request)
        mine = [db for (owner, _), db in state.databases.items() if owner == project]
        return JSONResponse({"databases": sorted(mine, key=lambda d: d["name"])})

    async def create_database(request: Request) -> Response:
        body = await _json_body(request)
        if isinstance(body, Response):
            return body
        name = body.get("name") if isinstance(body, dict) else None
        dimensions = body.get("dimensions", 384) if isinstance(body, dict) else None
        if not isinstance(name, str) or not name or len(name) > 64:
            return _error(422, "invalid_name", "'name' must be a string of 1-64 characters.")
        if not isinstance(dimensions, int) or not 1 <= dimensions <= 4096:
            return _error(422, "invalid_dimensions", "'dimensions' must be 1-4096.")
        if (_project(request), name) in state.databases:
            return _error(409, "exists", f"A database named {name!r} exists.")
        if len(state.databases) >= MAX_DATABASES:
            return _full("vector service")
        database = {"name": name, "dimensions": dimensions, "owner": request.user.identity}
        state.databases[_project(request), name] = database
        return JSONResponse(database, status_code=201)

    async def delete_database(request: Request) -> Response:
        gone = state.databases.pop((_project(request), request.path_params["name"]), None)
        if gone is None:
            return _error(404, "not_found", "No such database.")
        return Response(status_code=204)

    async def kev(request: Request) -> Response:
        key = request.path_params["key"]
        name = _scoped(request, key)
        if request.method == "PUT":
            body = await _body(request)
            if isinstance(body, Response):
                return body
            value = body.decode("utf-8", "replace")
            if not state.kev.put(name, value, len(body)):
                return _full("key-value store")
            return JSONResponse({"key": key, "value": value})
        if request.method == "DELETE":
            if state.kev.pop(name) is None:
                return _error(404, "not_found", "No such key.")
            return Response(status_code=204)
        stored = state.kev.get(name)
        if stored is None:
            return _error(404, "not_found", "No such key.")
        return JSONResponse({"key": key, "value": stored})

    async def query(request: Request) -> Response:
        body = await _json_body(request)
        if isinstance(body, Response):
            return body
        sql = body.get("sql") if isinstance(body, dict) else None
        if not isinstance(sql, str) or not sql.strip():
            return _error(422, "invalid_query", "'sql' must be a non-empty string.")
        if state.queries_pending >= _MAX_PENDING:
            return _error(503, "busy", "Too many queries are waiting; try again shortly.")
        state.queries_pending += 1
        try:
            # One query at a time; waiting here holds no thread.
            async with state.sql_lock:
                return await anyio.to_thread.run_sync(_run_query, sql, state.query_seconds)
        finally:
            state.queries_pending -= 1

    async def infer(request: Request) -> Response:
        body = await _json_body(request)
        if isinstance(body, Response):
            return body
        model = body.get("model") if isinstance(body, dict) else None
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(model, str) or not isinstance(messages, list) or not messages:
            return _error(422, "invalid_request", "Send {'model': str, 'messages': [...]}.")
        texts = [m.get("content", "") for m in messages if isinstance(m, Mapping)]
        if len(texts) != len(messages) or not all(isinstance(t, str) for t in texts):
            return _error(422, "invalid_request", "Each message needs a string 'content'.")
        prompt_tokens = sum(len(t.split()) for t in texts) + 3 * len(texts)
        # Both quota styles: the prompt's tokens are known before the work (reserve: 429
        # if they do not fit), the completion's only after it (record: counted, no 429).
        await gate.quotas.reserve(request, prompt_tokens)
        last = texts[-1].strip() or "nothing"
        completion = f"You said {len(last.split())} words; the demo model agrees with all of them."
        completion_tokens = len(completion.split())
        state = await gate.quotas.record(request, completion_tokens)
        return JSONResponse(
            {
                "model": model,
                "choices": [{"message": {"role": "assistant", "content": completion}}],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            },
            headers=state.header_dict() if state is not None else None,
        )

    async def files(request: Request) -> Response:
        path = request.path_params["path"]
        if request.method == "PUT":
            body = await _body(request)
            if isinstance(body, Response):
                return body
            if not state.files.put(_scoped(request, path), body, len(body)):
                return _full("file store")
            return JSONResponse({"path": path, "size": len(body)}, status_code=201)
        stored = state.files.get(_scoped(request, path))
        if stored is None:
            return _error(404, "not_found", "No such file.")
        return Response(stored, media_type="application/octet-stream")

    routes: list[BaseRoute] = [
        Route("/health", health),
        Route("/cloud/vec/databases", list_databases, methods=["GET"]),
        Route("/cloud/vec/databases", create_database, methods=["POST"]),
        Route("/cloud/vec/databases/{name}", delete_database, methods=["DELETE"]),
        Route("/cloud/kev/{key}", kev, methods=["GET", "PUT", "DELETE"]),
        Route("/cloud/data/query", query, methods=["POST"]),
        Route("/cloud/ai/infer", infer, methods=["POST"]),
        Route("/cloud/files/{path:path}", files, methods=["GET", "PUT"]),
    ]
    # The admin REST API, guarded by admin:manage_keys / admin:view_usage.
    routes.append(admin_mount(gate, "/cloud/keys"))
    # The web console, signed in with an admin key (its own session: no key per request).
    routes.append(console_mount(gate, "/console"))
    app = Starlette(routes=routes)
    rules = [*DEMO_RULES, *admin_rules("/cloud/keys"), *console_rules("/console")]
    app.add_middleware(KeystileMiddleware, gate=gate, rules=rules, deny_unmatched=True)
    app.state.demo = state
    return app


async def seed_demo_keys(gate: Keystile) -> dict[str, CreatedKey]:
    """One key of each type and an admin key, as the demo prints them."""
    everything = ["vec:*", "kev:*", "data:read", "ai:inference", "files:*"]
    return {
        "dev": await gate.manager.create(
            {"name": "demo dev key", "type": "dev", "scopes": everything}
        ),
        "prod": await gate.manager.create(
            {"name": "demo prod key", "type": "prod", "scopes": everything}
        ),
        "client": await gate.manager.create(
            {
                "name": "demo browser key",
                "type": "client",
                "scopes": ["vec:read", "kev:read", "ai:inference"],
                "allowed_origins": list(DEMO_ORIGINS),
            }
        ),
        "admin": await gate.manager.create(
            {"name": "demo admin key", "type": "prod", "scopes": ["*"]}
        ),
    }
