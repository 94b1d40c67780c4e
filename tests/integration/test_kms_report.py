"""The compliance report's content over the API: rotation status by the fake clock (a KMS key
past its period is overdue), grants in the window with their justification, a cross-service
grant actually letting another service use a key, and auditors allowed while workloads are
refused."""

from __future__ import annotations

import datetime as dt
import json

import grpc
import pytest

from broker.api._proto import access_pb2, access_pb2_grpc, kms_pb2
from broker.storage.database import ConnectionRecord, StaticRoleRecord

from .conftest import BrokerHarness
from .test_kms_api import OTHER_SERVICE, OWNER, create, refused, stub


async def report(broker: BrokerHarness, **kw: object) -> dict[str, object]:
    response = await stub(broker).ComplianceReport(kms_pb2.ComplianceReportRequest(**kw))
    document: dict[str, object] = json.loads(response.document_json)
    return document


async def test_report_shows_overdue_keys_and_grants_with_justifications(
    broker: BrokerHarness,
) -> None:
    await create(broker)
    grants = access_pb2_grpc.AccessStub(broker.channel(broker.operator))
    await grants.CreateGrant(
        access_pb2.CreateGrantRequest(
            grantee=OTHER_SERVICE,
            action="kms.decrypt",
            resource="orders-dek",
            ttl_seconds=3600,
            justification="INC-42: web reads order receipts",
        )
    )
    # The grant lets the other service decrypt (and only decrypt).
    owner = stub(broker, broker.identity(OWNER))
    sealed = await owner.Encrypt(kms_pb2.EncryptRequest(key="orders-dek", plaintext=b"r"))
    web = stub(broker, broker.identity(OTHER_SERVICE))
    opened = await web.Decrypt(kms_pb2.DecryptRequest(ciphertext=sealed.ciphertext))
    assert opened.plaintext == b"r"
    err = await refused(web.Encrypt(kms_pb2.EncryptRequest(key="orders-dek", plaintext=b"x")))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED

    document = await report(broker)
    (row,) = [c for c in document["credentials"] if c["name"] == "orders-dek"]  # type: ignore[attr-defined,index]
    assert row["overdue"] is False and row["owner"] == "orders"
    (grant,) = document["grants"]  # type: ignore[misc]
    assert grant["justification"] == "INC-42: web reads order receipts"
    assert grant["grantee"] == OTHER_SERVICE

    broker.clock.advance(days=91)
    later = await report(broker, tenant="default")
    (row,) = [c for c in later["credentials"] if c["name"] == "orders-dek"]  # type: ignore[attr-defined,index]
    assert row["overdue"] is True
    assert later["summary"]["overdue"] >= 1  # type: ignore[index]


@pytest.mark.parametrize("window", [-1, 3651 * 86400])
async def test_bad_windows_are_refused(broker: BrokerHarness, window: int) -> None:
    err = await refused(
        stub(broker).ComplianceReport(kms_pb2.ComplianceReportRequest(window_seconds=window))
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_workloads_may_not_read_the_report(broker: BrokerHarness) -> None:
    err = await refused(
        stub(broker, broker.identity(OWNER)).ComplianceReport(kms_pb2.ComplianceReportRequest())
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_static_roles_are_reported_with_their_rotation_due(broker: BrokerHarness) -> None:
    """A static database role (issue 12) is a credential the broker rotates: the report gives
    its last rotation and due date, overdue once its period has passed."""
    now = broker.clock.now()
    store = broker.app.database.store
    # Rows only (no database server): the report reads storage, it never logs in.
    await store.insert_connection(
        ConnectionRecord("warehouse", "postgresql", "postgresql://127.0.0.1/w", b"x", "kek", now)
    )
    await store.insert_static_role(
        StaticRoleRecord(
            name="analytics-reader",
            connection="warehouse",
            username="analytics",
            owner="analytics",
            tenant="default",
            environment="prod",
            rotation_period=30 * 86400,
            rotation_statements=None,
            sealed_password=None,
            kek_label=None,
            version=3,
            rotated_at=now,
            next_rotation_at=now + dt.timedelta(days=30),
            created_at=now,
        )
    )
    document = await report(broker)
    (row,) = [c for c in document["credentials"] if c["name"] == "analytics-reader"]  # type: ignore[attr-defined,index]
    assert row["kind"] == "static-role" and row["owner"] == "analytics"
    assert row["overdue"] is False and row["rotation_due"] is not None
    assert "user analytics" in row["detail"]

    broker.clock.advance(days=31)
    later = await report(broker)
    (row,) = [c for c in later["credentials"] if c["name"] == "analytics-reader"]  # type: ignore[attr-defined,index]
    assert row["overdue"] is True
