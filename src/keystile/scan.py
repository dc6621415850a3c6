"""Find keystile keys in files: ``keystile scan`` and the ``keystile-scan`` pre-commit hook.

A candidate is a known prefix followed by the 33 base62 characters of a key's body and
checksum. It is reported only when its checksum holds (:func:`keystile.keys.parse_key`), so
typos, truncations, look-alikes and random strings are not: a reported key is, all but
certainly, a real one. So no boundary is needed on either side: keys turn up glued to the
end of escape sequences (``\\nprod_...``, ``%22prod_...``) and to whatever follows them,
and the checksum (a key's last 6 characters) tells where one ends.

Every file is read, in chunks, as bytes, so a key in plain ASCII is found in any text
encoding that keeps ASCII as is, and in binaries too (a ``.pyc`` holds its strings as
ASCII). A file with a NUL byte in its first 8 KB, or a UTF-16 byte order mark, is also read
as UTF-16 (little- and big-endian: every other byte), which is what PowerShell's ``>``
writes. In every reading, runs of base64 (standard or URL-safe alphabet) long enough to
hold a key are decoded and searched too, as in a Kubernetes Secret.

Folders are walked recursively, skipping ``.git`` (and ``.hg``, ``.svn``); links to
folders, dangling links, FIFOs, sockets and devices are skipped. Findings name the file, the
line (of the UTF-16 text, for a key found there) and the key's display hint — never the
key.
"""

from __future__ import annotations

import binascii
import codecs
import contextlib
import errno
import os
import re
import stat
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field

from keystile import keys
from keystile.exceptions import KeyFormatError
from keystile.models import DEFAULT_POLICY

__all__ = ["SKIPPED_DIRECTORIES", "Finding", "ScanProblem", "key_pattern", "scan_paths"]

SNIFF_BYTES = 8192
CHUNK_BYTES = 1 << 20  # even: a UTF-16 reading keeps its byte parity from chunk to chunk
SKIPPED_DIRECTORIES = frozenset({".git", ".hg", ".svn"})
_TAIL = keys.BODY_LENGTH + keys.CHECKSUM_LENGTH
_LONGEST_KEY = keys.MAX_PREFIX_LENGTH + _TAIL
# What a chunk's reading keeps for the next: enough for the longest key, base64-encoded
# (4 characters per 3 bytes, from the start of the group that holds its first byte).
_OVERLAP = (_LONGEST_KEY + 2) // 3 * 4 + 4
_BASE64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/-_"
# Base64 characters to "a", anything else to " ": runs are then found by bytes.find, which
# is many times faster than a regular expression over every byte.
_BASE64_MASK = bytes(0x61 if i in _BASE64 else 0x20 for i in range(256))
_URL_SAFE = bytes.maketrans(b"-_", b"+/")
_KEY_TAIL = re.compile(rb"[0-9A-Za-z]{%d}" % _TAIL)
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
_BROKEN_LINK = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP})


@dataclass(frozen=True, slots=True)
class Finding:
    """A key found in a file: where, and its display hint (never the key itself)."""

    path: str
    line: int
    hint: str
    prefix: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.hint}"


