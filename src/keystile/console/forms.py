"""The console's forms: the key form (create and edit), reading it back into key settings,
and the filter forms of the keys page and the audit trail."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, date, datetime
from typing import Any

from keystile.console.pages import e, errors_for, other_errors, permission_tree
from keystile.exceptions import FieldError
from keystile.models import DEFAULT_POLICY, ApiKey, KeyPolicy
from keystile.scopes import ScopeCatalogue

__all__ = [
    "expiry",
    "filters",
    "key_form",
    "lines",
    "options",
    "settings",
    "values_of_form",
    "values_of_key",
]


def lines(text: str) -> list[str]:
    """A textarea's entries: one per line (commas separate too)."""
    return [line.strip() for line in text.replace(",", "\n").splitlines() if line.strip()]


def expiry(text: str, errors: list[FieldError]) -> datetime | None:
    """The expiry a date field gives (the start of that day, UTC); ``None`` when empty."""
    if not text.strip():
        return None
    try:
        day = date.fromisoformat(text.strip())
    except ValueError:
        errors.append(FieldError("expires_at", "must be a date such as 2027-01-31"))
        return None
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def options(values: Iterable[str], current: str | None) -> str:
    """``<option>`` s of ``values`` ("" reads "any"), ``current`` selected."""
    return "".join(
        f'<option value="{e(v)}"{" selected" if v == (current or "") else ""}>'
        f"{e(v or 'any')}</option>"
        for v in values
    )


def filters(action: str, fields: str) -> str:
    """A GET form of filter ``fields`` with its button."""
    return (
        f'<form class="filters" method="get" action="{e(action)}" role="search">{fields}'
        '<button type="submit" class="secondary">Filter</button></form>'
    )


TYPE_LABELS = {"dev": "Development", "prod": "Production", "client": "Client (browser)"}


def key_form(
    catalogue: ScopeCatalogue,
    csrf: str,
    action: str,
    values: Mapping[str, Any],
    errors: Mapping[str, list[str]],
    *,
    new: bool,
    policy: KeyPolicy = DEFAULT_POLICY,
) -> str:
    """The create and edit form (the type only when creating)."""
    known = ["name", "type", "scopes", "expires_at", "allowed_origins", "allowed_ips"]
    parts = [other_errors(errors, known)]
    parts.append(f'<form method="post" action="{e(action)}" novalidate>')
    parts.append(f'<input type="hidden" name="csrf" value="{e(csrf)}">')
    message, described = errors_for(errors, "name")
    parts.append(
        '<div class="field"><label for="name">Name</label>'
        f'<input type="text" id="name" name="name" class="wide" maxlength="200" required '
        f'value="{e(values.get("name", ""))}"{described}>{message}</div>'
    )
    if new:
        message, described = errors_for(errors, "type")
        chosen = values.get("type") or policy.names[0]
        radios = "".join(
            f'<label for="type-{e(t)}"><input type="radio" id="type-{e(t)}" name="type" '
            f'value="{e(t)}"{" checked" if chosen == t else ""}> '
            f"{e(TYPE_LABELS.get(t, t))}</label>"
            for t in policy.names
        )
        parts.append(
            f'<fieldset class="field" id="type"{described}><legend>Type</legend>'
            f"{radios}{message}</fieldset>"
        )
    parts.append(permission_tree(catalogue, values.get("scopes", ()), errors))
    message, described = errors_for(errors, "expires_at", "expires-hint")
    parts.append(
        '<div class="field"><label for="expires_at">Expires (optional)</label>'
        f'<input type="date" id="expires_at" name="expires_at" '
        f'value="{e(values.get("expires_at", ""))}"{described}>'
        '<p class="hint" id="expires-hint">The key stops working at the start of this day '
        f"(UTC). Empty: no expiry.</p>{message}</div>"
    )
    kind = values.get("type")
    browser = [t for t in policy.names if policy[t].browser]
    watched = [t for t in policy.names if policy[t].watch_new_ips or policy[t].requires_ips]
    for name, label, hint, applies in (
        (
            "allowed_origins",
            "Allowed origins",
            "Browser keys: the sites that may use the key from a browser, one per line "
            "(https://app.example.com, https://*.example.com).",
            browser,
        ),
        (
            "allowed_ips",
            "IP allowlist (optional)",
            "Server keys: the addresses or networks the key may be used from, one per "
            "line (203.0.113.7, 10.0.0.0/8). Empty: any address.",
            watched,
        ),
    ):
        if (not applies or (not new and kind not in applies)) and not values.get(name):
            continue
        types = e(" ".join(applies))
        message, described = errors_for(errors, name, f"{name}-hint")
        parts.append(
            f'<fieldset data-for-type="{types}"><legend>{label}</legend>'
            f'<div class="field"><label for="{name}">{label}, one per line</label>'
            f'<textarea id="{name}" name="{name}"{described}>'
            f"{e(values.get(name, ''))}</textarea>"
            f'<p class="hint" id="{name}-hint">{e(hint)}</p>{message}</div></fieldset>'
        )
    submit = "Create key" if new else "Save changes"
    parts.append(f'<button type="submit" id="save">{submit}</button></form>')
    return "".join(parts)


def _one(form: Mapping[str, list[str]], name: str) -> str:
    return (form.get(name) or [""])[0]


def settings(form: Mapping[str, list[str]], errors: list[FieldError]) -> dict[str, Any]:
    """The key form's fields as key settings (what the manager validates); a date that is
    not one goes to ``errors``."""
    found: dict[str, Any] = {
        "name": _one(form, "name"),
        "scopes": form.get("scopes", []),
        "expires_at": expiry(_one(form, "expires_at"), errors),
    }
    for name in ("allowed_origins", "allowed_ips"):
        if name in form:
            found[name] = lines(_one(form, name))
    return found


def values_of_form(form: Mapping[str, list[str]]) -> dict[str, Any]:
    """What was typed, to show the form again with it."""
    values: dict[str, Any] = {k: _one(form, k) for k in form if k != "scopes"}
    values["scopes"] = form.get("scopes", [])
    return values


def values_of_key(key: ApiKey) -> dict[str, Any]:
    """A key's settings as the edit form shows them."""
    return {
        "name": key.name,
        "type": key.type,
        "scopes": key.scopes,
        "expires_at": "" if key.expires_at is None else key.expires_at.date().isoformat(),
        "allowed_origins": "\n".join(key.allowed_origins),
        "allowed_ips": "\n".join(key.allowed_ips),
    }
