"""The key record, the key-type policy table and their validation.

- :class:`KeySettings` is what a caller chooses for a key (name, type, scopes, origins,
  IPs, limits, expiry, metadata); its field validators check each value's *format*.
- :class:`ApiKey` is the stored record: the settings plus id, display hint, timestamps and
  rotation links. It never holds the secret, nor its digest.
- :class:`KeyPolicy` holds the per-type rules and the scope catalogue, and checks settings
  against them (:meth:`KeyPolicy.validate`), raising one
  :class:`~keystile.exceptions.KeyValidationError` that names every offending field.
"""

from __future__ import annotations

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
)

from keystile import keys
from keystile.exceptions import FieldError, KeyValidationError
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
    "field_errors",
]


class KeyType(StrEnum):
    """The three key types."""

    DEV = "dev"
    PROD = "prod"
    CLIENT = "client"


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

    type: KeyType


class ApiKey(_KeyFields):
    """A stored key record. Holds no secret and no digest of one."""

    id: str
    type: KeyType
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
    """The rules of one key type: prefix, defaults and restrictions."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prefix: str
    rate_limit: RateLimitText = None
    # Each client address's share of a key's budget: a public key's whole window cannot be
    # spent from one address (IPv6: one /64).
    address_rate_limit: RateLimitText = None
    token_quota: Annotated[int | None, Field(ge=0, le=10**12)] = None
    forbidden_scopes: frozenset[str] = frozenset()
    requires_origins: bool = False
    rotation_age: timedelta | None = None

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        keys.generate_key(value)  # raises ValueError for a malformed prefix
        return value


DEFAULT_TYPE_POLICIES: Mapping[KeyType, KeyTypePolicy] = {
    KeyType.DEV: KeyTypePolicy(
        prefix="dev_", token_quota=100_000, rotation_age=timedelta(days=365)
    ),
    KeyType.PROD: KeyTypePolicy(
        prefix="prod_", token_quota=1_000_000, rotation_age=timedelta(days=90)
    ),
    KeyType.CLIENT: KeyTypePolicy(
        prefix="client_",
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
    """The key-type policy table and the scope catalogue, and the checks they imply."""

    __slots__ = ("_by_prefix", "catalogue", "types")

    def __init__(
        self,
        types: Mapping[KeyType, KeyTypePolicy] = DEFAULT_TYPE_POLICIES,
        catalogue: ScopeCatalogue = DEFAULT_CATALOGUE,
    ) -> None:
        missing = set(KeyType) - set(types)
        if missing:
            raise ValueError(f"the policy table lacks key types: {sorted(missing)}")
        self.types = dict(types)
        self.catalogue = catalogue
        self._by_prefix = {p.prefix: t for t, p in self.types.items()}
        if len(self._by_prefix) != len(self.types):
            raise ValueError("two key types share a prefix")

    @property
    def prefixes(self) -> Mapping[str, KeyType]:
        """Key prefix → key type, e.g. ``{"prod_": KeyType.PROD}``."""
        return self._by_prefix

    def __getitem__(self, key_type: KeyType) -> KeyTypePolicy:
        return self.types[key_type]

    def rate_limit(self, key: _KeyFields, key_type: KeyType) -> str | None:
        """The limit in force for a key: its own override, else its type's default."""
        return key.rate_limit if key.rate_limit is not None else self.types[key_type].rate_limit

    def address_rate_limit(self, key: _KeyFields, key_type: KeyType) -> str | None:
        """The limit in force for each client address of a key (IPv6: each /64)."""
        if key.address_rate_limit is not None:
            return key.address_rate_limit
        return self.types[key_type].address_rate_limit

    def token_quota(self, key: _KeyFields, key_type: KeyType) -> int | None:
        """The hourly AI token budget in force for a key."""
        if key.token_quota is not None:
            return key.token_quota
        return self.types[key_type].token_quota

    def validate(self, data: KeySettings | Mapping[str, Any], *, now: datetime) -> KeySettings:
        """Parse and check new-key settings; one :class:`KeyValidationError` lists every
        problem, each naming its field."""
        if isinstance(data, KeySettings):
            settings = data
        else:
            try:
                settings = KeySettings.model_validate(data)
            except ValidationError as exc:
                raise KeyValidationError(field_errors(exc)) from None
        errors = self.check(settings, settings.type, now=now)
        if errors:
            raise KeyValidationError(errors)
        return settings

    def check(self, key: _KeyFields, key_type: KeyType, *, now: datetime) -> list[FieldError]:
        """The policy problems of well-formed settings (empty when there are none)."""
        errors: list[FieldError] = []
        policy = self.types[key_type]
        # "*" is forbidden as itself; expanding it here would forbid everything.
        forbidden = self.catalogue.expand(s for s in policy.forbidden_scopes if s != "*")
        for index, scope in enumerate(key.scopes):
            problem = self.catalogue.check(scope)
            if problem is None and (
                scope in policy.forbidden_scopes or self.catalogue.expand([scope]) & forbidden
            ):
                problem = f"{key_type.value} keys may not hold {scope!r}"
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
                FieldError(
                    "allowed_origins", f"{key_type.value} keys must list at least one origin"
                )
            )
        if key.expires_at is not None and key.expires_at <= now:
            errors.append(FieldError("expires_at", "the expiry is not in the future"))
        return errors


DEFAULT_POLICY = KeyPolicy()