@dataclass(frozen=True, slots=True)
class ScanProblem:
    """A path that could not be scanned, and why."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def key_pattern(prefixes: Iterable[str]) -> re.Pattern[bytes]:
    """The byte pattern of key candidates with these prefixes (longest prefix first)."""
    ordered = sorted(set(prefixes), key=lambda p: (-len(p), p))
    if not ordered:
        raise ValueError("no key prefixes to look for")
    alternatives = b"|".join(re.escape(p.encode("ascii")) for p in ordered)
    return re.compile(b"(?:" + alternatives + b")[0-9A-Za-z]{%d}" % _TAIL)


@dataclass(frozen=True, slots=True)
class _Searcher:
    """Finds keys in bytes: plainly, and inside the base64 runs long enough to hold one."""

    prefixes: Collection[str]
    shortest_run: int  # base64 characters that the shortest key takes
    raw: tuple[bytes, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "raw", tuple(p.encode("ascii") for p in self.prefixes))

    def keys(self, data: bytes) -> list[tuple[int, str, str]]:
        """``(position, key, prefix)`` of every key in ``data``, by position."""
        found = list(self._plain(data))
        found.extend(self._encoded(data))
        found.sort()
        return found

    def _plain(self, data: bytes) -> Iterator[tuple[int, str, str]]:
        # bytes.find for each prefix, then the tail at each place found: many times faster
        # than one regular expression, and every place is tried (keys may overlap
        # look-alikes: "dev_...prod_<key>" is no dev_ key, but holds a prod_ one).
        for raw in self.raw:
            at = data.find(raw)
            while at >= 0:
                tail = _KEY_TAIL.match(data, at + len(raw))
                if tail is not None:
                    token = data[at : tail.end()].decode("ascii")
                    with contextlib.suppress(KeyFormatError):
                        yield at, token, keys.parse_key(token, self.prefixes)
                at = data.find(raw, at + 1)

    def _encoded(self, data: bytes) -> Iterator[tuple[int, str, str]]:
        mask = data.translate(_BASE64_MASK)
        needle = b"a" * self.shortest_run
        start = mask.find(needle)
        while start >= 0:
            end = mask.find(b" ", start + self.shortest_run)
            end = len(data) if end < 0 else end
            run = data[start:end].translate(_URL_SAFE)
            # The run may begin mid-group (cut by a chunk, or glued to other text): try
            # the four ways of grouping it; only the right one decodes to the key.
            for shift in range(4):
                for offset, token, prefix in self._plain(_decoded(run[shift:])):
                    yield start + shift + offset // 3 * 4, token, prefix
            start = mask.find(needle, end)


def _decoded(text: bytes) -> bytes:
    """Base64 ``text`` decoded, padded as needed; an incomplete last group is dropped."""
    extra = len(text) % 4
    if extra == 1:
        text = text[:-1]
    elif extra:
        text += b"=" * (4 - extra)
    try:
        return binascii.a2b_base64(text)
    except binascii.Error:  # cannot happen with the characters and padding above
        return b""


class _Reading:
    """One reading of a file's bytes (as they are, or every other byte), searched chunk by
    chunk; the end of each chunk is kept for the next, so no key is cut in two."""

    def __init__(self, path: str, searcher: _Searcher) -> None:
        self.path = path
        self.searcher = searcher
        self.kept = b""
        self.line = 1

    def feed(self, data: bytes, *, last: bool) -> Iterator[Finding]:
        buffer = self.kept + data
        cut = len(buffer) if last else max(0, len(buffer) - _OVERLAP)
        for position, token, prefix in self.searcher.keys(buffer):
            if position < cut:  # the rest is searched again with the next chunk
                line = self.line + buffer.count(b"\n", 0, position)
                yield Finding(self.path, line, keys.key_hint(token, prefix), prefix)
        self.line += buffer.count(b"\n", 0, cut)
        self.kept = buffer[cut:]


def _files(paths: Iterable[str]) -> Iterator[str | ScanProblem]:
    for root in paths:
        if os.path.isdir(root):
            unreadable: list[OSError] = []
            # Symbolic links to folders are not followed (no loops, no leaving the tree).
            for folder, dirnames, filenames in os.walk(root, onerror=unreadable.append):
                while unreadable:
                    exc = unreadable.pop()
                    yield ScanProblem(str(exc.filename), exc.strerror or type(exc).__name__)
                # Pruned in place, so os.walk does not descend; sorted, so output is stable.
                dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRECTORIES)
                for name in sorted(filenames):
                    yield os.path.normpath(os.path.join(folder, name))
            for exc in unreadable:
                yield ScanProblem(str(exc.filename), exc.strerror or type(exc).__name__)
        elif os.path.lexists(root):
            yield os.path.normpath(root)
        else:
            yield ScanProblem(root, "no such file or directory")


def _scan_file(path: str, searcher: _Searcher) -> Iterator[Finding | ScanProblem]:
    try:
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            if exc.errno in _BROKEN_LINK and os.path.islink(path):
                return  # a dangling link, or a loop of links: nothing to read
            raise
        if not stat.S_ISREG(mode):
            return  # a FIFO, a socket or a device
        with open(path, "rb") as file:
            chunk = file.read(CHUNK_BYTES)
            readings = [_Reading(path, searcher)]
            if b"\0" in chunk[:SNIFF_BYTES] or chunk.startswith(_UTF16_BOMS):
                readings += [_Reading(path, searcher), _Reading(path, searcher)]
            while True:
                following = file.read(CHUNK_BYTES)
                last = not following
                yield from readings[0].feed(chunk, last=last)
                if len(readings) > 1:  # UTF-16, either way, or a binary
                    yield from readings[1].feed(chunk[0::2], last=last)
                    yield from readings[2].feed(chunk[1::2], last=last)
                if last:
                    return
                chunk = following
    except OSError as exc:
        yield ScanProblem(path, exc.strerror or type(exc).__name__)


def scan_paths(
    paths: Iterable[str], prefixes: Collection[str] | None = None
) -> Iterator[Finding | ScanProblem]:
    """Every key with a valid checksum in ``paths`` (files, or folders walked recursively),
    and every path that could not be read. ``prefixes`` defaults to the built-in key types'.
    """
    known = frozenset(DEFAULT_POLICY.prefixes if prefixes is None else prefixes)
    if not known:
        raise ValueError("no key prefixes to look for")
    shortest = min(len(p) for p in known) + _TAIL
    searcher = _Searcher(known, shortest_run=shortest * 4 // 3)
    for item in _files(paths):
        if isinstance(item, ScanProblem):
            yield item
        else:
            yield from _scan_file(item, searcher)
