"""PostgreSQL-specific behaviour: connection failures become StorageError, quickly, without
the password; a lost connection never leaks a driver exception."""

from __future__ import annotations

import socket
import time

import pytest

from broker.errors import StorageError
from broker.storage import open_storage
from broker.storage.sql import SqlStorage
from tests.fixtures.postgres import PgCluster


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # nothing listens once the socket is closed


async def test_unreachable_server_is_a_quick_storage_error_with_the_dsn_redacted() -> None:
    port = closed_port()
    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        await open_storage(f"postgresql://broker:pw-Zx81q@127.0.0.1:{port}/broker")
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert "pw-Zx81q" not in message
    assert f"postgresql://broker:***@127.0.0.1:{port}/broker" in message
    assert info.value.__cause__ is None


@pytest.mark.postgres
async def test_wrong_password_is_a_storage_error_without_it(pg_cluster: PgCluster) -> None:
    dsn = pg_cluster.dsn("postgres").replace(pg_cluster.password, "Wr0ng-pa55")
    with pytest.raises(StorageError, match="password authentication failed") as info:
        await open_storage(dsn)
    assert "Wr0ng-pa55" not in str(info.value)
    assert pg_cluster.password not in str(info.value)


@pytest.mark.postgres
async def test_repr_never_shows_the_password(pg_cluster: PgCluster, pg_dsn: str) -> None:
    storage = await open_storage(pg_dsn)
    try:
        assert storage.dialect == "postgresql"
        assert pg_cluster.password not in repr(storage)
        assert "***" in repr(storage)
    finally:
        await storage.close()


@pytest.mark.postgres
async def test_a_killed_connection_surfaces_as_storage_error_and_the_pool_recovers(
    pg_cluster: PgCluster, pg_dsn: str
) -> None:
    storage = await open_storage(pg_dsn)
    assert isinstance(storage, SqlStorage)
    try:
        await storage.migrate()
        await storage.set_meta("k", "v")
        dbname = pg_dsn.rsplit("/", 1)[1]
        killed = pg_cluster.psql(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            f"WHERE datname = '{dbname}' AND pid <> pg_backend_pid()"
        )
        assert int(killed) >= 1
        outcomes: list[object] = []
        for _ in range(3):
            try:
                outcomes.append(await storage.get_meta("k"))
            except StorageError as exc:  # anything else (a raw asyncpg error) fails the test
                assert pg_cluster.password not in str(exc)
                outcomes.append(exc)
        assert outcomes[-1] == "v"
    finally:
        await storage.close()
