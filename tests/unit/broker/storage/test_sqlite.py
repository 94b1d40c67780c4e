"""SQLite-specific behaviour: the file, WAL, durability and locking settings, DSN parsing."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.errors import StorageError
from broker.storage import open_storage, redact_dsn
from broker.storage.factory import parse_sqlite_dsn
from broker.storage.sql import SqlStorage
from broker.storage.sqlite import split_script

REPO = Path(__file__).resolve().parents[4]


@contextlib.asynccontextmanager
async def opened(dsn: str) -> AsyncIterator[SqlStorage]:
    storage = await open_storage(dsn)
    assert isinstance(storage, SqlStorage)
    try:
        yield storage
    finally:
        await storage.close()


async def pragma(storage: SqlStorage, name: str) -> object:
    async with storage.backend.transaction(write=False) as tx:
        row = await tx.fetchrow(f"PRAGMA {name}")
    assert row is not None
    return row[0]


def seal(seq: int, prev: bytes, event: str) -> tuple[bytes, bytes]:
    return hashlib.sha256(seq.to_bytes(8, "big") + prev + event.encode()).digest(), b"mac"


# ------------------------------------------------------------------------------- the file


async def test_file_is_created_in_the_given_dir_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "data" / "broker.db"
    path.parent.mkdir()
    async with opened(f"sqlite://{path}") as storage:
        assert storage.dialect == "sqlite"
        assert path.is_file()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert await storage.migrate() >= 1
        assert await pragma(storage, "journal_mode") == "wal"
        assert await pragma(storage, "synchronous") == 2  # FULL
        assert await pragma(storage, "busy_timeout") == 10_000
        assert await pragma(storage, "foreign_keys") == 1
    # WAL is a property of the file: another connection sees it.
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT COUNT(*) FROM schema_migrations").fetchone()[0] >= 1
    assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith("broker.db")) in (
        ["broker.db"],
        ["broker.db", "broker.db-shm", "broker.db-wal"],
    )


async def test_relative_dsn_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rel").mkdir()
    async with opened("sqlite:rel/broker.db") as storage:
        await storage.migrate()
    assert (tmp_path / "rel" / "broker.db").is_file()


async def test_dsn_settings_reach_the_connection(tmp_path: Path) -> None:
    async with opened(f"sqlite://{tmp_path}/b.db?synchronous=normal&busy_timeout=250") as s:
        assert await pragma(s, "synchronous") == 1  # NORMAL
        assert await pragma(s, "busy_timeout") == 250


async def test_missing_directory_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="does not exist"):
        await open_storage(f"sqlite://{tmp_path}/nope/broker.db")
    assert not (tmp_path / "nope").exists()


async def test_existing_database_is_reopened_not_replaced(tmp_path: Path) -> None:
    dsn = f"sqlite://{tmp_path}/broker.db"
    async with opened(dsn) as storage:
        await storage.migrate()
        await storage.set_meta("k", "kept")
    async with opened(dsn) as storage:
        assert await storage.get_meta("k") == "kept"


# ---------------------------------------------------------------------- locking, processes


async def test_writer_waits_for_another_connections_lock(tmp_path: Path) -> None:
    path = tmp_path / "broker.db"
    async with opened(f"sqlite://{path}") as storage:
        await storage.migrate()
        holder = sqlite3.connect(path, isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")
            task = asyncio.create_task(storage.append_audit(["waited"], seal))
            await asyncio.sleep(0.3)
            assert not task.done()  # blocked by the other connection's write lock
            holder.execute("COMMIT")
            assert await asyncio.wait_for(task, 5) == [1]
        finally:
            holder.close()


async def test_lock_held_past_busy_timeout_is_a_storage_error(tmp_path: Path) -> None:
    path = tmp_path / "broker.db"
    async with opened(f"sqlite://{path}?busy_timeout=100") as storage:
        await storage.migrate()
        holder = sqlite3.connect(path, isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")
            started = time.monotonic()
            with pytest.raises(StorageError, match="locked"):
                await storage.append_audit(["refused"], seal)
            assert time.monotonic() - started < 3
            holder.execute("ROLLBACK")
        finally:
            holder.close()
        assert await storage.read_audit() == []
        assert await storage.append_audit(["later"], seal) == [1]  # the storage still works


CHILD = textwrap.dedent(
    """
    import asyncio, hashlib, pathlib, sys, time
    from broker.storage import open_storage

    def seal(seq, prev, event):
        return hashlib.sha256(seq.to_bytes(8, "big") + prev + event.encode()).digest(), b"mac"

    async def main(dsn, name, count, go):
        storage = await open_storage(dsn)
        try:
            await storage.migrate()
            pathlib.Path(go + "." + name).touch()  # ready
            while not pathlib.Path(go).exists():
                time.sleep(0.005)
            for i in range(count):
                await storage.append_audit([f"{name}-{i}"], seal)
        finally:
            await storage.close()

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]))
    """
)


async def test_two_processes_share_the_file_without_forking_the_chain(tmp_path: Path) -> None:
    dsn = f"sqlite://{tmp_path}/broker.db"
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    names = ("p1", "p2")
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, dsn, name, "150", str(go)],
            env=env,
            cwd=REPO,
            stderr=subprocess.PIPE,
        )
        for name in names
    ]
    try:
        deadline = time.monotonic() + 30
        # Both have migrated (concurrently) and wait: start their appends at the same time.
        while not all((tmp_path / f"go.{name}").exists() for name in names):
            assert time.monotonic() < deadline, "children did not get ready"
            dead = [child for child in children if child.poll() is not None]
            assert not dead, "a child died early: " + dead[0].communicate()[1].decode()[-2000:]
            await asyncio.sleep(0.01)
        go.touch()
        for child in children:
            _, err = await asyncio.to_thread(child.communicate, timeout=60)
            assert child.returncode == 0, err.decode()
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.communicate()
    async with opened(dsn) as storage:
        records = await storage.read_audit()
    assert [r.seq for r in records] == list(range(1, 301))
    prev = bytes(32)
    for r in records:
        assert r.prev_hash == prev
        assert (r.entry_hash, r.mac) == seal(r.seq, r.prev_hash, r.event)
        prev = r.entry_hash
    assert sorted(r.event for r in records) == sorted(f"{n}-{i}" for n in names for i in range(150))


# ---------------------------------------------------------------------------------- DSNs


def test_parse_absolute_and_relative_dsns() -> None:
    absolute = parse_sqlite_dsn("sqlite:///var/lib/broker/broker.db")
    assert absolute.path == Path("/var/lib/broker/broker.db")
    assert (absolute.synchronous, absolute.busy_timeout_ms) == ("FULL", 10_000)
    relative = parse_sqlite_dsn("sqlite:data/broker.db?synchronous=Normal&busy_timeout=5")
    assert relative.path == Path("data/broker.db") and not relative.path.is_absolute()
    assert (relative.synchronous, relative.busy_timeout_ms) == ("NORMAL", 5)
    assert parse_sqlite_dsn("sqlite:///tmp/with%20space.db").path == Path("/tmp/with space.db")
    assert str(parse_sqlite_dsn("sqlite:////var/lib/b.db").path) == "/var/lib/b.db"


@pytest.mark.parametrize(
    ("dsn", "message"),
    [
        ("sqlite://host/broker.db", "names a host"),
        ("sqlite:", "no database file"),
        ("sqlite:///var/lib/", "no database file"),
        ("sqlite::memory:", "in-memory"),
        ("sqlite:///x.db?journal=delete", "unknown sqlite DSN parameter 'journal'"),
        ("sqlite:///x.db?synchronous=off", "synchronous must be one of"),
        ("sqlite:///x.db?busy_timeout=soon", "busy_timeout must be milliseconds"),
    ],
)
def test_bad_sqlite_dsns_are_refused_with_a_reason(dsn: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_sqlite_dsn(dsn)


async def test_unsupported_scheme_is_refused_without_the_password() -> None:
    with pytest.raises(ValueError, match="unsupported storage DSN") as info:
        await open_storage("mysql://root:hunter2@db/broker")
    assert "hunter2" not in str(info.value)
    assert "mysql://root:***@db/broker" in str(info.value)


@pytest.mark.parametrize(
    ("dsn", "redacted"),
    [
        ("postgresql://u:s3cret@h:5432/db", "postgresql://u:***@h:5432/db"),
        (
            "postgres://u:p%40ss%3Aword@h/db?sslmode=require",
            "postgres://u:***@h/db?sslmode=require",
        ),
        ("postgresql://u@h/db?password=s3cret&x=1", "postgresql://u@h/db?password=***&x=1"),
        ("postgresql://u:s3cret@h1:5432,h2:5433/db", "postgresql://u:***@h1:5432,h2:5433/db"),
        ("postgresql://h/db", "postgresql://h/db"),
        ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),  # unescaped '@'
        ("postgresql://u:pa#ss@h/db", "postgresql://***"),  # cannot tell where it ends
        ("postgresql://u:pa/ss@h/db", "postgresql://***"),
        ("sqlite:///var/lib/broker.db", "sqlite:///var/lib/broker.db"),
    ],
)
def test_redact_dsn(dsn: str, redacted: str) -> None:
    assert redact_dsn(dsn) == redacted


# ------------------------------------------------------------------------------- scripts


def test_split_script_keeps_statements_whole() -> None:
    script = (
        "-- a comment; with a semicolon\n"
        "CREATE TABLE a (x TEXT DEFAULT ';');\n"
        "CREATE TRIGGER t AFTER INSERT ON a BEGIN\n"
        "  UPDATE a SET x = 'y';\n"
        "END;\n"
        "-- trailing comment\n"
    )
    statements = split_script(script)
    assert len(statements) == 2
    assert statements[1].startswith("CREATE TRIGGER") and statements[1].endswith("END;")
    with pytest.raises(ValueError, match="incomplete"):
        split_script("CREATE TABLE b (x TEXT)")


@pytest.mark.parametrize("single_hop", [False, True], ids=["async", "single-hop"])
async def test_cancelled_while_waiting_for_the_lock_leaves_no_open_transaction(
    tmp_path: Path, single_hop: bool
) -> None:
    path = tmp_path / "broker.db"
    async with opened(f"sqlite://{path}") as storage:
        storage.single_hop_writes = single_hop  # type: ignore[attr-defined]
        await storage.migrate()
        holder = sqlite3.connect(path, isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")
            task = asyncio.create_task(storage.append_audit(["cancelled"], seal))
            await asyncio.sleep(0.2)
            task.cancel()
            await asyncio.sleep(0.1)
            # The cancelled task finishes once its queued BEGIN gets the lock and is rolled back.
            holder.execute("COMMIT")
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 5)
        finally:
            holder.close()
        # The writer connection is usable, and another connection can take the lock again.
        assert await asyncio.wait_for(storage.append_audit(["next"], seal), 5) == [1]
        with contextlib.closing(sqlite3.connect(path, timeout=2)) as other:
            other.execute("INSERT INTO meta (key, value) VALUES ('k', 'v')")
            other.commit()
        assert [r.event for r in await storage.read_audit()] == ["next"]
