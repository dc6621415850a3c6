"""The README's commands and Python examples stay true."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import httpx

README = (Path(__file__).parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_opens_with_the_two_commands() -> None:
    """The first two shell blocks install and run the demo, then install and run the tests."""
    shells = re.findall(r"```sh\n(.*?)```", README, flags=re.S)
    assert "pip install -e '.[demo]' && keystile demo" in shells[0]
    assert "pip install -e '.[test]' && python -m pytest" in shells[1]


def test_fastapi_example_runs_and_enforces_scopes() -> None:
    """The FastAPI example issues a key that reads (200) but may not write (403)."""
    namespace: dict[str, Any] = {}
    exec(BLOCKS[0] + BLOCKS[1], namespace)
    app, token = namespace["app"], namespace["token"]

    async def drive() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
            return [
                await client.get("/cloud/vec/databases", headers=headers),
                await client.post("/cloud/vec/databases", headers=headers),
                await client.get("/cloud/vec/databases"),
                await client.get("/docs"),
            ]

    read, write, anonymous, docs = asyncio.run(drive())
    assert docs.status_code == 200  # FastAPI's own pages need no key
    assert read.status_code == 200
    assert read.json() == {"databases": [], "caller": "search service"}
    assert write.status_code == 403
    assert write.json()["error"]["code"] == "insufficient_scope"
    assert anonymous.status_code == 401
    operation = app.openapi()["paths"]["/cloud/vec/databases"]["post"]
    assert operation["security"] == [{"Keystile": ["vec:write"]}]
    assert {"401", "403", "429"} <= set(operation["responses"])


def test_starlette_example_runs() -> None:
    """The Starlette example serves /health publicly and guards the rest."""
    namespace: dict[str, Any] = {}
    exec(BLOCKS[2], namespace)
    app = namespace["app"]

    async def drive() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
            return [await client.get("/health"), await client.put("/cloud/kev/a")]

    health, put = asyncio.run(drive())
    assert health.status_code == 200
    assert put.status_code == 401


def test_managing_keys_example_runs() -> None:
    """The README's management example runs as written against a gate."""
    import textwrap
    from datetime import timedelta

    from keystile import Keystile

    block = next(b for b in BLOCKS if "gate.manager.rotate" in b)
    namespace: dict[str, Any] = {"timedelta": timedelta}
    exec("async def example(gate):\n" + textwrap.indent(block, "    "), namespace)

    async def run() -> None:
        gate = Keystile(store="memory://")
        await namespace["example"](gate)
        keys = (await gate.manager.list()).keys
        assert len(keys) == 2  # the key and its successor
        assert any(k.revoked_at is not None for k in keys)
        await gate.aclose()

    asyncio.run(run())


def test_every_setting_is_listed_under_configuration() -> None:
    """Each KeystileSettings field is named in the README as its environment variable."""
    from keystile import KeystileSettings

    section = README.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`(KEYSTILE_[A-Z_]+)`", section))
    expected = {f"KEYSTILE_{name.upper()}" for name in KeystileSettings.model_fields}
    assert expected - listed == set(), "settings missing from the README"
    assert listed - expected == set(), "README lists settings that do not exist"


def test_the_shipped_text_cites_no_working_document() -> None:
    """What the repository holds (the README, docs/, the package's sources and scripts, the
    tests and the benchmarks) says things in its own words: no section number pointing at a
    working document that is not in the repository."""
    root = Path(__file__).parents[1]
    shipped = [root / "README.md", *sorted((root / "src").rglob("*.py"))]
    shipped += sorted((root / "src").rglob("*.lua")) + sorted((root / "docs").rglob("*.md"))
    shipped += sorted((root / "tests").rglob("*.py")) + sorted((root / "benchmarks").rglob("*"))
    word = "SP" + "EC"  # spelled in two so that this test does not find itself
    citing = [
        str(p.relative_to(root))
        for p in shipped
        if p.is_file() and p.suffix in (".py", ".md", ".lua") and word in p.read_text()
    ]
    assert citing == []


def test_own_scopes_example_runs() -> None:
    """The README's own-catalogue example builds a gate whose catalogue is the app's plus
    the admin scopes; its configuration-file twin gives the same catalogue."""
    import tomllib

    from keystile.config import build_policy

    block = next(b for b in BLOCKS if "ScopeCatalogue({" in b)
    namespace: dict[str, Any] = {}
    exec(block, namespace)
    catalogue = namespace["gate"].policy.catalogue
    assert catalogue.all_scopes == {
        "orders:read",
        "orders:write",
        "admin:manage_keys",
        "admin:view_usage",
    }
    toml = next(b for b in re.findall(r"```toml\n(.*?)```", README, flags=re.S) if "orders" in b)
    table = tomllib.loads(toml)["tool"]["keystile"]
    policy = build_policy(table["scopes"], table["types"])
    assert policy.catalogue.all_scopes == catalogue.all_scopes
    assert policy.types[next(t for t in policy.types if t.value == "client")].rate_limit == (
        "50/minute"
    )
    assert policy.names == ("prod", "client", "partner")
    assert policy.prefixes["partner_"] == "partner"
    block = next(b for b in BLOCKS if '"partner": partner' in b)
    exec(block, namespace)
    assert namespace["gate"].policy.types["partner"].rate_limit == "600/minute"


