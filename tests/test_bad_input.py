"""Hostile Authorization headers get a 4xx, never a 5xx, and never reach the store (§2, §4)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import SECRET
from keystile import ApiKey, KeyFormatError, MemoryStore, RedisStore, generate_key, parse_key
from keystile.gate import Keystile
from keystile.stores import CachedStore
from test_middleware import Headers, assert_refused, call, challenge, make_app

PREFIXES = {"dev_", "prod_", "client_"}
KB64 = 64 * 1024
CYRILLIC_O = "\u043e"  # looks exactly like the Latin "o"


class CountingStore:
    """A MemoryStore that counts the lookups by digest it is asked for."""

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.finds = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def find(self, digest: str) -> ApiKey | None:
        self.finds += 1
        return await self.inner.find(digest)


def counting_gate() -> tuple[Keystile, CountingStore]:
    counting = CountingStore()
    return Keystile(store=CachedStore(counting), secret=SECRET), counting


def authorization(*values: bytes) -> Headers:
    return [(b"authorization", value) for value in values]


Value = Callable[[bytes], bytes]
BAD = 400, "invalid_request", challenge("invalid_request")
INVALID = 401, "invalid_api_key", challenge("invalid_token")

CASES = [
    # Bytes outside visible ASCII are not b64token syntax (RFC 6750 §2.1).
    pytest.param(lambda k: b"Bearer " + k + "é".encode(), BAD, id="non-ascii-utf8"),
    pytest.param(lambda k: b"Bearer caf\xe9" + k, BAD, id="latin-1-in-token"),
    pytest.param(lambda k: b"B\xe9arer " + k, BAD, id="latin-1-in-scheme"),
    pytest.param(lambda k: b"Bearer \xff\xfe\xfd", BAD, id="invalid-utf8"),
    pytest.param(lambda k: b"Bearer " + k[:10] + b"\x00" + k[10:], BAD, id="nul-in-token"),
    pytest.param(lambda k: b"Bearer " + k + b"\x00", BAD, id="nul-after-token"),
    pytest.param(lambda k: b"Bearer\x00" + k, BAD, id="nul-as-separator"),
    pytest.param(lambda k: b"\x00", BAD, id="nul-only"),
    pytest.param(lambda k: b"Bearer\t" + k, BAD, id="tab-as-separator"),
    pytest.param(lambda k: b"Bearer " + k[:10] + b"\t" + k[10:], BAD, id="tab-in-token"),
    pytest.param(lambda k: b"Bearer " + k + b"\t", BAD, id="trailing-tab"),
    pytest.param(lambda k: b"Bearer " + k + b"\r\nX-Admin: 1", BAD, id="crlf-injection"),
    pytest.param(lambda k: b"Bearer " + k + b"\x7f", BAD, id="del-character"),
    pytest.param(lambda k: b"Bearer " + k + b" ", BAD, id="trailing-space"),
    pytest.param(lambda k: b"Bearer =" + k, BAD, id="leading-padding"),
    pytest.param(lambda k: b"", BAD, id="empty-value"),
    pytest.param(lambda k: b"Bearer", BAD, id="scheme-only"),
    pytest.param(lambda k: b"Bearer ", BAD, id="empty-token"),
    pytest.param(lambda k: b"Bearer " + b" " * 100, BAD, id="spaces-only"),
    pytest.param(lambda k: b"Bearer " + b"A" * KB64, INVALID, id="64kb-token"),
    pytest.param(lambda k: b"Bearer prod_" + b"A" * KB64, INVALID, id="64kb-prefixed-token"),
    pytest.param(lambda k: b"Bearer " + b"\xff" * KB64, BAD, id="64kb-binary-token"),
    pytest.param(lambda k: b"x" * KB64, BAD, id="64kb-without-scheme"),
    pytest.param(lambda k: b"Bearer " + b"A" * KB64 + b"!", BAD, id="64kb-then-bad-byte"),
    pytest.param(
        lambda k: b"Bearer " + k.replace(b"o", CYRILLIC_O.encode(), 1), BAD, id="homoglyph-prefix"
    ),
    pytest.param(
        lambda k: b"Bearer " + k.replace(b"_", "\uff3f".encode(), 1),
        BAD,
        id="fullwidth-underscore",
    ),
    pytest.param(lambda k: b"Bearer " + k.replace(b"o", b"0", 1), INVALID, id="ascii-lookalike"),
    pytest.param(lambda k: b"Bearer " + k + b"==", INVALID, id="padded-token"),
    pytest.param(lambda k: b"Bearer " + k[:-1], INVALID, id="truncated"),
]


@pytest.mark.parametrize(("value", "expected"), CASES)
async def test_hostile_header_gets_the_right_4xx(
    value: Value, expected: tuple[int, str, str]
) -> None:
    """Each malformed header gets its documented status and code; the store is never asked, the app
    never called, and the answer does not echo the input."""
    gate, counting = counting_gate()
    created = await gate.manager.create({"name": "n", "type": "prod"})
    key = created.secret.get_secret_value().encode()
    app, seen = make_app(gate)
    response = await call(app, authorization(value(key)))
    assert_refused(response, *expected)
    assert counting.finds == 0
    assert len(seen) == 0
    assert len(response.content) < 200


def test_homoglyph_key_is_not_a_key() -> None:
    """A prefix written with a Cyrillic о is not the prod_ prefix, even to the parser."""
    key = generate_key("prod_")
    lookalike = key.replace("o", CYRILLIC_O, 1)
    assert lookalike != key and lookalike.startswith("pr")
    with pytest.raises(KeyFormatError):
        parse_key(lookalike, PREFIXES)


@pytest.mark.parametrize(
    "values",
    [
        pytest.param(lambda k: [b"Bearer " + k, b"Bearer " + k], id="same-key-twice"),
        pytest.param(lambda k: [b"Bearer " + k, b""], id="key-and-empty"),
        pytest.param(lambda k: [b"", b"Bearer " + k], id="empty-and-key"),
        pytest.param(lambda k: [b"Bearer " + k, b"Bearer \xff"], id="key-and-binary"),
        pytest.param(lambda k: [b"Bearer " + k] * 50, id="fifty-times"),
    ],
)
async def test_two_authorization_headers_are_400(values: Callable[[bytes], list[bytes]]) -> None:
    """Authorization sent more than once is 400 invalid_request, whatever the values."""
    gate, counting = counting_gate()
    created = await gate.manager.create({"name": "n", "type": "prod"})
    app, seen = make_app(gate)
    response = await call(app, authorization(*values(created.secret.get_secret_value().encode())))
    assert_refused(response, 400, "invalid_request", challenge("invalid_request"))
    assert counting.finds == 0
    assert len(seen) == 0


async def test_hostile_bytes_elsewhere_do_not_disturb_a_good_key() -> None:
    """Odd bytes and a 64 KB value in other headers leave a valid key's request alone."""
    gate, _ = counting_gate()
    created = await gate.manager.create({"name": "n", "type": "prod"})
    headers = [
        (b"x-binary", b"\x00\xff\xfe\t\x7f"),
        (b"x-latin", "café".encode("latin-1")),
        (b"cookie", b"c=" + b"z" * KB64),
        (b"x-dup", b"1"),
        (b"x-dup", b"2"),
        *authorization(b"Bearer " + created.secret.get_secret_value().encode()),
    ]
    app, seen = make_app(gate)
    response = await call(app, headers)
    assert response.status_code == 200
    assert len(seen) == 1


