"""IP allowlists and the client address (docs/ip-rules.md): the ASGI client, X-Forwarded-For only
through configured trusted proxies, and a real uvicorn in front."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from browser.harness import demo_argv, seed_env, serve, uvicorn_argv
from keystile import Keystile, MemoryStore, network
from keystile.middleware import KeystileMiddleware
from keystile.network import (
    ClientAddress,
    budget_address,
    normalize_ip_entry,
    parse_address,
    parse_ip_entry,
)

Headers = list[tuple[bytes, bytes]]


# -- allowlist entries ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "normalised"),
    [
        pytest.param("10.0.0.1", "10.0.0.1", id="ipv4"),
        pytest.param("10.0.0.1/32", "10.0.0.1", id="ipv4-host-cidr"),
        pytest.param("10.0.0.0/8", "10.0.0.0/8", id="ipv4-cidr"),
        pytest.param("0.0.0.0/0", "0.0.0.0/0", id="ipv4-all"),
        pytest.param("2001:DB8::1", "2001:db8::1", id="ipv6"),
        pytest.param("2001:db8:0:0::/32", "2001:db8::/32", id="ipv6-cidr"),
        pytest.param("::1/128", "::1", id="ipv6-host-cidr"),
        pytest.param("::ffff:10.1.2.3", "10.1.2.3", id="mapped"),
        pytest.param("::ffff:10.0.0.0/104", "10.0.0.0/8", id="mapped-cidr"),
        pytest.param("::ffff:0:0/96", "0.0.0.0/0", id="mapped-all"),
    ],
)
def test_entries_are_normalised(entry: str, normalised: str) -> None:
    """An allowlist entry is stored in one canonical spelling, IPv4-mapped as IPv4."""
    assert normalize_ip_entry(entry) == normalised


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        pytest.param("10.0.0.1/8", "did you mean 10.0.0.0/8", id="host-bits"),
        pytest.param("2001:db8::1/32", "did you mean 2001:db8::/32", id="host-bits-ipv6"),
        pytest.param("10.0.0.1/33", "not an IP address", id="prefix-too-long"),
        pytest.param("10.0.0.256", "not an IP address", id="octet"),
        pytest.param("010.0.0.1", "not an IP address", id="leading-zero"),
        pytest.param("example.com", "not an IP address", id="hostname"),
        pytest.param("", "not an IP address", id="empty"),
        pytest.param("１０.0.0.1", "not an IP address", id="fullwidth-digits"),
        pytest.param("1" * 65, "not an IP address", id="too-long"),
        pytest.param("10.0.0.0/8, 11.0.0.0/8", "not an IP address", id="two-entries"),
    ],
)
def test_malformed_entries_are_refused(entry: str, fragment: str) -> None:
    """parse_ip_entry refuses a malformed entry with a message that says why."""
    with pytest.raises(ValueError, match=re.escape(fragment)):
        parse_ip_entry(entry)


# -- the client address -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("203.0.113.9", "203.0.113.9", id="ipv4"),
        pytest.param(" 203.0.113.9\t", "203.0.113.9", id="spaces"),
        pytest.param("203.0.113.9:4711", "203.0.113.9", id="ipv4-port"),
        pytest.param("2001:db8::9", "2001:db8::9", id="ipv6"),
        pytest.param("[2001:db8::9]", "2001:db8::9", id="ipv6-brackets"),
        pytest.param("[2001:db8::9]:443", "2001:db8::9", id="ipv6-brackets-port"),
        pytest.param("::ffff:203.0.113.9", "203.0.113.9", id="mapped"),
        pytest.param("[::ffff:203.0.113.9]:80", "203.0.113.9", id="mapped-brackets"),
        pytest.param("", None, id="empty"),
        pytest.param("unknown", None, id="unknown"),
        pytest.param("proxy.internal", None, id="hostname"),
        pytest.param("203.0.113.256", None, id="octet"),
        pytest.param("203.0.113.09", None, id="leading-zero"),
        pytest.param("[2001:db8::9", None, id="unclosed-bracket"),
        pytest.param("[2001:db8::9]x", None, id="bracket-junk"),
        pytest.param("203.0.113.9:80:80", None, id="two-ports"),
        pytest.param("２０３.0.113.9", None, id="fullwidth"),
        pytest.param("1" * 100, None, id="long"),
        pytest.param("203.0.113.9:abc", None, id="port-letters"),
        pytest.param("203.0.113.9:", None, id="port-empty"),
        pytest.param("[2001:db8::9]:x", None, id="ipv6-port-letters"),
    ],
)
def test_parse_address(text: str, expected: str | None) -> None:
    """A hop is an address (with an optional port, IPv4-mapped as IPv4) or nothing."""
    parsed = parse_address(text)
    assert (None if parsed is None else str(parsed)) == expected


def _scope(peer: str | None, xff: Sequence[str | bytes] = ()) -> dict[str, Any]:
    headers = [(b"x-forwarded-for", v.encode("latin-1") if isinstance(v, str) else v) for v in xff]
    return {
        "type": "http",
        "client": None if peer is None else (peer, 50000),
        "headers": [(b"host", b"api"), *headers],
    }


PROXIES = ["10.0.0.0/8", "::1"]

# (trusted proxies, ASGI peer, X-Forwarded-For headers in order, the client address)
XFF_CASES = [
    pytest.param([], "198.51.100.7", [], "198.51.100.7", id="peer"),
    pytest.param([], "198.51.100.7", ["203.0.113.9"], "198.51.100.7", id="no-proxies-no-xff"),
    pytest.param([], "127.0.0.1", ["203.0.113.9"], "127.0.0.1", id="loopback-not-trusted"),
    pytest.param(PROXIES, "198.51.100.7", ["203.0.113.9"], "198.51.100.7", id="peer-untrusted"),
    pytest.param(PROXIES, "10.0.0.1", [], "10.0.0.1", id="proxy-without-xff"),
    pytest.param(PROXIES, "10.0.0.1", ["203.0.113.9"], "203.0.113.9", id="one-proxy"),
    pytest.param(
        PROXIES, "10.0.0.1", ["198.51.100.1, 203.0.113.9"], "203.0.113.9", id="rightmost"
    ),
    pytest.param(
        PROXIES,
        "10.0.0.1",
        ["198.51.100.1, 203.0.113.9, 10.0.0.3, 10.0.0.2"],
        "203.0.113.9",
        id="through-proxies",
    ),
    pytest.param(
        PROXIES,
        "10.0.0.1",
        ["198.51.100.1, 203.0.113.9", "10.0.0.2"],
        "203.0.113.9",
        id="two-headers",
    ),
    pytest.param(
        PROXIES,
        "10.0.0.1",
        ["203.0.113.9", "198.51.100.1"],
        "198.51.100.1",
        id="two-headers-order",
    ),
    pytest.param(PROXIES, "10.0.0.1", ["10.0.0.5, 10.0.0.2"], "10.0.0.5", id="all-trusted"),
    pytest.param(PROXIES, "10.0.0.1", ["  203.0.113.9 ,\t10.0.0.2  "], "203.0.113.9", id="spaces"),
    pytest.param(PROXIES, "10.0.0.1", ["203.0.113.9:4711"], "203.0.113.9", id="ipv4-port"),
    pytest.param(PROXIES, "10.0.0.1", ["2001:db8::9"], "2001:db8::9", id="ipv6"),
    pytest.param(PROXIES, "10.0.0.1", ["[2001:db8::9]"], "2001:db8::9", id="ipv6-brackets"),
    pytest.param(
        PROXIES, "10.0.0.1", ["[2001:db8::9]:443, 10.0.0.2"], "2001:db8::9", id="ipv6-port"
    ),
    pytest.param(PROXIES, "10.0.0.1", ["::ffff:203.0.113.9"], "203.0.113.9", id="mapped-hop"),
    pytest.param(PROXIES, "::ffff:10.0.0.1", ["203.0.113.9"], "203.0.113.9", id="mapped-peer"),
    pytest.param(PROXIES, "::1", ["203.0.113.9"], "203.0.113.9", id="ipv6-proxy"),
    pytest.param(
        PROXIES, "10.0.0.1", ["garbage, 203.0.113.9"], "203.0.113.9", id="junk-left-unread"
    ),
    pytest.param(PROXIES, "10.0.0.1", ["not-an-ip"], None, id="malformed"),
    pytest.param(PROXIES, "10.0.0.1", ["unknown"], None, id="unknown"),
    pytest.param(PROXIES, "10.0.0.1", [""], None, id="empty-header"),
    pytest.param(PROXIES, "10.0.0.1", ["203.0.113.9,"], None, id="trailing-comma"),
    pytest.param(PROXIES, "10.0.0.1", ["203.0.113.9,,10.0.0.2"], None, id="empty-hop"),
    pytest.param(
        PROXIES, "10.0.0.1", ["203.0.113.9, garbage, 10.0.0.2"], None, id="malformed-between"
    ),
    pytest.param(PROXIES, "10.0.0.1", ["[2001:db8::9"], None, id="unclosed-bracket"),
    pytest.param(PROXIES, "10.0.0.1", ["203.0.113.9 10.0.0.2"], None, id="space-separated"),
    pytest.param(PROXIES, "10.0.0.1", ["203.0.113.9;10.0.0.2"], None, id="semicolon"),
    pytest.param(PROXIES, "10.0.0.1", ["for=203.0.113.9"], None, id="forwarded-syntax"),
    pytest.param(PROXIES, "10.0.0.1", [b"203.0.113.9\xff"], None, id="high-byte"),
    pytest.param(PROXIES, "10.0.0.1", ["203.0.113.9:abc"], None, id="bad-port"),
    pytest.param(PROXIES, None, ["203.0.113.9"], None, id="no-client"),
]


@pytest.mark.parametrize(("trusted", "peer", "xff", "expected"), XFF_CASES)
def test_client_address(
    trusted: list[str], peer: str | None, xff: list[str | bytes], expected: str | None
) -> None:
    """X-Forwarded-For is read right to left through trusted proxies only; the first
    untrusted hop is the client, and a malformed hop on the way leaves no address."""
    address = ClientAddress(trusted)(_scope(peer, xff))
    assert (None if address is None else str(address)) == expected


@pytest.mark.parametrize(("trusted", "peer", "xff", "expected"), XFF_CASES)
def test_a_client_address_read_again_is_read_the_same(
    trusted: list[str], peer: str | None, xff: list[str | bytes], expected: str | None
) -> None:
    """The same requests through one ClientAddress, twice (the second time its addresses
    are remembered): the same client, and the same budget name as a fresh reading."""
    reader = ClientAddress(trusted)
    for _ in range(2):
        found = reader.read(_scope(peer, xff))
        assert (None if found is None else str(found[0])) == expected
        if found is not None:
            assert found[1] == budget_address(found[0])


def test_an_address_is_parsed_once_and_what_is_remembered_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A peer seen again costs no parse; past ``max_remembered`` texts the memory starts
    again, and a text longer than any address is never remembered (a header of junk
    keeps costing its parse, never memory)."""
    parsed: list[str] = []
    real = network.parse_address

    def counting(text: str) -> Any:
        parsed.append(text)
        return real(text)

    monkeypatch.setattr(network, "parse_address", counting)
    reader = ClientAddress(PROXIES)
    monkeypatch.setattr(reader, "max_remembered", 100)
    for _ in range(3):
        assert str(reader(_scope("203.0.113.9"))) == "203.0.113.9"
        found = reader.read(_scope("2001:db8:1:2::5"))
        assert found is not None and found[1] == "2001:db8:1:2::/64"
    assert parsed == ["203.0.113.9", "2001:db8:1:2::5"]
    for n in range(250):
        assert reader(_scope(f"198.51.{n // 256}.{n % 256}")) is not None
        assert len(reader._read) <= 100
    junk = "9" * 5000
    for _ in range(2):
        assert reader(_scope("10.0.0.1", [junk])) is None
    assert parsed.count(junk) == 2 and junk not in reader._read


