"""The console's project pages: the project's settings (its name and description) and its
alert rules, for the project and for each key (overrides), over the manager's
:mod:`keystile.manager_projects` calls, as the signed-in admin key and within its project.

A rule form holds everything its level sets: a field left empty is inherited (from the
process's default, or for a key from its project); ``off`` turns a rule with a threshold
off. Each field set there has its own Clear button, and Clear all removes them all.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from keystile.alerts import AlertRules
from keystile.console.pages import e, errors_for, field_errors, other_errors
from keystile.console.web import Context, Refused
from keystile.exceptions import KeyValidationError
from keystile.models import ApiKey
from keystile.projects import RULE_FIELDS, ProjectInfo, Rules

if TYPE_CHECKING:
    from keystile.manager import KeyManager

__all__ = ["RULE_INPUTS", "RuleInput", "RulePages", "rule_values", "shown"]


@dataclass(frozen=True, slots=True)
class RuleInput:
    """How the console shows and reads one alert rule."""

    label: str
    kind: str  # "number", "off-number" (may be off), "switch", "list"
    hint: str


RULE_INPUTS: dict[str, RuleInput] = {
    "requests_per_minute": RuleInput(
        "Requests per minute",
        "off-number",
        "Alert when a key makes more requests in a minute. A whole number; off: no limit.",
    ),
    "error_rate": RuleInput(
        "Error rate",
        "off-number",
        "Alert when this share of a minute's answers are errors (0 to 1, such as 0.5); "
        "off: no error alerts.",
    ),
    "error_min_requests": RuleInput(
        "Error alert minimum",
        "number",
        "The requests a minute needs before its error rate counts (a whole number).",
    ),
    "inactive_key_in_use": RuleInput(
        "Revoked or expired key in use", "switch", "Alert when a refused key keeps being used."
    ),
    "new_ip_for_prod": RuleInput(
        "New address for a production key",
        "switch",
        "Alert when a production key is used from an address it has not used before.",
    ),
    "quota_thresholds": RuleInput(
        "Quota thresholds",
        "list",
        "Alert as a quota's use passes each share, comma-separated (0.8, 0.9, 1); "
        "off: no quota alerts.",
    ),
    "rotation_due": RuleInput(
        "Rotation due", "switch", "Alert when a key is older than the rotation policy allows."
    ),
    "cooldown": RuleInput(
        "Cool-down (seconds)",
        "number",
        "How long the same alert for the same key stays quiet after it is raised.",
    ),
}


def shown(value: Any) -> str:
    """A rule's value as the pages show it (and its form field reads it back)."""
    if value is None:
        return "off"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ", ".join(shown(v) for v in value) if value else "off"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def rule_values(form: Mapping[str, list[str]]) -> Rules:
    """The rules a posted rule form sets (as the manager takes them; it validates them):
    the fields not left empty."""
    out: Rules = {}
    for name in RULE_FIELDS:
        text = (form.get(name) or [""])[0].strip()
        if not text:
            continue
        kind = RULE_INPUTS[name].kind
        off = text.casefold() in ("off", "none")
        if kind == "list":
            out[name] = [] if off else [part.strip() for part in text.split(",")]
        elif kind == "off-number" and off:
            out[name] = None
        else:
            out[name] = text  # "on" / "off", numbers: the model reads them
    return out


def _input(name: str, spec: RuleInput, value: str, described: str) -> str:
    if spec.kind == "switch":
        choices = (("", "inherit"), ("on", "on"), ("off", "off"))
        options = "".join(
            f'<option value="{v}"{" selected" if v == value else ""}>{label}</option>'
            for v, label in choices
        )
        return f'<select id="{name}" name="{name}"{described}>{options}</select>'
    return (
        f'<input type="text" id="{name}" name="{name}" value="{e(value)}" maxlength="200" '
        f'inputmode="{"text" if spec.kind != "number" else "decimal"}"{described}>'
    )


