"""keygate: API-key security for Starlette and FastAPI."""

from keygate.clock import ManualClock
from keygate.exceptions import (
    FieldError,
    KeyConflict,
    KeyFormatError,
    KeyGateError,
    KeyNotFound,
    KeyValidationError,
    StoreError,
    StoreUnavailable,
)
from keygate.keys import KeyHasher, generate_key, parse_key
from keygate.manager import CreatedKey, KeyManager
from keygate.models import ApiKey, KeyPolicy, KeySettings, KeyType, KeyTypePolicy
from keygate.scopes import ScopeCatalogue
from keygate.settings import KeyGateSettings
from keygate.stores import CachedStore, KeyStore, MemoryStore, RedisStore, open_store

__all__ = [
    "ApiKey",
    "CachedStore",
    "CreatedKey",
    "FieldError",
    "KeyConflict",
    "KeyFormatError",
    "KeyGateError",
    "KeyGateSettings",
    "KeyHasher",
    "KeyManager",
    "KeyNotFound",
    "KeyPolicy",
    "KeySettings",
    "KeyStore",
    "KeyType",
    "KeyTypePolicy",
    "KeyValidationError",
    "ManualClock",
    "MemoryStore",
    "RedisStore",
    "ScopeCatalogue",
    "StoreError",
    "StoreUnavailable",
    "__version__",
    "generate_key",
    "open_store",
    "parse_key",
]

__version__ = "0.1.0"