def test_other_forwarding_headers_are_ignored() -> None:
    """Forwarded, X-Real-IP and True-Client-IP never name the client, even via a proxy."""
    scope = _scope("10.0.0.1")
    scope["headers"] += [
        (b"forwarded", b"for=203.0.113.9"),
        (b"x-real-ip", b"203.0.113.9"),
        (b"true-client-ip", b"203.0.113.9"),
    ]
    assert str(ClientAddress(PROXIES)(scope)) == "10.0.0.1"


# -- allowlists through the middleware --------------------------------------------------------


class Counter:
    """How often the app behind the middleware was called."""

    calls = 0


@pytest.fixture
async def gate() -> AsyncIterator[Keystile]:
    """A gate over the memory store."""
    made = Keystile(store=MemoryStore())
    yield made
    await made.aclose()


def make_app(gate: Keystile, **options: Any) -> tuple[Starlette, Counter]:
    counter = Counter()

    async def endpoint(request: Request) -> JSONResponse:
        counter.calls += 1
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/{rest:path}", endpoint)])
    app.add_middleware(KeystileMiddleware, gate=gate, **options)
    return app, counter


async def key_with_ips(gate: Keystile, ips: Sequence[str]) -> str:
    created = await gate.manager.create(
        {"name": "ip key", "type": "prod", "scopes": ["vec:read"], "allowed_ips": list(ips)}
    )
    return created.secret.get_secret_value()