header_values = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(lambda s: s.encode("utf-8")),
    st.text(st.characters(max_codepoint=255), max_size=200).map(lambda s: s.encode("latin-1")),
    st.binary(max_size=200).map(lambda b: b"Bearer " + b),
    st.text(max_size=200).map(lambda s: ("Bearer " + s).encode("utf-8")),
    st.tuples(
        st.sampled_from([b"Bearer", b"bearer", b"BEARER", b"Basic", b""]),
        st.sampled_from([b" ", b"  ", b"\t", b"", b"\x00"]),
        st.sampled_from([b"", b"dev_", b"prod_", b"client_", b"pr\xd0\xbed_"]),
        st.text("0123456789ABCDEFabcdef=-._~+/", max_size=50).map(str.encode),
    ).map(b"".join),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.lists(header_values, min_size=1, max_size=2))
async def test_fuzzed_authorization_headers_never_get_a_5xx(values: list[bytes]) -> None:
    """Any bytes as Authorization (once or twice) get 400 or 401 with the documented JSON body,
    and never reach the store or the app."""
    gate, counting = counting_gate()
    app, seen = make_app(gate)
    response = await call(app, authorization(*values))
    assert response.status_code in {400, 401}
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"code", "message"}
    assert error["code"] in {"invalid_request", "invalid_api_key"}
    assert counting.finds == 0
    assert len(seen) == 0


# -- malformed tokens never reach the store ---------------------------------------------------


def _malformed() -> list[Any]:
    key = generate_key("prod_")
    return [
        pytest.param("live_" + key.removeprefix("prod_"), id="unknown-prefix"),
        pytest.param(key[:-1] + ("A" if key[-1] != "A" else "B"), id="checksum"),
        pytest.param(key[:-1], id="truncated"),
        pytest.param(key + "A", id="too-long"),
        pytest.param(key.upper(), id="upper-cased"),
        pytest.param("prod_" + "A" * 1000, id="long-prefixed"),
        pytest.param("prod_", id="prefix-only"),
        pytest.param("x", id="one-character"),
    ]


@pytest.mark.parametrize("token", _malformed())
async def test_malformed_tokens_never_reach_the_store(token: str) -> None:
    """A token with a wrong prefix, checksum or length is refused with no store lookup."""
    gate, counting = counting_gate()
    await gate.manager.create({"name": "n", "type": "prod"})
    app, _ = make_app(gate)
    response = await call(app, authorization(f"Bearer {token}".encode()))
    assert_refused(response, 401, "invalid_api_key", challenge("invalid_token"))
    assert counting.finds == 0


async def test_well_formed_tokens_do_reach_the_store() -> None:
    """The counter works: a well-formed unknown key is looked up once (then remembered as
    unknown), and a valid key once (then cached)."""
    gate, counting = counting_gate()
    created = await gate.manager.create({"name": "n", "type": "prod"})
    app, _ = make_app(gate)
    unknown = authorization(f"Bearer {generate_key('prod_')}".encode())
    valid = authorization(f"Bearer {created.secret.get_secret_value()}".encode())
    for _ in range(3):
        assert_refused(await call(app, unknown), *INVALID)
    assert counting.finds == 1
    for _ in range(3):
        assert (await call(app, valid)).status_code == 200
    assert counting.finds == 2


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(b"Bearer " + generate_key("prod_")[:-1].encode(), INVALID, id="bad-key"),
        pytest.param(b"Bearer \xff", BAD, id="binary"),
    ],
)
async def test_malformed_tokens_are_refused_even_with_the_store_down(
    unused_redis_url: str, value: bytes, expected: tuple[int, str, str]
) -> None:
    """With Redis unreachable, a malformed token still gets its 4xx, not 503."""
    store = RedisStore.from_url(unused_redis_url, timeout=0.2, pool_timeout=0.2)
    gate = Keystile(store=store, secret=SECRET)
    app, _ = make_app(gate)
    try:
        response = await call(app, authorization(value))
    finally:
        await gate.aclose()
    assert_refused(response, *expected)
