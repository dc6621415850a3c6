"""What :class:`~keystile.manager.KeyManager` does to projects: their name, and the alert
rules of a project and of each of its keys (see :mod:`keystile.projects`).

A mixin of the manager, so the admin API, the command line and the console reach it
through the one management API; every change and refused attempt goes to the audit trail
(``update_project``, ``alert_rules``) with each field's old and new value.
"""

from __future__ import annotations

import asyncio
import builtins
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydantic import TypeAdapter, ValidationError

from keystile.alerts import AlertRules
from keystile.audit import Action, Actor
from keystile.exceptions import FieldError, KeyNotFound, KeyValidationError
from keystile.models import DEFAULT_PROJECT, ApiKey, ProjectName, field_errors
from keystile.projects import (
    KeyAlertRules,
    ProjectAlertRules,
    ProjectInfo,
    ProjectRecord,
    ProjectStore,
    Rules,
    effective_rules,
    now_record,
    rule_changes,
)

if TYPE_CHECKING:
    from keystile.clock import Clock
    from keystile.stores.protocol import KeyStore

__all__ = ["INHERITED", "PROJECT_FIELDS", "ProjectManagement"]

PROJECT_FIELDS = ("name", "description")
"""What :meth:`ProjectManagement.update_project` may change."""
INHERITED = "(inherited)"  # an audit event's value for a rule a level does not set

_PROJECT_ID: TypeAdapter[str] = TypeAdapter(ProjectName)


def _project_id(project: object) -> str:
    checked = _shown(project)
    if checked is None:
        raise KeyValidationError.single(
            "project",
            "must be 1 to 63 lower-case letters, digits, '-' or '_', starting with a letter "
            "or digit",
        )
    return checked


def _shown(project: object) -> str | None:
    """A project id fit for the audit trail: a valid one, else none (never raw input)."""
    try:
        return _PROJECT_ID.validate_python(project)
    except ValidationError:
        return None


def _rule_diff(old: Rules, new: Rules) -> dict[str, list[Any]]:
    return {
        name: [old.get(name, INHERITED), new.get(name, INHERITED)]
        for name in sorted({*old, *new})
        if old.get(name, INHERITED) != new.get(name, INHERITED)
    }


