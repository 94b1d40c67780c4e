"""Wrapped static secrets, domain and storage together: one suite run on every storage backend
(SQLite file, PostgreSQL) with every key backend (software, SoftHSM2 PKCS#11).

Attacks go through a side door (raw SQL on the backend, bypassing the code under test) and each
test asserts the refusal and that nothing else changed. Time is a FakeClock: no sleeps.
"""

from __future__ import annotations

import datetime as dt
import secrets as random
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from broker.envelope import (
    SYSTEM_TENANT,
    DataKeyCache,
    Envelope,
    KekRotator,
    SealedBlob,
    aad,
    kek_label,
)
from broker.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from broker.policy import Caller, Decision
from broker.secrets import (
    METADATA_MAC_KEY,
    METADATA_MAC_UPGRADED,
    MetadataMac,
    NamedSecret,
    SecretIntegrityError,
    SecretJanitor,
    SecretService,
    VersionState,
)
from broker.storage import open_storage
from broker.storage.secrets import SecretRecord, SecretState, SqlSecretRepository, VersionRecord
from broker.storage.sql import SqlStorage
from ca.clock import FakeClock
from ca.keys import KeyBackend, SoftwareBackend, random_source

T0 = dt.datetime(2026, 6, 1, 9, 0, tzinfo=dt.UTC)
REF = "secret://payments/prod/stripe/api-key"
OTHER = "secret://payments/prod/webhook/token"
DAY = dt.timedelta(days=1)


def new_value() -> bytes:
    # Generated at test time (no secret-looking literals in the tree), recognisable in a dump.
    return f"sk_test_{random.token_hex(20)}".encode()


