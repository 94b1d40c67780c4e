"""The KMS key repository contract (keys, versions, compare-and-set rotation and state
changes, destruction), run against SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.errors import AlreadyExists
from broker.storage import open_storage
from broker.storage.kms import (
    KeyRecord,
    KeyState,
    KeyVersionRecord,
    KeyVersionState,
    KmsRepository,
)
from broker.storage.sql import SqlStorage

T0 = dt.datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def repo(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[KmsRepository]:
    if request.param == "sqlite":
        dsn = f"sqlite://{tmp_path / 'broker.db'}"
    else:
        dsn = request.getfixturevalue("pg_dsn")
    storage = await open_storage(dsn)
    assert isinstance(storage, SqlStorage)
    await storage.migrate()
    try:
        yield storage.kms()
    finally:
        await storage.close()


def key(tenant: str = "acme", name: str = "orders-dek") -> KeyRecord:
    return KeyRecord(
        tenant, name, "encrypt", "aes-256", "orders", "prod", "pii", 90 * 86400, "enabled", 1,
        T0, T0, None, b"mac1",
    )  # fmt: skip


def version(n: int, at: dt.datetime = T0) -> KeyVersionRecord:
    return KeyVersionRecord(n, f"kms.acme.orders-dek.{n}.abcd", "enabled", at)


async def test_insert_get_list_and_duplicates(repo: KmsRepository) -> None:
    await repo.insert_key(key(), version(1))
    await repo.insert_key(key("beta"), version(1))
    assert await repo.get_key("acme", "orders-dek") == key()
    assert (await repo.get_key("acme", "orders-dek")).mac == b"mac1"  # type: ignore[union-attr]
    assert await repo.get_key("acme", "nope") is None
    assert [k.tenant for k in await repo.list_keys()] == ["acme", "beta"]
    assert [k.tenant for k in await repo.list_keys("beta")] == ["beta"]
    with pytest.raises(AlreadyExists):
        await repo.insert_key(key(), version(1))
    assert await repo.list_versions("acme", "orders-dek") == [version(1)]


async def test_states_are_stored_as_strings_and_read_back_as_enums(repo: KmsRepository) -> None:
    await repo.insert_key(key(), version(1))
    stored = await repo.get_key("acme", "orders-dek")
    assert stored is not None and stored.state is KeyState.ENABLED
    (v1,) = await repo.list_versions("acme", "orders-dek")
    assert v1.state is KeyVersionState.ENABLED
    assert await repo.set_state(
        "acme", "orders-dek", expected=KeyState.ENABLED, state=KeyState.DISABLED, mac=b"m2"
    )
    changed = await repo.get_key("acme", "orders-dek")
    assert changed is not None and changed.state is KeyState.DISABLED
    assert changed.state == "disabled"
    with pytest.raises(ValueError, match="KeyState"):  # an unknown state is never written
        await repo.set_state("acme", "orders-dek", expected="disabled", state="off", mac=b"m3")
    assert await repo.get_key("acme", "orders-dek") == changed


async def test_rotation_is_compare_and_set(repo: KmsRepository) -> None:
    await repo.insert_key(key(), version(1))
    assert await repo.add_version("acme", "orders-dek", 1, version(2, T0 + DAY), b"mac2")
    # A second rotator that read version 1 loses, and changes nothing.
    assert not await repo.add_version("acme", "orders-dek", 1, version(3, T0 + DAY), b"mac3")
    record = await repo.get_key("acme", "orders-dek")
    assert record is not None and record.current_version == 2 and record.mac == b"mac2"
    assert record.last_rotated == T0 + DAY
    assert [v.version for v in await repo.list_versions("acme", "orders-dek")] == [1, 2]
    # A disabled key does not rotate.
    assert await repo.set_state(
        "acme", "orders-dek", expected="enabled", state="disabled", mac=b"m"
    )
    assert not await repo.add_version("acme", "orders-dek", 2, version(3), b"mac3")


async def test_state_changes_and_destruction(repo: KmsRepository) -> None:
    await repo.insert_key(key(), version(1))
    name = "orders-dek"
    assert not await repo.set_state("acme", name, expected="disabled", state="enabled", mac=b"m")
    assert await repo.set_state("acme", name, expected="enabled", state="disabled", mac=b"m")
    after = T0 + 30 * DAY
    assert await repo.set_state(
        "acme",
        "orders-dek",
        expected="disabled",
        state="pending-destroy",
        mac=b"pending",
        destroy_after=after,
    )
    record = await repo.get_key("acme", "orders-dek")
    assert record is not None and record.destroy_after == after and record.mac == b"pending"
    await repo.destroy_versions("acme", "orders-dek", after, b"gone")
    record = await repo.get_key("acme", "orders-dek")
    assert record is not None and record.state == "destroyed"
    (v,) = await repo.list_versions("acme", "orders-dek")
    assert v.state == "destroyed" and v.destroyed_at == after


async def test_the_request_path_reads_key_and_version_at_once(repo: KmsRepository) -> None:
    await repo.insert_key(key(), version(1))
    await repo.add_version("acme", "orders-dek", 1, version(2, T0 + DAY), b"mac2")
    loaded = await repo.get_key_version("acme", "orders-dek")
    assert loaded is not None and loaded[0].current_version == 2
    assert loaded[1] == version(2, T0 + DAY)
    old = await repo.get_key_version("acme", "orders-dek", 1)
    assert old is not None and old[1] == version(1)
    missing = await repo.get_key_version("acme", "orders-dek", 9)
    assert missing is not None and missing[1] is None
    assert await repo.get_key_version("acme", "nope") is None
    assert await repo.get_version("acme", "orders-dek", 2) == version(2, T0 + DAY)
    assert await repo.get_version("acme", "orders-dek", 3) is None
