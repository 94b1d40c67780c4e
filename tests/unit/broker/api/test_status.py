"""The one place errors become status codes: storage texts stay on the server (finding 14)."""

import logging

import grpc
import pytest

from broker.api.status import to_status
from broker.errors import AlreadyExists, StorageConflict, StorageError


def test_a_uniqueness_conflict_is_already_exists_without_the_driver_text(
    caplog: pytest.LogCaptureFixture,
) -> None:
    exc = StorageConflict("sqlite: UNIQUE constraint failed: attestors.issuer")
    with caplog.at_level(logging.INFO, logger="broker.api.status"):
        code, message = to_status(exc, "cid-1")
    assert code is grpc.StatusCode.ALREADY_EXISTS
    assert "already exists" in message and "cid-1" in message
    assert "UNIQUE" not in message and "attestors" not in message
    assert any("attestors.issuer" in r.getMessage() for r in caplog.records)  # for operators


def test_a_storage_failure_is_unavailable_without_the_driver_text() -> None:
    exc = StorageError("postgresql (postgresql://broker@db/x): ConnectionRefusedError: ...")
    code, message = to_status(exc, "cid-2")
    assert code is grpc.StatusCode.UNAVAILABLE
    assert "storage" in message and "retry" in message and "cid-2" in message
    assert "postgresql" not in message and "db" not in message.split("correlation")[0]


def test_domain_messages_still_reach_the_client() -> None:
    code, message = to_status(AlreadyExists("role 'ro' already exists"), "cid-3")
    assert (code, message) == (grpc.StatusCode.ALREADY_EXISTS, "role 'ro' already exists")


def test_unknown_exceptions_are_internal_with_a_generic_message() -> None:
    code, message = to_status(RuntimeError("boom: /etc/secret path"), "cid-4")
    assert code is grpc.StatusCode.INTERNAL
    assert message == "internal error; correlation id cid-4"


def test_no_writable_primary_is_unavailable_with_a_retry_after_hint() -> None:
    """Issue 19: a failover longer than the storage's wait is UNAVAILABLE and says when to
    come back, without the driver's text (hosts, ports) reaching the client."""
    from broker.errors import StorageCommitUnknown, StorageUnavailable

    exc = StorageUnavailable(
        "postgresql (postgresql://broker@db1:5432,db2:5432/x): no writable primary within 5 s",
        retry_after=5.0,
    )
    code, message = to_status(exc, "cid-9")
    assert code is grpc.StatusCode.UNAVAILABLE
    assert "retry after 5 s" in message and "cid-9" in message
    assert "db1" not in message and "5432" not in message
    lost = StorageCommitUnknown("postgresql (postgresql://broker@db1:5432/x): lost in COMMIT")
    code, message = to_status(lost, "cid-10")
    assert code is grpc.StatusCode.UNAVAILABLE and "db1" not in message
