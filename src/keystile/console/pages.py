"""The console's HTML: the layout (``templates/layout.html``) and the pieces pages are made of.

Every value that reaches the page goes through :func:`e` (HTML escaping); the pages carry
no inline script or style, so the Content-Security-Policy can forbid both.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from html import escape
from importlib import resources
from string import Template

from keystile.exceptions import FieldError
from keystile.models import ApiKey
from keystile.records import KeyInfo
from keystile.scopes import ScopeCatalogue
from keystile.usage import UsageTotals

__all__ = [
    "SERVICE_LABELS",
    "e",
    "field_errors",
    "layout",
    "permission_tree",
    "when",
]

_LAYOUT = Template(
    resources.files("keystile.console").joinpath("templates/layout.html").read_text("utf-8")
)

#: How the permission tree names the default catalogue's services; others are title-cased.
SERVICE_LABELS = {
    "vec": "Vec",
    "kev": "Kev",
    "data": "Data",
    "ai": "AI Services",
    "files": "File Storage",
    "admin": "Admin",
}


def e(value: object) -> str:
    """``value`` as HTML text (quotes too, for attributes)."""
    return escape(str(value), quote=True)


def when(moment: datetime | None, empty: str = "never") -> str:
    """A ``<time>`` element for ``moment`` in UTC, or ``empty``."""
    if moment is None:
        return f'<span class="muted">{e(empty)}</span>'
    return f'<time datetime="{e(moment.isoformat())}">{moment:%Y-%m-%d %H:%M} UTC</time>'


def layout(*, title: str, base: str, main: str, project: str = "", nav: str = "") -> str:
    """A whole page."""
    return _LAYOUT.substitute(title=e(title), base=e(base), main=main, project=e(project), nav=nav)


def nav(base: str, csrf: str, current: str) -> str:
    """The signed-in navigation: keys, new key, alert rules, audit trail, the project's
    settings, sign out."""
    links = [
        ("keys", "Keys"),
        ("keys/new", "Create key"),
        ("alert-rules", "Alert rules"),
        ("audit", "Audit trail"),
        ("project", "Project"),
    ]
    items = "".join(
        f'<li><a href="{e(base)}/{path}"'
        + (' aria-current="page"' if path == current else "")
        + f">{label}</a></li>"
        for path, label in links
    )
    signout = (
        f'<li><form method="post" action="{e(base)}/signout">'
        f'<input type="hidden" name="csrf" value="{e(csrf)}">'
        '<button type="submit">Sign out</button></form></li>'
    )
    return f'<nav aria-label="Console"><ul>{items}{signout}</ul></nav>'


def field_errors(errors: Iterable[FieldError]) -> dict[str, list[str]]:
    """The manager's field errors grouped by form field (``scopes[2]`` is ``scopes``)."""
    grouped: dict[str, list[str]] = {}
    for error in errors:
        root = re.split(r"[.\[]", error.field, maxsplit=1)[0] or "body"
        grouped.setdefault(root, []).append(f"{error.field}: {error.message}")
    return grouped


def errors_for(errors: Mapping[str, list[str]], name: str, hint: str = "") -> tuple[str, str]:
    """The messages shown beside field ``name``, and its ``aria-describedby`` (naming its
    ``hint`` element too, if any) and ``aria-invalid`` attributes."""
    messages = errors.get(name)
    described = [hint] if hint else []
    text = ""
    if messages:
        text = (
            f'<div class="error" id="{name}-error">'
            + "".join(f"<p>{e(m)}</p>" for m in messages)
            + "</div>"
        )
        described.append(f"{name}-error")
    attrs = f' aria-describedby="{" ".join(described)}"' if described else ""
    if messages:
        attrs += ' aria-invalid="true"'
    return text, attrs


def other_errors(errors: Mapping[str, list[str]], known: Sequence[str]) -> str:
    """A notice for the errors of no field on the form."""
    lines = [m for name, messages in errors.items() if name not in known for m in messages]
    if not lines:
        return ""
    items = "".join(f"<li>{e(m)}</li>" for m in lines)
    return f'<div class="notice bad" role="alert"><ul>{items}</ul></div>'


def service_label(service: str) -> str:
    return SERVICE_LABELS.get(service, service.replace("_", " ").title())


def permission_tree(
    catalogue: ScopeCatalogue, checked: Iterable[str], errors: Mapping[str, list[str]]
) -> str:
    """The permission tree: each service of ``catalogue`` with its actions as checkboxes."""
    held = catalogue.expand(checked)
    message, described = errors_for(errors, "scopes")
    groups = []
    for service, actions in catalogue.services.items():
        boxes = []
        for action in actions:
            scope = f"{service}:{action}"
            ident = f"scope-{service}-{action}"
            mark = " checked" if scope in held else ""
            boxes.append(
                f'<label for="{e(ident)}"><input type="checkbox" id="{e(ident)}" name="scopes" '
                f'value="{e(scope)}"{mark}> {e(action.replace("_", " ").title())}</label>'
            )
        groups.append(
            f"<fieldset><legend>{e(service_label(service))}</legend>{''.join(boxes)}</fieldset>"
        )
    return (
        f'<fieldset class="field" id="scopes"{described}><legend>Permissions</legend>'
        f'<div class="tree">{"".join(groups)}</div>{message}</fieldset>'
    )