async def get(
    app: Starlette, key: str, client: tuple[str, int], headers: dict[str, str] | None = None
) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, client=client)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
        return await http.get(
            "/data", headers={"Authorization": f"Bearer {key}", **(headers or {})}
        )


def assert_ip_refused(response: httpx.Response) -> None:
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "ip_not_allowed"
    assert "access-control-allow-origin" not in response.headers


@pytest.mark.parametrize(
    ("rules", "client", "allowed"),
    [
        pytest.param(["203.0.113.9"], "203.0.113.9", True, id="ipv4-exact"),
        pytest.param(["203.0.113.9"], "203.0.113.10", False, id="ipv4-other"),
        pytest.param(["10.0.0.0/8"], "10.255.1.2", True, id="ipv4-cidr"),
        pytest.param(["10.0.0.0/8"], "11.0.0.1", False, id="ipv4-outside"),
        pytest.param(["192.168.1.0/24", "203.0.113.9"], "203.0.113.9", True, id="second-rule"),
        pytest.param(["::1"], "::1", True, id="ipv6-exact"),
        pytest.param(["2001:db8::/32"], "2001:db8:1::5", True, id="ipv6-cidr"),
        pytest.param(["2001:db8::/32"], "2001:db9::1", False, id="ipv6-outside"),
        pytest.param(["2001:db8::/32"], "203.0.113.9", False, id="ipv6-rule-ipv4-client"),
        pytest.param(["0.0.0.0/0"], "2001:db8::1", False, id="ipv4-all-ipv6-client"),
        pytest.param(["10.0.0.0/8"], "::ffff:10.1.2.3", True, id="mapped-client"),
        pytest.param(["10.1.2.3"], "::ffff:10.1.2.3", True, id="mapped-client-exact"),
        pytest.param(["::ffff:10.0.0.0/104"], "10.1.2.3", True, id="mapped-rule"),
        pytest.param(["::ffff:10.1.2.3"], "10.1.2.3", True, id="mapped-rule-exact"),
        pytest.param(["::ffff:10.0.0.0/104"], "::ffff:10.1.2.3", True, id="mapped-both"),
        pytest.param(["10.0.0.0/8"], "::ffff:11.0.0.1", False, id="mapped-outside"),
        pytest.param(["::ffff:10.0.0.0/104"], "11.0.0.1", False, id="mapped-rule-outside"),
        pytest.param(["2001:db8::/32"], "::ffff:10.1.2.3", False, id="mapped-vs-ipv6"),
    ],
)
async def test_allowlist(rules: list[str], client: str, allowed: bool, gate: Keystile) -> None:
    """A key with an allowlist is admitted exactly from its addresses and networks,
    IPv4-mapped IPv6 being the same as IPv4, and the app is called only then."""
    app, counter = make_app(gate)
    key = await key_with_ips(gate, rules)
    response = await get(app, key, (client, 40000))
    if allowed:
        assert response.status_code == 200, response.text
        assert counter.calls == 1
    else:
        assert_ip_refused(response)
        assert counter.calls == 0


