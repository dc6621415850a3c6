"""The one management API: create, get, list, update, revoke, rotate and usage.

The admin REST API (:mod:`keystile.admin`) and the command line (:mod:`keystile.cli`) are
thin shells over this module; nothing here knows they exist. Every input is validated
here, and every problem is reported as a :class:`~keystile.exceptions.KeyValidationError`
naming its field, so all three surfaces say the same thing about the same mistake, and
every action and refused attempt is recorded in the audit trail (:mod:`keystile.audit`).
It stays one module past the usual size because it is one concern — what may be done to a
key, checked once for every surface.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from pydantic import SecretStr, ValidationError

from keystile import keys
from keystile.alerts import AlertRules
from keystile.audit import (
    ACTIONS,
    AUDIT_CURSOR,
    Action,
    Actor,
    AuditEvent,
    AuditPage,
    AuditTrail,
    matcher,
)
from keystile.authority import Authority
from keystile.backends import backend_for
from keystile.clock import Clock, system_clock, to_datetime, to_timestamp
from keystile.exceptions import (
    FieldError,
    KeyChanged,
    KeyNotFound,
    KeyValidationError,
    RotationRefused,
    ScopeRefused,
    StoreError,
    StoreUnavailable,
)
from keystile.logs import fields
from keystile.manager_projects import ProjectManagement
from keystile.models import (
    DEFAULT_POLICY,
    DEFAULT_PROJECT,
    ApiKey,
    KeyPolicy,
    KeySettings,
    KeyType,
    field_errors,
)
from keystile.projects import ProjectStore
from keystile.records import (
    KEY_ID,
    RECORD_FIELDS,
    CreatedKey,
    KeyInfo,
    KeyPage,
    KeyStatus,
    RotatedKey,
    decode_cursor,
    describe,
    encode_cursor,
    key_status,
    record_json,
)
from keystile.rotation import (
    DEFAULT_GRACE,
    check_rotatable,
    grace_seconds,
    rotated_expiry,
)
from keystile.stores.protocol import KeyStore
from keystile.usage import (
    Granularity,
    UsageOverview,
    UsageReader,
    UsageReport,
    UsageTotals,
)

__all__ = [
    "DEFAULT_GRACE",
    "RECORD_FIELDS",
    "UPDATABLE_FIELDS",
    "CreatedKey",
    "KeyInfo",
    "KeyManager",
    "KeyPage",
    "KeyStatus",
    "RotatedKey",
    "key_status",
    "record_json",
]

logger = logging.getLogger("keystile.manager")

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# Project, type and status filters are answered by the store's listing index; a metadata
# filter (not indexed) reads at most this many of the records they leave per call, so a
# filter that matches little cannot turn one request into a scan; the cursor continues.
_SCAN_BUDGET = 5000

UPDATABLE_FIELDS = (
    "name",
    "scopes",
    "allowed_origins",
    "allowed_ips",
    "rate_limit",
    "address_rate_limit",
    "token_quota",
    "expires_at",
    "metadata",
)
"""The fields :meth:`KeyManager.update` may change: everything a caller chose except the type."""

_FIXED_FIELDS = {
    "project": "a key's project cannot be changed: create a key in the other project",
    "type": "a key's type cannot be changed: create a new key of the other type",
    "secret": "a key's secret cannot be changed: rotate the key instead",
    "id": "is assigned by keystile and cannot be changed",
    "hint": "is derived from the secret and cannot be changed",
    "created_at": "is set when the key is created and cannot be changed",
    "revoked_at": "cannot be set by an update: revoke the key instead",
    "replaces": "is set by rotation and cannot be changed",
    "replaced_by": "is set by rotation and cannot be changed",
}

_WRITE_ATTEMPTS = 5  # compare-and-set rounds before giving up (KeyChanged)


# What an attempt refused on its merits raises: recorded in the audit trail as refused.
_REFUSED = (KeyValidationError, ScopeRefused, KeyNotFound, RotationRefused)


def _in_project(
    settings: KeySettings | Mapping[str, Any], project: str | None
) -> KeySettings | Mapping[str, Any]:
    """``settings`` placed in ``project`` (refused if they name another one)."""
    if project is None:
        return settings
    asked = settings.project if isinstance(settings, KeySettings) else settings.get("project")
    if (
        asked is not None
        and asked != project
        and not (isinstance(settings, KeySettings) and asked == DEFAULT_PROJECT)
    ):
        raise KeyValidationError.single(
            "project", f"keys are made in your own project ({project!r}) only"
        )
    if isinstance(settings, KeySettings):
        return settings.model_copy(update={"project": project})
    return {**settings, "project": project}


def _who(actor: ApiKey | None, by: Actor | None) -> Actor:
    if by is not None:
        return by
    return Actor.of_key(actor) if actor is not None else Actor.python()


class KeyManager(ProjectManagement):
    """Issue and manage keys in a store, and the projects they belong to (their names and
    alert rules: :class:`~keystile.manager_projects.ProjectManagement`).

    Changes to one record (update, revoke, rotate) read, change and write it back; they are
    serialised within this manager, so a revocation is never undone by a concurrent update
    made through the same manager.

    :meth:`create`, :meth:`update` and :meth:`rotate` take the calling key as ``actor``
    when a key (not an operator) asks, as the admin API does. Such a key may grant only
    scopes it holds itself, may not change its own scopes, allowlists or expiry, and may not
    update or rotate a key holding scopes it lacks: :class:`ScopeRefused` names the scopes
    missing. A ``*`` key, and ``actor=None`` (Python code, the command line), may do all.
    """

    def __init__(
        self,
        store: KeyStore,
        hasher: keys.KeyHasher,
        *,
        policy: KeyPolicy = DEFAULT_POLICY,
        clock: Clock = system_clock,
        usage: UsageReader | None = None,
        audit: AuditTrail | None = None,
        projects: ProjectStore | None = None,
        alert_rules: AlertRules | None = None,
    ) -> None:
        self.store = store
        self.hasher = hasher
        self.policy = policy
        self.authority = Authority(policy.catalogue)
        self.clock = clock
        # The gate's reader (which flushes its recorder before a report), or a reader of what
        # other processes recorded in the same Redis.
        self.usage_reader = usage or UsageReader(
            backend_for(store).usage_store(clock), clock=clock
        )
        self._writing = asyncio.Lock()
        # Every action and refused attempt, kept in the store (keystile.audit).
        self.audit = audit or backend_for(store).audit_trail(clock)
        # Project names and alert rules; ``alert_rules``: the process default.
        self.projects_store = projects or backend_for(store).project_store()
        self.alert_defaults = alert_rules or AlertRules()

    def now(self) -> datetime:
        return to_datetime(self.clock())

    async def _audit(
        self,
        action: Action,
        who: Actor,
        key: ApiKey | None = None,
        *,
        key_id: str | None = None,
        changes: dict[str, list[Any]] | None = None,
        refused: Exception | None = None,
        project: str | None = None,
    ) -> None:
        """Record an action (or a refused attempt) in the audit trail; a trail that cannot
        be written is logged, never the action's failure (it has happened)."""
        if key is not None:
            key_id = key.id
        shown = key_id if key_id is None or KEY_ID.fullmatch(key_id) else "(not a key id)"
        event = AuditEvent(
            at=self.now(),
            action=action,
            outcome="refused" if refused is not None else "ok",
            actor=who,
            key_id=shown,
            project=key.project if key is not None else project,
            changes=changes or {},
            reason=None if refused is None else str(refused),
        )
        try:
            await self.audit.append(event)
        except StoreError as exc:
            logger.warning(
                "could not record %s of %s in the audit trail: %s",
                action,
                shown,
                exc,
                extra=fields("audit.write_failed", key_id=shown),
            )

    async def _issue(
        self, settings: KeySettings, now: float, *, replaces: str | None = None
    ) -> CreatedKey:
        prefix = self.policy[settings.type].prefix
        token = keys.generate_key(prefix)
        record = ApiKey(
            id=keys.new_key_id(now),
            hint=keys.key_hint(token, prefix),
            created_at=to_datetime(now),
            replaces=replaces,
            **settings.model_dump(),
        )
        await self.store.add(record, self.hasher.digest(token))
        return CreatedKey(record, SecretStr(token))

    async def create(
        self,
        settings: KeySettings | Mapping[str, Any],
        *,
        actor: ApiKey | None = None,
        by: Actor | None = None,
        project: str | None = None,
    ) -> CreatedKey:
        """Validate ``settings``, issue a key, store its record; the secret is returned once.

        With an ``actor``, the new key's scopes must be ones it holds (:class:`ScopeRefused`).
        ``by`` says who acts, for the audit trail (default: ``actor``, else Python code).
        With ``project``, the key is made in that project (settings naming another one
        are refused).
        """
        who = _who(actor, by)
        try:
            created = await self._create(_in_project(settings, project), actor)
        except _REFUSED as exc:
            await self._audit("create", who, refused=exc, project=project)
            raise
        fields = created.key.model_dump(mode="json", include=set(KeySettings.model_fields))
        await self._audit(
            "create", who, created.key, changes={k: [None, v] for k, v in fields.items()}
        )
        return created

    async def _create(
        self, settings: KeySettings | Mapping[str, Any], actor: ApiKey | None
    ) -> CreatedKey:
        now = self.clock()
        valid = self.policy.validate(settings, now=to_datetime(now))
        self.authority.may_grant(actor, valid.scopes)
        created = await self._issue(valid, now)
        logger.info(
            "created key %s (%s, %s)",
            created.key.id,
            created.key.hint,
            valid.type,
            extra=fields("key.created", key_id=created.key.id, project=created.key.project),
        )
        return created

    async def get(self, key_id: str, *, project: str | None = None) -> ApiKey:
        """The record with this id; :class:`KeyNotFound` when there is none — or, with
        ``project``, when it belongs to another project (the same answer, word for word:
        nobody can tell another project's key from no key)."""
        if not isinstance(key_id, str) or not key_id:
            raise KeyNotFound("a key id is a non-empty string")
        record = await self.store.get(key_id)
        if record is None or (project is not None and record.project != project):
            # Echo only what looks like an id: a secret pasted where an id belongs must not
            # come back in an error message (or a command's stderr).
            shown = key_id if KEY_ID.fullmatch(key_id) else "given"
            raise KeyNotFound(
                f"no key with the id {shown}" if shown != "given" else "no key with the given id"
            )
        return record

    async def info(self, key_id: str, *, project: str | None = None) -> KeyInfo:
        """The record with this id, its status now and its last use (:class:`KeyNotFound`
        when there is none, or it is in another ``project``)."""
        [described] = await self.describe([await self.get(key_id, project=project)])
        return described

    async def describe(self, records: Iterable[ApiKey]) -> builtins.list[KeyInfo]:
        """Each record with its status now and when it was last used, as the usage store
        has it (one read per key; what this process counted since its last flush is not
        in it yet)."""
        return await describe(records, self.now(), self._last_used)

    async def _last_used(self, key_id: str) -> datetime | None:
        try:
            return (await self.usage_reader.store.last_use(key_id)).at
        except StoreError as exc:
            raise StoreUnavailable(f"usage cannot be read: {exc}") from exc

    async def list(
        self,
        *,
        type: KeyType | str | None = None,
        status: KeyStatus | str | None = None,
        metadata: Mapping[str, str] | None = None,
        cursor: str | None = None,
        limit: int = DEFAULT_PAGE_SIZE,
        project: str | None = None,
        undeclared: bool = False,
    ) -> KeyPage:
        """Records in creation order, ``limit`` at a time, that match every filter given:
        ``type`` (a declared one), ``status`` (``active``, ``rotated``, ``revoked`` or
        ``expired``) and ``metadata`` (each named entry equal); with ``undeclared``, only
        records of a type the policy no longer declares (refused when used). Pass the page's
        ``next`` as ``cursor`` to continue.

        ``project``, ``type`` and ``status`` come from the store's listing index: a page
        reads about ``limit`` records however many are stored. With ``metadata`` or
        ``undeclared``, a page
        may hold fewer than ``limit`` records (even none) and still have a ``next``: each
        call reads a bounded number of the records the other filters leave.
        """
        errors: builtins.list[FieldError] = []
        key_type = status_value = after = None
        if type is not None:
            if isinstance(type, str) and self.policy.declares(type):
                key_type = type
            else:
                errors.append(FieldError("type", f"must be one of {', '.join(self.policy.names)}"))
        try:
            status_value = None if status is None else KeyStatus(status)
        except ValueError:
            errors.append(FieldError("status", f"must be one of {', '.join(KeyStatus)}"))
        wanted = dict(metadata or {})
        for name, value in wanted.items():
            if not isinstance(name, str) or not isinstance(value, str):
                errors.append(FieldError(f"metadata.{name}", "metadata filters are strings"))
        if (
            isinstance(limit, bool)
            or not isinstance(limit, int)
            or not 1 <= limit <= MAX_PAGE_SIZE
        ):
            errors.append(FieldError("limit", f"must be a whole number from 1 to {MAX_PAGE_SIZE}"))
        if cursor is not None:
            try:
                after = decode_cursor(cursor)
            except KeyValidationError as exc:
                errors.extend(exc.errors)
        if errors:
            raise KeyValidationError(errors)

        now = self.now()

        def matches(record: ApiKey) -> bool:
            return (not undeclared or not self.policy.declares(record.type)) and all(
                record.metadata.get(k) == v for k, v in wanted.items()
            )

        sparse = bool(wanted) or undeclared  # filters the index does not answer
        # One record more than a page tells whether another page follows.
        batch = min(max(limit + 1, 500), max(_SCAN_BUDGET, limit + 1)) if sparse else limit + 1
        found: builtins.list[ApiKey] = []
        scanned = 0
        while True:
            page = await self.store.list_matching(
                now=now,
                project=project,
                key_type=key_type,
                status=status_value,
                after=after,
                limit=batch,
            )
            for record in page:
                if len(found) == limit:
                    # A full page, and at least one record after it.
                    return KeyPage(tuple(found), encode_cursor(found[-1].id))
                if matches(record):
                    found.append(record)
            if len(page) < batch:
                return KeyPage(tuple(found), None)
            after = page[-1].id
            scanned += len(page)
            if scanned >= _SCAN_BUDGET and len(found) < limit:
                return KeyPage(tuple(found), encode_cursor(after))

    def _changes(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(changes, Mapping):
            raise KeyValidationError.single("body", "the changes must be a mapping of fields")
        errors = []
        for name in changes:
            if name in UPDATABLE_FIELDS:
                continue
            message = _FIXED_FIELDS.get(str(name)) or (
                f"unknown field; the fields that can change are {', '.join(UPDATABLE_FIELDS)}"
            )
            errors.append(FieldError(str(name), message))  # FieldError keeps it short
        if errors:
            raise KeyValidationError(errors)
        return dict(changes)

    async def update(
        self,
        key_id: str,
        changes: Mapping[str, Any] | None = None,
        /,
        *,
        actor: ApiKey | None = None,
        by: Actor | None = None,
        project: str | None = None,
        **fields: Any,
    ) -> ApiKey:
        """Change some of a key's settings (:data:`UPDATABLE_FIELDS`; never its type or
        secret), by a mapping, keywords, or both. Each given field replaces the old value
        whole; ``None`` clears an optional one (``expires_at``, ``rate_limit``,
        ``address_rate_limit``, ``token_quota``: back to no expiry and the type's defaults).

        Checked with the rules of :meth:`create`, field formats and policy; one
        :class:`KeyValidationError` names every offending field. Fields not being changed
        are not re-judged, so a key made under older rules can still be renamed. A rotated
        key's expiry may only move earlier.

        With an ``actor`` (see the class), :class:`ScopeRefused` when the key holds scopes
        the actor lacks, the new scopes include one, or the actor changes its own scopes,
        allowlists or expiry.
        """
        who = _who(actor, by)
        try:
            asked = {**(changes or {}), **fields}
            record, updated = await self._update(key_id, asked, actor, project)
        except _REFUSED as exc:
            await self._audit("update", who, key_id=key_id, refused=exc, project=project)
            raise
        before = record.model_dump(mode="json")
        after = updated.model_dump(mode="json")
        changed = {k: [before[k], v] for k, v in after.items() if before[k] != v}
        await self._audit("update", who, updated, changes=changed)
        return updated

    async def _update(
        self, key_id: str, asked: dict[str, Any], actor: ApiKey | None, project: str | None
    ) -> tuple[ApiKey, ApiKey]:
        wanted = self._changes(asked)

        def change(record: ApiKey) -> ApiKey:
            self.authority.may_manage(actor, record, "update")
            merged = {**record.model_dump(), **wanted}
            try:
                updated = ApiKey.model_validate(merged)
            except ValidationError as exc:
                raise KeyValidationError(field_errors(exc)) from None
            problems = [
                e
                for e in self.policy.check(updated, updated.type, now=self.now())
                if re.split(r"[.\[]", e.field, maxsplit=1)[0] in wanted
            ]
            problems += rotated_expiry(record, updated)
            if problems:
                raise KeyValidationError(problems)
            if "scopes" in wanted:
                self.authority.may_grant(actor, updated.scopes)
            self.authority.may_change_itself(actor, record, updated)
            return updated

        if not wanted:
            record = await self.get(key_id, project=project)
            self.authority.may_manage(actor, record, "update")
            return record, record
        record, updated = await self._write(key_id, change, project)
        if updated != record:
            logger.info(
                "updated key %s (%s): %s",
                key_id,
                record.hint,
                ", ".join(sorted(wanted)),
                extra=fields("key.updated", key_id=key_id, project=record.project),
            )
        return record, updated

    async def revoke(
        self, key_id: str, *, by: Actor | None = None, project: str | None = None
    ) -> ApiKey:
        """Revoke a key at once, everywhere. Revoking a revoked key changes nothing."""
        who = by or Actor.python()
        try:
            record, revoked = await self._revoke(key_id, project)
        except _REFUSED as exc:
            await self._audit("revoke", who, key_id=key_id, refused=exc, project=project)
            raise
        changes = {}
        if revoked.revoked_at != record.revoked_at:
            changes["revoked_at"] = [None, revoked.model_dump(mode="json")["revoked_at"]]
            await self._follow(revoked, None)
        await self._audit("revoke", who, revoked, changes=changes)
        return revoked

    async def _follow(self, record: ApiKey, successor: ApiKey | None) -> None:
        """Move or remove the key's alert-rule overrides; a store failure here is logged,
        never the revocation's or rotation's (it has happened)."""
        try:
            await self._key_rules_follow(record, successor)
        except StoreError as exc:
            logger.warning(
                "could not %s the alert rules of %s: %s",
                "remove" if successor is None else "copy",
                record.id,
                exc,
                extra=fields("key.rules_not_moved", key_id=record.id),
            )

    async def _revoke(self, key_id: str, project: str | None) -> tuple[ApiKey, ApiKey]:
        def change(record: ApiKey) -> ApiKey:
            if record.revoked:
                return record
            return record.model_copy(update={"revoked_at": self.now()})

        record, revoked = await self._write(key_id, change, project)
        if revoked != record:
            logger.info(
                "revoked key %s (%s)",
                key_id,
                record.hint,
                extra=fields("key.revoked", key_id=key_id, project=record.project),
            )
        return record, revoked

    async def _write(
        self, key_id: str, change: Callable[[ApiKey], ApiKey], project: str | None = None
    ) -> tuple[ApiKey, ApiKey]:
        """Read the record, ``change`` it, and write it back only if nobody else wrote it
        meanwhile — in any process (compare and set); else read it again and redo the
        change on what is there now (a revocation is never undone by an update that read
        the record before it). The record before and after; unchanged: nothing written."""
        async with self._writing:
            for _ in range(_WRITE_ATTEMPTS):
                record = await self.get(key_id, project=project)
                changed = change(record)
                if changed == record:
                    return record, record
                try:
                    await self.store.replace(changed, expected=record)
                except KeyChanged:
                    continue
                return record, changed
        raise KeyChanged(
            f"key {key_id} changed {_WRITE_ATTEMPTS} times while being updated; try again"
        )

    async def rotate(
        self,
        key_id: str,
        *,
        grace: timedelta | float = DEFAULT_GRACE,
        actor: ApiKey | None = None,
        by: Actor | None = None,
        project: str | None = None,
    ) -> RotatedKey:
        """Issue a successor with the same settings and a new secret; the old key keeps
        working for ``grace`` (a duration or seconds; default 24 h, may be zero), then is
        refused as expired — never later than an expiry it already had.

        The two records link to each other (``previous.replaced_by``, ``key.replaces``).
        A revoked, expired or already rotated key is refused with :class:`RotationRefused`.
        With an ``actor`` (see the class), a key holding scopes it lacks is refused with
        :class:`ScopeRefused`: the successor's secret would give them to it.
        """
        who = _who(actor, by)
        try:
            rotated = await self._rotate(key_id, grace, actor, project)
        except _REFUSED as exc:
            await self._audit("rotate", who, key_id=key_id, refused=exc, project=project)
            raise
        old = rotated.previous
        ends = old.model_dump(mode="json")["expires_at"]
        changes = {"replaced_by": [None, rotated.key.id], "expires_at": [None, ends]}
        await self._follow(old, rotated.key)
        await self._audit("rotate", who, old, changes=changes)
        return rotated

    async def _rotate(
        self, key_id: str, grace: timedelta | float, actor: ApiKey | None, project: str | None
    ) -> RotatedKey:
        seconds = grace_seconds(grace)
        async with self._writing:
            for _ in range(_WRITE_ATTEMPTS):
                old = await self.get(key_id, project=project)
                self.authority.may_manage(actor, old, "rotate")
                now = self.clock()
                moment = to_datetime(now)
                check_rotatable(old, moment)
                settings = KeySettings.model_validate(
                    old.model_dump(include=set(KeySettings.model_fields))
                )
                problems = self.policy.check(settings, settings.type, now=moment)
                if problems:
                    raise KeyValidationError(problems)
                created = await self._issue(settings, now, replaces=old.id)
                ends = to_datetime(now + seconds)
                if old.expires_at is not None and old.expires_at < ends:
                    ends = old.expires_at
                link = {"replaced_by": created.key.id, "expires_at": ends}
                previous = old.model_copy(update=link)
                try:
                    # Only if nobody revoked, rotated or changed the key meanwhile.
                    await self.store.replace(previous, expected=old)
                except KeyChanged:
                    # The successor was made from what the key was: withdraw it (never
                    # shown to anyone) and start again from what the key is now.
                    orphan = created.key.model_copy(update={"revoked_at": self.now()})
                    await self.store.replace(orphan)
                    logger.info(
                        "rotating %s: it changed meanwhile; withdrew %s",
                        old.id,
                        orphan.id,
                        extra=fields("key.rotation_retried", key_id=old.id),
                    )
                    continue
                except BaseException:
                    logger.warning(
                        "rotating %s: issued %s but could not link the old key to it",
                        old.id,
                        created.key.id,
                        extra=fields("key.rotation_unlinked", key_id=old.id),
                    )
                    raise
                break
            else:
                raise KeyChanged(
                    f"key {key_id} changed {_WRITE_ATTEMPTS} times while being rotated; try again"
                )
        logger.info(
            "rotated key %s (%s) to %s (%s); the old key expires at %s",
            old.id,
            old.hint,
            created.key.id,
            created.key.hint,
            ends.isoformat(),
            extra=fields("key.rotated", key_id=old.id, project=old.project),
        )
        return RotatedKey(created.key, created.secret, previous)

    async def history(
        self,
        *,
        key_id: str | None = None,
        action: str | None = None,
        outcome: str | None = None,
        actor: str | None = None,
        cursor: str | None = None,
        limit: int = 100,
        project: str | None = None,
    ) -> AuditPage:
        """The audit trail, newest first: events about ``key_id``, of ``action`` (create,
        update, rotate, revoke) and ``outcome`` (ok, refused), by ``actor`` (a key id,
        ``"command line"`` or ``"python"``); ``cursor`` is a previous page's ``next``."""
        errors = []
        if action is not None and action not in ACTIONS:
            errors.append(FieldError("action", f"must be one of: {', '.join(ACTIONS)}"))
        if outcome is not None and outcome not in ("ok", "refused"):
            errors.append(FieldError("outcome", "must be 'ok' or 'refused'"))
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
            errors.append(FieldError("limit", "must be a whole number, 1 to 1000"))
        if cursor is not None and not AUDIT_CURSOR.fullmatch(cursor):
            errors.append(FieldError("cursor", "is not a cursor this trail gave"))
        if errors:
            raise KeyValidationError(errors)
        wanted = matcher(
            key_id=key_id, action=action, outcome=outcome, actor=actor, project=project
        )
        return await self.audit.read(wanted, cursor=cursor, limit=limit)

    async def usage(
        self,
        key_id: str | None = None,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        granularity: Granularity = "minute",
        project: str | None = None,
    ) -> UsageReport | UsageOverview:
        """One key's usage report (:class:`KeyNotFound` if there is no such key): totals
        and a series over ``start``..``end`` at ``granularity``, all-time totals, the busiest
        IPs and origins, last use. Without ``key_id``: every key's totals and last use, and
        the sum of them — with ``project``, that project's keys only."""
        if granularity not in ("minute", "day"):
            raise KeyValidationError.single("granularity", "must be 'minute' or 'day'")
        for field, moment in (("start", start), ("end", end)):
            if moment is not None:
                try:  # there and back: the report names its range in UTC
                    to_datetime(to_timestamp(moment))
                except (ValueError, OverflowError) as exc:
                    raise KeyValidationError.single(field, str(exc)) from None
        if key_id is not None:
            await self.get(key_id, project=project)
        try:
            if key_id is None:
                return await self._named(await self.usage_reader.overview(), project)
            return await self.usage_reader.report(
                key_id, start=start, end=end, granularity=granularity
            )
        except ValueError as exc:  # the end before the start
            raise KeyValidationError.single("end", str(exc)) from None
        except StoreError as exc:
            raise StoreUnavailable(f"usage cannot be read: {exc}") from exc

    async def _named(self, overview: UsageOverview, project: str | None) -> UsageOverview:
        """The overview with each key's name (``None`` for a key no longer stored); with
        ``project``, only that project's keys, and their totals summed."""
        ids = [k.key_id for k in overview.keys]
        found: builtins.list[ApiKey | None] = []
        for start in range(0, len(ids), 50):  # bounded concurrency
            chunk = ids[start : start + 50]
            found.extend(await asyncio.gather(*(self.store.get(i) for i in chunk)))
        keys = [
            k.model_copy(update={"name": None if r is None else r.name})
            for k, r in zip(overview.keys, found, strict=True)
            if project is None or (r is not None and r.project == project)
        ]
        update: dict[str, Any] = {"keys": keys}
        if project is not None:
            update["totals"] = UsageTotals.sum(k.totals for k in keys)
        return overview.model_copy(update=update)
