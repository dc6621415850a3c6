"""The console's larger page bodies: a key's facts and usage, its alerts, the audit table."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from keystile.alerts import Alert
from keystile.audit import AuditEvent
from keystile.clock import to_datetime
from keystile.console.charts import Bucket, bar_chart
from keystile.console.pages import (
    e,
    key_menu,
    ranking,
    scope_list,
    status_badge,
    totals_cards,
    when,
)
from keystile.console.slots import Slot
from keystile.models import DEFAULT_POLICY, ApiKey, KeyPolicy
from keystile.records import KeyInfo
from keystile.usage import DAY, MINUTE, UsageReport

__all__ = [
    "alerts_section",
    "audit_table",
    "buckets",
    "key_usage",
    "revoke_form",
    "rotate_form",
    "secret_once",
    "shown_already",
    "signin_form",
]


def key_usage(
    base: str,
    key: ApiKey,
    info: KeyInfo,
    hour: UsageReport,
    month: UsageReport,
    policy: KeyPolicy = DEFAULT_POLICY,
) -> list[str]:
    """A key's facts, its usage over the hour and the 30 days as figures and charts, and
    (browser keys) its busiest addresses and origins."""
    last = hour.last_use
    used_from = f" from {e(last.ip)}" if last.ip else ""
    used_from += f" ({e(last.origin)})" if last.origin else ""
    facts: list[tuple[str, str]] = [
        ("Type", e(key.type)),
        ("Hint", f"<code>{e(key.hint)}</code>"),
        ("Status", status_badge(info.status.value)),
        ("Scopes", f'<span class="scopes">{scope_list(key.scopes)}</span>'),
        ("Created", when(key.created_at)),
        ("Last used", when(hour.last_use.at or info.last_used_at) + used_from),
        ("Expires", when(key.expires_at, "no expiry")),
    ]
    if key.allowed_origins:
        facts.append(("Allowed origins", e(", ".join(key.allowed_origins))))
    if key.allowed_ips:
        facts.append(("IP allowlist", e(", ".join(key.allowed_ips))))
    rows = "".join(f'<tr><th scope="row">{k}</th><td>{v}</td></tr>' for k, v in facts)
    main = [
        f"<p>{key_menu(base, key, info.status.value)} <code>{e(key.id)}</code></p>",
        f'<table class="facts">{rows}</table>',
        _span("hour", "Last hour", "Requests per minute, last hour", hour, MINUTE),
        _span("month", "Last 30 days", "Requests per day, last 30 days", month, DAY),
    ]
    browser = policy.declares(key.type) and policy[key.type].browser
    if browser or hour.top_ips or hour.top_origins:
        main += [
            '<section aria-labelledby="busiest"><h2 id="busiest">Busiest clients</h2>',
            ranking("IP address", "top-ips", hour.top_ips),
            ranking("Origin", "top-origins", hour.top_origins),
            "</section>",
        ]
    return main


def _span(ident: str, heading: str, title: str, report: UsageReport, size: int) -> str:
    """A span's figures and its chart, in a section of its own."""
    chart = bar_chart(f"chart-{ident}", title, buckets(report, size), daily=size == DAY)
    return (
        f'<section aria-labelledby="{ident}-heading"><h2 id="{ident}-heading">{heading}</h2>'
        f"{totals_cards(ident, report.totals)}{chart}"
        '<p class="legend" aria-hidden="true"><span class="swatch req"></span>requests'
        '<span class="swatch err"></span>errors</p></section>'
    )


