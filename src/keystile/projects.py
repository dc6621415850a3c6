"""Projects: their record (a display name, a description) and their alert rules.

Every key belongs to a project (its ``project``, a slug such as ``default`` or ``shop``).
A project needs no record to exist: one not recorded shows with its id as its name and the
process-wide alert rules. Recording it — renaming it, or setting its alert rules — keeps:

- a :class:`ProjectRecord` (name, description, when it was first recorded);
- a :class:`RuleSet`: the project's own alert rules, and each key's overrides — only the
  rules they set (a JSON object of :class:`~keystile.alerts.AlertRules` fields); what they
  leave out comes from the next level. A key's rules are its overrides, else its project's,
  else the process's (``Keystile(alert_rules=...)``).

On a Redis store, one project is two hashes tagged by the project id (one slot in a
cluster) and a line in the project index; on the memory store, dicts in this process. A
project holds at most :data:`MAX_KEY_OVERRIDES` key overrides, and a revoked key's are
removed (it can raise no alert but "still in use", which follows the project's rules).

:class:`RuleBook` is what the alerter reads on each usage flush: every project's rules,
cached for :data:`RULES_TTL` seconds (a change made through this process's manager is
seen at once; one made in another process within the TTL), and loaded for every stale
project of a flush in one round trip.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, Protocol, cast

from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError

from keystile.alerts import AlertRules, Floors, lowest, minute_floors
from keystile.clock import to_datetime
from keystile.exceptions import FieldError, KeyValidationError, StoreError
from keystile.models import ProjectName, field_errors
from keystile.redis.connect import RedisClient
from keystile.redis.errors import translated
from keystile.redis.schema import RedisSchema

__all__ = [
    "MAX_KEY_OVERRIDES",
    "RULES_TTL",
    "RULE_FIELDS",
    "KeyAlertRules",
    "MemoryProjectStore",
    "ProjectAlertRules",
    "ProjectInfo",
    "ProjectRecord",
    "ProjectStore",
    "RedisProjectStore",
    "RuleBook",
    "RuleSet",
    "effective_rules",
    "rule_changes",
]

MAX_KEY_OVERRIDES = 10_000  # per project
MAX_PROJECTS = 100_000  # recorded projects listed, at most
RULES_TTL = 5.0  # seconds a flush may use a project's rules as read
_PROJECT_FIELD = "project"  # the rule hash's field of the project's own rules
_KEY_FIELD = "key:"  # ... and the prefix of each key's

RULE_FIELDS = tuple(AlertRules.model_fields)
"""The alert rules a project or a key may set."""

Rules = dict[str, Any]  # some AlertRules fields, as JSON values

ProjectTitle = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)
]
Description = Annotated[str, StringConstraints(strip_whitespace=True, max_length=1000)]


class ProjectRecord(BaseModel):
    """What is recorded of a project."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: ProjectName
    name: ProjectTitle
    description: Description = ""
    created_at: datetime
    updated_at: datetime


class ProjectInfo(BaseModel):
    """A project as the management API shows it: recorded or not (then its name is its id
    and it has no ``created_at``); ``keys``, in listings, how many keys it holds."""

    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    description: str = ""
    created_at: datetime | None = None
    updated_at: datetime | None = None
    recorded: bool = False
    keys: int | None = None

    @classmethod
    def of(
        cls, project: str, record: ProjectRecord | None, keys: int | None = None
    ) -> ProjectInfo:
        if record is None:
            return cls(id=project, name=project, keys=keys)
        return cls(**record.model_dump(), recorded=True, keys=keys)


class ProjectAlertRules(BaseModel):
    """A project's alert rules: what it sets (``rules``; the rest is inherited), the
    process-wide ``default``, and the ``effective`` result; ``overridden`` lists the keys
    with overrides of their own."""

    model_config = ConfigDict(frozen=True)

    project: str
    rules: Rules
    default: AlertRules
    effective: AlertRules
    overridden: list[str] = []