def status_badge(status: str) -> str:
    return f'<span class="status status-{e(status)}">{e(status)}</span>'


def scope_list(scopes: Sequence[str]) -> str:
    if not scopes:
        return '<span class="muted">none</span>'
    return "".join(f"<code>{e(s)}</code>" for s in scopes)


def key_menu(base: str, key: ApiKey, status: str) -> str:
    """The ⋮ menu of a key: a ``<details>`` (keyboard-operable without script)."""
    href = f"{e(base)}/keys/{e(key.id)}"
    items = [f'<li><a href="{href}">Usage</a></li>']
    if status != "revoked":
        items.append(f'<li><a href="{href}/edit">Edit</a></li>')
        items.append(f'<li><a href="{href}/alert-rules">Alert rules</a></li>')
    if status == "active":
        items.append(f'<li><a href="{href}/rotate">Rotate</a></li>')
    if status != "revoked":
        items.append(f'<li><a href="{href}/revoke">Revoke</a></li>')
    return (
        f'<details class="menu"><summary aria-label="Actions for {e(key.name)}">⋮</summary>'
        f"<ul>{''.join(items)}</ul></details>"
    )


def keys_table(base: str, rows: Sequence[KeyInfo]) -> str:
    """The keys page's table."""
    if not rows:
        return '<p class="notice">No keys match.</p>'
    body = []
    for info in rows:
        key = info.key
        body.append(
            "<tr>"
            f'<td><a href="{e(base)}/keys/{e(key.id)}">{e(key.name)}</a>'
            f'<br><code class="muted">{e(key.id)}</code></td>'
            f"<td>{e(key.type)}</td><td><code>{e(key.hint)}</code></td>"
            f'<td class="scopes">{scope_list(key.scopes)}</td>'
            f"<td>{status_badge(info.status.value)}</td>"
            f"<td>{when(key.created_at)}</td><td>{when(info.last_used_at)}</td>"
            f"<td>{when(key.expires_at, 'no expiry')}</td>"
            f"<td>{key_menu(base, key, info.status.value)}</td></tr>"
        )
    head = "".join(
        f'<th scope="col">{h}</th>'
        for h in (
            "Name",
            "Type",
            "Hint",
            "Scopes",
            "Status",
            "Created",
            "Last used",
            "Expires",
            '<span class="visually-hidden">Actions</span>',
        )
    )
    return (
        '<table id="keys"><caption class="visually-hidden">The project\'s keys</caption>'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    )


def size(count: int) -> str:
    """Bytes for people: 1.2 MB."""
    value = float(count)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{count} B"  # pragma: no cover - the loop always returns


def totals_cards(prefix: str, totals: UsageTotals) -> str:
    """Requests, bandwidth, errors and refusals of a span, as a row of figures."""
    errors = totals.errors_4xx + totals.errors_5xx
    rate = f"{100 * errors / totals.requests:.1f} %" if totals.requests else "–"
    figures = (
        ("requests", "Requests", str(totals.requests)),
        ("bytes-in", "Bandwidth in", size(totals.bytes_in)),
        ("bytes-out", "Bandwidth out", size(totals.bytes_out)),
        ("errors", "Errors (4xx + 5xx)", str(errors)),
        ("error-rate", "Error rate", rate),
        ("rate-limited", "Rate-limited", str(totals.rate_limited)),
        ("quota", "Quota refusals", str(totals.quota_exceeded)),
    )
    cards = "".join(
        f'<dl class="card"><dt>{label}</dt><dd id="{prefix}-{ident}">{e(value)}</dd></dl>'
        for ident, label, value in figures
    )
    return f'<div class="cards">{cards}</div>'


def ranking(title: str, ident: str, counts: Mapping[str, int], limit: int = 10) -> str:
    """The busiest addresses or origins as a small table."""
    if not counts:
        return f"<h3>{e(title)}</h3><p>None recorded.</p>"
    top = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:limit]
    rows = "".join(f'<tr><td>{e(k)}</td><td class="num">{v}</td></tr>' for k, v in top)
    return (
        f'<h3>{e(title)}</h3><table id="{ident}"><thead><tr><th scope="col">{e(title)}</th>'
        f'<th scope="col" class="num">Requests</th></tr></thead><tbody>{rows}</tbody></table>'
    )