@dataclass
class World:
    kind: str
    storage: SqlStorage
    repo: SqlSecretRepository
    keys: KeyBackend
    envelope: Envelope
    service: SecretService
    clock: FakeClock
    rotator: KekRotator
    db_path: Path | None
    dsn: str

    async def put(self, ref: str = REF, tenant: str = "acme", value: bytes | None = None) -> bytes:
        value = value or new_value()
        await self.service.put(
            tenant,
            ref,
            owner="payments",
            classification="confidential",
            rotation_period=dt.timedelta(days=90),
            value=value,
        )
        return value

    async def rotate(self, ref: str = REF, tenant: str = "acme") -> bytes:
        value = new_value()
        await self.service.rotate(
            tenant,
            ref,
            environment="prod",
            ticket="SEC-1",
            justification="scheduled",
            value=value,
        )
        return value

    async def get(self, ref: str = REF, tenant: str = "acme", version: int | None = None) -> bytes:
        loaded = await self.service.load(tenant, ref, version)
        if loaded is None:
            raise NotFound("absent")
        info, row = loaded
        return (await self.service.reveal(info, row)).value

    async def raw(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        """Side door: one statement straight on the backend (not through the repository)."""
        async with self.storage.backend.transaction(write=True) as tx:
            return await tx.fetch(sql, *args)

    async def sealed(self, ref: str, version: int, tenant: str = "acme") -> bytes:
        rows = await self.raw(
            "SELECT sealed FROM secret_versions WHERE tenant = ? AND ref = ? AND version = ?",
            tenant,
            ref,
            version,
        )
        return bytes(rows[0][0])

    async def set_sealed(self, ref: str, version: int, blob: bytes, tenant: str = "acme") -> None:
        await self.raw(
            "UPDATE secret_versions SET sealed = ? WHERE tenant = ? AND ref = ? AND version = ? "
            "RETURNING version",
            blob,
            tenant,
            ref,
            version,
        )


@pytest.fixture(params=["software", pytest.param("softhsm", marks=pytest.mark.softhsm)])
def keys(request: pytest.FixtureRequest) -> Iterator[KeyBackend]:
    if request.param == "software":
        yield SoftwareBackend()
    else:
        yield request.getfixturevalue("pkcs11_backend")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def world(
    request: pytest.FixtureRequest, tmp_path: Path, keys: KeyBackend
) -> AsyncIterator[World]:
    db_path: Path | None = None
    if request.param == "sqlite":
        db_path = tmp_path / "data" / "broker.db"
        db_path.parent.mkdir()
        dsn = f"sqlite://{db_path}"
    else:
        dsn = request.getfixturevalue("pg_dsn")
    storage = await open_storage(dsn)
    assert isinstance(storage, SqlStorage)
    await storage.migrate()
    clock = FakeClock(T0)
    mac = MetadataMac(keys)
    repo = storage.secrets(mac)
    # As the broker runs it: unwrapped data keys cached, so every refusal below holds with it.
    envelope = Envelope(keys, storage, DataKeyCache(clock))
    service = SecretService(repo, envelope, clock)
    await service.start(mac)
    rotator = KekRotator(envelope, [service], repo)
    try:
        yield World(
            request.param, storage, repo, keys, envelope, service, clock, rotator, db_path, dsn
        )
    finally:
        await storage.close()


# -- the happy path and plaintext at rest -------------------------------------------------------


async def test_put_get_show_list_round_trip(world: World) -> None:
    value = await world.put()
    assert await world.get() == value
    info = await world.service.show("acme", REF)
    r = info.record
    assert (r.owner, r.service, r.environment, r.classification) == (
        "payments",
        "payments",
        "prod",
        "confidential",
    )
    assert r.rotation_period_s == 90 * 86400
    assert r.last_rotated == T0
    assert info.missing == ()
    assert [(v.version, v.state, v.kek) for v in info.versions] == [(1, "current", "kek.acme.1")]
    listed = await world.service.list_secrets("acme", "secret://payments/")
    assert [i.record.ref for i in listed] == [REF]
    assert await world.service.list_secrets("acme", "secret://billing/") == []
    assert await world.service.list_secrets("other") == []
    with pytest.raises(AlreadyExists, match="rotate"):
        await world.put()
    assert await world.get() == value  # the refused put changed nothing


async def test_states_are_stored_as_before_and_read_as_enums(world: World) -> None:
    await world.put()
    await world.rotate()
    assert await world.raw("SELECT state FROM secrets WHERE ref = ?", REF) == [("active",)]
    info = await world.service.show("acme", REF)
    assert type(info.record.state) is SecretState and info.record.state == "active"
    assert [v.state for v in info.versions] == [VersionState.PREVIOUS, VersionState.CURRENT]
    assert [type(v.state) for v in info.versions] == [VersionState, VersionState]


async def test_no_plaintext_at_rest(world: World) -> None:
    values = [await world.put(), await world.put(OTHER), await world.rotate()]
    values.append(await world.put(REF, tenant="beta"))
    for tenant, ref in (("acme", REF), ("acme", OTHER), ("beta", REF)):
        assert await world.get(ref, tenant) in values
    await world.rotator.rotate()
    needles = [v for v in values] + [v.hex().encode() for v in values]
    if world.kind == "sqlite":
        assert world.db_path is not None
        files = [p for p in world.db_path.parent.rglob("*") if p.is_file()]
        assert {p.name for p in files} >= {"broker.db"}
        for path in files:  # the database, its WAL and shared-memory files
            data = path.read_bytes()
            for needle in needles:
                assert needle not in data, f"plaintext found in {path.name}"
    else:
        conn = await asyncpg.connect(world.dsn)
        try:
            tables = [
                r[0]
                for r in await conn.fetch(
                    "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
                )
            ]
            assert {"secrets", "secret_versions", "meta", "audit"} <= set(tables)
            for table in tables:
                rows = await conn.fetch(f'SELECT t::text FROM "{table}" t')
                dump = "\n".join(r[0] for r in rows).encode()
                for needle in needles:
                    assert needle not in dump, f"plaintext found in table {table}"
        finally:
            await conn.close()


# -- attacks on stored ciphertext ---------------------------------------------------------------


async def test_tampered_ciphertext_is_refused(world: World) -> None:
    value = await world.put()
    other = await world.put(OTHER)
    original = await world.sealed(REF, 1)
    header = 5 + len(SealedBlob.from_bytes(original).kek_label)
    # The tag, the ciphertext, the nonce, the wrapped data key:
    for position in (len(original) - 1, len(original) - 20, header + 45, header + 3):
        damaged = bytearray(original)
        damaged[position] ^= 0x01
        await world.set_sealed(REF, 1, bytes(damaged))
        with pytest.raises(FailedPrecondition, match="did not verify"):
            await world.get()
    await world.set_sealed(REF, 1, b"\x01garbage")
    with pytest.raises(FailedPrecondition, match="did not verify"):
        await world.get()
    assert await world.get(OTHER) == other  # nothing else affected
    await world.set_sealed(REF, 1, original)
    assert await world.get() == value


async def test_swapped_blobs_are_refused(world: World) -> None:
    await world.put()
    await world.put(OTHER)
    await world.rotate()
    a1, a2, b1 = (
        await world.sealed(REF, 1),
        await world.sealed(REF, 2),
        await world.sealed(OTHER, 1),
    )
    await world.set_sealed(REF, 2, b1)  # another secret's blob
    with pytest.raises(FailedPrecondition, match="did not verify"):
        await world.get()
    await world.set_sealed(REF, 2, a1)  # another version's blob
    with pytest.raises(FailedPrecondition, match="did not verify"):
        await world.get()
    await world.set_sealed(REF, 2, a2)
    await world.get()


async def test_a_blob_under_another_tenants_kek_is_refused(world: World) -> None:
    await world.put(REF, tenant="acme")
    beta_value = await world.put(REF, tenant="beta")
    beta_blob = await world.sealed(REF, 1, tenant="beta")
    acme_blob = await world.sealed(REF, 1, tenant="acme")
    # The same reference and version, but sealed by tenant beta: refused in acme.
    await world.set_sealed(REF, 1, beta_blob, tenant="acme")
    with pytest.raises(FailedPrecondition, match="did not verify"):
        await world.get(tenant="acme")
    # Relabelled to acme's KEK: the wrapped key does not unwrap under it.
    blob = SealedBlob.from_bytes(beta_blob)
    relabelled = SealedBlob("kek.acme.1", blob.wrapped_key, blob.nonce, blob.ciphertext)
    await world.set_sealed(REF, 1, relabelled.to_bytes(), tenant="acme")
    with pytest.raises(FailedPrecondition, match="did not verify"):
        await world.get(tenant="acme")
    # And acme's own data key rewrapped by beta's KEK (a KEK of the wrong tenant): refused.
    acme = SealedBlob.from_bytes(acme_blob)
    data_key = world.keys.unwrap(acme.kek_label, acme.wrapped_key)
    forged = SealedBlob(
        "kek.beta.1", world.keys.wrap("kek.beta.1", data_key), acme.nonce, acme.ciphertext
    )
    await world.set_sealed(REF, 1, forged.to_bytes(), tenant="acme")
    with pytest.raises(FailedPrecondition, match="did not verify"):
        await world.get(tenant="acme")
    assert await world.get(tenant="beta") == beta_value


# -- metadata -----------------------------------------------------------------------------------


async def test_missing_metadata_is_refused_for_distribution(world: World) -> None:
    # A record as an import or an older broker might have left it: no owner, no class.
    blob = await world.envelope.seal("acme", new_value(), aad("acme", REF, 1))
    await world.repo.insert_secret(
        SecretRecord(
            tenant="acme",
            ref=REF,
            service="payments",
            environment="prod",
            owner=None,
            classification=None,
            rotation_period_s=86400,
            last_rotated=T0,
            current_version=1,
            state="active",
            created_at=T0,
        ),
        VersionRecord(1, blob.kek_label, blob.to_bytes(), T0),
    )
    with pytest.raises(FailedPrecondition) as info:
        await world.get()
    assert "missing required metadata: owner, data-classification" in str(info.value)
    shown = await world.service.show("acme", REF)
    assert shown.missing == ("owner", "data-classification")
    assert shown.record.state == "active"  # metadata stays readable, nothing changed


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("owner", "", "owner"),
        ("owner", "Pay Ments", "owner"),
        ("classification", "secret", "classification"),
        ("rotation_period", dt.timedelta(minutes=5), "rotation period"),
    ],
)
async def test_put_refuses_bad_metadata(
    world: World, field: str, value: object, message: str
) -> None:
    kwargs: dict[str, Any] = dict(
        owner="payments", classification="pii", rotation_period=dt.timedelta(days=30)
    )
    kwargs[field] = value
    with pytest.raises(InvalidArgument, match=message):
        await world.service.put("acme", REF, value=new_value(), **kwargs)
    assert await world.repo.list_secrets() == []


