"""Structured logs: every record keystile writes has an event name and its fields, and the
JSON formatter writes them (issue #17, item 3)."""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

import pytest

from keystile import Keystile
from keystile.logs import FIELDS, JsonFormatter, fields

SOURCES = Path(__file__).parents[1] / "src" / "keystile"
LEVELS = {"debug", "info", "warning", "error", "exception", "critical"}


def log_calls() -> list[tuple[str, ast.Call]]:
    found = []
    for path in sorted(SOURCES.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in LEVELS
                and isinstance(node.func.value, (ast.Name, ast.Attribute))
                and ast.unparse(node.func.value) in ("logger", "self._logger")
            ):
                found.append((f"{path.relative_to(SOURCES)}:{node.lineno}", node))
    return found


def test_every_log_call_in_the_library_names_its_event() -> None:
    """Each logger call passes ``extra`` built by ``fields(<event>, ...)`` (possibly
    merged into a dict), so every record carries ``event``."""
    calls = log_calls()
    assert len(calls) >= 30
    missing = []
    for where, call in calls:
        extra = next((k.value for k in call.keywords if k.arg == "extra"), None)
        text = ast.unparse(extra) if extra is not None else ""
        if "fields(" not in text and "_logged(" not in text:  # _logged: fields() + request
            missing.append(where)
    assert missing == []


def test_fields_refuses_a_field_it_does_not_know() -> None:
    with pytest.raises(TypeError, match="not a structured log field"):
        fields("x", secret="nope")
    assert fields("key.revoked", key_id="key_1", project=None) == {
        "event": "key.revoked",
        "key_id": "key_1",
    }


async def test_records_carry_the_event_and_fields_and_format_as_json(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="keystile")
    gate = Keystile()
    created = await gate.manager.create({"name": "a", "type": "prod", "project": "shop"})
    await gate.manager.revoke(created.key.id)
    records = [r for r in caplog.records if r.name.startswith("keystile")]
    revoked = next(r for r in records if getattr(r, "event", None) == "key.revoked")
    assert revoked.key_id == created.key.id  # type: ignore[attr-defined]
    assert revoked.project == "shop"  # type: ignore[attr-defined]
    line = json.loads(JsonFormatter().format(revoked))
    assert line["event"] == "key.revoked" and line["level"] == "INFO"
    assert line["key_id"] == created.key.id and line["project"] == "shop"
    assert line["logger"] == "keystile.manager" and created.key.id in line["message"]
    assert set(line) <= {"time", "level", "logger", "event", "message", *FIELDS}
    assert created.secret.get_secret_value() not in json.dumps(line)
    assert all(getattr(r, "event", None) for r in records)
    await gate.aclose()


def test_the_json_formatter_keeps_the_exception() -> None:
    logger = logging.getLogger("keystile.test")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logger.makeRecord(
            "keystile.test",
            logging.ERROR,
            __file__,
            1,
            "failed %s",
            ("x",),
            __import__("sys").exc_info(),
            extra=fields("test.failed", code="x"),
        )
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "failed x" and line["code"] == "x"
    assert "RuntimeError: boom" in line["exception"]
