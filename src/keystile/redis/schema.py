"""Every name keystile keeps in Redis: its pattern, what it holds, its hash tag and its TTL.

One :class:`RedisSchema` per namespace builds every name the library reads or writes, so
this module is the whole key schema — what an operator sizing Redis, a reader of the code
and a Redis Cluster need to know. ``python -m keystile.redis [namespace]`` prints it.

Everything about one key (its record, rate-limit windows, quota, usage, alert state) is
hash-tagged by the key id (``{key_...}``), so in a Redis Cluster one key's data lives in one
slot and each Lua script touches one slot. The listing index is hash-tagged by project
(``{<project>}``, and ``{*}`` for the sets over every project), so one listing reads one
slot; so are a project's record and rules. Names without a tag (the digest index, the id
index, the usage index, the events channel, the project index) are read and written one
name at a time.
No secret appears in any name or value: a digest is the HMAC of a key under the server
secret.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["NAMES", "Name", "RedisSchema"]


@dataclass(frozen=True, slots=True)
class Name:
    """One row of the schema."""

    pattern: str  # with <placeholders>, under the namespace <ns>
    kind: str  # the Redis type
    tag: str  # what the hash tag is ("-" when none)
    ttl: str  # how long it lives
    holds: str


NAMES: tuple[Name, ...] = (
    Name(
        "<ns>:key:{<key id>}",
        "string",
        "key id",
        "none (60 s while being created)",
        "the key's record, JSON",
    ),
    Name(
        "<ns>:digest:<hmac>",
        "string",
        "-",
        "none (60 s while being created)",
        "the key id of a key's HMAC digest",
    ),
    Name("<ns>:index", "zset", "-", "none", "every key id (score 0: listed in id order)"),
    Name(
        "<ns>:list:{<project>}:<type>:<set>",
        "zset",
        "project (* for every project)",
        "none",
        "the listing index: ids of the project's keys of the type by status (active, "
        "rotated, revoked, expired; score 0, id order), and by expiry in microseconds "
        "(ends-active, ends-rotated, gone-active, gone-rotated)",
    ),
    Name(
        "<ns>:list:{*}:types",
        "set",
        "*",
        "none",
        "the listing index's key types: every type a key was indexed with (as many as the "
        "app declares)",
    ),
    Name(
        "<ns>:list:{*}:version",
        "string",
        "*",
        "none",
        "the listing index's version: the index holds every key written before it was set",
    ),
    Name("<ns>:events", "channel", "-", "-", "pub/sub: key changes, for every process's cache"),
    Name(
        "<ns>:rl:{<key id>}:<amount>/<seconds>",
        "list",
        "key id",
        "the window",
        "a rate-limit window: admission times (ms), newest first, at most <amount>",
    ),
    Name(
        "<ns>:rl:{<key id>}:ip:<address>:<amount>/<seconds>",
        "list",
        "key id",
        "the window",
        "one client address's share of the key's window (IPv6: a /64)",
    ),
    Name(
        "<ns>:quota:{<key id>}",
        "hash",
        "key id",
        "61 minutes",
        "AI tokens spent, per minute of the rolling hour",
    ),
    Name(
        "<ns>:usage:{<key id>}:total",
        "hash",
        "key id",
        "day retention + 1 day, from the key's latest new day",
        "all-time counts, the last use (time, address, origin), and per writing process "
        "(p:<process>) the latest flush sequence applied (a retried flush counts once; a "
        "process that wrote nothing for an hour before another's first write is forgotten; "
        "at most 1,024 processes)",
    ),
    Name(
        "<ns>:usage:{<key id>}:m:<hour>",
        "hash",
        "key id",
        "minute retention + 1 hour, from its latest new minute",
        "per-minute counts of one hour: a field per minute (0-59), the counters one after "
        "another in base-64 digits (a byte per digit, 0-63; a counter's last digit + 64)",
    ),
    Name(
        "<ns>:usage:{<key id>}:h:<hour>",
        "hash",
        "key id",
        "minute retention + 1 hour",
        "the earlier layout of m:<hour> (counters comma-separated, in decimal): read, never "
        "written; a minute moves to m:<hour> when it is written again",
    ),
    Name(
        "<ns>:usage:{<key id>}:d:<day>",
        "hash",
        "key id",
        "day retention + 1 day",
        "counts of one day",
    ),
    Name(
        "<ns>:usage:{<key id>}:ips",
        "zset",
        "key id",
        "day retention + 1 day, from the key's latest new day",
        "the busiest client addresses (top N)",
    ),
    Name(
        "<ns>:usage:{<key id>}:origins",
        "zset",
        "key id",
        "day retention + 1 day, from the key's latest new day",
        "the busiest origins (top N)",
    ),
    Name(
        "<ns>:usage:{<key id>}:seen_ips",
        "set",
        "key id",
        "90 days after last use",
        "addresses seen (new-IP alert), at most 10,000",
    ),
    Name(
        "<ns>:usage:index",
        "zset",
        "-",
        "day retention + 1 day",
        "key ids by their last usage flush",
    ),
    Name(
        "<ns>:audit",
        "stream",
        "-",
        "audit retention after the last event (entries too; at most audit_max_events)",
        "the audit trail: management actions and refused attempts, oldest first",
    ),
    Name(
        "<ns>:project:{<project>}",
        "hash",
        "project",
        "none",
        "a project's record: name, description, created_at, updated_at",
    ),
    Name(
        "<ns>:project:{<project>}:rules",
        "hash",
        "project",
        "none",
        "a project's alert rules (field 'project') and its keys' overrides ('key:<key id>'; "
        "at most 10,000, removed when the key is revoked), JSON",
    ),
    Name("<ns>:projects", "zset", "-", "none", "every recorded project id, at most 100,000"),
    Name(
        "<ns>:alert:{<key id>}:<rule>",
        "string",
        "key id",
        "the rule's cooldown",
        "an alert fired recently (its cooldown)",
    ),
)
"""The schema, one row per name pattern."""


class RedisSchema:
    """The names of one namespace (``keystile`` by default)."""

    __slots__ = ("namespace",)

    def __init__(self, namespace: str = "keystile") -> None:
        self.namespace = namespace

    def __repr__(self) -> str:
        return f"RedisSchema({self.namespace!r})"

    # -- keys -------------------------------------------------------------------------------

    def record(self, key_id: str) -> str:
        return f"{self.namespace}:key:{{{key_id}}}"

    def digest(self, digest: str) -> str:
        return f"{self.namespace}:digest:{digest}"

    @property
    def index(self) -> str:
        return f"{self.namespace}:index"

    def listing(self, project: str | None, key_type: str, part: str) -> str:
        """A set of the listing index: ``project``'s keys (``None``: every project's)."""
        return f"{self.namespace}:list:{{{project or '*'}}}:{key_type}:{part}"

    @property
    def listing_types(self) -> str:
        return f"{self.namespace}:list:{{*}}:types"

    @property
    def listing_version(self) -> str:
        return f"{self.namespace}:list:{{*}}:version"

    @property
    def events(self) -> str:
        return f"{self.namespace}:events"

    # -- limits -----------------------------------------------------------------------------

    def window(self, key_id: str, amount: int, seconds: int, address: str = "") -> str:
        """A rate-limit window of the key, or (``address``) one address's share of it."""
        if address:
            return f"{self.namespace}:rl:{{{key_id}}}:ip:{address}:{amount}/{seconds}"
        return f"{self.namespace}:rl:{{{key_id}}}:{amount}/{seconds}"

    def quota(self, key_id: str) -> str:
        return f"{self.namespace}:quota:{{{key_id}}}"

    # -- usage and alerts -------------------------------------------------------------------

    def usage(self, key_id: str, part: str) -> str:
        """A usage name of the key: ``total``, ``m:<hour>`` (``h:<hour>``: the earlier
        layout), ``d:<day>``, ``ips``, ``origins``."""
        return f"{self.namespace}:usage:{{{key_id}}}:{part}"

    def seen_addresses(self, key_id: str) -> str:
        return f"{self.namespace}:usage:{{{key_id}}}:seen_ips"

    @property
    def usage_index(self) -> str:
        return f"{self.namespace}:usage:index"

    def alert(self, key_id: str, rule: str) -> str:
        return f"{self.namespace}:alert:{{{key_id}}}:{rule}"

    # -- projects ---------------------------------------------------------------------------

    def project(self, project: str) -> str:
        return f"{self.namespace}:project:{{{project}}}"

    def project_rules(self, project: str) -> str:
        return f"{self.namespace}:project:{{{project}}}:rules"

    @property
    def projects(self) -> str:
        return f"{self.namespace}:projects"

    @property
    def audit(self) -> str:
        return f"{self.namespace}:audit"


def table(namespace: str = "keystile") -> str:
    """The schema as text, names spelt under ``namespace``."""
    rows = [("name", "type", "hash tag", "ttl", "holds")]
    rows += [(n.pattern.replace("<ns>", namespace), n.kind, n.tag, n.ttl, n.holds) for n in NAMES]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[4]]).rstrip())
    return "\n".join(lines)