# -- revocation ---------------------------------------------------------------------------------


async def test_revoke_refuses_every_version_at_once(world: World) -> None:
    await world.put()
    await world.rotate()
    await world.rotate()
    other = await world.put(OTHER)
    await world.service.revoke("acme", REF, "leaked in a CI log")
    for version in (None, 1, 2, 3):
        with pytest.raises(FailedPrecondition, match="revoked"):
            await world.get(version=version)
    info = await world.service.show("acme", REF)
    assert info.record.state == "revoked"
    assert {v.state for v in info.versions} == {"revoked"}
    with pytest.raises(FailedPrecondition, match="already revoked"):
        await world.service.revoke("acme", REF, "again")
    with pytest.raises(InvalidArgument, match="justification"):
        await world.service.revoke("acme", OTHER, "  ")
    assert await world.get(OTHER) == other
    # Recovery: a fresh value re-enables distribution; the old versions stay revoked.
    fresh = await world.rotate()
    assert await world.get() == fresh
    for version in (1, 2, 3):
        with pytest.raises(FailedPrecondition, match="revoked"):
            await world.get(version=version)


# -- rotation window and rollback ---------------------------------------------------------------


class Deciding:
    """An `Authorize` port that records what it was asked and refuses (or allows) it all."""

    def __init__(self, allowed: bool) -> None:
        self.allowed = allowed
        self.asked: list[tuple[str, dict[str, str]]] = []

    def __call__(self, resource: str, attributes: Any = None, /) -> Decision:
        self.asked.append((resource, dict(attributes or {})))
        if not self.allowed:
            raise PermissionDenied("refused by the test's policy")
        return Decision(True, "allowed by the test's policy", "test")


