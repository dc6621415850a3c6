"""Security regressions from the issue tracker, one section per item."""

from __future__ import annotations

import io
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Mount

from conftest import SECRET
from keystile import KeyHasher, KeyManager, KeystileMiddleware, MemoryStore, generate_key
from keystile.admin import admin_app
from keystile.cli import build_parser, execute
from keystile.gate import Keystile

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
