"""Storage repositories over SQLite (embedded default) and PostgreSQL (asyncpg)."""
