"""Key settings, the key-type policy table and the scope catalogue (docs/key-format.md)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from keystile import KeyPolicy, KeyType, KeyTypePolicy, KeyValidationError, ScopeCatalogue
from keystile.exceptions import ConfigurationError, FieldError
from keystile.models import DEFAULT_POLICY, DEFAULT_TYPE_POLICIES, KeySettings
from keystile.scopes import DEFAULT_CATALOGUE

NOW = datetime(2027, 1, 1, tzinfo=UTC)
ORIGINS = ["https://app.example.com"]


def validate(**fields: Any) -> KeySettings:
    fields.setdefault("name", "test key")
    return DEFAULT_POLICY.validate(fields, now=NOW)


def problems(**fields: Any) -> dict[str, str]:
    with pytest.raises(KeyValidationError) as caught:
        validate(**fields)
    return {e.field: e.message for e in caught.value.errors}


def test_default_policy_table_matches_the_spec() -> None:
    """Prefixes, default limits and quotas are those of docs/key-format.md."""
    dev, prod, client = (DEFAULT_TYPE_POLICIES[t] for t in KeyType)
    assert (dev.prefix, prod.prefix, client.prefix) == ("dev_", "prod_", "client_")
    assert (dev.rate_limit, prod.rate_limit, client.rate_limit) == (None, None, "100/minute")
    assert (dev.token_quota, prod.token_quota, client.token_quota) == (
        100_000,
        1_000_000,
        10_000,
    )
    assert client.requires_origins and not dev.requires_origins
    assert {"admin:manage_keys", "admin:view_usage", "data:admin", "*"} == set(
        client.forbidden_scopes
    )
    assert prod.rotation_age == timedelta(days=90)


@pytest.mark.parametrize(
    ("fields", "field", "fragment"),
    [
        ({"type": "dev", "scopes": ["vec:fly"]}, "scopes[0]", "unknown action 'fly'"),
        ({"type": "dev", "scopes": ["db:read"]}, "scopes[0]", "unknown service 'db'"),
        ({"type": "dev", "scopes": ["vecread"]}, "scopes[0]", "service:action"),
        (
            {"type": "client", "scopes": ["admin:manage_keys"], "allowed_origins": ORIGINS},
            "scopes[0]",
            "client keys may not hold",
        ),
        (
            {"type": "client", "scopes": ["data:admin"], "allowed_origins": ORIGINS},
            "scopes[0]",
            "may not hold",
        ),
        (
            {"type": "client", "scopes": ["*"], "allowed_origins": ORIGINS},
            "scopes[0]",
            "may not hold '*'",
        ),
        (
            {"type": "client", "scopes": ["admin:*"], "allowed_origins": ORIGINS},
            "scopes[0]",
            "may not hold 'admin:*'",
        ),
        ({"type": "client", "scopes": ["vec:read"]}, "allowed_origins", "at least one origin"),
        (
            {"type": "client", "allowed_origins": ["example.com"]},
            "allowed_origins[0]",
            "needs a scheme",
        ),
        (
            {"type": "client", "allowed_origins": ["https://a.com/"]},
            "allowed_origins[0]",
            "trailing '/'",
        ),
        (
            {"type": "client", "allowed_origins": ["https://a.com/app"]},
            "allowed_origins[0]",
            "path",
        ),
        (
            {"type": "client", "allowed_origins": ["https://u@a.com"]},
            "allowed_origins[0]",
            "user information",
        ),
        ({"type": "client", "allowed_origins": ["null"]}, "allowed_origins[0]", "null"),
        (
            {"type": "client", "allowed_origins": ["https://a.com:99999"]},
            "allowed_origins[0]",
            "invalid port",
        ),
        (
            {"type": "client", "allowed_origins": ["https://*.com"]},
            "allowed_origins[0]",
            "registrable domain",
        ),
        ({"type": "prod", "allowed_ips": ["10.0.0.1/8"]}, "allowed_ips[0]", "host bits"),
        ({"type": "prod", "allowed_ips": ["10.0.0.256"]}, "allowed_ips[0]", "not an IP"),
        ({"type": "prod", "allowed_ips": ["2001:db8::/129"]}, "allowed_ips[0]", "not an IP"),
        ({"type": "prod", "allowed_ips": ["localhost"]}, "allowed_ips[0]", "not an IP"),
        ({"type": "prod", "expires_at": "2026-12-31T00:00:00Z"}, "expires_at", "future"),
        ({"type": "prod", "expires_at": "2027-06-01T00:00:00"}, "expires_at", "timezone"),
        ({"type": "prod", "rate_limit": "lots"}, "rate_limit", "not a rate limit"),
        ({"type": "prod", "rate_limit": "0/minute"}, "rate_limit", "at least one"),
        ({"type": "prod", "token_quota": -1}, "token_quota", "greater than or equal"),
        ({"type": "root"}, "type", "must be one of dev, prod, client"),
        ({"type": "Prod"}, "type", "lower-case letters"),
        ({"type": "dev", "name": ""}, "name", "at least 1 character"),
        ({"type": "dev", "secret": "x"}, "secret", "Extra inputs"),
    ],
    ids=lambda v: "" if not isinstance(v, str) else v,
)
def test_invalid_settings_name_the_field(
    fields: dict[str, Any], field: str, fragment: str
) -> None:
    """Each invalid setting is refused with a message that names its field."""
    found = problems(**fields)
    assert field in found, found
    assert fragment in found[field]


def test_all_problems_are_reported_at_once() -> None:
    """One error lists every policy problem, not just the first."""
    found = problems(type="client", scopes=["admin:view_usage", "vec:nope"])
    assert set(found) == {"scopes[0]", "scopes[1]", "allowed_origins"}


def test_valid_settings_are_normalised() -> None:
    """Origins, IPs, limits and expiry come back in one canonical spelling."""
    settings = validate(
        type="client",
        scopes=["vec:read", "vec:read", " ai:inference "],
        allowed_origins=[
            "HTTPS://App.Example.com:443",
            "https://*.Example.com",
            "https://bücher.de",
        ],
        allowed_ips=["::ffff:10.1.2.3", "2001:DB8::/32", "192.168.0.0/16"],
        rate_limit="10 per second;1000/hour",
        expires_at="2027-06-01T02:00:00+02:00",
    )
    assert settings.scopes == ("vec:read", "ai:inference")
    assert settings.allowed_origins == (
        "https://app.example.com",
        "https://*.example.com",
        "https://xn--bcher-kva.de",
    )
    assert settings.allowed_ips == ("10.1.2.3", "2001:db8::/32", "192.168.0.0/16")
    assert settings.rate_limit == "10/second;1000/hour"
    assert settings.expires_at == datetime(2027, 6, 1, tzinfo=UTC)


def test_client_key_may_hold_ordinary_scopes() -> None:
    """A client key with origins and non-sensitive scopes, wildcards included, is valid."""
    settings = validate(type="client", scopes=["vec:*", "ai:inference"], allowed_origins=ORIGINS)
    assert settings.type is KeyType.CLIENT


def test_effective_limits_fall_back_to_the_type() -> None:
    """A key without overrides inherits its type's limit and quota; overrides win."""
    plain = validate(type="client", allowed_origins=ORIGINS)
    custom = validate(type="client", allowed_origins=ORIGINS, rate_limit="5/second", token_quota=7)
    assert DEFAULT_POLICY.rate_limit(plain, KeyType.CLIENT) == "100/minute"
    assert DEFAULT_POLICY.token_quota(plain, KeyType.CLIENT) == 10_000
    assert DEFAULT_POLICY.rate_limit(custom, KeyType.CLIENT) == "5/second"
    assert DEFAULT_POLICY.token_quota(custom, KeyType.CLIENT) == 7
    assert DEFAULT_POLICY.rate_limit(plain, KeyType.PROD) is None