async def test_administrative_calls_decide_on_the_loaded_secret_before_acting(
    world: World,
) -> None:
    """Show/Rollback/Revoke/Delete are one domain call each: the secret is loaded, the port
    decides on its attributes, and only then does anything change."""
    await world.put()
    value = await world.rotate()
    before = await world.service.show("acme", REF)
    web = Caller("spiffe://example.org/acme/prod/web", False)
    refuse = Deciding(allowed=False)
    named = NamedSecret("acme", REF, web, refuse, {})
    for attempt in (
        lambda: world.service.show_for(named),
        lambda: world.service.rollback_for(named),
        lambda: world.service.revoke_for(named, "an attacker's reason"),
        lambda: world.service.delete_for(named),
    ):
        with pytest.raises(PermissionDenied):
            await attempt()
    assert len(refuse.asked) == 4
    assert {r for r, _ in refuse.asked} == {before.sha256}
    assert all(a["owner"] == "payments" for _, a in refuse.asked)
    after = await world.service.show("acme", REF)
    assert (after.record.state, after.record.current_version) == ("active", 2)
    assert [(v.version, v.state) for v in after.versions] == [
        (v.version, v.state) for v in before.versions
    ]
    assert await world.get() == value

    allow = Deciding(allowed=True)
    operator = Caller("spiffe://example.org/broker/operator/alice", True)
    allowed = NamedSecret("acme", REF, operator, allow, {})
    assert (await world.service.show_for(allowed)).record.current_version == 2
    _, from_version, to_version = await world.service.rollback_for(allowed)
    assert (from_version, to_version) == (2, 1)
    assert (await world.service.revoke_for(allowed, "leaked")).record.state == "revoked"
    assert len(allow.asked) == 3