def rules_form(
    action: str,
    csrf: str,
    effective: AlertRules,
    sources: Mapping[str, str],
    values: Mapping[str, str],
    errors: Mapping[str, list[str]],
    level: str,
) -> str:
    """The rules of one level (``level``: "project" or "key") with their effective value
    and where it comes from, as a form; and the form of its Clear buttons."""
    rows = []
    held = effective.model_dump()
    for name in RULE_FIELDS:
        spec = RULE_INPUTS[name]
        message, described = errors_for(errors, name, f"{name}-hint")
        clear = ""
        if sources[name] == level:
            clear = (
                f'<button type="submit" form="clear-rules" name="field" value="{name}" '
                f'class="secondary">Clear<span class="visually-hidden"> {e(spec.label)}'
                "</span></button>"
            )
        rows.append(
            f'<tr id="rule-{name}"><th scope="row"><label for="{name}">{e(spec.label)}</label>'
            f'<p class="hint" id="{name}-hint">{e(spec.hint)}</p></th>'
            f'<td class="effective">{e(shown(held[name]))}</td>'
            f'<td class="source">{e(sources[name])}</td>'
            f"<td>{_input(name, spec, values.get(name, ''), described)}{message}</td>"
            f"<td>{clear}</td></tr>"
        )
    head = "".join(
        f'<th scope="col">{h}</th>'
        for h in (
            "Rule",
            "In force",
            "Set by",
            f"Set for this {level}",
            '<span class="visually-hidden">Clear</span>',
        )
    )
    return (
        f"{other_errors(errors, RULE_FIELDS)}"
        f'<form method="post" action="{e(action)}" id="rules-form" novalidate>'
        f'<input type="hidden" name="csrf" value="{e(csrf)}">'
        f'<table id="rules"><caption class="visually-hidden">Alert rules</caption>'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        '<p class="hint">Empty: inherited. Off turns a rule off.</p>'
        '<p><button type="submit" id="save-rules">Save rules</button></p></form>'
        f'<form method="post" action="{e(action)}/clear" id="clear-rules">'
        f'<input type="hidden" name="csrf" value="{e(csrf)}">'
        f'<button type="submit" name="all" value="1" class="secondary" id="clear-all">'
        f"Clear all the {level}'s rules</button></form>"
    )


def _own_values(rules: Rules) -> dict[str, str]:
    return {name: shown(value) for name, value in rules.items() if name in RULE_FIELDS}


def _notice(request: Request) -> str:
    if request.query_params.get("saved"):
        return '<p class="notice" role="status">Saved.</p>'
    return ""


