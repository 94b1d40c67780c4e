"""A synchronous client for the Access service (Rego policy, grants, approvals, break-glass),
over a `BrokerClient`'s mTLS channel. Every method returns plain Python values; failures raise
`broker.api.client.ClientError`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from broker.api._proto import access_pb2, access_pb2_grpc
from broker.api.client.base import FeatureClient, Transport
from broker.api.client.records import record_from
from broker.api.timestamps import optional_datetime

__all__ = [
    "AccessClient",
    "ApprovalView",
    "BreakGlassCredential",
    "BreakGlassView",
    "GrantView",
    "PolicyDecision",
    "RegoPolicy",
]


@dataclass(frozen=True)
class RegoPolicy:
    version: int
    modules: dict[str, str]
    author: str
    updated_at: datetime | None


@dataclass(frozen=True)
class PolicyDecision:
    allowed: bool
    rule: str
    reason: str
    flags: dict[str, str]
    input: dict[str, Any]


@dataclass(frozen=True)
class GrantView:
    id: str
    grantee: str
    action: str
    resource: str
    justification: str
    created_by: str
    created_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None
    revoked_by: str
    state: str


@dataclass(frozen=True)
class ApprovalView:
    id: str
    requester: str
    action: str
    resource: str
    justification: str
    created_at: datetime | None
    expires_at: datetime | None
    approved_by: str
    approved_at: datetime | None
    used_at: datetime | None
    state: str


@dataclass(frozen=True)
class BreakGlassView:
    id: str
    operator: str
    approval_id: str
    spiffe_id: str
    action: str
    resource: str
    issued_at: datetime | None
    expires_at: datetime | None
    used_at: datetime | None
    revoked_at: datetime | None
    state: str


@dataclass(frozen=True)
class BreakGlassCredential:
    record: BreakGlassView
    cert_chain: list[bytes]  # DER, leaf first
    private_key: bytes  # PKCS#8 DER
    bundle: list[bytes]  # DER roots


def _grant(g: access_pb2.Grant) -> GrantView:
    return record_from(GrantView, g)


def _approval(a: access_pb2.Approval) -> ApprovalView:
    return record_from(ApprovalView, a)


def _breakglass(b: access_pb2.BreakGlass) -> BreakGlassView:
    return record_from(BreakGlassView, b)


class AccessClient(FeatureClient):
    def __init__(self, transport: Transport) -> None:
        super().__init__(transport)
        self._stub = access_pb2_grpc.AccessStub(transport.channel)

    def set_rego_policy(self, modules: Mapping[str, str]) -> int:
        request = access_pb2.SetRegoPolicyRequest(modules=dict(modules))
        return int(self._call(self._stub.SetRegoPolicy, request).version)

    def get_rego_policy(self) -> RegoPolicy:
        r = self._call(self._stub.GetRegoPolicy, access_pb2.GetRegoPolicyRequest())
        return RegoPolicy(
            int(r.version), dict(r.modules), r.author, optional_datetime(r, "updated_at")
        )

    def test_policy(
        self, document: Mapping[str, Any], modules: Mapping[str, str] | None = None
    ) -> PolicyDecision:
        request = access_pb2.TestPolicyRequest(
            input_json=json.dumps(document), modules=dict(modules or {})
        )
        r = self._call(self._stub.TestPolicy, request)
        return PolicyDecision(
            r.allowed, r.rule, r.reason, dict(r.flags), json.loads(r.input_json or "{}")
        )

    def create_grant(
        self, grantee: str, action: str, resource: str, ttl_seconds: int, justification: str
    ) -> GrantView:
        request = access_pb2.CreateGrantRequest(
            grantee=grantee,
            action=action,
            resource=resource,
            ttl_seconds=ttl_seconds,
            justification=justification,
        )
        return _grant(self._call(self._stub.CreateGrant, request))

    def list_grants(self, include_inactive: bool = False) -> list[GrantView]:
        r = self._call(self._stub.ListGrants, access_pb2.ListGrantsRequest(all=include_inactive))
        return [_grant(g) for g in r.grants]

    def revoke_grant(self, grant_id: str) -> GrantView:
        return _grant(
            self._call(self._stub.RevokeGrant, access_pb2.RevokeGrantRequest(id=grant_id))
        )

    def request_approval(self, action: str, resource: str, justification: str) -> ApprovalView:
        request = access_pb2.RequestApprovalRequest(
            action=action, resource=resource, justification=justification
        )
        return _approval(self._call(self._stub.RequestApproval, request))

    def approve(self, approval_id: str) -> ApprovalView:
        return _approval(self._call(self._stub.Approve, access_pb2.ApproveRequest(id=approval_id)))

    def list_approvals(self, include_inactive: bool = False) -> list[ApprovalView]:
        request = access_pb2.ListApprovalsRequest(all=include_inactive)
        return [_approval(a) for a in self._call(self._stub.ListApprovals, request).approvals]

    def issue_breakglass(self, approval_id: str, ttl_seconds: int) -> BreakGlassCredential:
        request = access_pb2.IssueBreakGlassRequest(
            approval_id=approval_id, ttl_seconds=ttl_seconds
        )
        r = self._call(self._stub.IssueBreakGlass, request)
        return BreakGlassCredential(
            _breakglass(r.record), list(r.cert_chain), bytes(r.private_key), list(r.bundle)
        )

    def list_breakglass(self, include_inactive: bool = False) -> list[BreakGlassView]:
        request = access_pb2.ListBreakGlassRequest(all=include_inactive)
        return [_breakglass(b) for b in self._call(self._stub.ListBreakGlass, request).records]

    def revoke_breakglass(self, record_id: str) -> BreakGlassView:
        request = access_pb2.RevokeBreakGlassRequest(id=record_id)
        return _breakglass(self._call(self._stub.RevokeBreakGlass, request))