async def test_rotation_window_and_rollback(world: World) -> None:
    v1 = await world.put()
    world.clock.advance(hours=1)
    v2 = await world.rotate()
    assert await world.get() == v2
    assert await world.get(version=1) == v1  # the previous version stays readable by number
    world.clock.advance(hours=23)
    assert await world.get(version=1) == v1
    _, before, after = await world.service.rollback("acme", REF)
    assert (before, after) == (2, 1)
    assert await world.get() == v1
    with pytest.raises(FailedPrecondition, match="revoked"):
        await world.get(version=2)  # the version rolled back from is revoked
    info = await world.service.show("acme", REF)
    assert [(v.version, v.state) for v in info.versions] == [(1, "current"), (2, "revoked")]
    v3 = await world.rotate()
    world.clock.advance(hours=24, seconds=1)
    assert await world.get() == v3
    with pytest.raises(FailedPrecondition, match="rollback window"):
        await world.get(version=1)
    with pytest.raises(FailedPrecondition, match="no earlier version"):
        await world.service.rollback("acme", REF)
    assert await world.get() == v3  # the refused rollback changed nothing
    retired, _ = await world.service.maintain()
    assert retired == 1
    info = await world.service.show("acme", REF)
    assert [(v.version, v.state) for v in info.versions] == [
        (1, "revoked"),
        (2, "revoked"),
        (3, "current"),
    ]


async def test_rotate_guards(world: World) -> None:
    value = await world.put()
    with pytest.raises(InvalidArgument, match="environment"):
        await world.service.rotate(
            "acme", REF, environment="dev", ticket="SEC-1", justification="x", value=new_value()
        )
    with pytest.raises(InvalidArgument, match="ticket"):
        await world.service.rotate(
            "acme", REF, environment="prod", ticket="", justification="x", value=new_value()
        )
    with pytest.raises(NotFound):
        await world.service.rotate(
            "acme", OTHER, environment="prod", ticket="SEC-1", justification="x", generate_length=32
        )
    assert await world.get() == value
    assert [v.version for v in (await world.service.show("acme", REF)).versions] == [1]
    await world.service.rotate(
        "acme", REF, environment="prod", ticket="SEC-2", justification="x", generate_length=48
    )
    generated = await world.get()
    assert len(generated) == 48 and generated != value


# -- delete, retention, due ---------------------------------------------------------------------


async def test_delete_then_retention_destroys_the_data(world: World) -> None:
    await world.put()
    await world.rotate()
    kept = await world.put(OTHER)
    await world.service.delete("acme", REF)
    with pytest.raises(FailedPrecondition, match="deleted"):
        await world.get()
    janitor = SecretJanitor(world.service, world.storage, world.clock, "replica-a")
    world.clock.advance(days=29)
    assert await janitor.tick() == (1, [])  # v1 left its rollback window; nothing destroyed
    assert await world.sealed(REF, 1)  # still there within retention
    assert await janitor.tick() is None  # not due again within its interval
    other = SecretJanitor(world.service, world.storage, world.clock, "replica-b")
    assert await other.tick() is None  # replica-a holds the leader lease
    world.clock.advance(days=1, seconds=1)
    result = await janitor.tick()
    assert result is not None and result[1] == [("acme", REF)]
    rows = await world.raw(
        "SELECT sealed, kek_label FROM secret_versions WHERE ref = ? ORDER BY version", REF
    )
    assert rows == [(None, None), (None, None)]
    info = await world.service.show("acme", REF)
    assert info.record.state == "destroyed"
    assert {v.state for v in info.versions} == {"destroyed"}
    with pytest.raises(AlreadyExists):
        await world.put()  # the tombstone keeps the name
    assert await world.get(OTHER) == kept