class KeyAlertRules(BaseModel):
    """A key's alert rules: its own ``overrides``, its project's ``project_rules``, and the
    ``effective`` result (overrides > project > process default)."""

    model_config = ConfigDict(frozen=True)

    key_id: str
    project: str
    overrides: Rules
    project_rules: Rules
    effective: AlertRules


@dataclass(slots=True)
class RuleSet:
    """A project's stored rules and its keys' overrides."""

    project: Rules = field(default_factory=dict)
    keys: dict[str, Rules] = field(default_factory=dict)


def rule_changes(changes: object, *, field_prefix: str = "") -> Rules:
    """Validate some alert rules (field name -> value); the normalised JSON values.
    :class:`KeyValidationError` names each unknown field and each bad value."""
    if not isinstance(changes, Mapping):
        raise KeyValidationError.single("body", "the rules must be a mapping of rule fields")
    errors = [
        FieldError(
            f"{field_prefix}{name}", f"unknown rule; the rules are {', '.join(RULE_FIELDS)}"
        )
        for name in changes
        if name not in RULE_FIELDS
    ]
    if errors:
        raise KeyValidationError(errors)
    try:
        checked = AlertRules.model_validate({**AlertRules().model_dump(), **changes})
    except ValidationError as exc:
        raise KeyValidationError(
            [FieldError(f"{field_prefix}{e.field}", e.message) for e in field_errors(exc)]
        ) from None
    values = checked.model_dump(mode="json")
    return {name: values[name] for name in changes}


def effective_rules(default: AlertRules, *levels: Rules) -> AlertRules:
    """``default`` with each level's rules on top, in order."""
    merged: Rules = {}
    for level in levels:
        merged.update(level)
    if not merged:
        return default
    try:
        checked = AlertRules.model_validate(merged)  # what is not set: valid class defaults
    except ValidationError:  # a stored rule no longer valid (edited by hand): the default
        return default
    return default.model_copy(update={name: getattr(checked, name) for name in merged})


