"""The console's project pages, on the memory store and the real Redis: the project's name in
every page's header and its settings form; the project's alert rules and each key's
overrides, read and edited through the console and the same as the manager and the admin
REST API hold; field errors beside their fields; CSRF (issue #16, items 1 and 2)."""

from __future__ import annotations

import re

import httpx
import pytest

import test_console
from keystile.alerts import AlertRules
from keystile.console.rules import RULE_INPUTS
from keystile.projects import RULE_FIELDS
from test_console import World, sign_in
from usage_app import http

world = test_console.world  # the fixture: a gate (memory, Redis) with two projects' keys

RULE_POSTS = [
    "/console/project",
    "/console/alert-rules",
    "/console/alert-rules/clear",
    "/console/keys/{id}/alert-rules",
    "/console/keys/{id}/alert-rules/clear",
]


async def token_of(client: httpx.AsyncClient, path: str = "/console/alert-rules") -> str:
    page = await client.get(path)
    assert page.status_code == 200, page.text
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found is not None
    return found[1]


def row(page: str, name: str) -> str:
    """The rules table's row of rule ``name``."""
    found = re.search(rf'<tr id="rule-{name}">(.*?)</tr>', page, re.S)
    assert found is not None, name
    return found[1]


def in_force(page: str, name: str) -> tuple[str, str]:
    """A rule's value in force and what sets it, as the rules page shows them."""
    cells = row(page, name)
    value = re.search(r'<td class="effective">([^<]*)</td>', cells)
    source = re.search(r'<td class="source">([^<]*)</td>', cells)
    assert value is not None and source is not None
    return value[1], source[1]


def rest(world: World) -> dict[str, str]:
    return {"Authorization": f"Bearer {world.admin}"}


def test_every_alert_rule_has_its_field_on_the_form() -> None:
    """The console knows how to show and read every AlertRules field."""
    assert tuple(RULE_INPUTS) == RULE_FIELDS == tuple(AlertRules.model_fields)


async def test_project_rules_set_in_the_console_are_what_the_manager_and_rest_hold(
    world: World,
) -> None:
    """The project's rules saved through the form are what manager.alert_rules and
    GET /alert-rules answer; the page then shows them as set by the project, the others
    as the default; the change is in the audit trail as the admin key's."""
    async with http(world.app) as client:
        await sign_in(client, world.admin)
        form = {
            "csrf": await token_of(client),
            "requests_per_minute": "120",
            "error_rate": "off",
            "quota_thresholds": "0.5, 1",
            "new_ip_for_prod": "off",
            "cooldown": "",
        }
        saved = await client.post("/console/alert-rules", data=form)
        assert saved.status_code == 303
        assert saved.headers["location"] == "/console/alert-rules?saved=1"
        page = (await client.get(saved.headers["location"])).text
        answer = await client.get("/cloud/keys/alert-rules", headers=rest(world))
    expected = {
        "requests_per_minute": 120,
        "error_rate": None,
        "quota_thresholds": [0.5, 1.0],
        "new_ip_for_prod": False,
    }
    held = await world.gate.manager.alert_rules("alpha")
    assert held.rules == expected
    assert held.effective.requests_per_minute == 120 and held.effective.error_rate is None
    assert answer.status_code == 200 and answer.json()["alert_rules"]["rules"] == expected
    assert (await world.gate.manager.alert_rules("beta")).rules == {}
    assert in_force(page, "requests_per_minute") == ("120", "project")
    assert in_force(page, "error_rate") == ("off", "project")
    assert in_force(page, "quota_thresholds") == ("0.5, 1", "project")
    assert in_force(page, "cooldown") == ("3600", "default")
    assert 'value="120"' in row(page, "requests_per_minute")
    assert "Saved." in page
    events = (await world.gate.manager.history(project="alpha", action="alert_rules")).events
    assert events[0].outcome == "ok" and events[0].actor.key_id == world.admin_id
    assert events[0].changes["requests_per_minute"] == ["(inherited)", 120]