async def test_allowlist_is_checked_on_every_request(gate: Keystile) -> None:
    """The same key, cached after its first use, is judged again by each request's address."""
    app, counter = make_app(gate)
    key = await key_with_ips(gate, ["203.0.113.0/24"])
    assert (await get(app, key, ("203.0.113.9", 1))).status_code == 200
    assert_ip_refused(await get(app, key, ("198.51.100.7", 1)))
    assert (await get(app, key, ("203.0.113.200", 1))).status_code == 200
    assert_ip_refused(await get(app, key, ("::1", 1)))
    assert counter.calls == 2


async def test_a_key_without_an_allowlist_is_admitted_from_anywhere(gate: Keystile) -> None:
    """No allowlist, no address check: any client, none at all, any X-Forwarded-For."""
    app, counter = make_app(gate, trusted_proxies=["10.0.0.0/8"])
    key = await key_with_ips(gate, [])
    for client in ("203.0.113.9", "::1", "10.0.0.1"):
        response = await get(app, key, (client, 1), {"X-Forwarded-For": "garbage"})
        assert response.status_code == 200
    assert await raw_status(app, key, None, []) == 200
    assert counter.calls == 4


async def test_the_client_address_is_the_asgi_client(gate: Keystile) -> None:
    """Without trusted proxies only the ASGI client counts; forwarding headers do not."""
    app, _ = make_app(gate)
    key = await key_with_ips(gate, ["203.0.113.9"])
    spoofed = {
        "X-Forwarded-For": "203.0.113.9",
        "X-Real-IP": "203.0.113.9",
        "Forwarded": "for=203.0.113.9",
    }
    assert_ip_refused(await get(app, key, ("127.0.0.1", 1), spoofed))
    assert (await get(app, key, ("203.0.113.9", 1))).status_code == 200