def test_policy_table_is_configurable() -> None:
    """Another catalogue and other prefixes replace the built-in ones."""
    catalogue = ScopeCatalogue({"photos": ["view", "upload"]})
    types = dict(DEFAULT_TYPE_POLICIES)
    types[KeyType.DEV] = KeyTypePolicy(prefix="sandbox_", rate_limit="5/second")
    policy = KeyPolicy(types, catalogue)
    assert policy.prefixes["sandbox_"] is KeyType.DEV
    assert policy.validate({"name": "n", "type": "dev", "scopes": ["photos:*"]}, now=NOW)
    with pytest.raises(KeyValidationError, match="unknown service 'vec'"):
        policy.validate({"name": "n", "type": "dev", "scopes": ["vec:read"]}, now=NOW)


def test_policy_table_refuses_shared_prefixes_and_bad_names() -> None:
    """Two types with one prefix, a malformed name, or no type at all, is a configuration
    error naming the types; a prefix is lower-case."""
    types = dict(DEFAULT_TYPE_POLICIES)
    types["partner"] = KeyTypePolicy(prefix="prod_")
    with pytest.raises(ConfigurationError, match="'prod' and 'partner' share a prefix"):
        KeyPolicy(types)
    with pytest.raises(ConfigurationError, match="'Partner': a key type's name is"):
        KeyPolicy({"Partner": KeyTypePolicy(prefix="partner_")})
    with pytest.raises(ConfigurationError, match="declares no key type"):
        KeyPolicy({})
    with pytest.raises(ValueError, match="prefix"):
        KeyTypePolicy(prefix="bad prefix_")
    with pytest.raises(ValueError, match="lower-case"):
        KeyTypePolicy(prefix="Partner_")
    with pytest.raises(ValueError, match="not both"):
        KeyTypePolicy(prefix="partner_", browser=True, watch_new_ips=True)