async def test_a_keys_overrides_are_edited_and_cleared_field_by_field(world: World) -> None:
    """A key's overrides saved on its rules page are what manager.key_alert_rules and
    GET /{id}/alert-rules answer; one Clear button removes one, Clear all the rest; the
    key's page shows the rules in force with what sets each."""
    await world.gate.manager.set_alert_rules(project="alpha", requests_per_minute=500)
    path = f"/console/keys/{world.worker}/alert-rules"
    async with http(world.app) as client:
        await sign_in(client, world.admin)
        token = await token_of(client, path)
        form = {"csrf": token, "cooldown": "60", "rotation_due": "off", "error_rate": "0.25"}
        saved = await client.post(path, data=form)
        assert saved.status_code == 303 and saved.headers["location"] == f"{path}?saved=1"
        page = (await client.get(path)).text
        answer = await client.get(f"/cloud/keys/{world.worker}/alert-rules", headers=rest(world))
        key_page = (await client.get(f"/console/keys/{world.worker}")).text
        held = await world.gate.manager.key_alert_rules(world.worker)
        assert held.overrides == {"cooldown": 60.0, "rotation_due": False, "error_rate": 0.25}
        assert answer.json()["alert_rules"]["overrides"] == held.overrides
        assert in_force(page, "cooldown") == ("60", "key")
        assert in_force(page, "requests_per_minute") == ("500", "project")
        assert in_force(page, "error_min_requests") == ("20", "default")
        assert f'href="{path}"' in key_page and 'id="alert-rules"' in key_page
        assert "<td>60</td><td>key</td>" in key_page
        assert "<td>500</td><td>project</td>" in key_page

        one = await client.post(f"{path}/clear", data={"csrf": token, "field": "cooldown"})
        assert one.status_code == 303
        held = await world.gate.manager.key_alert_rules(world.worker)
        assert held.overrides == {"rotation_due": False, "error_rate": 0.25}
        assert held.effective.cooldown == 3600.0
        everything = await client.post(f"{path}/clear", data={"csrf": token, "all": "1"})
        assert everything.status_code == 303
        bad = await client.post(f"{path}/clear", data={"csrf": token, "field": "nope"})
        assert bad.status_code == 400 and "field must be one of" in bad.text
    assert (await world.gate.manager.key_alert_rules(world.worker)).overrides == {}
    assert (await world.gate.manager.alert_rules("alpha")).rules == {"requests_per_minute": 500}


async def test_rules_set_through_the_manager_show_in_the_console(world: World) -> None:
    """Rules set in Python (project and key) are what the console's pages show, with a
    Clear button for each rule the level sets and a ⋮ menu entry to the key's rules."""
    manager = world.gate.manager
    await manager.set_alert_rules(project="alpha", requests_per_minute=777, rotation_due=False)
    await manager.set_key_alert_rules(world.worker, error_min_requests=33)
    async with http(world.app) as client:
        await sign_in(client, world.admin)
        project = (await client.get("/console/alert-rules")).text
        key = (await client.get(f"/console/keys/{world.worker}/alert-rules")).text
        keys = (await client.get("/console/keys")).text
    assert in_force(project, "requests_per_minute") == ("777", "project")
    assert in_force(project, "rotation_due") == ("off", "project")
    assert '<option value="off" selected>' in row(project, "rotation_due")
    assert 'value="requests_per_minute"' in row(project, "requests_per_minute")
    assert 'form="clear-rules"' not in row(project, "cooldown")
    assert "1 key overrides some of them" in project
    assert in_force(key, "error_min_requests") == ("33", "key")
    assert in_force(key, "requests_per_minute") == ("777", "project")
    assert 'value="33"' in row(key, "error_min_requests")
    assert 'value=""' in row(key, "requests_per_minute")  # inherited: not set on the key
    assert f'href="/console/keys/{world.worker}/alert-rules">Alert rules</a>' in keys


async def test_bad_rule_values_come_back_beside_their_fields(world: World) -> None:
    """Bad values get a 422 page with each message beside its field (aria-invalid, and
    the typed values kept); nothing is stored."""
    bad = {
        "requests_per_minute": "lots",
        "error_rate": "2",
        "quota_thresholds": "0.5, x",
        "inactive_key_in_use": "maybe",
        "cooldown": "-1",
    }
    async with http(world.app) as client:
        await sign_in(client, world.admin)
        token = await token_of(client)
        project = await client.post("/console/alert-rules", data={"csrf": token, **bad})
        key = await client.post(
            f"/console/keys/{world.worker}/alert-rules", data={"csrf": token, **bad}
        )
    for answer in (project, key):
        assert answer.status_code == 422
        for name in bad:
            assert f'id="{name}-error"' in answer.text, name
            assert 'aria-invalid="true"' in row(answer.text, name)
        assert 'value="lots"' in row(answer.text, "requests_per_minute")
    assert (await world.gate.manager.alert_rules("alpha")).rules == {}
    assert (await world.gate.manager.key_alert_rules(world.worker)).overrides == {}


