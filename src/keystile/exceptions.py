"""keystile's exceptions.

Every error keystile raises on purpose derives from one root::

    KeystileError
    ├── KeyFormatError          a token is not a well-formed keystile key (prefix, length,
    │                           alphabet, checksum); raised before any store is consulted
    ├── KeyValidationError      key settings break the policy (unknown scope, client key
    │                           without origins, malformed CIDR, expiry in the past, ...);
    │                           also a ValueError, carrying one FieldError per problem
    ├── KeyNotFound             no key record has that id
    ├── KeyConflict             a record with that id or digest already exists
    │   └── KeyChanged          the record changed while being updated (another process
    │                           wrote it meanwhile, again and again): read it again
    ├── RotationRefused         the key cannot be rotated: it is revoked, expired, or
    │                           already rotated (``reason`` says which)
    ├── ScopeRefused            the calling key may not do this: it would grant, change or
    │                           rotate scopes it does not hold itself (``missing`` names them)
    ├── ConfigurationError      the app is set up wrongly: a setting (keyword argument or
    │                           ``KEYSTILE_*`` variable) with a value it cannot take, a
    │                           configuration file's mistake, a route that requires a scope
    │                           the catalogue lacks; also a ValueError, one line per
    │                           problem in ``problems``
    ├── Refusal                 an HTTP refusal (status, ``error.code``, challenge) raised
    │                           below the middleware (keystile.responses); also Starlette's
    │                           HTTPException
    └── StoreError              the key store failed
        ├── StoreUnavailable    the store could not be reached or did not answer in time
        └── StoreMisconfigured  the store answers, but not as the URL says it should (a
                                plain redis:// URL that reaches a Redis Cluster node)

Messages never contain a secret: at most a key's public id or display hint.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ConfigurationError",
    "FieldError",
    "KeyChanged",
    "KeyConflict",
    "KeyFormatError",
    "KeyNotFound",
    "KeyValidationError",
    "KeystileError",
    "RotationRefused",
    "ScopeRefused",
    "StoreError",
    "StoreMisconfigured",
    "StoreUnavailable",
]


MAX_FIELD_LENGTH = 100


class KeystileError(Exception):
    """The root of every error keystile raises on purpose."""


class KeyFormatError(KeystileError, ValueError):
    """A token is not a well-formed keystile key.

    The message says what is wrong (prefix, length, alphabet, checksum) and never repeats
    the token itself.
    """


@dataclass(frozen=True, slots=True)
class FieldError:
    """One problem with one input field.

    Both parts are echoed to whoever sent the input (a 422 body, a terminal), so a key
    pasted into any field comes back as its display hint only; the field's name, which
    may be a caller's text, is cut to :data:`MAX_FIELD_LENGTH` characters after that.
    """

    field: str
    message: str

    def __post_init__(self) -> None:
        from keystile.keys import redact_keys  # keys imports this module

        object.__setattr__(self, "field", redact_keys(self.field)[:MAX_FIELD_LENGTH])
        object.__setattr__(self, "message", redact_keys(self.message))

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class KeyValidationError(KeystileError, ValueError):
    """Key settings break the key-type policy or the scope catalogue."""

    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = list(errors)
        super().__init__("; ".join(str(e) for e in self.errors))

    @classmethod
    def single(cls, field: str, message: str) -> KeyValidationError:
        return cls([FieldError(field, message)])


class KeyNotFound(KeystileError, LookupError):
    """No key record has that id."""


class KeyConflict(KeystileError):
    """A key record with that id or digest already exists."""


class KeyChanged(KeyConflict):
    """A key record changed between reading it and writing it back (another process
    updated, revoked or rotated it meanwhile)."""


class RotationRefused(KeystileError):
    """The key cannot be rotated: it is ``"revoked"``, ``"expired"``, or already
    ``"rotated"`` (it has a successor). ``reason`` holds which; the message says what to do.
    """

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class ScopeRefused(KeystileError):
    """The calling key may not make this change: it would grant scopes the key does not
    hold itself, change its own scopes, allowlists or expiry, or act on a key holding more
    than it does. ``missing`` holds the scopes it lacks (``("*",)`` for changes to itself).
    """

    def __init__(self, missing: tuple[str, ...], message: str) -> None:
        self.missing = missing
        super().__init__(message)


class ConfigurationError(KeystileError, ValueError):
    """The app is configured wrongly; ``problems`` has one line per mistake, each naming
    where it is (a setting as it was given — ``KEYSTILE_RATE_LIMIT_FAILURE`` or
    ``rate_limit_failure=`` — a configuration file's field, a route, a rule) and what it
    allows or, where one is close, the valid value. It never repeats a secret's value."""

    def __init__(self, problems: list[str] | str) -> None:
        if isinstance(problems, str):
            self.problems = [problems]
            super().__init__(problems)
            return
        self.problems = list(problems)
        count = len(self.problems)
        head = (
            "keystile cannot start: "
            if count == 1
            else f"keystile cannot start ({count} problems): "
        )
        super().__init__(head + "; ".join(self.problems))


class StoreError(KeystileError):
    """The key store failed."""


class StoreUnavailable(StoreError):
    """The key store could not be reached, or did not answer in time."""


class StoreMisconfigured(StoreError):
    """The store answers, but cannot be used as configured: the message says what to use
    instead. Start-up stops on it (a store that is only down does not stop start-up)."""