def test_a_type_may_require_an_ip_allowlist() -> None:
    """A type with ``requires_ips`` refuses a key without allowed addresses, naming the
    field; with one, the key is valid."""
    partner = KeyTypePolicy(prefix="partner_", requires_ips=True)
    policy = KeyPolicy({**DEFAULT_TYPE_POLICIES, "partner": partner})
    with pytest.raises(KeyValidationError) as refused:
        policy.validate({"name": "n", "type": "partner"}, now=NOW)
    assert refused.value.errors == [
        FieldError("allowed_ips", "partner keys must list at least one address or network")
    ]
    allowed = policy.validate(
        {"name": "n", "type": "partner", "allowed_ips": ["203.0.113.0/24"]}, now=NOW
    )
    assert allowed.allowed_ips == ("203.0.113.0/24",)


def test_a_policy_may_add_a_type_and_leave_one_out() -> None:
    """A fourth type is declared by its name and rules; a type left out is refused for
    new keys, naming the types there are; records of it still load."""
    types = {k: v for k, v in DEFAULT_TYPE_POLICIES.items() if k != "dev"}
    types["partner"] = KeyTypePolicy(prefix="partner_", rate_limit="7/second")
    policy = KeyPolicy(types)
    assert policy.prefixes == {"prod_": "prod", "client_": "client", "partner_": "partner"}
    settings = policy.validate({"name": "n", "type": "partner"}, now=NOW)
    assert settings.type == "partner"
    assert policy.rate_limit(settings, settings.type) == "7/second"
    with pytest.raises(KeyValidationError) as refused:
        policy.validate({"name": "n", "type": "dev"}, now=NOW)
    assert refused.value.errors == [FieldError("type", "must be one of prod, client, partner")]
    assert policy.rate_limit(settings, "dev") is None  # an undeclared type has no defaults
    with pytest.raises(KeyError, match="'dev' is not a declared key type"):
        policy["dev"]


@pytest.mark.parametrize(
    ("held", "required", "granted"),
    [
        (["vec:read"], "vec:read", True),
        (["vec:read"], "vec:write", False),
        (["vec:*"], "vec:delete", True),
        (["vec:*"], "kev:read", False),
        (["*"], "admin:manage_keys", True),
        (["vec:read", "vec:write", "vec:delete"], "vec:*", True),
        (["vec:read"], "vec:*", False),
        ([], "vec:read", False),
        (["*"], "custom:thing", False),
        (["custom:thing"], "custom:thing", True),
    ],
    ids=str,
)
def test_scope_grants(held: list[str], required: str, granted: bool) -> None:
    """service:* grants every action of its service and * grants everything."""
    assert DEFAULT_CATALOGUE.grants(held, required) is granted


def test_catalogue_refuses_malformed_names() -> None:
    """A catalogue entry with ':' or '*' in a name is refused."""
    with pytest.raises(ValueError, match="invalid name"):
        ScopeCatalogue({"vec:x": ["read"]})
    with pytest.raises(ValueError, match="invalid name"):
        ScopeCatalogue({"vec": ["*"]})