class ProjectStore(Protocol):
    """Where project records and rules live."""

    def add_listener(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(project)`` after each change made through this store."""

    async def get(self, project: str) -> ProjectRecord | None: ...

    async def put(self, record: ProjectRecord) -> None: ...

    async def records(self) -> list[ProjectRecord]:
        """Every recorded project (at most :data:`MAX_PROJECTS`), by id."""

    async def rules(self, projects: Iterable[str]) -> dict[str, RuleSet]:
        """The rules of each project (one round trip)."""

    async def set_rules(self, project: str, key_id: str | None, rules: Rules | None) -> None:
        """Store the project's rules (``key_id`` None) or a key's overrides; ``None`` or
        ``{}`` removes them. A key override past :data:`MAX_KEY_OVERRIDES` is refused."""


class _Announcing:
    def __init__(self) -> None:
        self._listeners: list[Callable[[str], None]] = []

    def add_listener(self, listener: Callable[[str], None]) -> None:
        self._listeners.append(listener)

    def _announce(self, project: str) -> None:
        for listener in self._listeners:
            listener(project)


def _too_many() -> KeyValidationError:
    return KeyValidationError.single(
        "key_id", f"a project holds at most {MAX_KEY_OVERRIDES:,} keys with rules of their own"
    )


class MemoryProjectStore(_Announcing):
    """Projects in this process."""

    def __init__(self) -> None:
        super().__init__()
        self._records: dict[str, ProjectRecord] = {}
        self._rules: dict[str, RuleSet] = {}

    async def get(self, project: str) -> ProjectRecord | None:
        return self._records.get(project)

    async def put(self, record: ProjectRecord) -> None:
        if record.id not in self._records and len(self._records) >= MAX_PROJECTS:
            raise KeyValidationError.single("project", f"at most {MAX_PROJECTS:,} projects")
        self._records[record.id] = record
        self._announce(record.id)

    async def records(self) -> list[ProjectRecord]:
        return [self._records[p] for p in sorted(self._records)]

    async def rules(self, projects: Iterable[str]) -> dict[str, RuleSet]:
        out = {}
        for project in projects:
            found = self._rules.get(project, RuleSet())
            out[project] = RuleSet(
                dict(found.project), {k: dict(v) for k, v in found.keys.items()}
            )
        return out

    async def set_rules(self, project: str, key_id: str | None, rules: Rules | None) -> None:
        held = self._rules.setdefault(project, RuleSet())
        if key_id is None:
            held.project = dict(rules or {})
        elif rules:
            if key_id not in held.keys and len(held.keys) >= MAX_KEY_OVERRIDES:
                raise _too_many()
            held.keys[key_id] = dict(rules)
        else:
            held.keys.pop(key_id, None)
        if not held.project and not held.keys:
            del self._rules[project]
        self._announce(project)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisProjectStore(_Announcing):
    """Projects in Redis: ``<ns>:project:{<id>}`` (the record) and
    ``<ns>:project:{<id>}:rules`` (its rules and its keys' overrides), in one slot, and
    ``<ns>:projects`` (the ids recorded)."""

    def __init__(self, client: RedisClient, *, namespace: str = "keystile") -> None:
        super().__init__()
        self.client = client
        self.names = RedisSchema(namespace)

    @translated("reading a project")
    async def get(self, project: str) -> ProjectRecord | None:
        raw = await self.client.hgetall(self.names.project(project))
        return _record(raw)

    @translated("writing a project")
    async def put(self, record: ProjectRecord) -> None:
        known = await self.client.zscore(self.names.projects, record.id)
        if known is None and await self.client.zcard(self.names.projects) >= MAX_PROJECTS:
            raise KeyValidationError.single("project", f"at most {MAX_PROJECTS:,} projects")
        values = {k: str(v) for k, v in record.model_dump(mode="json").items()}
        await self.client.hset(self.names.project(record.id), mapping=cast(Any, values))
        await self.client.zadd(self.names.projects, {record.id: 0})
        self._announce(record.id)

    @translated("listing projects")
    async def records(self) -> list[ProjectRecord]:
        ids = [
            _text(i) for i in await self.client.zrange(self.names.projects, 0, MAX_PROJECTS - 1)
        ]
        found: list[ProjectRecord] = []
        for start in range(0, len(ids), 500):
            async with self.client.pipeline(transaction=False) as pipe:
                for project in ids[start : start + 500]:
                    pipe.hgetall(self.names.project(project))
                replies = await pipe.execute()
            found += [r for r in map(_record, replies) if r is not None]
        return found

    @translated("reading alert rules")
    async def rules(self, projects: Iterable[str]) -> dict[str, RuleSet]:
        wanted = list(dict.fromkeys(projects))
        if not wanted:
            return {}
        async with self.client.pipeline(transaction=False) as pipe:
            for project in wanted:
                pipe.hgetall(self.names.project_rules(project))
            replies = await pipe.execute()
        out = {}
        for project, raw in zip(wanted, replies, strict=True):
            held = RuleSet()
            for name, value in (raw or {}).items():
                text = _text(name)
                try:
                    rules = json.loads(value)
                except ValueError:
                    continue
                if not isinstance(rules, dict):
                    continue
                if text == _PROJECT_FIELD:
                    held.project = rules
                elif text.startswith(_KEY_FIELD):
                    held.keys[text.removeprefix(_KEY_FIELD)] = rules
            out[project] = held
        return out

    @translated("writing alert rules")
    async def set_rules(self, project: str, key_id: str | None, rules: Rules | None) -> None:
        name = self.names.project_rules(project)
        entry = _PROJECT_FIELD if key_id is None else _KEY_FIELD + key_id
        if not rules:
            await self.client.hdel(name, entry)
        else:
            if key_id is not None:
                async with self.client.pipeline(transaction=False) as pipe:
                    pipe.hexists(name, entry)
                    pipe.hexists(name, _PROJECT_FIELD)
                    pipe.hlen(name)
                    held, own, fields = await pipe.execute()
                # A field per key with overrides, plus the project's own.
                if not held and int(fields) - bool(own) >= MAX_KEY_OVERRIDES:
                    raise _too_many()
            await self.client.hset(name, entry, json.dumps(rules, separators=(",", ":")))
        self._announce(project)


def _record(raw: Mapping[Any, Any] | None) -> ProjectRecord | None:
    if not raw:
        return None
    try:
        return ProjectRecord.model_validate({_text(k): _text(v) for k, v in raw.items()})
    except ValidationError:
        return None


class RuleBook:
    """Every project's rules as the alerter needs them on a flush: cached per project for
    ``ttl`` seconds, stale ones loaded together, dropped at once on a change made through
    the same :class:`ProjectStore` object."""

    def __init__(
        self,
        store: ProjectStore,
        *,
        ttl: float = RULES_TTL,
        monotonic: Callable[[], float] = time.monotonic,
        max_projects: int = 10_000,
    ) -> None:
        self.store = store
        self.ttl = ttl
        self.monotonic = monotonic
        self.max_projects = max_projects
        self._sets: dict[str, tuple[float, RuleSet]] = {}  # project -> (read at, rules)
        # (project, key or "") -> effective rules over ``_default``, rebuilt as sets change.
        self._effective: dict[tuple[str, str], AlertRules] = {}
        self._default: AlertRules | None = None
        self._floors: dict[str, Floors] = {}  # project -> minute_floors of its rules
        store.add_listener(self.forget)

    def forget(self, project: str) -> None:
        """Read ``project`` again at the next flush."""
        self._sets.pop(project, None)
        self._effective = {k: v for k, v in self._effective.items() if k[0] != project}
        self._floors.pop(project, None)

    async def refresh(self, projects: Iterable[str]) -> None:
        """Load every project not read within the TTL, in one round trip; a store that
        fails leaves what was known (else the default) in place."""
        now = self.monotonic()
        stale = [p for p in set(projects) if self._sets.get(p, (-1e18, None))[0] + self.ttl <= now]
        if not stale:
            return
        try:
            loaded = await self.store.rules(stale)
        except StoreError:
            return
        if len(self._sets) + len(loaded) > self.max_projects:
            self._sets.clear()
            self._effective.clear()
            self._floors.clear()
        for project, held in loaded.items():
            self.forget(project)
            self._sets[project] = (now, held)

    def rules(self, default: AlertRules, project: str, key_id: str) -> AlertRules:
        """The key's effective rules, from what is cached (no round trip)."""
        found = self._sets.get(project)
        if found is None:
            return default
        if default is not self._default:  # the process default was replaced
            self._default = default
            self._effective.clear()
            self._floors.clear()
        held = found[1]
        which = key_id if key_id in held.keys else ""
        memo = (project, which)
        rules = self._effective.get(memo)
        if rules is None:
            if len(self._effective) >= 100_000:
                self._effective.clear()
            levels = [held.project] + ([held.keys[key_id]] if which else [])
            rules = effective_rules(default, *levels)
            self._effective[memo] = rules
        return rules

    def floors(self, default: AlertRules, projects: Iterable[str]) -> Floors:
        """The fewest requests one key makes in one minute that may fire a per-minute
        rule (:func:`~keystile.alerts.minute_floors`: ``requests_per_minute``, and
        ``error_rate`` with one failed) under the rules of any key of ``projects`` (each
        one's, each of its keys' overrides) or ``default``, from what is cached: a
        key-minute with fewer needs no rules looked at."""
        if default is not self._default:
            self._default = default
            self._effective.clear()
            self._floors.clear()
        found_floors = [minute_floors(default)]
        for project in projects:
            floors = self._floors.get(project)
            if floors is None:
                found = self._sets.get(project)
                keys = ("", *(found[1].keys if found is not None else ()))
                floors = lowest(
                    [minute_floors(default)]
                    + [minute_floors(self.rules(default, project, key_id)) for key_id in keys]
                )
                if len(self._floors) >= 100_000:
                    self._floors.clear()
                self._floors[project] = floors
            found_floors.append(floors)
        return lowest(found_floors)


def now_record(
    project: str, name: str, description: str, at: float, created: datetime | None
) -> Rules:
    """The fields of a record written at ``at`` (``created``: when it was first)."""
    moment = to_datetime(at)
    return {
        "id": project,
        "name": name,
        "description": description,
        "created_at": created or moment,
        "updated_at": moment,
    }