async def test_a_request_without_a_client_is_refused(gate: Keystile) -> None:
    """An ASGI request with no ``client`` has no address, which no allowlist admits."""
    app, counter = make_app(gate, trusted_proxies=["10.0.0.0/8"])
    key = await key_with_ips(gate, ["0.0.0.0/0", "::/0"])
    assert await raw_status(app, key, None, [b"203.0.113.9"]) == 403
    assert counter.calls == 0


async def test_trusted_proxies_through_the_middleware(gate: Keystile) -> None:
    """Behind a configured proxy the client is the rightmost untrusted hop: the proxy's own
    address no longer counts, a spoofed hop to the left never does, a malformed one refuses."""
    app, counter = make_app(gate, trusted_proxies=["10.0.0.0/8"])
    client_key = await key_with_ips(gate, ["203.0.113.9"])
    proxy_key = await key_with_ips(gate, ["10.0.0.0/8"])
    proxy = ("10.0.0.1", 1)
    real = {"X-Forwarded-For": "203.0.113.9, 10.0.0.2"}
    spoofed = {"X-Forwarded-For": "203.0.113.9, 198.51.100.7"}
    assert (await get(app, client_key, proxy, real)).status_code == 200
    assert_ip_refused(await get(app, proxy_key, proxy, real))
    assert_ip_refused(await get(app, client_key, proxy, spoofed))
    assert_ip_refused(await get(app, client_key, proxy, {"X-Forwarded-For": "203.0.113.9, x"}))
    assert (await get(app, proxy_key, proxy)).status_code == 200
    # From an untrusted peer the header is ignored.
    assert_ip_refused(await get(app, client_key, ("198.51.100.7", 1), real))
    assert counter.calls == 2


async def raw_status(
    app: Starlette, key: str, client: tuple[str, int] | None, xff: list[bytes]
) -> int:
    """The status of one raw ASGI request, header bytes passed through untouched."""
    headers = [(b"host", b"api"), (b"authorization", f"Bearer {key}".encode())]
    headers += [(b"x-forwarded-for", value) for value in xff]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/data",
        "raw_path": b"/data",
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": client,
        "server": ("api", 80),
    }
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await app(scope, receive, send)
    return statuses[0]


