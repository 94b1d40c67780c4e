"""gRPC servicer for access control (broker.v1.Access): the Rego policy, just-in-time grants,
two-party approvals and break-glass credentials."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import grpc

from broker.access import AccessControl
from broker.authn import Authenticator
from broker.errors import InvalidArgument
from broker.policy import Action, Decision
from broker.storage.access import ApprovalRecord, BreakGlassRecord, GrantRecord
from ca.clock import Clock
from ca.errors import CAError
from ca.spiffeid import SpiffeId

from .._proto import access_pb2, access_pb2_grpc
from ..timestamps import to_timestamp
from .binding import MethodSpec, ServiceBinding
from .pipeline import current_call

if TYPE_CHECKING:
    from broker.app import Application
    from broker.authority import CAService


__all__ = ["ACCESS_SPECS", "AccessServicer", "binding"]

_SVC = "/broker.v1.Access/"
_MAX_INPUT = 64 * 1024

ACCESS_SPECS: dict[str, MethodSpec] = {
    _SVC + "SetRegoPolicy": MethodSpec(Action.POLICY_SET, lambda r: "rego"),
    _SVC + "GetRegoPolicy": MethodSpec(Action.POLICY_GET, lambda r: "rego"),
    _SVC + "TestPolicy": MethodSpec(Action.POLICY_TEST, lambda r: "rego"),
    _SVC + "CreateGrant": MethodSpec(Action.GRANT_CREATE, lambda r: r.grantee[:2100]),
    _SVC + "ListGrants": MethodSpec(Action.GRANT_LIST),
    _SVC + "RevokeGrant": MethodSpec(Action.GRANT_REVOKE, lambda r: r.id[:64]),
    _SVC + "RequestApproval": MethodSpec(Action.APPROVAL_REQUEST, lambda r: r.resource[:2100]),
    _SVC + "Approve": MethodSpec(Action.APPROVAL_APPROVE, lambda r: r.id[:64]),
    _SVC + "ListApprovals": MethodSpec(Action.APPROVAL_LIST),
    _SVC + "IssueBreakGlass": MethodSpec(
        Action.BREAK_GLASS, lambda r: r.approval_id[:64], deferred=True
    ),
    _SVC + "ListBreakGlass": MethodSpec(Action.BREAK_GLASS_LIST),
    _SVC + "RevokeBreakGlass": MethodSpec(Action.BREAK_GLASS_REVOKE, lambda r: r.id[:64]),
}


def _grant(g: GrantRecord, now: dt.datetime) -> access_pb2.Grant:
    state = "revoked" if g.revoked_at else ("active" if now < g.expires_at else "expired")
    return access_pb2.Grant(
        id=g.id,
        grantee=g.grantee,
        action=g.action,
        resource=g.resource,
        justification=g.justification,
        created_by=g.created_by,
        created_at=to_timestamp(g.created_at),
        expires_at=to_timestamp(g.expires_at),
        revoked_at=to_timestamp(g.revoked_at),
        revoked_by=g.revoked_by or "",
        state=state,
    )


def _approval(a: ApprovalRecord, now: dt.datetime) -> access_pb2.Approval:
    return access_pb2.Approval(
        id=a.id,
        requester=a.requester,
        action=a.action,
        resource=a.resource,
        justification=a.justification,
        created_at=to_timestamp(a.created_at),
        expires_at=to_timestamp(a.expires_at),
        approved_by=a.approved_by or "",
        approved_at=to_timestamp(a.approved_at),
        used_at=to_timestamp(a.used_at),
        state=a.state(now),
    )


def _breakglass(b: BreakGlassRecord, now: dt.datetime) -> access_pb2.BreakGlass:
    return access_pb2.BreakGlass(
        id=b.id,
        operator=b.operator,
        approval_id=b.approval_id,
        spiffe_id=b.spiffe_id,
        action=b.action,
        resource=b.resource,
        issued_at=to_timestamp(b.issued_at),
        expires_at=to_timestamp(b.expires_at),
        used_at=to_timestamp(b.used_at),
        revoked_at=to_timestamp(b.revoked_at),
        state=b.state(now),
    )


def _decision(decision: Decision, document: Mapping[str, Any]) -> access_pb2.TestPolicyResponse:
    return access_pb2.TestPolicyResponse(
        allowed=decision.allowed,
        rule=decision.rule,
        reason=decision.reason,
        flags=dict(decision.flags),
        input_json=json.dumps(document, sort_keys=True),
    )


class AccessServicer(access_pb2_grpc.AccessServicer):  # type: ignore[misc]
    def __init__(
        self, access: AccessControl, ca: CAService, auth: Authenticator, clock: Clock
    ) -> None:
        self._access = access
        self._ca = ca
        self._auth = auth
        self._clock = clock

    def _now(self) -> dt.datetime:
        return self._clock.now()

    async def SetRegoPolicy(
        self, request: access_pb2.SetRegoPolicyRequest, context: grpc.aio.ServicerContext
    ) -> access_pb2.SetRegoPolicyResponse:
        call = current_call()
        version = await self._access.set_policy(dict(request.modules), call.caller)
        call.details.update(version=version, modules=sorted(request.modules))
        return access_pb2.SetRegoPolicyResponse(version=version)

    async def GetRegoPolicy(
        self, request: access_pb2.GetRegoPolicyRequest, context: grpc.aio.ServicerContext
    ) -> access_pb2.GetRegoPolicyResponse:
        view = self._access.policy()
        return access_pb2.GetRegoPolicyResponse(
            version=view.version,
            modules=dict(view.modules),
            author=view.author,
            updated_at=to_timestamp(view.updated_at),
        )

    async def TestPolicy(
        self, request: access_pb2.TestPolicyRequest, context: grpc.aio.ServicerContext
    ) -> access_pb2.TestPolicyResponse:
        if len(request.input_json) > _MAX_INPUT:
            raise InvalidArgument(f"the test input is larger than {_MAX_INPUT} bytes")
        try:
            document = json.loads(request.input_json)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"the test input is not valid JSON: {exc.msg}") from None
        if not isinstance(document, dict):
            raise InvalidArgument("the test input must be a JSON object")
        modules = dict(request.modules) or None
        caller = document.get("caller")
        if isinstance(caller, str):
            return self._test_request(document, caller, modules)
        return _decision(self._access.test(document, modules), document)

    def _test_request(
        self, document: Mapping[str, Any], caller_id: str, modules: Mapping[str, str] | None
    ) -> access_pb2.TestPolicyResponse:
        try:
            caller = self._auth.caller_for_id(SpiffeId.parse(caller_id))
        except CAError as exc:
            raise InvalidArgument(f"caller: {exc}") from None
        action = document.get("action")
        if not isinstance(action, str) or not action:
            raise InvalidArgument("the test input needs an 'action' string")
        resource = document.get("resource", "")
        attributes = document.get("attributes") or {}
        if isinstance(resource, dict):
            attributes = {k: v for k, v in resource.items() if k != "name"} | attributes
            resource = resource.get("name", "")
        if not isinstance(resource, str) or not isinstance(attributes, dict):
            raise InvalidArgument(
                "'resource' must be a string or an object, 'attributes' an object"
            )
        attrs = {str(k): str(v) for k, v in attributes.items()}
        context = {str(k): str(v) for k, v in (document.get("context") or {}).items()}
        full = self._access.policy_input(caller, action, resource, attrs, context)
        return _decision(self._access.test(full, modules), full)

    async def CreateGrant(
        self, request: access_pb2.CreateGrantRequest, context: grpc.aio.ServicerContext
    ) -> access_pb2.Grant:
        call = current_call()
        grant = await self._access.create_grant(
            call.caller,
            request.grantee,
            request.action,
            request.resource,
            dt.timedelta(seconds=request.ttl_seconds),
            request.justification or call.justification,
        )
        call.details.update(
            grant=grant.id,
            action=grant.action,
            granted_resource=grant.resource,
            expires_at=grant.expires_at.isoformat(),
        )
        return _grant(grant, self._now())

    async def ListGrants(
        self, request: access_pb2.ListGrantsRequest, context: grpc.aio.ServicerContext
    ) -> access_pb2.ListGrantsResponse:
        grants = await self._access.list_grants(include_inactive=request.all)
        now = self._now()
        return access_pb2.ListGrantsResponse(grants=[_grant(g, now) for g in grants])

    async def RevokeGrant(
        self, request: access_pb2.RevokeGrantRequest, context: grpc.aio.ServicerContext
    ) -> access_pb2.Grant:
        grant = await self._access.revoke_grant(request.id, current_call().caller)
        return _grant(grant, self._now())

    async def RequestApproval(
        self, request: access_pb2.RequestApprovalRequest, context: grpc.aio.ServicerContext
    ) -> access_pb2.Approval:
        call = current_call()
        approval = await self._access.request_approval(
            call.caller,
            request.action,
            request.resource,
            request.justification or call.justification,
        )
        call.details.update(approval=approval.id, action=approval.action)
        return _approval(approval, self._now())

    async def Approve(
        self, request: access_pb2.ApproveRequest, context: grpc.aio.ServicerContext
    ) -> access_pb2.Approval:
        call = current_call()
        approval = await self._access.approve(request.id, call.caller)
        call.details.update(
            approval=approval.id, requester=approval.requester, action=approval.action
        )
        return _approval(approval, self._now())

    async def ListApprovals(
        self, request: access_pb2.ListApprovalsRequest, context: grpc.aio.ServicerContext
    ) -> access_pb2.ListApprovalsResponse:
        approvals = await self._access.list_approvals(include_inactive=request.all)
        now = self._now()
        return access_pb2.ListApprovalsResponse(approvals=[_approval(a, now) for a in approvals])

    async def IssueBreakGlass(
        self, request: access_pb2.IssueBreakGlassRequest, context: grpc.aio.ServicerContext
    ) -> access_pb2.IssueBreakGlassResponse:
        call = current_call()
        ttl = dt.timedelta(seconds=request.ttl_seconds or 3600)
        issued = await self._access.issue_breakglass_credential(
            call.caller, request.approval_id, ttl, call.authorize, self._ca
        )
        record = issued.record
        call.details.update(breakglass=record.id, expires_at=record.expires_at.isoformat())
        call.details["flags"] = {"breakglass": record.id}
        return access_pb2.IssueBreakGlassResponse(
            record=_breakglass(record, self._now()),
            cert_chain=list(issued.cert_chain_der),
            private_key=issued.private_key_der,
            bundle=list(issued.bundle_der),
        )

    async def ListBreakGlass(
        self, request: access_pb2.ListBreakGlassRequest, context: grpc.aio.ServicerContext
    ) -> access_pb2.ListBreakGlassResponse:
        records = await self._access.list_breakglass(include_inactive=request.all)
        now = self._now()
        return access_pb2.ListBreakGlassResponse(records=[_breakglass(b, now) for b in records])

    async def RevokeBreakGlass(
        self, request: access_pb2.RevokeBreakGlassRequest, context: grpc.aio.ServicerContext
    ) -> access_pb2.BreakGlass:
        record = await self._access.revoke_breakglass(request.id)
        return _breakglass(record, self._now())


def binding(app: Application) -> ServiceBinding:
    return ServiceBinding(
        access_pb2.DESCRIPTOR.services_by_name["Access"],
        access_pb2_grpc.add_AccessServicer_to_server,
        AccessServicer(app.access, app.ca, app.authenticator, app.clock),
        ACCESS_SPECS,
    )