# What the fragments in the README take as given: a module around each, so that mypy --strict
# checks every block as a reader would paste it into an app.
_CONTEXT = {
    "gate.quotas.reserve": (
        "from fastapi import FastAPI, Security\n"
        "from starlette.requests import Request\n"
        "from starlette.responses import JSONResponse\n"
        "from keystile import ApiKey, Keystile\n"
        "from keystile.fastapi import api_key\n"
        "gate = Keystile()\napp = FastAPI()\nprompt_tokens = completion_tokens = 100\n",
        None,
    ),
    "metrics_app(gate)": (
        "from starlette.applications import Starlette\n"
        "from keystile import Keystile\n"
        "gate = Keystile()\napp = Starlette()\n",
        None,
    ),
    "gate.usage.report": (
        "from keystile import Keystile\n",
        "async def example(gate: Keystile, key_id: str) -> None:\n",
    ),
    "gate.manager.rotate": (
        "from datetime import timedelta\nfrom keystile import Keystile\n",
        "async def example(gate: Keystile) -> None:\n",
    ),
}


def _module(block: str, index: int) -> str:
    """``block`` as a module: a fragment gets its context, a block that continues the one
    before it (it uses ``gate`` without making one) gets that block in front."""
    import textwrap

    for marker, (head, wrapper) in _CONTEXT.items():
        if marker in block:
            body = textwrap.indent(block, "    ") if wrapper else block
            return head + (wrapper or "") + body
    if "gate." in block and "gate =" not in block:
        return BLOCKS[index - 1] + block
    return block


def test_every_python_block_type_checks_strictly(tmp_path: Path) -> None:
    """Each README Python block, pasted as a reader would, passes mypy --strict."""
    from mypy import api

    paths = []
    for index, block in enumerate(BLOCKS):
        path = tmp_path / f"readme_block_{index}.py"
        path.write_text(_module(block, index))
        paths.append(str(path))
    cache = str(tmp_path / ".mypy_cache")
    out, err, status = api.run(["--strict", "--cache-dir", cache, *paths])
    assert status == 0, out + err
    assert f"no issues found in {len(BLOCKS)} source files" in out


def test_quota_and_usage_examples_run() -> None:
    """The token-quota handler and the usage-report lines run as written."""
    import textwrap

    from keystile import KeystileMiddleware

    quota = next(b for b in BLOCKS if "gate.quotas.reserve" in b)
    report = next(b for b in BLOCKS if "gate.usage.report" in b)
    head, _ = _CONTEXT["gate.quotas.reserve"]
    namespace: dict[str, Any] = {}
    exec(head + quota, namespace)
    app, gate = namespace["app"], namespace["gate"]
    app.add_middleware(KeystileMiddleware, gate=gate)
    exec("async def example(gate, key_id):\n" + textwrap.indent(report, "    "), namespace)

    async def drive() -> tuple[httpx.Response, Any]:
        created = await gate.manager.create(
            {"name": "ai", "type": "dev", "scopes": ["ai:inference"], "token_quota": 1000}
        )
        headers = {"Authorization": f"Bearer {created.secret.get_secret_value()}"}
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
            answer = await client.post("/cloud/ai/infer", headers=headers)
        await gate.usage.flush()
        await namespace["example"](gate, created.key.id)
        usage = await gate.usage.report(created.key.id, granularity="minute")
        await gate.aclose()
        return answer, usage

    answer, usage = asyncio.run(drive())
    assert answer.status_code == 200 and answer.json() == {"text": "..."}
    assert answer.headers["RateLimit"].startswith('"ai-tokens";r=800')
    assert usage.totals.requests == 1


def test_metrics_example_serves_the_metrics() -> None:
    block = next(b for b in BLOCKS if "metrics_app(gate)" in b)
    head, _ = _CONTEXT["metrics_app(gate)"]
    namespace: dict[str, Any] = {}
    exec(head + block, namespace)

    async def scrape() -> httpx.Response:
        transport = httpx.ASGITransport(app=namespace["app"])
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
            return await client.get("/metrics")

    answer = asyncio.run(scrape())
    assert answer.status_code == 200
    assert "keystile_requests_total" in answer.text
