"""Storage repositories over SQLite (embedded default) and PostgreSQL (asyncpg).

`open_storage(dsn)` returns a `Storage` (see `interface.py`); call `migrate()` before use. Each
feature's repository comes from the storage, the same way for all of them:
`storage.access()`, `storage.identity()`, `storage.database()`, `storage.operators()` and
`storage.secrets(seal)` return the `XxxRepository` protocols below (implemented by
`SqlXxxRepository` in `broker.storage.<feature>`).
"""

from broker.storage.access import AccessRepository
from broker.storage.database import DatabaseRepository
from broker.storage.factory import open_storage, redact_dsn
from broker.storage.identity import IdentityRepository
from broker.storage.interface import Storage
from broker.storage.operators import OperatorRepository
from broker.storage.secrets import SecretRepository

__all__ = [
    "AccessRepository",
    "DatabaseRepository",
    "IdentityRepository",
    "OperatorRepository",
    "SecretRepository",
    "Storage",
    "open_storage",
    "redact_dsn",
]