class RulePages:
    """The project settings and alert-rule pages (mixed into
    :class:`~keystile.console.app.Console`)."""

    manager: KeyManager

    if TYPE_CHECKING:  # what the console brings

        def _html(
            self, ctx: Context, title: str, main: str, current: str = ""
        ) -> HTMLResponse: ...

        async def _key(self, ctx: Context) -> ApiKey: ...

    def rule_routes(
        self,
        page: Callable[..., Callable[[Request], Awaitable[Response]]],
    ) -> list[BaseRoute]:
        """The routes of these pages, each through the console's ``page`` guard."""
        return [
            Route("/project", page(self.project_page), methods=["GET"]),
            Route("/project", page(self.save_project, write=True), methods=["POST"]),
            Route("/alert-rules", page(self.rules_page), methods=["GET"]),
            Route("/alert-rules", page(self.save_rules, write=True), methods=["POST"]),
            Route("/alert-rules/clear", page(self.clear_rules, write=True), methods=["POST"]),
            Route("/keys/{key_id}/alert-rules", page(self.key_rules_page), methods=["GET"]),
            Route(
                "/keys/{key_id}/alert-rules",
                page(self.save_key_rules, write=True),
                methods=["POST"],
            ),
            Route(
                "/keys/{key_id}/alert-rules/clear",
                page(self.clear_key_rules, write=True),
                methods=["POST"],
            ),
        ]

    async def project_name(self, project: str) -> str:
        """The project's name, for the header of every page."""
        return (await self.manager.project_info(project)).name

    # -- the project's settings -----------------------------------------------------------

    async def project_page(self, ctx: Context) -> Response:
        info = await self.manager.project_info(ctx.project)
        values = {"name": info.name, "description": info.description}
        return self._project_form(ctx, info, values, {}, _notice(ctx.request))

    def _project_form(
        self,
        ctx: Context,
        info: ProjectInfo,
        values: Mapping[str, str],
        errors: Mapping[str, list[str]],
        notice: str = "",
    ) -> HTMLResponse:
        name_error, name_attrs = errors_for(errors, "name", "name-hint")
        text_error, text_attrs = errors_for(errors, "description", "description-hint")
        main = (
            f"{notice}{other_errors(errors, ('name', 'description'))}"
            f"<p>Project id <code>{e(info.id)}</code> (keys carry it; it does not change)."
            "</p>"
            f'<form method="post" action="{e(ctx.base)}/project" novalidate>'
            f'<input type="hidden" name="csrf" value="{e(ctx.csrf)}">'
            '<div class="field"><label for="name">Name</label>'
            '<input type="text" id="name" name="name" class="wide" maxlength="200" required '
            f'value="{e(values.get("name", ""))}"{name_attrs}>'
            '<p class="hint" id="name-hint">Shown at the top of every page; 1 to 200 '
            f"characters.</p>{name_error}</div>"
            '<div class="field"><label for="description">Description (optional)</label>'
            f'<textarea id="description" name="description" maxlength="1000"{text_attrs}>'
            f"{e(values.get('description', ''))}</textarea>"
            '<p class="hint" id="description-hint">Up to 1,000 characters.</p>'
            f"{text_error}</div>"
            '<button type="submit" id="save-project">Save</button></form>'
            f'<p><a href="{e(ctx.base)}/alert-rules">The project\'s alert rules</a></p>'
        )
        response = self._html(ctx, "Project settings", main, "project")
        if errors:
            response.status_code = 422
        return response

    async def save_project(self, ctx: Context) -> Response:
        asked = {"name": ctx.one("name"), "description": ctx.one("description")}
        try:
            await self.manager.update_project(ctx.project, asked, by=ctx.by())
        except KeyValidationError as exc:
            info = await self.manager.project_info(ctx.project)
            return self._project_form(ctx, info, asked, field_errors(exc.errors))
        return RedirectResponse(f"{ctx.base}/project?saved=1", status_code=303)

    # -- alert rules: the project's, and a key's overrides --------------------------------

    async def rules_page(self, ctx: Context) -> Response:
        return await self._show(ctx, None)

    async def key_rules_page(self, ctx: Context) -> Response:
        return await self._show(ctx, await self._key(ctx))

    async def save_rules(self, ctx: Context) -> Response:
        return await self._save(ctx, None)

    async def save_key_rules(self, ctx: Context) -> Response:
        return await self._save(ctx, await self._key(ctx))

    async def clear_rules(self, ctx: Context) -> Response:
        return await self._clear(ctx, None)

    async def clear_key_rules(self, ctx: Context) -> Response:
        return await self._clear(ctx, await self._key(ctx))

    async def rules_summary(self, ctx: Context, key: ApiKey) -> str:
        """A key's rules in force and what sets each, with a link to edit its overrides
        (on the key's page)."""
        level = await self._level(ctx, key)
        held = level.effective.model_dump()
        rows = "".join(
            f'<tr><th scope="row">{e(RULE_INPUTS[name].label)}</th>'
            f"<td>{e(shown(held[name]))}</td><td>{e(level.sources[name])}</td></tr>"
            for name in RULE_FIELDS
        )
        return (
            '<h3 id="rules-heading">Alert rules in force</h3>'
            '<table id="alert-rules" aria-labelledby="rules-heading"><thead><tr>'
            '<th scope="col">Rule</th><th scope="col">In force</th>'
            f'<th scope="col">Set by</th></tr></thead><tbody>{rows}</tbody></table>'
            f'<p><a href="{e(level.action)}">Edit this key\'s alert rules</a> · '
            f'<a href="{e(ctx.base)}/alert-rules">Edit the project\'s alert rules</a></p>'
        )

    async def _level(self, ctx: Context, key: ApiKey | None) -> _Level:
        if key is None:
            project = await self.manager.alert_rules(ctx.project)
            sources = {n: "project" if n in project.rules else "default" for n in RULE_FIELDS}
            count = len(project.overridden)
            overrides = (
                "No key overrides them."
                if not count
                else f"{count} key{' overrides' if count == 1 else 's override'} some of them "
                "(on each key's page, Alert rules)."
            )
            intro = (
                "The rules of every key of the project; what is left empty follows the "
                f"server's default. {overrides}"
            )
            return _Level(
                "project",
                f"{ctx.base}/alert-rules",
                "Alert rules",
                intro,
                project.rules,
                project.effective,
                sources,
            )
        found = await self.manager.key_alert_rules(key.id, project=ctx.project)
        sources = {
            n: "key"
            if n in found.overrides
            else "project"
            if n in found.project_rules
            else "default"
            for n in RULE_FIELDS
        }
        intro = (
            f'Overrides for <a href="{e(ctx.base)}/keys/{e(key.id)}">{e(key.name)}</a> '
            f"(<code>{e(key.id)}</code>); what is left empty follows "
            f'<a href="{e(ctx.base)}/alert-rules">the project\'s rules</a>.'
        )
        return _Level(
            "key",
            f"{ctx.base}/keys/{key.id}/alert-rules",
            f"Alert rules of {key.name}",
            intro,
            found.overrides,
            found.effective,
            sources,
        )

    async def _show(
        self,
        ctx: Context,
        key: ApiKey | None,
        values: Mapping[str, str] | None = None,
        errors: Mapping[str, list[str]] | None = None,
    ) -> HTMLResponse:
        level = await self._level(ctx, key)
        form = rules_form(
            level.action,
            ctx.csrf,
            level.effective,
            level.sources,
            _own_values(level.own) if values is None else values,
            errors or {},
            level.name,
        )
        main = f"{_notice(ctx.request)}<p>{level.intro}</p>{form}"
        response = self._html(ctx, level.title, main, "alert-rules" if key is None else "")
        if errors:
            response.status_code = 422
        return response

    async def _set(self, ctx: Context, key: ApiKey | None, rules: Rules) -> None:
        """Make ``rules`` all the level sets (the others inherited)."""
        if key is None:
            await self.manager.set_alert_rules(
                rules, project=ctx.project, replace=True, by=ctx.by()
            )
        else:
            await self.manager.set_key_alert_rules(
                key.id, rules, project=ctx.project, replace=True, by=ctx.by()
            )

    def _done(self, ctx: Context, key: ApiKey | None) -> Response:
        where = "alert-rules" if key is None else f"keys/{key.id}/alert-rules"
        return RedirectResponse(f"{ctx.base}/{where}?saved=1", status_code=303)

    async def _save(self, ctx: Context, key: ApiKey | None) -> Response:
        try:
            await self._set(ctx, key, rule_values(ctx.form))
        except KeyValidationError as exc:
            typed = {name: ctx.one(name) for name in RULE_FIELDS}
            return await self._show(ctx, key, typed, field_errors(exc.errors))
        return self._done(ctx, key)

    async def _clear(self, ctx: Context, key: ApiKey | None) -> Response:
        """Clear all (``all``) or one rule (``field``) of the level."""
        rules: Rules = {}
        if not ctx.one("all"):
            field = ctx.one("field")
            if field not in RULE_FIELDS:
                raise Refused(400, "Bad request", f"field must be one of {', '.join(RULE_FIELDS)}")
            own = (await self._level(ctx, key)).own
            rules = {name: value for name, value in own.items() if name != field}
        await self._set(ctx, key, rules)
        return self._done(ctx, key)


@dataclass(frozen=True, slots=True)
class _Level:
    """The rules of the project or of a key, as a page shows them."""

    name: str  # "project" or "key": what the form's fields set
    action: str
    title: str
    intro: str  # HTML
    own: Rules
    effective: AlertRules
    sources: dict[str, str]  # rule -> "key", "project" or "default"