@pytest.mark.parametrize("path", RULE_POSTS)
@pytest.mark.parametrize("token", [None, "wrong"])
async def test_the_new_forms_need_the_csrf_token(
    world: World, path: str, token: str | None
) -> None:
    """Each new form without the session's CSRF token is refused 403 and changes nothing."""
    data = {"name": "Taken", "requests_per_minute": "5", "cooldown": "9", "all": "1"}
    if token is not None:
        data["csrf"] = token
    await world.gate.manager.set_alert_rules(project="alpha", cooldown=99)
    await world.gate.manager.set_key_alert_rules(world.worker, cooldown=98)
    async with http(world.app) as client:
        await sign_in(client, world.admin)
        answer = await client.post(path.format(id=world.worker), data=data)
    assert answer.status_code == 403
    assert (await world.gate.manager.alert_rules("alpha")).rules == {"cooldown": 99.0}
    assert (await world.gate.manager.key_alert_rules(world.worker)).overrides == {"cooldown": 98.0}
    assert not (await world.gate.manager.project_info("alpha")).recorded


async def test_renaming_the_project_shows_in_every_pages_header(world: World) -> None:
    """The settings form renames the project and sets its description (audited as the
    admin key's); the header of every page then shows the new name; bad values come back
    beside their fields (422) and change nothing."""
    async with http(world.app) as client:
        await sign_in(client, world.admin)
        before = (await client.get("/console/keys")).text
        assert '<span class="project">alpha</span>' in before
        token = await token_of(client, "/console/project")
        saved = await client.post(
            "/console/project",
            data={"csrf": token, "name": "Alpha <Shop>", "description": "The shop's keys"},
        )
        assert saved.status_code == 303
        assert saved.headers["location"] == "/console/project?saved=1"
        pages = [
            (await client.get(p)).text
            for p in (
                "/console/keys",
                "/console/audit",
                "/console/alert-rules",
                "/console/project",
                f"/console/keys/{world.worker}",
                f"/console/keys/{world.worker}/alert-rules",
            )
        ]
        bad = await client.post(
            "/console/project", data={"csrf": token, "name": "  ", "description": "d" * 1001}
        )
    for page in pages:
        assert '<span class="project">Alpha &lt;Shop&gt;</span>' in page
    assert "The shop&#x27;s keys</textarea>" in pages[3]
    info = await world.gate.manager.project_info("alpha")
    assert info.name == "Alpha <Shop>" and info.description == "The shop's keys"
    assert (await world.gate.manager.project_info("beta")).name == "beta"
    history = world.gate.manager.history
    [event] = (await history(project="alpha", action="update_project", outcome="ok")).events
    assert event.actor.key_id == world.admin_id
    assert event.changes["name"] == ["alpha", "Alpha <Shop>"]
    assert bad.status_code == 422
    assert 'id="name-error"' in bad.text and 'id="description-error"' in bad.text
    assert (await world.gate.manager.project_info("alpha")).name == "Alpha <Shop>"
    [refused] = (await history(project="alpha", action="update_project", outcome="refused")).events
    assert refused.actor.key_id == world.admin_id


async def test_the_new_pages_keep_the_consoles_protections(world: World) -> None:
    """The project and rule pages carry the strict CSP and no-store, no inline script or
    style, every field labelled; signed out, they lead to the sign-in page."""
    pages = [
        "/console/project",
        "/console/alert-rules",
        f"/console/keys/{world.worker}/alert-rules",
    ]
    async with http(world.app) as client:
        for path in pages:
            answer = await client.get(path)
            assert answer.status_code == 303 and "/console/signin" in answer.headers["location"]
        await sign_in(client, world.admin)
        answers = [await client.get(path) for path in pages]
    for answer in answers:
        assert answer.status_code == 200
        assert "unsafe-inline" not in answer.headers["content-security-policy"]
        assert answer.headers["cache-control"] == "no-store"
        assert "<script>" not in answer.text and " style=" not in answer.text
        fields = re.findall(r'<(?:input|select|textarea) [^>]*id="([^"]+)"', answer.text)
        labelled = set(re.findall(r'<label for="([^"]+)"', answer.text))
        assert fields and set(fields) <= labelled