class ProjectManagement:
    """Projects' names and alert rules (mixed into :class:`~keystile.manager.KeyManager`)."""

    projects_store: ProjectStore
    alert_defaults: AlertRules

    if TYPE_CHECKING:  # what the manager brings
        store: KeyStore
        clock: Clock
        _writing: asyncio.Lock

        async def get(self, key_id: str, *, project: str | None = None) -> ApiKey: ...

        async def _audit(
            self,
            action: Action,
            who: Actor,
            key: ApiKey | None = None,
            *,
            key_id: str | None = None,
            changes: dict[str, builtins.list[Any]] | None = None,
            refused: Exception | None = None,
            project: str | None = None,
        ) -> None: ...

    # -- projects -------------------------------------------------------------------------

    async def project_info(self, project: str = DEFAULT_PROJECT) -> ProjectInfo:
        """The project's name and description (its id as its name when not recorded)."""
        project = _project_id(project)
        return ProjectInfo.of(project, await self.projects_store.get(project))

    async def update_project(
        self,
        project: str = DEFAULT_PROJECT,
        changes: Mapping[str, Any] | None = None,
        /,
        *,
        by: Actor | None = None,
        **fields: Any,
    ) -> ProjectInfo:
        """Rename a project or change its description (``name=``, ``description=``); the
        first change records it."""
        who = by or Actor.python()
        try:
            project = _project_id(project)
            asked = {**(changes or {}), **fields}
            unknown = [
                FieldError(str(n), f"unknown field; the fields are {', '.join(PROJECT_FIELDS)}")
                for n in asked
                if n not in PROJECT_FIELDS
            ]
            if unknown:
                raise KeyValidationError(unknown)
            async with self._writing:  # read, change, write: one at a time here
                old, record = await self._renamed(project, asked)
        except (KeyValidationError, KeyNotFound) as exc:
            await self._audit("update_project", who, refused=exc, project=_shown(project))
            raise
        diff = {
            k: [old[k], getattr(record, k)] for k in PROJECT_FIELDS if old[k] != getattr(record, k)
        }
        await self._audit("update_project", who, changes=diff, project=project)
        return ProjectInfo.of(project, record)

    async def _renamed(
        self, project: str, asked: dict[str, Any]
    ) -> tuple[dict[str, Any], ProjectRecord]:
        """The project's fields before, and its record with ``asked`` applied, written."""
        before = await self.projects_store.get(project)
        old = {"name": project, "description": ""} if before is None else before.model_dump()
        try:
            record = ProjectRecord.model_validate(
                now_record(
                    project,
                    asked.get("name", old["name"]),
                    asked.get("description", old["description"]),
                    self.clock(),
                    None if before is None else before.created_at,
                )
            )
        except ValidationError as exc:
            raise KeyValidationError(field_errors(exc)) from None
        await self.projects_store.put(record)
        return old, record

    async def projects(self) -> builtins.list[ProjectInfo]:
        """Every project, recorded or holding keys, by id, with how many keys each holds
        (reads every key record: for operators)."""
        counts: Counter[str] = Counter()
        after: str | None = None
        while True:
            page = await self.store.list_keys(after=after, limit=1000)
            counts.update(record.project for record in page)
            if len(page) < 1000:
                break
            after = page[-1].id
        records = {r.id: r for r in await self.projects_store.records()}
        return [
            ProjectInfo.of(p, records.get(p), counts.get(p, 0))
            for p in sorted({*records, *counts})
        ]

    # -- alert rules ----------------------------------------------------------------------

    async def alert_rules(self, project: str = DEFAULT_PROJECT) -> ProjectAlertRules:
        """The project's alert rules: what it sets, the default and the effective rules."""
        project = _project_id(project)
        held = (await self.projects_store.rules([project]))[project]
        return ProjectAlertRules(
            project=project,
            rules=held.project,
            default=self.alert_defaults,
            effective=effective_rules(self.alert_defaults, held.project),
            overridden=sorted(held.keys),
        )

    async def set_alert_rules(
        self,
        changes: Mapping[str, Any] | None = None,
        /,
        *,
        project: str = DEFAULT_PROJECT,
        replace: bool = False,
        by: Actor | None = None,
        **fields: Any,
    ) -> ProjectAlertRules:
        """Set some of the project's alert rules (fields of
        :class:`~keystile.alerts.AlertRules`; ``None`` turns a rule with a threshold
        off); the others keep their value — or, with ``replace``, are inherited from the
        process default again."""
        asked = {**(changes or {}), **fields}
        await self._change_rules(project, None, asked, replace=replace, by=by)
        return await self.alert_rules(project)

    async def clear_alert_rules(
        self, *, project: str = DEFAULT_PROJECT, by: Actor | None = None
    ) -> ProjectAlertRules:
        """Remove the project's own rules: it follows the process default again."""
        await self._change_rules(project, None, {}, replace=True, by=by)
        return await self.alert_rules(project)

    async def key_alert_rules(self, key_id: str, *, project: str | None = None) -> KeyAlertRules:
        """A key's overrides and effective rules (:class:`KeyNotFound` when there is no
        such key, or, with ``project``, it is another project's)."""
        record = await self.get(key_id, project=project)
        held = (await self.projects_store.rules([record.project]))[record.project]
        overrides = held.keys.get(record.id, {})
        return KeyAlertRules(
            key_id=record.id,
            project=record.project,
            overrides=overrides,
            project_rules=held.project,
            effective=effective_rules(self.alert_defaults, held.project, overrides),
        )

    async def set_key_alert_rules(
        self,
        key_id: str,
        changes: Mapping[str, Any] | None = None,
        /,
        *,
        project: str | None = None,
        replace: bool = False,
        by: Actor | None = None,
        **fields: Any,
    ) -> KeyAlertRules:
        """Override some alert rules for one key (as :meth:`set_alert_rules`; with
        ``replace``, the rules not given follow the project's again)."""
        asked = {**(changes or {}), **fields}
        await self._change_rules(project, key_id, asked, replace=replace, by=by)
        return await self.key_alert_rules(key_id, project=project)

    async def clear_key_alert_rules(
        self, key_id: str, *, project: str | None = None, by: Actor | None = None
    ) -> KeyAlertRules:
        """Remove a key's overrides: it follows its project's rules again."""
        await self._change_rules(project, key_id, {}, replace=True, by=by)
        return await self.key_alert_rules(key_id, project=project)

    async def _change_rules(
        self,
        project: str | None,
        key_id: str | None,
        asked: Mapping[str, Any],
        *,
        replace: bool,
        by: Actor | None,
    ) -> None:
        who = by or Actor.python()
        action: Action = "alert_rules"
        record: ApiKey | None = None
        try:
            if key_id is not None:
                record = await self.get(key_id, project=project)
                project = record.project
            project = _project_id(project)
            wanted = rule_changes(asked)
            # Read, merge, write: serialised within this manager (across processes, the
            # last write wins).
            async with self._writing:
                held = (await self.projects_store.rules([project]))[project]
                old = held.project if record is None else held.keys.get(record.id, {})
                new = wanted if replace else {**old, **wanted}
                if new != old:
                    await self.projects_store.set_rules(
                        project, None if record is None else record.id, new
                    )
        except (KeyValidationError, KeyNotFound) as exc:
            await self._audit(action, who, key_id=key_id, refused=exc, project=_shown(project))
            raise
        if record is None:
            await self._audit(action, who, changes=_rule_diff(old, new), project=project)
        else:
            await self._audit(action, who, record, changes=_rule_diff(old, new))

    async def _key_rules_follow(self, record: ApiKey, successor: ApiKey | None) -> None:
        """A revoked key's overrides are removed; a rotated key's pass to its successor."""
        held = (await self.projects_store.rules([record.project]))[record.project]
        overrides = held.keys.get(record.id)
        if not overrides:
            return
        if successor is not None:
            await self.projects_store.set_rules(record.project, successor.id, overrides)
        else:
            await self.projects_store.set_rules(record.project, record.id, None)
