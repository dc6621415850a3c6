"""Origin parsing and matching (docs/cors.md): parsed scheme, host and port, never strings."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from keystile.origins import (
    Origin,
    OriginPattern,
    PatternIndex,
    origin_allowed,
    parse_origin,
    parse_origin_pattern,
    wildcard_public_suffix,
)

TEN_KB = "https://" + "a" * 10_000 + ".com"
TEN_KB_SUBDOMAIN = "https://" + "a." * 5000 + "example.com"

# (allowed-origin entry, Origin header as sent, whether it matches). Internationalised hosts
# follow UTS #46 non-transitional, as Chromium serialises them: new URL("https://faß.de")
# has the origin https://xn--fa-hia.de, not https://fass.de.
MATCHES = [
    pytest.param("https://app.example.com", "https://app.example.com", True, id="exact"),
    pytest.param("http://localhost:5173", "http://localhost:5173", True, id="exact-port"),
    pytest.param("http://127.0.0.1:5173", "http://127.0.0.1:5173", True, id="exact-ipv4"),
    pytest.param("https://app.example.com", "http://app.example.com", False, id="scheme-down"),
    pytest.param("http://localhost:5173", "https://localhost:5173", False, id="scheme-up"),
    pytest.param("https://a.com", "https://a.com:443", True, id="default-port-https-header"),
    pytest.param("https://a.com:443", "https://a.com", True, id="default-port-https-entry"),
    pytest.param("http://a.com", "http://a.com:80", True, id="default-port-http-header"),
    pytest.param("http://a.com:80", "http://a.com", True, id="default-port-http-entry"),
    pytest.param("https://a.com", "https://a.com:80", False, id="https-on-port-80"),
    pytest.param("https://a.com", "https://a.com:8443", False, id="other-port"),
    pytest.param("http://localhost:5173", "http://localhost:5174", False, id="next-port"),
    pytest.param("http://localhost:5173", "http://localhost", False, id="port-missing"),
    pytest.param("http://localhost:5173", "http://127.0.0.1:5173", False, id="localhost-vs-ip"),
    pytest.param("https://a.com", "https://a.com/", False, id="trailing-slash"),
    pytest.param("https://a.com", "https://a.com/app", False, id="path"),
    pytest.param("https://a.com", "https://a.com?x=1", False, id="query"),
    pytest.param("https://a.com", "https://a.com#x", False, id="fragment"),
    pytest.param("https://a.com", "https://a.com\\", False, id="backslash"),
    pytest.param("https://app.example.com", "https://APP.Example.COM", True, id="upper-host"),
    pytest.param("https://a.com", "HTTPS://a.com", True, id="upper-scheme"),
    pytest.param("https://a.com", "https://a.com.", False, id="trailing-dot"),
    pytest.param("https://bücher.de", "https://xn--bcher-kva.de", True, id="idn-entry"),
    pytest.param("https://xn--bcher-kva.de", "https://xn--bcher-kva.de", True, id="idn-ascii"),
    pytest.param("https://BÜCHER.de", "https://xn--bcher-kva.de", True, id="idn-entry-upper"),
    pytest.param("https://bücher.de", "https://bücher.de", False, id="idn-unicode-header"),
    pytest.param("https://*.bücher.de", "https://shop.xn--bcher-kva.de", True, id="idn-wild"),
    pytest.param("https://faß.de", "https://xn--fa-hia.de", True, id="idn-sharp-s"),
    pytest.param("https://faß.de", "https://fass.de", False, id="idn-sharp-s-not-ss"),
    pytest.param("https://ς.gr", "https://xn--3xa.gr", True, id="idn-final-sigma"),
    pytest.param("https://a.com", "null", False, id="null"),
    pytest.param("https://a.com", "NULL", False, id="null-upper"),
    pytest.param("https://*.example.com", "null", False, id="null-wildcard"),
    pytest.param("https://*.example.com", "https://a.example.com", True, id="wild-depth-1"),
    pytest.param("https://*.example.com", "https://a.b.c.example.com", True, id="wild-depth-3"),
    pytest.param("https://*.example.com", "https://A.EXAMPLE.com", True, id="wild-upper"),
    pytest.param("https://*.example.com", "https://example.com", False, id="wild-apex"),
    pytest.param("https://*.example.com", "https://evil-example.com", False, id="wild-prefix"),
    pytest.param("https://*.example.com", "https://aexample.com", False, id="wild-no-dot"),
    pytest.param("https://*.example.com", "https://example.com.evil.net", False, id="wild-suffix"),
    pytest.param(
        "https://*.example.com", "https://a.example.com.evil.net", False, id="wild-sub-suffix"
    ),
    pytest.param("https://*.example.com", "http://a.example.com", False, id="wild-scheme"),
    pytest.param("https://*.example.com", "https://a.example.com:8443", False, id="wild-port"),
    pytest.param(
        "https://*.example.com:8443", "https://a.example.com:8443", True, id="wild-with-port"
    ),
    pytest.param("https://*.example.com", "https://*.example.com", False, id="wild-in-header"),
    pytest.param("https://example.com", "https://user@example.com", False, id="userinfo"),
    pytest.param("https://example.com", "https://u:p@example.com", False, id="userinfo-pw"),
    pytest.param(
        "https://example.com", "https://example.com@evil.net", False, id="userinfo-confusion"
    ),
    pytest.param("https://a.com", TEN_KB, False, id="10kb"),
    pytest.param("https://*.example.com", TEN_KB_SUBDOMAIN, False, id="10kb-wild"),
    pytest.param("http://[::1]:8080", "http://[::1]:8080", True, id="ipv6"),
    pytest.param("http://[::1]:8080", "http://[0:0:0:0:0:0:0:1]:8080", True, id="ipv6-long"),
    pytest.param("http://[2001:db8::1]", "http://[2001:DB8::1]", True, id="ipv6-upper"),
    pytest.param("http://[2001:db8::1]", "http://[2001:db8::1]:80", True, id="ipv6-default"),
    pytest.param("http://[::1]:8080", "http://[::1]:8081", False, id="ipv6-port"),
    pytest.param("http://[::1]:8080", "http://[::2]:8080", False, id="ipv6-other"),
    pytest.param("http://[::1]", "http://::1", False, id="ipv6-no-brackets"),
    pytest.param("http://[::1]", "http://[::1", False, id="ipv6-unclosed"),
    pytest.param("http://[::1]", "http://[::1]x", False, id="ipv6-trailing-text"),
    pytest.param("https://a.com", b"https://a.com", True, id="bytes"),
    pytest.param("https://bücher.de", "https://bücher.de".encode(), False, id="utf8-bytes"),
    pytest.param("https://bücher.de", b"https://b\xfccher.de", False, id="latin1-bytes"),
    pytest.param("https://a.com", b"https://a.com\xff", False, id="high-byte"),
    pytest.param("https://example.com", "https://еxample.com", False, id="cyrillic-e"),
    pytest.param("https://a.com", "https://a%2ecom", False, id="percent-encoded"),
    pytest.param("ws://a.com", "ws://a.com:80", True, id="ws"),
    pytest.param("wss://a.com", "wss://a.com:443", True, id="wss"),
    pytest.param("ws://a.com", "http://a.com", False, id="ws-vs-http"),
    pytest.param("https://a.com", "wss://a.com", False, id="https-vs-wss"),
    pytest.param("https://a.com", "", False, id="empty"),
    pytest.param("https://a.com", b"", False, id="empty-bytes"),
    pytest.param("https://a.com", " https://a.com", False, id="leading-space"),
    pytest.param("https://a.com", "https://a.com ", False, id="trailing-space"),
    pytest.param("https://a.com", "https://a.com\t", False, id="tab"),
    pytest.param("https://a.com", "https://a.com\r\n", False, id="crlf"),
    pytest.param("https://a.com", "https://a .com", False, id="inner-space"),
    pytest.param("https://a.com", "a.com", False, id="no-scheme"),
    pytest.param("https://a.com", "//a.com", False, id="scheme-relative"),
    pytest.param("https://a.com", "https://a.com:", False, id="empty-port"),
    pytest.param("https://a.com", "https://a.com:0", False, id="port-0"),
    pytest.param("https://a.com", "https://a.com:99999", False, id="port-too-big"),
    pytest.param("https://a.com", "https://a.com:+443", False, id="port-sign"),
    pytest.param("https://a.com", "https://a_b.com", False, id="underscore"),
]


@pytest.mark.parametrize(("entry", "header", "expected"), MATCHES)
def test_origin_matching(entry: str, header: str | bytes, expected: bool) -> None:
    """An Origin header matches an allowed-origin entry exactly when the table says so."""
    pattern = parse_origin_pattern(entry)
    origin = parse_origin(header)
    assert (origin is not None and pattern.matches(origin)) is expected
    assert (origin is not None and origin_allowed(origin, [pattern])) is expected


def test_table_is_large_enough() -> None:
    """The matching table covers at least thirty cases, every one named."""
    assert len(MATCHES) >= 30
    assert len({p.id for p in MATCHES}) == len(MATCHES)


def test_origin_allowed_over_several_entries() -> None:
    """origin_allowed is true when any entry matches, false for none or no entries."""
    entries = [parse_origin_pattern(e) for e in ("https://a.com", "https://*.b.com")]
    assert origin_allowed(Origin("https", "x.b.com", 443), entries)
    assert origin_allowed(Origin("https", "a.com", 443), entries)
    assert not origin_allowed(Origin("https", "b.com", 443), entries)
    assert not origin_allowed(Origin("https", "a.com", 443), [])


@pytest.mark.parametrize(
    ("entry", "normalised"),
    [
        pytest.param("HTTPS://App.Example.COM:443", "https://app.example.com", id="case-port"),
        pytest.param("http://localhost:5173", "http://localhost:5173", id="kept"),
        pytest.param("https://*.Bücher.de", "https://*.xn--bcher-kva.de", id="idn-wildcard"),
        pytest.param("https://faß.de", "https://xn--fa-hia.de", id="idn-sharp-s"),
        pytest.param("https://ＥＸＡＭＰＬＥ.com", "https://example.com", id="fullwidth"),
        pytest.param("http://[0:0::1]:80", "http://[::1]", id="ipv6"),
        pytest.param("wss://a.com:443", "wss://a.com", id="wss"),
        pytest.param("https://*.example.com:8443", "https://*.example.com:8443", id="wild-port"),
    ],
)
def test_entries_are_normalised(entry: str, normalised: str) -> None:
    """An allowed-origin entry is written back in one canonical spelling."""
    assert str(parse_origin_pattern(entry)) == normalised


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        pytest.param("", "empty", id="empty"),
        pytest.param(" https://a.com", "whitespace", id="leading-space"),
        pytest.param("https://a.com\n", "whitespace", id="newline"),
        pytest.param("null", "'null'", id="null"),
        pytest.param("a.com", "needs a scheme", id="no-scheme"),
        pytest.param("://a.com", "needs a scheme", id="empty-scheme"),
        pytest.param("1http://a.com", "needs a scheme", id="bad-scheme"),
        pytest.param("https://a.com/", "trailing '/'", id="trailing-slash"),
        pytest.param("https://a.com/app", "path, query or fragment", id="path"),
        pytest.param("https://a.com?x", "path, query or fragment", id="query"),
        pytest.param("https://a.com#x", "path, query or fragment", id="fragment"),
        pytest.param("https://user@a.com", "user information", id="userinfo"),
        pytest.param("https://[::1", "unclosed IPv6", id="ipv6-unclosed"),
        pytest.param("https://[::g]", "invalid IPv6", id="ipv6-invalid"),
        pytest.param("https://[::1]x", "after its IPv6", id="ipv6-trailing"),
        pytest.param("https://a.com:", "empty port", id="empty-port"),
        pytest.param("https://a.com:0", "invalid port", id="port-0"),
        pytest.param("https://a.com:65536", "invalid port", id="port-65536"),
        pytest.param("https://a.com:8o", "invalid port", id="port-letter"),
        pytest.param("https://a.com:٣", "invalid port", id="port-arabic-digit"),
        pytest.param("https://a.com.", "trailing dot", id="trailing-dot"),
        pytest.param("https://a_b.com", "invalid host", id="underscore"),
        pytest.param("https://-a.com", "invalid host", id="leading-hyphen"),
        pytest.param("https://a..com", "invalid host", id="empty-label"),
        pytest.param("https://" + "a" * 64 + ".com", "invalid host", id="label-64"),
        pytest.param("https://a.*.com", "invalid host", id="inner-wildcard"),
        pytest.param("https://*", "invalid host", id="bare-wildcard"),
        pytest.param("https://*.com", "registrable domain", id="wildcard-tld"),
        pytest.param("https://xn--a\u3002.com", "internationalised host", id="bad-idn"),
        pytest.param("https://a\u200db.com", "internationalised host", id="zero-width-joiner"),
        pytest.param("https://" + "a" * 3000 + ".com", "too long", id="too-long"),
    ],
)
def test_malformed_entries_are_refused(entry: str, fragment: str) -> None:
    """parse_origin_pattern refuses a malformed entry with a message that says why."""
    with pytest.raises(ValueError, match=re.escape(fragment)):
        parse_origin_pattern(entry)


def test_a_non_string_entry_is_refused() -> None:
    """An entry that is not a string is a ValueError, not a TypeError."""
    with pytest.raises(ValueError, match="must be a string"):
        parse_origin_pattern(b"https://a.com")  # type: ignore[arg-type]


def test_a_wildcard_is_never_an_origin() -> None:
    """A header carrying a wildcard parses to nothing."""
    assert parse_origin("https://*.example.com") is None


# Pieces of origins, shuffled into near-misses.
_PIECES = "http https ws HTTPS :// : / [ ] ::1 *. . a example.com xn--bcher-kva bücher @ %"
_PIECES += " 80 443 0 65536 null ? # \\ - ß"
_ORIGINISH = st.lists(st.sampled_from([*_PIECES.split(), " ", "\t", "\x00"]), max_size=12).map(
    "".join
)


@given(st.one_of(st.text(), st.binary(), _ORIGINISH, _ORIGINISH.map(str.encode)))
def test_parse_origin_never_raises(header: str | bytes) -> None:
    """parse_origin turns any text or bytes into an Origin or None, and never raises."""
    origin = parse_origin(header)
    assert origin is None or isinstance(origin, Origin)
    if origin is not None:
        # What it parsed re-serialises to an origin that parses to the same thing.
        assert parse_origin(str(origin)) == origin


@given(_ORIGINISH)
def test_parse_origin_pattern_raises_only_value_error(entry: str) -> None:
    """parse_origin_pattern either parses an entry or raises ValueError."""
    try:
        pattern = parse_origin_pattern(entry)
    except ValueError:
        return
    assert parse_origin_pattern(str(pattern)) == pattern


@pytest.mark.parametrize("header", ["http://127.0.0.1", "http://10.0.0.1"])
def test_a_wildcard_never_matches_an_ip_address(header: str) -> None:
    """A wildcard entry is refused or matches no IPv4-literal origin."""
    try:
        pattern = parse_origin_pattern("http://*.0.0.1")
    except ValueError:
        return
    origin = parse_origin(header)
    assert origin is not None and not pattern.matches(origin)


# -- the index of many keys' entries (issue #18 item 5) ----------------------------------------

_SCHEMES = st.sampled_from(["https", "http", "wss"])
_PORTS = st.sampled_from([None, 80, 443, 8443])
_LABELS = st.sampled_from(["a", "b", "example", "com", "co", "xn--bcher-kva", "1", "10"])
_HOSTS = st.one_of(
    st.lists(_LABELS, min_size=1, max_size=5).map(".".join),
    st.lists(st.sampled_from(["1", "10"]), min_size=4, max_size=4).map(".".join),  # IPv4
    st.sampled_from(["::1", "::ffff:a01:101", "localhost", "1.10.1"]),
)
_ORIGINS = st.builds(Origin, _SCHEMES, _HOSTS, _PORTS)
_UNTIL = st.sampled_from([math.inf, 10.0, 20.0, 30.0])


@st.composite
def _entries_and_origins(
    draw: st.DrawFn,
) -> tuple[list[tuple[OriginPattern, float]], list[Origin]]:
    """Entries drawn from a small pool (so that the same one is often held twice, with the
    same or another expiry), and origins near them: each pool entry's own origin and a
    subdomain of it, besides arbitrary ones."""
    pool = draw(
        st.lists(st.builds(OriginPattern, _ORIGINS, st.booleans()), min_size=1, max_size=4)
    )
    held = draw(st.lists(st.tuples(st.sampled_from(pool), _UNTIL), max_size=12))
    near = [p.origin for p in pool]
    near += [Origin(o.scheme, f"{draw(_LABELS)}.{o.host}", o.port) for o in near]
    return held, near + draw(st.lists(_ORIGINS, max_size=4))


_WILD_IP = OriginPattern(Origin("http", "0.1", 80), subdomains=True)


@settings(max_examples=300)
@example(drawn=([(_WILD_IP, math.inf)], [Origin("http", "10.0.1", 80)]), dropped=[], now=0.0)
@example(drawn=([(_WILD_IP, math.inf)], [Origin("http", "10.10.0.1", 80)]), dropped=[], now=0.0)
@given(
    drawn=_entries_and_origins(),
    dropped=st.lists(st.integers(min_value=0), max_size=12),
    now=st.sampled_from([-math.inf, 0.0, 10.0, 15.0, 25.0, 40.0]),
)
def test_item5_the_index_answers_as_a_scan_does(
    drawn: tuple[list[tuple[OriginPattern, float]], list[Origin]],
    dropped: list[int],
    now: float,
) -> None:
    """PatternIndex.matches answers exactly as a scan of every entry still held (and held
    past ``now``) with OriginPattern.matches, after entries are added and some discarded —
    duplicates, shared bases, IP literals, schemes and ports included."""
    held, asked = drawn
    index = PatternIndex(held)
    left = list(held)
    for n in dropped:
        if not left:
            break
        pattern, until = left.pop(n % len(left))
        index.discard(pattern, until)
    for origin in asked:
        expected = any(until > now and p.matches(origin) for p, until in left)
        assert index.matches(origin, now) is expected, origin
    # Discarding everything left empties the index: the counts were exact.
    for pattern, until in left:
        index.discard(pattern, until)
    assert not any(index.matches(origin) for origin in asked)
    assert (index._exact, index._wild, index._depths, index._depth) == ({}, {}, {}, 0)


@pytest.mark.parametrize(
    ("entries", "header", "expected"),
    [p for p in MATCHES if isinstance(p.values[1], str)],
)
def test_item5_the_index_agrees_with_the_matching_table(
    entries: str, header: str, expected: bool
) -> None:
    """Every case of the matching table answers the same through the index."""
    origin = parse_origin(header)
    index = PatternIndex([(parse_origin_pattern(entries), math.inf)])
    assert (origin is not None and index.matches(origin)) is expected


def test_item5_discarding_what_was_never_held_is_a_key_error() -> None:
    """Discarding an entry the index does not hold (or with another expiry) raises
    KeyError and leaves what it holds alone."""
    pattern = parse_origin_pattern("https://*.example.com")
    index = PatternIndex([(pattern, 10.0)])
    for entry, until in ((pattern, 20.0), (parse_origin_pattern("https://a.com"), math.inf)):
        with pytest.raises(KeyError):
            index.discard(entry, until)
    assert index.matches(Origin("https", "a.example.com", 443), 5.0)


# -- wildcards over public suffixes (issue #18 item 7) -----------------------------------------


@pytest.mark.parametrize(
    ("entry", "suffix"),
    [
        pytest.param("https://*.co.uk", "co.uk", id="co-uk"),
        pytest.param("https://*.vercel.app", "vercel.app", id="vercel-private"),
        pytest.param("https://*.github.io", "github.io", id="github-private"),
        pytest.param("https://*.s3.amazonaws.com", "s3.amazonaws.com", id="three-labels"),
        pytest.param("https://*.foo.ck", "foo.ck", id="psl-wildcard-rule"),
        pytest.param("https://*.xn--55qx5d.cn", "xn--55qx5d.cn", id="idn-punycode"),
        pytest.param("https://*.公司.cn", "xn--55qx5d.cn", id="idn-unicode"),
        pytest.param("https://*.CO.UK:8443", "co.uk", id="upper-port"),
        pytest.param("https://*.example.co.uk", None, id="under-co-uk"),
        pytest.param("https://*.myapp.vercel.app", None, id="under-vercel"),
        pytest.param("https://*.example.com", None, id="under-com"),
        pytest.param("https://*.bücher.de", None, id="idn-under-de"),
        pytest.param("http://*.localhost:5173", None, id="localhost"),
        pytest.param("https://co.uk", None, id="exact-not-wildcard"),
        pytest.param("https://github.io", None, id="exact-private"),
    ],
)
def test_item7_the_public_suffix_a_wildcard_covers(entry: str, suffix: str | None) -> None:
    """wildcard_public_suffix names the public suffix (ICANN or private section of the
    list) a wildcard entry covers whole, and None for one under a registrable domain, for
    *.localhost and for exact origins."""
    assert wildcard_public_suffix(parse_origin_pattern(entry)) == suffix