async def test_due_lists_secrets_past_their_rotation_period(world: World) -> None:
    await world.service.put(
        "acme",
        REF,
        owner="payments",
        classification="internal",
        rotation_period=dt.timedelta(days=7),
        generate_length=32,
    )
    await world.put(OTHER)  # 90 days
    assert await world.service.due() == []
    world.clock.advance(days=8)
    assert [i.record.ref for i in await world.service.due()] == [REF]
    await world.rotate()
    assert await world.service.due("acme") == []


# -- KEK rotation -------------------------------------------------------------------------------


async def test_kek_rotation_rewraps_everything_and_destroys_the_old_kek(world: World) -> None:
    acme = {REF: await world.put(), OTHER: await world.put(OTHER)}
    acme_v2 = await world.rotate()
    beta = await world.put(REF, tenant="beta")
    system = await world.envelope.seal(SYSTEM_TENANT, b"admin-password", aad("db", "x"))
    assert world.keys.has_key("kek.acme.1")

    [only] = await world.rotator.rotate("acme")
    assert (only.tenant, only.new_label, only.rewrapped) == ("acme", "kek.acme.2", 3)
    assert only.destroyed == ("kek.acme.1",) and only.kept == ()
    assert not world.keys.has_key("kek.acme.1")
    assert world.keys.has_key("kek.beta.1")  # other tenants untouched
    assert await world.get() == acme_v2
    assert await world.get(version=1) == acme[REF]
    assert await world.get(OTHER) == acme[OTHER]
    assert await world.get(REF, "beta") == beta
    labels = await world.raw("SELECT DISTINCT kek_label FROM secret_versions WHERE tenant = 'acme'")
    assert labels == [("kek.acme.2",)]

    rotations = await world.rotator.rotate()  # every tenant, the broker's own included
    assert [(r.tenant, r.new_label) for r in rotations] == [
        (SYSTEM_TENANT, "kek._system.2"),
        ("acme", "kek.acme.3"),
        ("beta", "kek.beta.2"),
    ]
    assert not world.keys.has_key("kek.acme.2") and not world.keys.has_key("kek.beta.1")
    # No store holds the _system blob here, so its old KEK went too: that blob is now gone for
    # good, which is why every store of sealed blobs must register in app.sealed_stores.
    assert not world.keys.has_key(kek_label(SYSTEM_TENANT, 1))
    assert system.kek_label == kek_label(SYSTEM_TENANT, 1)
    assert await world.get(REF, "beta") == beta
    assert await world.get() == acme_v2


async def test_kek_rotation_keeps_an_old_kek_still_in_use(world: World) -> None:
    value = await world.put()
    stale = await world.sealed(REF, 1)

    class LateWriter:
        """A store that rewraps nothing and still holds a blob under kek.acme.1."""

        async def rewrap(self, envelope: Envelope, tenant: str, new_label: str) -> int:
            return 0

        async def kek_in_use(self, label: str) -> bool:
            return label == "kek.acme.1"

    rotator = KekRotator(world.envelope, [world.service, LateWriter()], world.repo)
    [result] = await rotator.rotate("acme")
    assert result.kept == ("kek.acme.1",) and result.destroyed == ()
    assert world.keys.has_key("kek.acme.1")
    assert await world.get() == value
    assert SealedBlob.from_bytes(stale).kek_label == "kek.acme.1"


