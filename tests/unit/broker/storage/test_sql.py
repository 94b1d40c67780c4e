"""The dialect-independent parts: the shipped migrations and the SQL rewriting seam."""

from __future__ import annotations

import datetime as dt
import re

import pytest

from broker.storage.backend import require_aware
from broker.storage.postgres import qmark_to_numbered
from broker.storage.sql import DIALECTS, latest_version, load_migrations

_TX_CONTROL = re.compile(
    r"^\s*(BEGIN|COMMIT|ROLLBACK|START\s+TRANSACTION)\s*(TRANSACTION|WORK)?\s*;",
    re.IGNORECASE | re.MULTILINE,
)


def test_every_dialect_has_every_migration_version_in_order() -> None:
    versions = {d: [m.version for m in load_migrations(d)] for d in DIALECTS}
    latest = latest_version("sqlite")
    assert latest >= 1
    for dialect in DIALECTS:
        assert versions[dialect] == list(range(1, latest + 1)), dialect


@pytest.mark.parametrize("dialect", DIALECTS)
def test_migrations_are_named_and_create_the_core_tables(dialect: str) -> None:
    migrations = load_migrations(dialect)
    assert migrations[0].name == "initial"
    created = {
        name.lower()
        for m in migrations
        for name in re.findall(r"CREATE TABLE (\w+)", m.sql, flags=re.IGNORECASE)
    }
    assert {
        "schema_migrations",
        "authorities",
        "policies",
        "audit",
        "meta",
        "counters",
        "leases_lock",
    } <= created
    for m in migrations:
        assert m.filename.startswith(f"{m.version:04d}_")
        # migrate() owns the transaction: a migration must not commit half of itself.
        assert not _TX_CONTROL.search(m.sql), m.filename


def test_unknown_dialect_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown dialect"):
        load_migrations("oracle")


def test_qmark_placeholders_become_numbered() -> None:
    assert qmark_to_numbered("SELECT ? , ?, x FROM t WHERE a = ? ") == (
        "SELECT $1 , $2, x FROM t WHERE a = $3 "
    )
    assert qmark_to_numbered("SELECT 1") == "SELECT 1"


def test_require_aware_converts_to_utc_and_refuses_naive() -> None:
    plus2 = dt.timezone(dt.timedelta(hours=2))
    value = require_aware(dt.datetime(2026, 1, 1, 12, tzinfo=plus2))
    assert value == dt.datetime(2026, 1, 1, 10, tzinfo=dt.UTC) and value.tzinfo is dt.UTC
    with pytest.raises(ValueError, match="naive"):
        require_aware(dt.datetime(2026, 1, 1))
