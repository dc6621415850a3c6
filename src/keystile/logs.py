"""Structured logs: every record keystile writes carries an ``event`` name and, where they
apply, the fields ``key_id``, ``project``, ``code``, ``client_ip``, ``store`` and ``actor``,
through the standard :mod:`logging` ``extra`` — so a log pipeline can filter on
``record.event == "key.revoked"`` without parsing messages. Never a secret: a key appears
by its id (or hint) only.

:class:`JsonFormatter` writes one JSON object per record::

    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logging.getLogger("keystile").addHandler(handler)

giving ``{"time": ..., "level": "INFO", "logger": "keystile.manager", "event":
"key.revoked", "message": "revoked key key_... (prod_...)", "key_id": "key_..."}``.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

__all__ = ["FIELDS", "JsonFormatter", "fields"]

#: The structured fields a record may carry besides ``event``.
FIELDS = ("key_id", "project", "code", "client_ip", "store", "actor")


def fields(event: str, **values: Any) -> dict[str, Any]:
    """``extra=`` for a log call: the event name and the fields that have a value."""
    unknown = set(values) - set(FIELDS)
    if unknown:
        raise TypeError(f"not a structured log field: {sorted(unknown)}")
    return {"event": event, **{k: v for k, v in values.items() if v is not None}}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, event, message,
    the structured fields present, and the exception's text if any."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "event": getattr(record, "event", None),
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value if isinstance(value, (str, int, float, bool)) else str(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)
