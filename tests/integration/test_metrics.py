"""Request metrics through the real pipeline (in process, mTLS): every unary RPC is counted
by method and status code in broker_rpc_duration_seconds, refusals included; audit writes and
forced rotations are timed."""

from __future__ import annotations

import grpc
import pytest
from prometheus_client import REGISTRY

from broker.api._proto import ca_pb2

from .conftest import OTHER_WORKLOAD_ID, WORKLOAD_ID, BrokerHarness

TIMEOUT = 10.0
MINT_JWT = "/broker.v1.CertificateAuthority/MintJWTSVID"
ROTATE = "/broker.v1.CertificateAuthority/Rotate"


def _count(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_rpcs_are_measured_by_method_and_outcome(broker: BrokerHarness) -> None:
    ok0 = _count("broker_rpc_duration_seconds_count", method=MINT_JWT, code="OK")
    denied0 = _count("broker_rpc_duration_seconds_count", method=MINT_JWT, code="PERMISSION_DENIED")
    audit0 = _count("broker_audit_write_duration_seconds_count", outcome="ok")

    ca = broker.ca(broker.identity(WORKLOAD_ID))
    for _ in range(3):
        await ca.MintJWTSVID(
            ca_pb2.MintJWTSVIDRequest(spiffe_id=WORKLOAD_ID, audience=["db"]), timeout=TIMEOUT
        )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await ca.MintJWTSVID(
            ca_pb2.MintJWTSVIDRequest(spiffe_id=OTHER_WORKLOAD_ID, audience=["db"]),
            timeout=TIMEOUT,
        )
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED

    assert _count("broker_rpc_duration_seconds_count", method=MINT_JWT, code="OK") == ok0 + 3
    assert (
        _count("broker_rpc_duration_seconds_count", method=MINT_JWT, code="PERMISSION_DENIED")
        == denied0 + 1
    )
    # every one of the four was audited (the refusal too) and each write was timed
    assert _count("broker_audit_write_duration_seconds_count", outcome="ok") >= audit0 + 4


async def test_forced_rotation_is_timed_with_its_outcome(broker: BrokerHarness) -> None:
    before = _count(
        "broker_ca_rotation_duration_seconds_count", trigger="forced", outcome="rotated"
    )
    resp = await broker.ca().Rotate(ca_pb2.RotateRequest(force=True), timeout=TIMEOUT)
    assert resp.actions
    assert (
        _count("broker_ca_rotation_duration_seconds_count", trigger="forced", outcome="rotated")
        == before + 1
    )
    assert _count("broker_rpc_duration_seconds_count", method=ROTATE, code="OK") >= 1