async def test_a_write_racing_a_kek_rotation_is_not_lost(world: World) -> None:
    """The rotation runs between sealing a value and storing it: it cannot see the blob, so it
    destroys the KEK the blob is under; the write notices and seals again under the new KEK."""
    await world.put(OTHER)  # kek.acme.1 exists

    class Racing:
        def __init__(self, inner: SqlSecretRepository) -> None:
            self._inner = inner

        async def insert_secret(self, record: SecretRecord, first: VersionRecord) -> None:
            await world.rotator.rotate("acme")  # rewraps OTHER, destroys the KEK of `first`
            await self._inner.insert_secret(record, first)

        async def add_version(self, *args: Any, **kwargs: Any) -> bool:
            await world.rotator.rotate("acme")
            return await self._inner.add_version(*args, **kwargs)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inner, name)

    service = SecretService(Racing(world.repo), world.envelope, world.clock)  # type: ignore[arg-type]
    value = new_value()
    await service.put(
        "acme",
        REF,
        owner="payments",
        classification="pii",
        rotation_period=dt.timedelta(days=30),
        value=value,
    )
    assert not world.keys.has_key("kek.acme.1")
    assert await world.get() == value
    rotated = new_value()
    await service.rotate(
        "acme", REF, environment="prod", ticket="SEC-3", justification="race", value=rotated
    )
    assert not world.keys.has_key("kek.acme.2")
    assert await world.get() == rotated
    assert await world.get(version=1) == value
    labels = await world.raw("SELECT DISTINCT kek_label FROM secret_versions WHERE tenant = 'acme'")
    assert labels == [("kek.acme.3",)]


# -- metadata integrity (issue 20, finding 12) ----------------------------------------------------


async def _row(world: World, ref: str = REF) -> list[tuple[Any, ...]]:
    return await world.raw(
        "SELECT owner, classification, state, current_version, meta_mac FROM secrets "
        "WHERE tenant = 'acme' AND ref = ?",
        ref,
    )


@pytest.mark.parametrize(
    ("column", "value"),
    [("owner", "api"), ("classification", "public"), ("state", "active"), ("service", "api")],
)
async def test_tampered_metadata_is_refused_on_read_and_write(
    world: World, column: str, value: str
) -> None:
    """`UPDATE secrets SET owner = 'api'` (or a declassification, or un-revoking) by someone
    with database write access: every read and every change refuses, nothing is served."""
    await world.put()
    if column == "state":
        await world.service.revoke("acme", REF, "compromised")
    before_versions = await world.raw("SELECT * FROM secret_versions ORDER BY version")
    await world.raw(f"UPDATE secrets SET {column} = ? WHERE ref = ?", value, REF)
    tampered = await _row(world)
    for attempt in (
        world.get,
        lambda: world.service.show("acme", REF),
        world.rotate,
        lambda: world.service.rollback("acme", REF),
        lambda: world.service.revoke("acme", REF, "again"),
        lambda: world.service.delete("acme", REF),
    ):
        with pytest.raises(SecretIntegrityError, match="integrity check failed"):
            await attempt()
    assert await _row(world) == tampered  # not re-sealed by a legitimate-looking change
    assert await world.raw("SELECT * FROM secret_versions ORDER BY version") == before_versions


async def test_current_version_moved_back_serves_nothing(world: World) -> None:
    """`UPDATE secrets SET current_version = 1` must not silently serve the old value."""
    await world.put()
    await world.rotate()
    await world.raw("UPDATE secrets SET current_version = 1 WHERE ref = ?", REF)
    with pytest.raises(SecretIntegrityError):
        await world.get()
    # The MAC of another secret's row does not fit either (it covers tenant and reference).
    await world.put(OTHER)
    other_mac = (await _row(world, OTHER))[0][4]
    await world.raw(
        "UPDATE secrets SET current_version = 2, meta_mac = ? WHERE ref = ?", other_mac, REF
    )
    with pytest.raises(SecretIntegrityError):
        await world.get()


async def test_a_stripped_mac_is_not_legacy_after_the_upgrade(world: World) -> None:
    """Setting meta_mac to NULL (to pass as a row from before MACs) is refused, and a restart
    does not seal the tampered row: the upgrade is recorded in the key backend."""
    await world.put()
    await world.raw("UPDATE secrets SET owner = 'api', meta_mac = NULL WHERE ref = ?", REF)
    with pytest.raises(SecretIntegrityError):
        await world.get()
    assert await world.service.start(MetadataMac(world.keys)) == 0
    with pytest.raises(SecretIntegrityError):
        await world.get()
    assert (await _row(world))[0][4] is None


