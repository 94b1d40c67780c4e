"""Storage repositories over SQLite (embedded default) and PostgreSQL (asyncpg).

`open_storage(dsn)` returns a `Storage` (see `interface.py`); call `migrate()` before use.
"""

from broker.storage.factory import open_storage, redact_dsn

__all__ = ["open_storage", "redact_dsn"]
