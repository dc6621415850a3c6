"""keygate: API-key security for Starlette and FastAPI."""

from keygate.clock import ManualClock
from keygate.exceptions import (
    FieldError,
    KeyChanged,
    KeyConflict,
    KeyFormatError,
    KeyGateError,
    KeyNotFound,
    KeyValidationError,
    RotationRefused,
    StoreError,
    StoreUnavailable,
)
from keygate.gate import KeyGate, KeyUser, Principal
from keygate.keys import KeyHasher, generate_key, parse_key
from keygate.manager import (
    CreatedKey,
    KeyManager,
    KeyPage,
    KeyStatus,
    RotatedKey,
)
from keygate.middleware import KeyGateMiddleware
from keygate.models import ApiKey, KeyPolicy, KeySettings, KeyType, KeyTypePolicy
from keygate.responses import Refusal
from keygate.routing import Rule, RuleTable, check_scopes, public, scopes_required
from keygate.scopes import ScopeCatalogue
from keygate.settings import KeyGateSettings
from keygate.stores import CachedStore, KeyStore, MemoryStore, RedisStore, open_store

__all__ = [
    "ApiKey",
    "CachedStore",
    "CreatedKey",
    "FieldError",
    "KeyChanged",
    "KeyConflict",
    "KeyFormatError",
    "KeyGate",
    "KeyGateError",
    "KeyGateMiddleware",
    "KeyGateSettings",
    "KeyHasher",
    "KeyManager",
    "KeyNotFound",
    "KeyPage",
    "KeyPolicy",
    "KeySettings",
    "KeyStatus",
    "KeyStore",
    "KeyType",
    "KeyTypePolicy",
    "KeyUser",
    "KeyValidationError",
    "ManualClock",
    "MemoryStore",
    "Principal",
    "RedisStore",
    "Refusal",
    "RotatedKey",
    "RotationRefused",
    "Rule",
    "RuleTable",
    "ScopeCatalogue",
    "StoreError",
    "StoreUnavailable",
    "__version__",
    "check_scopes",
    "generate_key",
    "open_store",
    "parse_key",
    "public",
    "scopes_required",
]

__version__ = "0.1.0"
