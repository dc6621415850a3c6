"""The session-wide secret-leak watch (enabled by ``KEYSTILE_TEST_LEAK_CHECK=1``, see
conftest.py): every secret ``keystile.keys.generate_key`` returns in this process is
remembered, and every log record, at any level, is checked for 8 consecutive characters of
one. Findings name the logger, the place and the key's hint — never the secret.

Only the random part of a key (after its type prefix) is watched: the prefix is public, and
a window that includes it would match ordinary words ("client_k...").
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import Callable

WINDOW = 8
_RUNS = re.compile(rf"[0-9A-Za-z]{{{WINDOW},}}")


class LeakWatch(logging.Handler):
    """A logging handler that checks every record against every secret seen so far."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self._windows: dict[str, str] = {}  # 8 characters of a secret -> its hint
        self.secrets = 0
        self.records = 0
        self.leaks: list[str] = []

    def remember(self, secret: str) -> None:
        """Watch for ``secret`` from now on."""
        prefix, _, tail = secret.partition("_")
        hint = f"{prefix}_...{secret[-4:]}"
        for i in range(len(tail) - WINDOW + 1):
            self._windows[tail[i : i + WINDOW]] = hint
        self.secrets += 1

    def find(self, text: str) -> str | None:
        """The hint of a secret that ``text`` holds 8 characters of, if any."""
        windows = self._windows
        for run in _RUNS.finditer(text):
            chunk = run.group()
            for i in range(len(chunk) - WINDOW + 1):
                hint = windows.get(chunk[i : i + WINDOW])
                if hint is not None:
                    return hint
        return None

    def emit(self, record: logging.LogRecord) -> None:
        self.records += 1
        try:
            text = self.format(record)  # the message, exc_info and stack_info as text
        except Exception:  # a record whose arguments do not format: check what is there
            text = f"{record.msg!s} {record.args!r}"
        # The structured fields too (keystile.logs), and anything else passed in ``extra``.
        text += " " + repr(vars(record))
        hint = self.find(text)
        if hint is not None and len(self.leaks) < 100:
            self.leaks.append(
                f"{record.name} {record.levelname} ({record.pathname}:{record.lineno}) "
                f"holds 8+ characters of the secret of key {hint}"
            )


def watch_generation(watch: LeakWatch) -> Callable[[], None]:
    """Wrap ``keystile.keys.generate_key`` (and every keystile module's reference to it) so
    each secret it returns is remembered; returns the function that undoes it."""
    import keystile.keys

    original = keystile.keys.generate_key

    @functools.wraps(original)
    def generate_key(prefix: str) -> str:
        secret = original(prefix)
        watch.remember(secret)
        return secret

    patched = []
    for name, module in list(sys.modules.items()):
        if (name == "keystile" or name.startswith("keystile.")) and getattr(
            module, "generate_key", None
        ) is original:
            module.generate_key = generate_key  # type: ignore[attr-defined]
            patched.append(module)

    def undo() -> None:
        for module in patched:
            module.generate_key = original  # type: ignore[attr-defined]

    return undo
