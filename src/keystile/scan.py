"""Find keystile keys in files: ``keystile scan`` and the ``keystile-scan`` pre-commit hook.

A candidate is a known prefix followed by exactly the 33 base62 characters of a key's body
and checksum, with no base62 character right after it. It is reported only when its
checksum holds (:func:`keystile.keys.parse_key`), so typos, truncations, look-alikes and
random strings are not: a reported key is, all but certainly, a real one.

No boundary is required *before* the prefix: keys turn up glued to the end of escape
sequences (``\\nprod_...``, ``%22prod_...``), and the checksum keeps that safe.

Folders are walked recursively, skipping ``.git`` (and ``.hg``, ``.svn``); files with a NUL
byte in their first 8 KB are taken for binaries and skipped. Findings name the file, the
line and the key's display hint — never the key.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass

from keystile import keys
from keystile.exceptions import KeyFormatError
from keystile.models import DEFAULT_POLICY

__all__ = ["SKIPPED_DIRECTORIES", "Finding", "ScanProblem", "key_pattern", "scan_paths"]

SNIFF_BYTES = 8192
SKIPPED_DIRECTORIES = frozenset({".git", ".hg", ".svn"})
_TAIL = keys.BODY_LENGTH + keys.CHECKSUM_LENGTH


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
    return re.compile(b"(?:" + alternatives + b")[0-9A-Za-z]{%d}(?![0-9A-Za-z])" % _TAIL)


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


def _scan_file(
    path: str, pattern: re.Pattern[bytes], prefixes: Collection[str]
) -> Iterator[Finding | ScanProblem]:
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return  # a FIFO, a socket, a device or a dangling link: nothing to read
        with open(path, "rb") as file:
            if b"\0" in file.read(SNIFF_BYTES):
                return  # a binary
            file.seek(0)
            for number, line in enumerate(file, 1):
                for match in pattern.finditer(line):
                    token = match.group().decode("ascii")
                    try:
                        prefix = keys.parse_key(token, prefixes)
                    except KeyFormatError:
                        continue
                    yield Finding(path, number, keys.key_hint(token, prefix), prefix)
    except OSError as exc:
        yield ScanProblem(path, exc.strerror or type(exc).__name__)


def scan_paths(
    paths: Iterable[str], prefixes: Collection[str] | None = None
) -> Iterator[Finding | ScanProblem]:
    """Every key with a valid checksum in ``paths`` (files, or folders walked recursively),
    and every path that could not be read. ``prefixes`` defaults to the built-in key types'.
    """
    known = frozenset(DEFAULT_POLICY.prefixes if prefixes is None else prefixes)
    pattern = key_pattern(known)
    for item in _files(paths):
        if isinstance(item, ScanProblem):
            yield item
        else:
            yield from _scan_file(item, pattern, known)