async def test_rows_from_before_macs_are_sealed_once_at_start(world: World) -> None:
    value = await world.put()
    await world.raw("UPDATE secrets SET meta_mac = NULL WHERE ref = ?", REF)
    await world.raw("UPDATE secret_versions SET state_mac = NULL WHERE ref = ?", REF)
    # As on a broker upgraded from before MACs: the key backend has no upgrade marker yet.
    world.keys.destroy_key(METADATA_MAC_UPGRADED)
    assert await world.service.start(MetadataMac(world.keys)) == 2  # the row and its version
    assert await world.get() == value
    assert world.keys.has_key(METADATA_MAC_UPGRADED)
    await world.raw("UPDATE secret_versions SET state_mac = NULL WHERE ref = ?", REF)
    assert await world.service.start(MetadataMac(world.keys)) == 0  # upgraded: never again
    with pytest.raises(SecretIntegrityError):
        await world.get()


async def test_an_old_version_brought_back_by_sql_is_refused(world: World) -> None:
    """Clearing a version's retire/revoke times (to read a rotated-away value by number, or to
    roll back to it) is refused; the janitor's own revocation still verifies."""
    await world.put()
    await world.rotate()
    world.clock.advance(days=2)  # version 1 left its rollback window
    with pytest.raises(FailedPrecondition, match="left its rollback window"):
        await world.get(version=1)
    assert await world.service.maintain() == (1, [])  # revoked_at = retire_at, in bulk SQL
    with pytest.raises(FailedPrecondition, match="version 1 of the secret was revoked"):
        await world.get(version=1)  # the janitor's change verifies: an ordinary refusal
    before = await world.raw("SELECT * FROM secrets")
    await world.raw(
        "UPDATE secret_versions SET retire_at = NULL, revoked_at = NULL WHERE version = 1"
    )
    with pytest.raises(SecretIntegrityError):
        await world.get(version=1)
    # Pushing the window out instead, to roll back to it: refused, nothing changed.
    await world.raw(
        "UPDATE secret_versions SET retire_at = ?, revoked_at = NULL WHERE version = 1",
        world.storage.backend.encode_ts(world.clock.now() + DAY),
    )
    with pytest.raises(SecretIntegrityError):
        await world.service.rollback("acme", REF)
    assert await world.raw("SELECT * FROM secrets") == before


async def test_a_lost_metadata_mac_key_stops_the_start(world: World) -> None:
    await world.put()
    world.keys.destroy_key(METADATA_MAC_KEY)
    with pytest.raises(FailedPrecondition, match="missing from the key backend"):
        await world.service.start(MetadataMac(world.keys))
    assert not world.keys.has_key(METADATA_MAC_KEY)  # never silently replaced
    with pytest.raises(SecretIntegrityError):
        await world.get()


async def test_the_janitor_does_not_destroy_a_row_marked_deleted_by_sql(world: World) -> None:
    value = await world.put()
    await world.raw(
        "UPDATE secrets SET state = 'deleted', deleted_at = created_at WHERE ref = ?", REF
    )
    world.clock.advance(days=365)
    _, destroyed = await world.service.maintain()
    assert destroyed == []
    assert await world.sealed(REF, 1)  # the data is still there to restore
    await world.raw(
        "UPDATE secrets SET state = 'active', deleted_at = NULL WHERE ref = ?", REF
    )  # the operator restores the row: it verifies again
    assert await world.get() == value


async def test_generated_values_come_from_the_key_backends_generator(world: World) -> None:
    """`secrets put --generate`: the value is drawn from the key backend's random generator
    (C_GenerateRandom on the SoftHSM token), not the process's."""
    drawn: list[int] = []
    source = random_source(world.keys)

    def counting(n: int) -> bytes:
        drawn.append(n)
        return source.random(n)

    world.service.random = counting
    await world.service.put(
        "acme",
        REF,
        owner="payments",
        classification="confidential",
        rotation_period=dt.timedelta(days=90),
        generate_length=40,
    )
    value = await world.get()
    assert len(value) == 40 and drawn