def buckets(report: UsageReport, size: int) -> list[Bucket]:
    """The report's series with every bucket of its range, empty ones too."""
    counts = {p.start: p.counts for p in report.series}
    start = report.start.timestamp()
    out = []
    for index in range(int((report.end.timestamp() - start) // size)):
        moment = to_datetime(start + index * size)
        got = counts.get(moment)
        if got is None:
            out.append(Bucket(moment, 0, 0))
        else:
            out.append(Bucket(moment, got.requests, got.errors_4xx + got.errors_5xx))
    return out


def alerts_section(raised: Iterable[Alert], rules: str) -> str:
    """The alerts raised for a key, and ``rules``: the alert rules in force (HTML)."""
    raised = list(raised)
    if raised:
        items = "".join(
            f"<tr><td>{when(a.at)}</td><td>{e(a.rule)}</td><td>{e(a.message)}</td></tr>"
            for a in raised
        )
        listing = (
            '<table id="alerts"><thead><tr><th scope="col">When</th><th scope="col">Rule'
            f'</th><th scope="col">Alert</th></tr></thead><tbody>{items}</tbody></table>'
        )
    else:
        listing = "<p>No alert raised for this key since the server started.</p>"
    return (
        '<section aria-labelledby="alerts-heading"><h2 id="alerts-heading">Alerts</h2>'
        f"{listing}{rules}</section>"
    )


def audit_table(events: Iterable[AuditEvent]) -> str:
    """The audit trail's events as a table (or a notice that none match)."""
    rows = "".join(
        f"<tr><td>{when(ev.at)}</td><td>{e(ev.action)}</td><td>{e(ev.outcome)}</td>"
        f"<td>{e(ev.actor)}</td><td><code>{e(ev.key_id or '')}</code></td>"
        f"<td>{e(', '.join(sorted(ev.changes)) or ev.reason or '')}</td></tr>"
        for ev in events
    )
    head = "".join(
        f'<th scope="col">{h}</th>'
        for h in ("When", "Action", "Outcome", "By", "Key", "Changes or reason")
    )
    table = (
        f'<table id="audit"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'
        if rows
        else '<p class="notice">No events match.</p>'
    )
    return table


def signin_form(base: str, message: str) -> str:
    """The sign-in form, with why the last attempt failed (if it did)."""
    notice = described = ""
    if message:
        notice = f'<p class="notice bad" role="alert" id="signin-error">{e(message)}</p>'
        described = ' aria-describedby="signin-error"'
    return (
        f'{notice}<form method="post" action="{e(base)}/signin">'
        '<div class="field"><label for="key">Admin key</label>'
        f'<input type="password" id="key" name="key" class="wide" required autofocus{described}>'
        '<p class="hint">A key holding admin:manage_keys. It is checked once and not kept: '
        "the browser gets a session of 30 minutes, renewed while you use the console.</p>"
        '</div><button type="submit">Sign in</button></form>'
    )


def secret_once(base: str, slot: Slot) -> str:
    """The page showing a new key's secret, its copy button and the warning."""
    return (
        '<div class="notice warning" role="alert"><p><strong>Copy it now, it will only be '
        "shown once.</strong> keystile keeps only a digest of it: nobody can show it to you "
        "again.</p></div>"
        f'<div class="field"><label for="secret">The key {e(slot.name)}</label>'
        f'<input type="text" id="secret" class="secret" readonly value="{e(slot.secret)}">'
        "</div>"
        '<p><button type="button" data-copy="secret" data-status="copy-status" hidden>'
        'Copy the key</button> <span id="copy-status" role="status"></span></p>'
        f'<p><a href="{e(base)}/keys/{e(slot.key_id)}">Go to the key</a> · '
        f'<a href="{e(base)}/keys">Back to the keys</a></p>'
    )


def shown_already(base: str) -> str:
    """What the secret's page says once it has been shown."""
    return (
        '<p class="notice warning" role="status">This key was shown once and cannot be '
        "shown again. If it was not copied, rotate the key to get a new one.</p>"
        f'<p><a href="{e(base)}/keys">Back to the keys</a></p>'
    )


def rotate_form(base: str, csrf: str, key: ApiKey, graces: Mapping[str, str]) -> str:
    """The rotation form: the old key's grace period (24 hours chosen)."""
    choices = "".join(
        f'<option value="{v}"{" selected" if v == "86400" else ""}>{label}</option>'
        for v, label in graces.items()
    )
    return (
        f"<p>Rotating <strong>{e(key.name)}</strong> (<code>{e(key.hint)}</code>) issues a "
        "new key with the same settings. The old one keeps working for the grace period, "
        "then is refused.</p>"
        f'<form method="post" action="{e(base)}/keys/{e(key.id)}/rotate">'
        f'<input type="hidden" name="csrf" value="{e(csrf)}">'
        '<div class="field"><label for="grace">Grace period of the old key</label>'
        f'<select id="grace" name="grace">{choices}</select></div>'
        '<button type="submit">Rotate</button> '
        f'<a class="button secondary" href="{e(base)}/keys">Cancel</a></form>'
    )


def revoke_form(base: str, csrf: str, key: ApiKey) -> str:
    """The revocation's confirmation."""
    return (
        f'<div class="notice bad"><p>Revoke <strong>{e(key.name)}</strong> '
        f"(<code>{e(key.hint)}</code>)? Every request with it is refused at once, "
        "everywhere. A revocation cannot be undone.</p></div>"
        f'<form method="post" action="{e(base)}/keys/{e(key.id)}/revoke">'
        f'<input type="hidden" name="csrf" value="{e(csrf)}">'
        '<button type="submit" class="danger" id="confirm-revoke">Revoke the key</button> '
        f'<a class="button secondary" href="{e(base)}/keys">Cancel</a></form>'
    )
