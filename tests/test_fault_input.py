"""Hostile bytes through a real server (docs/errors.md: no input may produce a 5xx): raw sockets
to uvicorn serving the demo (``keystile demo``, memory store) and a keystile app behind a
trusted proxy (shared Redis) — header fuzz, homoglyph keys, malformed Origin and
X-Forwarded-For. uvicorn (h11) may refuse a request itself with a 400 or close the
connection: that is recorded, and fine; a 5xx, a traceback or a dead server is not."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from conftest import REDIS_URL, SECRET, Figures
from faults.load import make_keys
from faults.rawhttp import RawAnswer, exchange, request
from faults.server import Server, child_env, serve

pytestmark = pytest.mark.slow

CYRILLIC_O = "\u043e"
KB = 1024


@dataclass(frozen=True)
class Case:
    """One hostile request: ``must_pass`` when it is a legitimate spelling of a valid
    request (200 required), ``may_pass`` when it carries a valid key and the rest is noise
    the app may ignore (200 allowed); anything else must be refused."""

    name: str
    data: bytes
    may_pass: bool = False
    must_pass: bool = False


def auth(value: bytes) -> tuple[bytes, bytes]:
    return (b"Authorization", value)


def cases(path: str, dev: str, client: str, origin: str, *, proxied: bool) -> list[Case]:
    """The corpus, for an app where ``dev`` may GET ``path`` and ``client`` may too from
    ``origin``; ``proxied``: the app trusts 127.0.0.1 as a proxy and ``dev`` is allowed
    only from 203.0.113.0/24 (so a malformed X-Forwarded-For must not pass)."""
    key = dev.encode()
    prefix, _, body = dev.partition("_")
    good = auth(b"Bearer " + key)
    c = client.encode()

    def get(
        name: str, *headers: tuple[bytes, bytes], may: bool = False, must: bool = False
    ) -> Case:
        if proxied and (may or must) and not name.startswith(("origin", "xff")):
            headers = (*headers, (b"X-Forwarded-For", b"203.0.113.7"))  # an allowed address
        return Case(name, request("GET", path, list(headers)), may or must, must)

    def raw(name: str, data: bytes, *, may: bool = False) -> Case:
        return Case(name, data, may)

    # ip:port is a form some proxies send; parse_address takes it (network.py).
    ported = {"with-port"}

    homoglyph = prefix.replace("o", CYRILLIC_O) if "o" in prefix else CYRILLIC_O + prefix[1:]
    out = [
        get("valid", good, must=True),
        get("scheme-lowercase", auth(b"bearer " + key), must=True),
        get("scheme-uppercase", auth(b"BEARER " + key), must=True),
        get("two-spaces", auth(b"Bearer  " + key), must=True),
        get("trailing-space", auth(b"Bearer " + key + b" "), must=True),  # OWS
        get("tab-separator", auth(b"Bearer\t" + key)),
        get("no-token", auth(b"Bearer")),
        get("basic-scheme", auth(b"Basic " + key)),
        get("two-tokens", auth(b"Bearer " + key + b"," + key)),
        get("token-twice-spaced", auth(b"Bearer " + key + b" " + key)),
        get("truncated", auth(b"Bearer " + key[:-1])),
        get("checksum-off", auth(b"Bearer " + key[:-1] + (b"A" if key[-1:] != b"A" else b"B"))),
        get("case-flipped", auth(b"Bearer " + key.swapcase())),
        get("ten-times", auth(b"Bearer " + key * 10)),
        get("non-ascii-utf8", auth(b"Bearer " + key + "é".encode())),
        get("latin-1-byte", auth(b"Bearer \xff\xfe" + key)),
        get("invalid-utf8-scheme", auth(b"B\xe9arer " + key)),
        get("nul-in-token", auth(b"Bearer " + key[:8] + b"\x00" + key[8:])),
        get("nul-only", auth(b"\x00")),
        get("cr-in-value", auth(b"Bearer " + key[:8] + b"\r" + key[8:])),
        get("del-in-value", auth(b"Bearer " + key + b"\x7f")),
        get("homoglyph-prefix", auth(b"Bearer " + f"{homoglyph}_{body}".encode())),
        get("homoglyph-scheme", auth("Веаrer ".encode() + key)),
        get("fullwidth-prefix", auth(b"Bearer " + f"{prefix.upper()}_{body}".encode())),
        get(
            "fullwidth-chars",
            auth(b"Bearer " + "".join(chr(ord(ch) + 0xFEE0) for ch in dev[:4]).encode() + key[4:]),
        ),
        get("zero-width-space", auth(b"Bearer " + key[:6] + "\u200b".encode() + key[6:])),
        get("rtl-override", auth(b"Bearer " + "\u202e".encode() + key)),
        get("combining-mark", auth(b"Bearer " + key[:5] + "\u0301".encode() + key[5:])),
        get("auth-16kb", auth(b"Bearer " + b"a" * (16 * KB))),
        get("auth-64kb", auth(b"Bearer " + b"a" * (64 * KB))),
        get("other-header-64kb", good, (b"X-Junk", b"j" * (64 * KB)), may=True),
        get("header-name-64kb", good, (b"X" * (64 * KB), b"1"), may=True),
        get("1000-repeated-headers", good, *[(b"X-Repeat", b"r")] * 1000, may=True),
        get("1000-authorization-headers", *[good] * 1000),
        get("two-authorization-headers", good, auth(b"Bearer " + c)),
        get("empty-authorization", auth(b"")),
        # Origins, with the browser key that lists one.
        get("origin-allowed", auth(b"Bearer " + c), (b"Origin", origin.encode()), must=True),
    ]
    for label, value in [
        ("null", b"null"),
        ("scheme-only", b"http://"),
        ("unclosed-ipv6", b"http://[::1"),
        ("port-99999", b"http://localhost:99999"),
        ("wildcard", b"https://*.example.com"),
        ("javascript", b"javascript:alert(1)"),
        ("space-in-host", b"http://exa mple.com"),
        ("non-ascii-host", "http://ex\u00e4mple.com".encode()),
        ("latin-1-host", b"http://ex\xe4mple.com"),
        ("punycode-garbage", b"http://xn--.com"),
        ("8kb", b"http://" + b"a" * (8 * KB) + b".com"),
        ("with-path", origin.encode() + b"/path"),
        ("uppercase", origin.upper().encode()),  # the same origin, case-folded: may pass
        ("trailing-dot", origin.encode() + b"."),
        ("userinfo", origin.encode() + b"@evil.example"),
        ("homoglyph", origin.replace("o", CYRILLIC_O, 1).encode()),
        ("nul", origin.encode() + b"\x00"),
    ]:
        out.append(
            get(
                f"origin-{label}",
                auth(b"Bearer " + c),
                (b"Origin", value),
                may=label == "uppercase",
            )
        )
    out.append(
        get(
            "origin-twice",
            auth(b"Bearer " + c),
            (b"Origin", origin.encode()),
            (b"Origin", origin.encode()),
        )
    )
    for label, value in [
        ("null", b"null"),
        ("garbage", b"%%%"),
        ("8kb", b"http://" + b"a" * (8 * KB)),
        ("non-ascii", "http://ex\u00e4mple.com".encode()),
    ]:
        out.append(
            Case(
                f"preflight-origin-{label}",
                request(
                    "OPTIONS",
                    path,
                    [
                        (b"Origin", value),
                        (b"Access-Control-Request-Method", b"GET"),
                        (b"Access-Control-Request-Headers", b"authorization"),
                    ],
                ),
            )
        )
    out.append(
        Case(
            "preflight-huge-request-headers",
            request(
                "OPTIONS",
                path,
                [
                    (b"Origin", origin.encode()),
                    (b"Access-Control-Request-Method", b"G\xe9T"),
                    (b"Access-Control-Request-Headers", b"x-a," * 2000),
                ],
            ),
        )
    )
    for label, value in [
        ("garbage-hop", b"203.0.113.5, garbage"),
        ("octet-999", b"999.1.1.1"),
        ("mapped-999", b"::ffff:999.1.1.1"),
        ("with-port", b"203.0.113.5:80"),
        ("bracketed-v6-port", b"[2001:db8::1]:80"),
        ("empty", b""),
        ("commas", b",,,,"),
        ("2000-hops", b"203.0.113.5, " * 2000),
        ("fullwidth-digits", "\uff12\uff10\uff13.0.113.5".encode()),
        ("unknown", b"unknown"),
        ("obfuscated", b"_hidden"),
        ("v4-zone", b"203.0.113.5%eth0"),
        ("v6-zone", b"fe80::1%eth0"),
        ("cidr", b"203.0.113.0/24"),
        ("latin-1", b"203.0.113.\xb5"),
        ("nul", b"203.0.113.5\x00"),
    ]:
        # Without a trusted proxy the header is ignored: the valid key may pass.
        may = not proxied or label in ported
        out.append(get(f"xff-{label}", good, (b"X-Forwarded-For", value), may=may))
    hops = [(b"X-Forwarded-For", b"198.51.100.1")] * 50
    out.append(get("xff-50-headers", good, *hops, may=not proxied))
    out += [
        raw("path-non-ascii", b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        raw("path-64kb", b"GET /" + b"p" * (64 * KB) + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
        raw("path-dot-dot", b"GET /x/../health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        # RFC 9112 §3.2.2: a server must accept the absolute form; httptools gives the app
        # its path (/health, public), h11 the whole target (no rule: refused).
        raw(
            "absolute-form",
            b"GET http://evil.example/health HTTP/1.1\r\nHost: x\r\n\r\n",
            may=True,
        ),
        raw("method-space", b"GE T / HTTP/1.1\r\nHost: x\r\n\r\n"),
        raw("version-9", b"GET / HTTP/9.9\r\nHost: x\r\n\r\n"),
        raw("http-0.9", b"GET /\r\n\r\n"),
        raw("no-host", b"GET " + path.encode() + b" HTTP/1.1\r\nConnection: close\r\n\r\n"),
        raw("lf-only", b"GET / HTTP/1.1\nHost: x\n\n"),
        raw("header-no-colon", b"GET / HTTP/1.1\r\nHost: x\r\nBroken\r\n\r\n"),
        raw(
            "obs-fold",
            b"GET "
            + path.encode()
            + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer\r\n "
            + key
            + b"\r\nConnection: close\r\n\r\n",
            may=not proxied,  # h11 unfolds obsolete line folding: then it is a valid request
        ),
        raw("bad-content-length", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n"),
        raw(
            "chunked-garbage",
            b"POST "
            + path.encode()
            + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + key
            + b"\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\n\r\n",
        ),
        raw("binary-noise", bytes(range(256)) * 4),
        raw("empty-connection", b""),
    ]
    return out


SERVER_ERRORS = re.compile(r"Traceback|Exception in ASGI|Internal Server Error|\" 50[0-9] ")
# When h11 finds a request body malformed (chunked-garbage), uvicorn answers 400 itself;
# the app, already running, then sees Starlette's ClientDisconnect while reading the body,
# or h11's LocalProtocolError ("state=MUST_CLOSE") when it sends its own answer, and uvicorn
# logs that. The client got uvicorn's 400; these are counted and reported, any other
# traceback fails the test.
PROTOCOL_TRACEBACK = re.compile(
    r"ERROR:    Exception in ASGI application\nTraceback.*?\n"
    r"(starlette\.requests\.ClientDisconnect|h11\._util\.LocalProtocolError: .*?MUST_CLOSE)\n",
    re.S,
)


async def run_corpus(server: Server, corpus: list[Case]) -> tuple[Counter[str], str]:
    """Send every case on its own connection and check each answer; the tally of answers,
    and the protocol-error tracebacks the server logged (see PROTOCOL_TRACEBACK)."""
    tally: Counter[str] = Counter()
    for case in corpus:
        answer: RawAnswer = await exchange(
            server.port, case.data, timeout=10.0, half_close=not case.data
        )
        assert answer.error != "timed out", f"{case.name}: no answer in 10 s"
        assert answer.status is None or answer.status < 500, f"{case.name}: {answer.raw[:300]!r}"
        assert b"Traceback" not in answer.body, case.name
        if answer.status == 200:
            assert case.may_pass, f"{case.name} was admitted"
        elif case.must_pass:
            raise AssertionError(f"{case.name}: {answer.describe()}")
        tally[answer.describe()] += 1
        assert server.alive, f"the server died on {case.name}:\n{server.output}"
    health = await exchange(server.port, request("GET", "/health", []))
    assert health.status == 200, health
    protocol = Counter(
        m.split(":")[0].rsplit(".", 1)[-1] for m in PROTOCOL_TRACEBACK.findall(server.output)
    )
    rest = PROTOCOL_TRACEBACK.sub("", server.output)
    assert not SERVER_ERRORS.search(rest), rest[-3000:]
    logged = ", ".join(f"{n} x {name}" for name, n in sorted(protocol.items())) or "none"
    return tally, logged


def summary(tally: Counter[str]) -> str:
    return ", ".join(f"{k} x{n}" for k, n in sorted(tally.items(), key=lambda kv: -kv[1]))


@pytest.fixture
def demo() -> Iterator[tuple[Server, dict[str, str]]]:
    """``keystile demo`` on a free port, and the keys it printed."""
    with serve(demo=True) as server:
        keys = dict(re.findall(r"^\s+(dev|prod|client|admin)\s+(\S+_\S+)$", server.output, re.M))
        assert set(keys) == {"dev", "prod", "client", "admin"}, server.output
        yield server, keys


async def test_hostile_requests_to_the_demo_never_get_a_5xx(
    demo: tuple[Server, dict[str, str]], figures: Figures
) -> None:
    """Every request of the corpus sent to ``keystile demo`` gets a 4xx (or, from uvicorn
    itself, a 400 or a closed connection) — never a 5xx, never a traceback, never a 200 for a
    request that is not a legitimate spelling of a valid one — and the demo still answers
    /health afterwards."""
    server, keys = demo
    corpus = cases(
        "/cloud/vec/databases",
        keys["dev"],
        keys["client"],
        "http://localhost:5173",
        proxied=False,
    )
    tally, logged = await run_corpus(server, corpus)
    figures.add(
        f"hostile input, {len(corpus)} raw requests to `keystile demo`: {summary(tally)}; "
        f"server alive; protocol-error tracebacks in its log (client got uvicorn's 400): "
        f"{logged}"
    )


@pytest.mark.redis
async def test_hostile_requests_behind_a_trusted_proxy_never_get_a_5xx(
    redis_namespace: str, figures: Figures
) -> None:
    """The same corpus against a keystile app trusting 127.0.0.1 as a proxy (so
    X-Forwarded-For is parsed) with an IP-allowlisted production key: never a 5xx, malformed
    forwarding chains never satisfy the allowlist, and the server lives on."""
    keys = {}
    for name, settings in [
        ("dev", {"type": "prod", "scopes": ["kev:read"], "allowed_ips": ["203.0.113.0/24"]}),
        (
            "client",
            {
                "type": "client",
                "scopes": ["kev:read"],
                "allowed_origins": ["https://app.example.com"],
            },
        ),
    ]:
        [made] = await make_keys(REDIS_URL, redis_namespace, SECRET, settings, 1)
        keys[name] = made.secret
    env = child_env(
        KEYSTILE_REDIS_URL=REDIS_URL,
        KEYSTILE_SECRET=SECRET,
        KEYSTILE_NAMESPACE=redis_namespace,
        KS_TRUSTED_PROXIES="127.0.0.1,::1",
    )
    with serve(env, flags=("--no-proxy-headers",)) as server:
        corpus = cases("/x", keys["dev"], keys["client"], "https://app.example.com", proxied=True)
        tally, logged = await run_corpus(server, corpus)
    figures.add(
        f"hostile input, {len(corpus)} raw requests to a keystile app behind a trusted proxy: "
        f"{summary(tally)}; server alive; protocol-error tracebacks in its log: {logged}"
    )
