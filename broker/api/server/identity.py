"""gRPC servicer for workload identity (broker.v1.WorkloadIdentity): attestation, agent renewal
and sync, entry minting, join tokens, attestors, registration entries, the denylist."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
from cryptography import x509

from broker import metrics
from broker.attestation import attestor_resource, token_fingerprint
from broker.authn import Authenticator
from broker.authority import IssuedX509
from broker.errors import InvalidArgument
from broker.policy import Action
from broker.storage.identity import AttestorRecord, EntryRecord
from broker.workloads import AgentSync, IdentityService

from .._proto import identity_pb2, identity_pb2_grpc
from ..timestamps import to_timestamp
from .attributes import identity_attributes, template_attributes
from .binding import MethodSpec, ServiceBinding
from .pipeline import current_call

if TYPE_CHECKING:
    from broker.app import Application


__all__ = ["IDENTITY_SPECS", "WorkloadIdentityServicer", "binding"]

_SVC = "/broker.v1.WorkloadIdentity/"
# A WatchAgent stream with no change sends a bare keepalive this often (lets the agent tell a
# quiet broker from a dead connection; 5,000 agents make ~80 tiny messages a second).
WATCH_KEEPALIVE_SECONDS = 60.0


def _attest_resource(request: Any) -> str:
    if request.WhichOneof("credential") == "join_token":
        return "join-token:" + token_fingerprint(request.join_token)
    return "jwt:" + token_fingerprint(request.jwt)


IDENTITY_SPECS: dict[str, MethodSpec] = {
    _SVC + "Attest": MethodSpec(Action.ATTEST, _attest_resource, bootstrap=True),
    _SVC + "RenewAgent": MethodSpec(Action.AGENT_RENEW, deferred=True),
    _SVC + "SyncAgent": MethodSpec(Action.AGENT_SYNC, deferred=True),
    # The stream's opening is audited (and its refusal); what it pushes is not (module doc).
    _SVC + "WatchAgent": MethodSpec(Action.AGENT_SYNC, lambda r: r.agent_id[:2100]),
    _SVC + "MintEntryX509": MethodSpec(Action.AGENT_SYNC, lambda r: r.entry_id[:64], deferred=True),
    _SVC + "MintEntryJWT": MethodSpec(Action.AGENT_SYNC, lambda r: r.entry_id[:64], deferred=True),
    # Deferred: a join token for a prod identity is minting it by proxy (second operator).
    _SVC + "CreateJoinToken": MethodSpec(
        Action.TOKEN_CREATE, lambda r: r.spiffe_id[:2100], deferred=True
    ),
    # Deferred, like the two below: an attestor whose template can yield a prod identity, or an
    # entry for one, hands that identity to someone (a second operator must approve).
    _SVC + "AddAttestor": MethodSpec(Action.ATTESTOR_ADMIN, lambda r: r.name[:64], deferred=True),
    _SVC + "ListAttestors": MethodSpec(Action.ATTESTOR_ADMIN),
    _SVC + "RemoveAttestor": MethodSpec(Action.ATTESTOR_ADMIN, lambda r: r.name[:64]),
    _SVC + "CreateEntry": MethodSpec(
        Action.ENTRY_ADMIN, lambda r: r.spiffe_id[:2100], deferred=True
    ),
    _SVC + "ListEntries": MethodSpec(Action.ENTRY_ADMIN),
    _SVC + "GetEntry": MethodSpec(Action.ENTRY_ADMIN, lambda r: r.id[:64]),
    _SVC + "DeleteEntry": MethodSpec(Action.ENTRY_ADMIN, lambda r: r.id[:64]),
    _SVC + "DenySVID": MethodSpec(Action.SVID_DENY, lambda r: r.target[:2100]),
}


def _peer_serial(context: grpc.aio.ServicerContext) -> str | None:
    """The serial (hex) of the verified client certificate, for the denylist."""
    certs = (context.auth_context() or {}).get("x509_pem_cert") or ()
    if not certs:
        return None
    return format(x509.load_pem_x509_certificate(certs[0]).serial_number, "x")


def _agent_svid(issued: IssuedX509) -> identity_pb2.AgentSVID:
    return identity_pb2.AgentSVID(
        spiffe_id=issued.spiffe_id,
        cert_chain=issued.chain_der,
        bundle=issued.bundle_der,
        expires_at=to_timestamp(issued.expires_at),
        serial=issued.serial,
    )


def _entry(e: EntryRecord) -> identity_pb2.Entry:
    return identity_pb2.Entry(
        id=e.id,
        spiffe_id=e.spiffe_id,
        parent_id=e.parent_id,
        selectors=list(e.selectors),
        x509_ttl_seconds=e.x509_ttl,
        jwt_ttl_seconds=e.jwt_ttl,
        dns_names=list(e.dns_names),
        created_at=to_timestamp(e.created_at),
    )


def _sync_message(sync: AgentSync) -> identity_pb2.SyncAgentResponse:
    return identity_pb2.SyncAgentResponse(
        entries=[_entry(e) for e in sync.entries],
        trust_domain=sync.trust_domain,
        bundle_jwks=sync.bundle_jwks,
        bundle_sequence=sync.bundle_sequence,
        crl=list(sync.crl),
        root_cross_certificates=list(sync.root_cross),
    )


def _attestor(a: AttestorRecord) -> identity_pb2.Attestor:
    return identity_pb2.Attestor(
        name=a.name,
        issuer=a.issuer,
        audience=a.audience,
        jwks_json=a.jwks,
        template=a.template,
        algorithms=list(a.algorithms),
        created_at=to_timestamp(a.created_at),
    )


class WorkloadIdentityServicer(identity_pb2_grpc.WorkloadIdentityServicer):  # type: ignore[misc]
    def __init__(
        self, service: IdentityService, authenticator: Authenticator | None = None
    ) -> None:
        self._svc = service
        self._auth = authenticator

    async def Attest(
        self, request: identity_pb2.AttestRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.AgentSVID:
        call = current_call()
        kind = request.WhichOneof("credential")
        if kind == "join_token":
            issued = await self._svc.attest_join_token(
                request.join_token, bytes(request.csr), call.caller
            )
        elif kind == "jwt":
            issued = await self._svc.attest_jwt(request.jwt, bytes(request.csr), call.caller)
        else:
            raise InvalidArgument("attestation needs a join_token or a jwt")
        call.details.update(
            method=kind,
            spiffe_id=issued.spiffe_id,
            serial=issued.serial,
            expires_at=issued.expires_at.isoformat(),
        )
        return _agent_svid(issued)

    async def RenewAgent(
        self, request: identity_pb2.RenewAgentRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.AgentSVID:
        call = current_call()
        call.authorize(call.caller.spiffe_id)
        issued = await self._svc.renew(call.caller, _peer_serial(context) or "", bytes(request.csr))
        call.details.update(serial=issued.serial, expires_at=issued.expires_at.isoformat())
        return _agent_svid(issued)

    async def SyncAgent(
        self, request: identity_pb2.SyncAgentRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.SyncAgentResponse:
        call = current_call()
        call.authorize(call.caller.spiffe_id)
        sync = await self._svc.sync(call.caller, _peer_serial(context))
        call.details.update(entries=len(sync.entries))
        return _sync_message(sync)

    async def WatchAgent(
        self, request: identity_pb2.WatchAgentRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[identity_pb2.SyncAgentResponse]:
        """The agent's sync pushed: the full sync, then a new one on every change the feed
        reports (`broker.syncfeed`) that alters what this agent is told, a keepalive when
        nothing changed for `WATCH_KEEPALIVE_SECONDS`. Ends with PERMISSION_DENIED once the
        agent is denylisted."""
        call = current_call()
        agent = call.caller
        if request.agent_id != agent.spiffe_id:
            raise InvalidArgument("WatchAgent streams the calling agent's own sync only")
        serial = _peer_serial(context)
        feed = self._svc.feed
        feed.subscribers += 1
        metrics.set_agent_streams(feed.subscribers)
        try:
            last: identity_pb2.SyncAgentResponse | None = None
            version = feed.version
            stale = True
            while True:
                if stale:
                    message = _sync_message(await self._svc.sync(agent, serial))
                    if message != last:
                        last = message
                        yield message
                seen = await feed.wait(version, WATCH_KEEPALIVE_SECONDS)
                stale = seen != version
                version = seen
                if not stale:
                    yield identity_pb2.SyncAgentResponse(keepalive=True)
        finally:
            feed.subscribers -= 1
            metrics.set_agent_streams(feed.subscribers)

    async def MintEntryX509(
        self, request: identity_pb2.MintEntryX509Request, context: grpc.aio.ServicerContext
    ) -> identity_pb2.EntryX509SVID:
        call = current_call()
        issued = await self._svc.mint_entry_x509(
            request.entry_id, bytes(request.csr), call.caller, call.authorize, _peer_serial(context)
        )
        call.details.update(
            spiffe_id=issued.spiffe_id,
            serial=issued.serial,
            expires_at=issued.expires_at.isoformat(),
        )
        return identity_pb2.EntryX509SVID(
            spiffe_id=issued.spiffe_id,
            cert_chain=issued.chain_der,
            bundle=issued.bundle_der,
            expires_at=to_timestamp(issued.expires_at),
            serial=issued.serial,
        )

    async def MintEntryJWT(
        self, request: identity_pb2.MintEntryJWTRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.EntryJWTSVID:
        call = current_call()
        token = await self._svc.mint_entry_jwt(
            request.entry_id,
            tuple(request.audience),
            call.caller,
            call.authorize,
            _peer_serial(context),
        )
        call.details.update(
            spiffe_id=token.spiffe_id,
            audience=list(request.audience)[:16],
            expires_at=token.expires_at.isoformat(),
            kid=token.kid,
        )
        return identity_pb2.EntryJWTSVID(
            spiffe_id=token.spiffe_id, token=token.token, expires_at=to_timestamp(token.expires_at)
        )

    async def CreateJoinToken(
        self, request: identity_pb2.CreateJoinTokenRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.CreateJoinTokenResponse:
        current_call().authorize(
            request.spiffe_id[:2100], identity_attributes(self._auth, request.spiffe_id)
        )
        ttl = dt.timedelta(seconds=request.ttl_seconds) if request.HasField("ttl_seconds") else None
        token, sid, expires = await self._svc.create_join_token(request.spiffe_id, ttl)
        current_call().details.update(
            token=token_fingerprint(token), expires_at=expires.isoformat()
        )
        return identity_pb2.CreateJoinTokenResponse(
            token=token, spiffe_id=sid, expires_at=to_timestamp(expires)
        )

    async def AddAttestor(
        self, request: identity_pb2.Attestor, context: grpc.aio.ServicerContext
    ) -> identity_pb2.Attestor:
        call = current_call()
        call.authorize(request.name[:64])  # who may administer attestors at all, before parsing

        async def authorize(a: AttestorRecord) -> None:
            resource = attestor_resource(
                a.name, a.issuer, a.audience, a.jwks, a.template, a.algorithms
            )
            call.authorize(resource, template_attributes(self._auth, a.template))
            await call.settle()

        record = await self._svc.add_attestor(
            request.name,
            request.issuer,
            request.audience,
            request.jwks_json,
            request.template,
            tuple(request.algorithms),
            authorize=authorize,
        )
        return _attestor(record)

    async def ListAttestors(
        self, request: identity_pb2.ListAttestorsRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.ListAttestorsResponse:
        return identity_pb2.ListAttestorsResponse(
            attestors=[_attestor(a) for a in await self._svc.list_attestors()]
        )

    async def RemoveAttestor(
        self, request: identity_pb2.RemoveAttestorRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.RemoveAttestorResponse:
        await self._svc.remove_attestor(request.name)
        return identity_pb2.RemoveAttestorResponse()

    async def CreateEntry(
        self, request: identity_pb2.Entry, context: grpc.aio.ServicerContext
    ) -> identity_pb2.Entry:
        call = current_call()
        call.authorize(request.spiffe_id[:2100])  # who may administer entries at all

        async def authorize(e: EntryRecord) -> None:
            call.details.update(parent_id=e.parent_id)
            call.authorize(e.spiffe_id, identity_attributes(self._auth, e.spiffe_id))
            await call.settle()

        entry = await self._svc.create_entry(
            spiffe_id=request.spiffe_id,
            parent_id=request.parent_id,
            selectors=tuple(request.selectors),
            x509_ttl=request.x509_ttl_seconds,
            jwt_ttl=request.jwt_ttl_seconds,
            dns_names=tuple(request.dns_names),
            authorize=authorize,
        )
        call.details.update(entry_id=entry.id)
        return _entry(entry)

    async def ListEntries(
        self, request: identity_pb2.ListEntriesRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.ListEntriesResponse:
        entries = await self._svc.list_entries(request.parent_id or None)
        return identity_pb2.ListEntriesResponse(entries=[_entry(e) for e in entries])

    async def GetEntry(
        self, request: identity_pb2.GetEntryRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.Entry:
        return _entry(await self._svc.get_entry(request.id))

    async def DeleteEntry(
        self, request: identity_pb2.DeleteEntryRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.DeleteEntryResponse:
        await self._svc.delete_entry(request.id)
        return identity_pb2.DeleteEntryResponse()

    async def DenySVID(
        self, request: identity_pb2.DenySVIDRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.DenySVIDResponse:
        record = await self._svc.deny(request.target)
        return identity_pb2.DenySVIDResponse(kind=record.kind, value=record.value)


def binding(app: Application) -> ServiceBinding:
    return ServiceBinding(
        identity_pb2.DESCRIPTOR.services_by_name["WorkloadIdentity"],
        identity_pb2_grpc.add_WorkloadIdentityServicer_to_server,
        WorkloadIdentityServicer(app.workloads, app.authenticator),
        IDENTITY_SPECS,
    )
