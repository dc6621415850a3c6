"""keystile: API-key security for Starlette and FastAPI."""

from keystile.clock import ManualClock
from keystile.exceptions import (
    ConfigurationError,
    FieldError,
    KeyChanged,
    KeyConflict,
    KeyFormatError,
    KeyNotFound,
    KeystileError,
    KeyValidationError,
    RotationRefused,
    ScopeRefused,
    StoreError,
    StoreMisconfigured,
    StoreUnavailable,
)
from keystile.gate import Keystile, KeyUser, Principal
from keystile.keys import KeyHasher, generate_key, parse_key
from keystile.manager import (
    CreatedKey,
    KeyInfo,
    KeyManager,
    KeyPage,
    KeyStatus,
    RotatedKey,
)
from keystile.middleware import KeystileMiddleware
from keystile.models import ApiKey, KeyPolicy, KeySettings, KeyType, KeyTypePolicy
from keystile.responses import Refusal
from keystile.routing import Rule, RuleTable, check_scopes, public, scopes_required
from keystile.scopes import ScopeCatalogue
from keystile.settings import KeystileSettings
from keystile.stores import CachedStore, KeyStore, MemoryStore, RedisStore, open_store

__all__ = [
    "ApiKey",
    "CachedStore",
    "ConfigurationError",
    "CreatedKey",
    "FieldError",
    "KeyChanged",
    "KeyConflict",
    "KeyFormatError",
    "KeyHasher",
    "KeyInfo",
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
    "Keystile",
    "KeystileError",
    "KeystileMiddleware",
    "KeystileSettings",
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
    "ScopeRefused",
    "StoreError",
    "StoreMisconfigured",
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
