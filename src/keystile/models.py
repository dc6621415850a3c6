"""The key record, the key-type policy table and their validation.

- :class:`KeySettings` is what a caller chooses for a key (name, type, scopes, origins,
  IPs, limits, expiry, metadata); its field validators check each value's *format*.
- :class:`ApiKey` is the stored record: the settings plus id, display hint, timestamps and
  rotation links. It never holds the secret, nor its digest.
- :class:`KeyPolicy` holds the per-type rules and the scope catalogue, and checks settings
  against them (:meth:`KeyPolicy.validate`), raising one
  :class:`~keystile.exceptions.KeyValidationError` that names every offending field.

A key type is a name and its :class:`KeyTypePolicy`; what a key may do follows from the
policy, never from the name. ``dev``, ``prod`` and ``client`` are the default table's
entries (and :class:`KeyType`'s members); an app may add types, change them or leave some
out. A record keeps its type's name, so a record of a type the policy no longer declares
still loads (and is refused at authentication).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from keystile import keys
from keystile.exceptions import ConfigurationError, FieldError, KeyValidationError
from keystile.network import normalize_ip_entry
from keystile.origins import parse_origin_pattern, wildcard_public_suffix
from keystile.rates import normalize_rate_limit
from keystile.scopes import DEFAULT_CATALOGUE, ScopeCatalogue

__all__ = [
    "DEFAULT_POLICY",
    "DEFAULT_PROJECT",
    "DEFAULT_TYPE_POLICIES",
    "ApiKey",
    "KeyPolicy",
    "KeySettings",
    "KeyType",
    "KeyTypePolicy",
    "TypeName",
    "field_errors",
]


class KeyType(StrEnum):
    """The names of the three built-in key types (a policy may declare others: a key's
    type is any declared name, and these compare equal to their plain strings)."""

    DEV = "dev"
    PROD = "prod"
    CLIENT = "client"


_TYPE_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
_TYPE_NAME_RULE = "a key type's name is 1-32 lower-case letters, digits or '_', from a letter"


def _type_name(name: str) -> str:
    """A built-in type's name as its :class:`KeyType` member; any other as it is."""
    if _TYPE_NAME.fullmatch(name) is None:
        raise ValueError(_TYPE_NAME_RULE)
    try:
        return KeyType(name)
    except ValueError:
        return name


#: A key type's name: 1-32 lower-case letters, digits and ``_``, starting with a letter
#: (it appears in metrics labels, rate-limit headers and logs).
TypeName = Annotated[str, AfterValidator(_type_name)]


def _origin(text: str) -> str:
    return str(parse_origin_pattern(text))


def _rate_limit(text: str | None) -> str | None:
    return None if text is None else normalize_rate_limit(text)


def _utc(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    try:
        return moment.astimezone(UTC)
    except OverflowError:  # e.g. 9999-12-31T23:00:00-05:00 is past year 9999 in UTC
        raise ValueError("is out of range in UTC (years 1 to 9999)") from None


def _unique(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))


Scope = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
OriginEntry = Annotated[str, AfterValidator(_origin)]
IPEntry = Annotated[str, AfterValidator(normalize_ip_entry)]
RateLimitText = Annotated[str | None, AfterValidator(_rate_limit)]
UTCDatetime = Annotated[AwareDatetime | None, AfterValidator(_utc)]
RequiredUTCDatetime = Annotated[AwareDatetime, AfterValidator(lambda m: m.astimezone(UTC))]
#: A project's name: lower-case letters, digits, ``-`` and ``_``, starting with a letter or
#: digit (it appears in URLs, logs and metrics).
ProjectName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
DEFAULT_PROJECT = "default"
MetaKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MetaValue = Annotated[str, StringConstraints(max_length=512)]