_ADDRESSES = ["203.0.113.9", "198.51.100.7", "10.0.0.1", "10.0.0.2", "::1", "2001:db8::9"]
_HOP = st.one_of(
    st.sampled_from(_ADDRESSES),
    st.sampled_from(_ADDRESSES).map(lambda a: f"[{a}]:443" if ":" in a else f"{a}:80"),
    st.text(max_size=20),
)
_XFF_VALUE = st.one_of(
    st.lists(_HOP, max_size=5).map(", ".join).map(lambda s: s.encode("utf-8")),
    st.binary(max_size=60),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    peer=st.sampled_from(["203.0.113.9", "198.51.100.7", "::1", "::ffff:198.51.100.7"]),
    allowed=st.sampled_from([["203.0.113.9"], ["10.0.0.0/8"], ["198.51.100.0/24", "::1"]]),
    trusted=st.sampled_from([[], ["10.0.0.0/8"], ["10.0.0.0/8", "127.0.0.1"]]),
    xff=st.lists(_XFF_VALUE, min_size=1, max_size=3),
)
async def test_a_spoofed_x_forwarded_for_changes_nothing(
    peer: str, allowed: list[str], trusted: list[str], xff: list[bytes]
) -> None:
    """From a peer that is not a trusted proxy, any X-Forwarded-For headers at all give the
    same decision as none."""
    gate = Keystile(store=MemoryStore())
    try:
        app, _ = make_app(gate, trusted_proxies=trusted)
        key = await key_with_ips(gate, allowed)
        without = await raw_status(app, key, (peer, 1), [])
        with_xff = await raw_status(app, key, (peer, 1), xff)
    finally:
        await gate.aclose()
    address = ipaddress.ip_address(peer)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    expected = 200 if any(address in ipaddress.ip_network(n) for n in allowed) else 403
    assert (without, with_xff) == (expected, expected)


# -- a real uvicorn in front ------------------------------------------------------------------

SPOOFED = {"X-Forwarded-For": "203.0.113.9"}
IP_KEYS: list[dict[str, object]] = [
    {"name": "loopback", "type": "prod", "scopes": ["vec:read"], "allowed_ips": ["127.0.0.1"]},
    {"name": "remote", "type": "prod", "scopes": ["vec:read"], "allowed_ips": ["203.0.113.9"]},
]


@pytest.mark.parametrize(
    ("argv", "rewrites"),
    [
        pytest.param(lambda port: uvicorn_argv(port), True, id="uvicorn-default"),
        pytest.param(
            lambda port: uvicorn_argv(port, "--no-proxy-headers"), False, id="no-proxy-headers"
        ),
        pytest.param(demo_argv, False, id="keystile-demo"),
    ],
)
def test_uvicorn_and_x_forwarded_for(argv: Callable[[int], list[str]], rewrites: bool) -> None:
    """uvicorn by default makes X-Forwarded-For from 127.0.0.1 the ASGI client, so keystile
    judges a spoofed address; with --no-proxy-headers, and under `keystile demo`, the real
    peer 127.0.0.1 is judged whatever the header says."""
    with (
        serve(argv, seed_env(IP_KEYS)) as server,
        httpx.Client(base_url=server.base_url, timeout=5.0) as http,
    ):
        loopback, remote = ({"Authorization": f"Bearer {k}"} for k in server.keys)
        assert http.get("/cloud/vec/databases", headers=loopback).status_code == 200
        assert_ip_refused(http.get("/cloud/vec/databases", headers=remote))
        from_loopback = http.get("/cloud/vec/databases", headers={**loopback, **SPOOFED})
        from_remote = http.get("/cloud/vec/databases", headers={**remote, **SPOOFED})
        logged = server.wait_for_lines('"GET /cloud/vec/databases HTTP/1.1"', count=4)
        if rewrites:
            # The spoof works: the header decides, not the peer.
            assert_ip_refused(from_loopback)
            assert from_remote.status_code == 200
            assert [line.split()[1] for line in logged[2:]] == ["203.0.113.9:0"] * 2
        else:
            assert from_loopback.status_code == 200
            assert_ip_refused(from_remote)
            assert all(line.split()[1].startswith("127.0.0.1:") for line in logged)