class _KeyFields(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
    scopes: Annotated[tuple[Scope, ...], AfterValidator(_unique)] = ()
    allowed_origins: Annotated[
        tuple[OriginEntry, ...], Field(max_length=100), AfterValidator(_unique)
    ] = ()
    allowed_ips: Annotated[
        tuple[IPEntry, ...], Field(max_length=100), AfterValidator(_unique)
    ] = ()
    rate_limit: RateLimitText = None
    address_rate_limit: RateLimitText = None
    token_quota: Annotated[int | None, Field(ge=0, le=10**12)] = None
    expires_at: UTCDatetime = None
    metadata: Annotated[dict[MetaKey, MetaValue], Field(max_length=50)] = Field(
        default_factory=dict
    )
    # Every key belongs to one project; an admin key manages its own project's keys only.
    project: ProjectName = DEFAULT_PROJECT


class KeySettings(_KeyFields):
    """What a caller chooses for a new key."""

    type: TypeName


class ApiKey(_KeyFields):
    """A stored key record. Holds no secret and no digest of one."""

    id: str
    type: TypeName
    hint: str
    created_at: RequiredUTCDatetime
    revoked_at: UTCDatetime = None
    replaces: str | None = None
    replaced_by: str | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def expired(self, now: datetime) -> bool:
        """Whether the key has expired at ``now`` (exact to the second and below)."""
        return self.expires_at is not None and now >= self.expires_at

    def active(self, now: datetime) -> bool:
        return not self.revoked and not self.expired(now)


class KeyTypePolicy(BaseModel):
    """The rules of one key type: prefix, defaults and restrictions.

    ``browser``: the key is public, shipped in web pages; usage counts its requests by
    client address and by origin. ``watch_new_ips``: the addresses a key is used from are
    noted, and the first use from a new one raises the ``new_ip`` alert. A type is one or
    the other or neither. ``requires_origins``: each key must list its allowed origins;
    ``requires_ips``: each key must list the addresses or networks it may be used from.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    prefix: str
    browser: bool = False
    watch_new_ips: bool = False
    rate_limit: RateLimitText = None
    # Each client address's share of a key's budget: a public key's whole window cannot be
    # spent from one address (IPv6: one /64).
    address_rate_limit: RateLimitText = None
    token_quota: Annotated[int | None, Field(ge=0, le=10**12)] = None
    forbidden_scopes: frozenset[str] = frozenset()
    requires_origins: bool = False
    requires_ips: bool = False
    rotation_age: timedelta | None = None

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        keys.generate_key(value)  # raises ValueError for a malformed prefix
        if value != value.lower():
            raise ValueError(f"a key prefix is lower-case, not {value!r}")
        return value

    @model_validator(mode="after")
    def _address_mode(self) -> KeyTypePolicy:
        if self.browser and self.watch_new_ips:
            raise ValueError("a type is a browser key or watches new IPs, not both")
        return self


DEFAULT_TYPE_POLICIES: Mapping[str, KeyTypePolicy] = {
    KeyType.DEV: KeyTypePolicy(
        prefix="dev_", token_quota=100_000, rotation_age=timedelta(days=365)
    ),
    KeyType.PROD: KeyTypePolicy(
        prefix="prod_",
        watch_new_ips=True,
        token_quota=1_000_000,
        rotation_age=timedelta(days=90),
    ),
    KeyType.CLIENT: KeyTypePolicy(
        prefix="client_",
        browser=True,
        rate_limit="100/minute",
        address_rate_limit="20/minute",
        token_quota=10_000,
        forbidden_scopes=frozenset({"admin:manage_keys", "admin:view_usage", "data:admin", "*"}),
        requires_origins=True,
    ),
}


def _field_name(loc: tuple[int | str, ...]) -> str:
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else part)
    return name or "body"


def field_errors(exc: ValidationError) -> list[FieldError]:
    """pydantic's errors as :class:`FieldError` s named like the JSON fields."""
    errors = []
    for error in exc.errors(include_url=False, include_input=False):
        message = error["msg"].removeprefix("Value error, ")
        errors.append(FieldError(_field_name(tuple(error["loc"])), message))
    return errors


class KeyPolicy:
    """The key-type policy table and the scope catalogue, and the checks they imply.

    ``types`` maps each declared type's name to its rules (default: ``dev``, ``prod`` and
    ``client``); any non-empty table will do, so an app may add a type, redefine one or
    leave one out. Names and prefixes are checked here: a bad name, or two types whose
    prefixes collide, is a :class:`~keystile.exceptions.ConfigurationError`.
    """

    __slots__ = ("_by_prefix", "catalogue", "types")

    def __init__(
        self,
        types: Mapping[str, KeyTypePolicy] = DEFAULT_TYPE_POLICIES,
        catalogue: ScopeCatalogue = DEFAULT_CATALOGUE,
    ) -> None:
        problems = [] if types else ["the policy declares no key type"]
        table: dict[str, KeyTypePolicy] = {}
        by_prefix: dict[str, str] = {}
        for name, rules in types.items():
            if not isinstance(name, str) or _TYPE_NAME.fullmatch(name) is None:
                problems.append(f"key type {name!r}: {_TYPE_NAME_RULE}")
                continue
            if not isinstance(rules, KeyTypePolicy):
                problems.append(f"key type {name!r}: its rules must be a KeyTypePolicy")
                continue
            name = str(name)  # a KeyType member as its plain name
            other = by_prefix.setdefault(rules.prefix, name)
            if other != name:
                problems.append(
                    f"key types {other!r} and {name!r} share a prefix ({rules.prefix!r}): "
                    "each type needs its own"
                )
            table[_type_name(name)] = rules
        if problems:
            raise ConfigurationError(problems)
        self.types: dict[str, KeyTypePolicy] = table
        self.catalogue = catalogue
        self._by_prefix = {p: _type_name(n) for p, n in by_prefix.items()}

    @property
    def prefixes(self) -> Mapping[str, str]:
        """Key prefix → key type, e.g. ``{"prod_": KeyType.PROD}``."""
        return self._by_prefix

    @property
    def names(self) -> tuple[str, ...]:
        """The declared types' names, in declaration order."""
        return tuple(self.types)

    def declares(self, key_type: object) -> bool:
        """Whether ``key_type`` is one of this policy's types."""
        return isinstance(key_type, str) and key_type in self.types

    def __getitem__(self, key_type: str) -> KeyTypePolicy:
        try:
            return self.types[key_type]
        except KeyError:
            raise KeyError(self.undeclared(key_type)) from None

    def undeclared(self, key_type: str) -> str:
        """Why ``key_type`` is refused: it is not declared, and what is."""
        return f"{str(key_type)!r} is not a declared key type (declared: {', '.join(self.types)})"

    def _default(self, key_type: str, field: str) -> Any:
        rules = self.types.get(key_type)
        return None if rules is None else getattr(rules, field)

    def rate_limit(self, key: _KeyFields, key_type: str) -> str | None:
        """The limit in force for a key: its own override, else its type's default."""
        if key.rate_limit is not None:
            return key.rate_limit
        limit: str | None = self._default(key_type, "rate_limit")
        return limit

    def address_rate_limit(self, key: _KeyFields, key_type: str) -> str | None:
        """The limit in force for each client address of a key (IPv6: each /64)."""
        if key.address_rate_limit is not None:
            return key.address_rate_limit
        limit: str | None = self._default(key_type, "address_rate_limit")
        return limit

    def token_quota(self, key: _KeyFields, key_type: str) -> int | None:
        """The hourly AI token budget in force for a key."""
        if key.token_quota is not None:
            return key.token_quota
        quota: int | None = self._default(key_type, "token_quota")
        return quota

    def validate(self, data: KeySettings | Mapping[str, Any], *, now: datetime) -> KeySettings:
        """Parse and check new-key settings; one :class:`KeyValidationError` lists every
        problem, each naming its field."""
        if isinstance(data, KeySettings):
            settings = data
        else:
            try:
                settings = KeySettings.model_validate(data)
            except ValidationError as exc:
                errors = field_errors(exc)
                kind = data.get("type")
                if not self.declares(kind) and all(e.field != "type" for e in errors):
                    errors.append(self._type_error())  # every problem in one answer
                raise KeyValidationError(errors) from None
        errors = self.check(settings, settings.type, now=now)
        if errors:
            raise KeyValidationError(errors)
        return settings

    def _type_error(self) -> FieldError:
        return FieldError("type", f"must be one of {', '.join(self.types)}")

    def check(self, key: _KeyFields, key_type: str, *, now: datetime) -> list[FieldError]:
        """The policy problems of well-formed settings (empty when there are none)."""
        policy = self.types.get(key_type)
        if policy is None:
            return [self._type_error()]
        errors: list[FieldError] = []
        # "*" is forbidden as itself; expanding it here would forbid everything.
        forbidden = self.catalogue.expand(s for s in policy.forbidden_scopes if s != "*")
        for index, scope in enumerate(key.scopes):
            problem = self.catalogue.check(scope)
            if problem is None and (
                scope in policy.forbidden_scopes or self.catalogue.expand([scope]) & forbidden
            ):
                problem = f"{key_type} keys may not hold {scope!r}"
            if problem is not None:
                errors.append(FieldError(f"scopes[{index}]", problem))
        for index, entry in enumerate(key.allowed_origins):
            # A policy rule, not a format one: a stored key from before it still loads.
            suffix = wildcard_public_suffix(parse_origin_pattern(entry))
            if suffix is not None:
                problem = (
                    f"{entry!r} would allow every site under {suffix!r}, a public suffix; "
                    "use a wildcard under your own domain"
                )
                errors.append(FieldError(f"allowed_origins[{index}]", problem))
        if policy.requires_origins and not key.allowed_origins:
            errors.append(
                FieldError("allowed_origins", f"{key_type} keys must list at least one origin")
            )
        if policy.requires_ips and not key.allowed_ips:
            errors.append(
                FieldError(
                    "allowed_ips", f"{key_type} keys must list at least one address or network"
                )
            )
        if key.expires_at is not None and key.expires_at <= now:
            errors.append(FieldError("expires_at", "the expiry is not in the future"))
        return errors


DEFAULT_POLICY = KeyPolicy()
