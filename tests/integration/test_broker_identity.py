"""Who clients trust, over real gRPC and TLS: the CLI, the SDK and the agent accept a server only
if its certificate is the broker's own (spiffe://<td>/broker/server, pinned through its reserved
DNS name), and the agent takes no bundle, SVID or JWT key that does not chain to what it already
trusts. Impostors are real gRPC servers with the broker's servicer shapes: one holding a
workload SVID with DNS `localhost` (as a permissive CA policy once allowed), one holding the
broker's own serving identity (a stolen key) but answering with a foreign CA ("evilca")."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import os
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import timestamp_pb2

from broker.agent import Agent, FileDelivery
from broker.api._proto import (
    ca_pb2,
    ca_pb2_grpc,
    identity_pb2,
    identity_pb2_grpc,
    secrets_pb2,
    secrets_pb2_grpc,
    workload_pb2,
    workload_pb2_grpc,
)
from broker.api.client.base import BrokerClient, ClientCredentials, ClientError
from broker.api.client.ca import CAClient
from broker.api.client.identity import GrpcBrokerLink
from broker.api.client.sdk import SecretResolver, SecretUnavailable
from broker.api.client.secrets import BrokerSecretSource, SecretsClient
from broker.api.server.serving import AppServer, serve_application
from broker.api.workload import pinned_roots, selectors_of, serve_workload_api
from broker.app import Application
from broker.cli import run
from broker.errors import Unauthenticated
from broker.storage.factory import open_storage
from ca.bundle import TrustBundle
from ca.clock import FakeClock
from ca.jwtsvid import mint_jwt_svid
from ca.keys import SoftwareBackend
from ca.spiffeid import SpiffeId
from ca.x509svid import LeafIssuer, build_intermediate, build_root, server_name
from tests.integration.conftest import OPERATOR_ID, TRUST_DOMAIN, make_config

AGENT_ID = f"spiffe://{TRUST_DOMAIN}/agents/node1"
WEB_ID = f"spiffe://{TRUST_DOMAIN}/acme/dev/web"
SERVER_ID = f"spiffe://{TRUST_DOMAIN}/broker/server"
HOUR = dt.timedelta(hours=1)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _der(*certs: x509.Certificate) -> list[bytes]:
    return [c.public_bytes(serialization.Encoding.DER) for c in certs]


def _ts(when: dt.datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(when)
    return ts


@dataclass
class Broker:
    app: Application
    served: AppServer
    clock: FakeClock

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.served.port}"

    @property
    def attest_address(self) -> str:
        return f"127.0.0.1:{self.served.attest_port}"

    @property
    def bundle_pem(self) -> bytes:
        return self.app.ca.trust_bundle_pem()

    def issue(
        self, spiffe_id: str, dns: list[str] | None = None, ips: bool = False
    ) -> tuple[bytes, bytes]:
        """(chain PEM, key PEM) from the broker's own CA, bypassing CA policy."""
        key = ec.generate_private_key(ec.SECP256R1())
        leaf, issuer = self.app.ca.issue_internal(
            SpiffeId.parse(spiffe_id),
            key.public_key(),
            HOUR,
            dns_names=dns or [],
            ip_addresses=[ipaddress.ip_address("127.0.0.1")] if ips else [],
        )
        return _pem(leaf, issuer), _pem_key(key)

    def operator_client(self) -> BrokerClient:
        chain, key = self.issue(OPERATOR_ID)
        return BrokerClient(self.address, ClientCredentials(chain, key, self.bundle_pem))


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[Broker]:
    config = make_config(tmp_path)
    storage = await open_storage(config.storage.resolved_dsn())
    app = Application(config, SoftwareBackend(), storage, FakeClock(dt.datetime.now(dt.UTC)))
    await app.start()
    served = await serve_application(app)
    assert served.attest_port
    try:
        yield Broker(app, served, app.clock)  # type: ignore[arg-type]
    finally:
        await served.server.stop(grace=None)
        await app.close()


class ForeignCA:
    """The attacker's CA: a root that says it is the trust domain's, CN=evilca."""

    def __init__(self) -> None:
        now = dt.datetime.now(dt.UTC)
        root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = build_root(root_key, TRUST_DOMAIN, now, 24 * HOUR, subject_cn="evilca")
        key = ec.generate_private_key(ec.SECP256R1())
        issuing = build_intermediate(root_key, self.root, key.public_key(), TRUST_DOMAIN, now, HOUR)
        self.issuer = LeafIssuer(key, issuing)
        self.jwt_key = ec.generate_private_key(ec.SECP256R1())

    def issue(self, spiffe_id: str, csr_der: bytes) -> list[bytes]:
        csr = x509.load_der_x509_csr(csr_der)
        now = dt.datetime.now(dt.UTC)
        leaf = self.issuer.issue(csr.public_key(), SpiffeId.parse(spiffe_id), now, HOUR)
        return _der(leaf, self.issuer.certificate)

    def jwks(self) -> bytes:
        return TrustBundle(
            TRUST_DOMAIN, [self.root], {"evil": self.jwt_key.public_key()}, sequence=99
        ).to_jwks_json()


@dataclass
class Impostor:
    """A real gRPC server with the broker's servicer shapes (WorkloadIdentity,
    CertificateAuthority, Secrets) on one port, its "attestation port" on another. Every call
    that reaches it is recorded in `calls`."""

    chain_pem: bytes
    key_pem: bytes
    foreign: ForeignCA
    attest: Callable[[bytes], list[bytes]]  # CSR DER -> chain DER for the agent
    bundle_jwks: bytes
    calls: list[str] = field(default_factory=list)
    port: int = 0
    attest_port: int = 0
    _server: Any = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def attest_address(self) -> str:
        return f"127.0.0.1:{self.attest_port}"

    def start(self) -> None:
        impostor = self

        class Identity(identity_pb2_grpc.WorkloadIdentityServicer):
            def Attest(self, request: Any, context: Any) -> Any:
                impostor.calls.append("Attest")
                chain = impostor.attest(request.csr)
                leaf = x509.load_der_x509_certificate(chain[0])
                return identity_pb2.AgentSVID(
                    spiffe_id=AGENT_ID,
                    cert_chain=chain,
                    expires_at=_ts(leaf.not_valid_after_utc),
                )

            def SyncAgent(self, request: Any, context: Any) -> Any:
                impostor.calls.append("SyncAgent")
                entry = identity_pb2.Entry(
                    id="e-web",
                    spiffe_id=WEB_ID,
                    parent_id=AGENT_ID,
                    selectors=sorted(selectors_of(os.getuid(), os.getgid())),
                )
                return identity_pb2.SyncAgentResponse(
                    entries=[entry],
                    trust_domain=TRUST_DOMAIN,
                    bundle_jwks=impostor.bundle_jwks,
                    bundle_sequence=99,
                )

            def MintEntryX509(self, request: Any, context: Any) -> Any:
                impostor.calls.append("MintEntryX509")
                chain = impostor.foreign.issue(WEB_ID, request.csr)
                leaf = x509.load_der_x509_certificate(chain[0])
                return identity_pb2.EntryX509SVID(
                    spiffe_id=WEB_ID, cert_chain=chain, expires_at=_ts(leaf.not_valid_after_utc)
                )

            def MintEntryJWT(self, request: Any, context: Any) -> Any:
                impostor.calls.append("MintEntryJWT")
                now = dt.datetime.now(dt.UTC)
                svid = mint_jwt_svid(
                    impostor.foreign.jwt_key,
                    SpiffeId.parse(WEB_ID),
                    list(request.audience),
                    now,
                    dt.timedelta(minutes=5),
                    kid="evil",
                )
                return identity_pb2.EntryJWTSVID(
                    spiffe_id=WEB_ID, token=svid.token, expires_at=_ts(svid.expires_at)
                )

        class CA(ca_pb2_grpc.CertificateAuthorityServicer):
            def GetStatus(self, request: Any, context: Any) -> Any:
                impostor.calls.append("GetStatus")
                return ca_pb2.GetStatusResponse(trust_domain=TRUST_DOMAIN, key_backend="evil")

        class Secrets(secrets_pb2_grpc.SecretsServicer):
            def Get(self, request: Any, context: Any) -> Any:
                impostor.calls.append("Get")
                return secrets_pb2.GetSecretResponse(value=b"attacker-chosen", version=1)

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        identity_pb2_grpc.add_WorkloadIdentityServicer_to_server(Identity(), server)
        ca_pb2_grpc.add_CertificateAuthorityServicer_to_server(CA(), server)
        secrets_pb2_grpc.add_SecretsServicer_to_server(Secrets(), server)
        creds = grpc.ssl_server_credentials([(self.key_pem, self.chain_pem)])
        self.port = server.add_secure_port("127.0.0.1:0", creds)
        self.attest_port = server.add_secure_port("127.0.0.1:0", creds)
        server.start()
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(None)


@pytest.fixture
def impostors() -> Iterator[list[Impostor]]:
    started: list[Impostor] = []
    yield started
    for impostor in started:
        impostor.stop()


def _start(impostors: list[Impostor], **kwargs: Any) -> Impostor:
    impostor = Impostor(**kwargs)
    impostor.start()
    impostors.append(impostor)
    return impostor


def _agent(
    target: Any, bundle_pem: bytes, write_dir: Path, join_token: str
) -> tuple[Agent, GrpcBrokerLink]:
    link = GrpcBrokerLink(
        target.address, target.attest_address, bundle_pem, join_token=join_token, timeout=10
    )
    delivery = FileDelivery(write_dir, selectors_of(os.getuid(), os.getgid()))
    agent = Agent(
        link,
        target.clock if isinstance(target, Broker) else FakeClock(dt.datetime.now(dt.UTC)),
        trust_anchors=pinned_roots(bundle_pem),
        delivery=delivery,
    )
    return agent, link


async def _workload_api(agent: Agent, socket_dir: Path) -> dict[str, Any]:
    """What a workload of this uid gets from the agent's Workload API (a real socket): each
    method's first message, or its gRPC status code."""
    endpoint = await serve_workload_api(agent, socket_dir / "agent.sock")
    answers: dict[str, Any] = {}
    channel = grpc.aio.insecure_channel(f"unix:{socket_dir / 'agent.sock'}")
    stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
    header = [("workload.spiffe.io", "true")]
    calls: dict[str, Callable[[], Any]] = {
        "x509": lambda: stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=header),
        "x509-bundles": lambda: stub.FetchX509Bundles(
            workload_pb2.X509BundlesRequest(), metadata=header
        ),
        "jwt-bundles": lambda: stub.FetchJWTBundles(
            workload_pb2.JWTBundlesRequest(), metadata=header
        ),
    }
    try:
        for name, call in calls.items():
            stream = call()
            try:
                answers[name] = await asyncio.wait_for(stream.read(), 10)
            except grpc.aio.AioRpcError as exc:
                answers[name] = exc.code()
            finally:
                stream.cancel()
        try:
            answers["jwt"] = await stub.FetchJWTSVID(
                workload_pb2.JWTSVIDRequest(audience=["db"]), metadata=header, timeout=10
            )
        except grpc.aio.AioRpcError as exc:
            answers["jwt"] = exc.code()
    finally:
        await channel.close()
        await endpoint.stop()
    return answers


def _cli(broker: Broker, server: str, tmp_path: Path, *args: str) -> int:
    chain, key = broker.issue(OPERATOR_ID)
    (tmp_path / "op.pem").write_bytes(chain)
    (tmp_path / "op.key").write_bytes(key)
    (tmp_path / "bundle.pem").write_bytes(broker.bundle_pem)
    return run(
        [
            "--server",
            server,
            "--cert",
            str(tmp_path / "op.pem"),
            "--key",
            str(tmp_path / "op.key"),
            "--bundle",
            str(tmp_path / "bundle.pem"),
            *args,
        ]
    )


async def test_the_serving_certificate_carries_the_brokers_id_and_reserved_name(
    broker: Broker,
) -> None:
    leaf = x509.load_pem_x509_certificates(broker.served.material.chain_pem)[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [SERVER_ID]
    assert server_name(TRUST_DOMAIN) in san.get_values_for_type(x509.DNSName)
    assert server_name(TRUST_DOMAIN) == f"server.broker.{TRUST_DOMAIN}.spiffe.invalid"


async def test_the_real_broker_is_accepted_by_the_cli_the_sdk_and_the_agent(
    broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = broker.operator_client()
    try:
        status = await asyncio.to_thread(CAClient(client).status)
        assert status.trust_domain == TRUST_DOMAIN
        token = await asyncio.to_thread(lambda: identity_client(client).create_join_token(AGENT_ID))
        await asyncio.to_thread(
            lambda: identity_client(client).create_entry(
                WEB_ID, AGENT_ID, sorted(selectors_of(os.getuid(), os.getgid()))
            )
        )
    finally:
        client.close()
    assert await asyncio.to_thread(_cli, broker, broker.address, tmp_path, "ca", "status") == 0
    assert TRUST_DOMAIN in capsys.readouterr().out

    write_dir = tmp_path / "out"
    agent, link = _agent(broker, broker.bundle_pem, write_dir, token.token)
    try:
        await agent.step()
        assert agent.agent_id == AGENT_ID
        [svid] = agent.svids_for(selectors_of(os.getuid(), os.getgid()))
        assert svid.spiffe_id == WEB_ID
        assert (write_dir / "bundle.pem").read_bytes() == broker.bundle_pem
        [jwt_svid] = await agent.jwt_svids(selectors_of(os.getuid(), os.getgid()), ["db"])
        assert agent.validate_jwt(jwt_svid.token, "db")[0] == WEB_ID
    finally:
        link.close()


def identity_client(client: BrokerClient) -> Any:
    from broker.api.client.identity import IdentityClient

    return IdentityClient(client)


async def test_the_ca_never_issues_the_brokers_server_names(broker: Broker) -> None:
    client = broker.operator_client()
    ca = CAClient(client)
    policy = json.loads(broker.app.ca.policy_document().document)
    for rule in policy["rules"]:
        rule.pop("dns_names_allowed", None)
        rule["dns_names"] = ["*"]  # the most permissive policy there is
    try:
        await asyncio.to_thread(ca.set_policy, json.dumps(policy))
        assert await asyncio.to_thread(ca.mint_x509, WEB_ID, None, None, ["web.internal"])
        for name in ("localhost", server_name(TRUST_DOMAIN), "*.example.org.spiffe.invalid"):
            with pytest.raises(ClientError) as info:
                await asyncio.to_thread(ca.mint_x509, WEB_ID, None, None, [name])
            assert info.value.code_name == "PERMISSION_DENIED"
            assert "broker's own server names" in info.value.message
            with pytest.raises(ClientError) as info:
                await asyncio.to_thread(
                    lambda n=name: identity_client(client).create_entry(
                        WEB_ID, AGENT_ID, ["unix:uid:1000"], dns_names=[n]
                    )
                )
            assert info.value.code_name == "PERMISSION_DENIED"
        entries = await asyncio.to_thread(lambda: identity_client(client).list_entries())
        assert entries == []  # nothing was stored
    finally:
        client.close()


async def test_a_workload_svid_with_localhost_posing_as_the_broker_is_refused(
    broker: Broker,
    impostors: list[Impostor],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # As if CA policy had let a workload have DNS:localhost (and the loopback IP): the
    # certificate chains to the real root and names the host every client dials.
    chain, key = broker.issue(WEB_ID, dns=["localhost"], ips=True)
    foreign = ForeignCA()
    impostor = _start(
        impostors,
        chain_pem=chain,
        key_pem=key,
        foreign=foreign,
        attest=lambda csr: foreign.issue(AGENT_ID, csr),
        bundle_jwks=foreign.jwks(),
    )
    op_chain, op_key = broker.issue(OPERATOR_ID)

    # The CLI's client.
    client = BrokerClient(impostor.address, ClientCredentials(op_chain, op_key, broker.bundle_pem))
    with pytest.raises(ClientError) as info:
        await asyncio.to_thread(CAClient(client).status)
    client.close()
    assert info.value.code_name == "UNAVAILABLE"
    assert "not the broker's" in info.value.message

    # The CLI itself: one line on stderr, non-zero exit.
    capsys.readouterr()
    assert await asyncio.to_thread(_cli, broker, impostor.address, tmp_path, "ca", "status") != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not the broker's" in err[0], err

    # The SDK.
    client = BrokerClient(impostor.address, ClientCredentials(op_chain, op_key, broker.bundle_pem))
    sdk = SecretResolver(BrokerSecretSource(SecretsClient(client)))
    with pytest.raises(SecretUnavailable, match="not the broker's"):
        await asyncio.to_thread(sdk.get, "secret://web/prod/key")
    client.close()

    # The agent: attestation port and API port alike.
    write_dir = tmp_path / "agent"
    agent, link = _agent(impostor, broker.bundle_pem, write_dir, "join-token")
    try:
        await agent.step()
    finally:
        link.close()
    assert agent.agent_id is None
    assert agent.snapshot.bundle is None and not agent.snapshot.svids
    assert not write_dir.exists()

    assert impostor.calls == []  # no request ever reached it


async def test_an_impostor_with_the_brokers_identity_cannot_plant_a_foreign_ca(
    broker: Broker, impostors: list[Impostor], tmp_path: Path
) -> None:
    """A stolen serving key passes the TLS check; the agent still serves nothing foreign."""
    chain, key = broker.issue(SERVER_ID, dns=[server_name(TRUST_DOMAIN)])
    foreign = ForeignCA()

    def real_attest(csr_der: bytes) -> list[bytes]:  # relayed to the real CA
        csr = x509.load_der_x509_csr(csr_der)
        leaf, issuer = broker.app.ca.issue_internal(
            SpiffeId.parse(AGENT_ID), csr.public_key(), HOUR
        )
        return _der(leaf, issuer)

    # 1. A bundle holding only the foreign root and the attacker's JWT key.
    impostor = _start(
        impostors,
        chain_pem=chain,
        key_pem=key,
        foreign=foreign,
        attest=real_attest,
        bundle_jwks=foreign.jwks(),
    )
    write_dir = tmp_path / "agent"
    agent, link = _agent(impostor, broker.bundle_pem, write_dir, "join-token")
    try:
        await agent.step()
        assert agent.agent_id == AGENT_ID  # the relayed, genuine agent SVID
        assert "SyncAgent" in impostor.calls
        assert agent.snapshot.bundle is None and not agent.snapshot.svids
        assert "MintEntryX509" not in impostor.calls
        assert [c.subject for c in agent.trust_anchors] == [
            c.subject for c in pinned_roots(broker.bundle_pem)
        ]
        assert not (write_dir / "bundle.pem").exists()
        answers = await _workload_api(agent, tmp_path)
        assert all(isinstance(a, grpc.StatusCode) for a in answers.values()), answers
    finally:
        link.close()

    # 2. The genuine bundle, but SVIDs and JWTs signed by the foreign CA.
    impostor2 = _start(
        impostors,
        chain_pem=chain,
        key_pem=key,
        foreign=foreign,
        attest=real_attest,
        bundle_jwks=broker.app.ca.bundle().jwks,
    )
    agent, link = _agent(impostor2, broker.bundle_pem, write_dir, "join-token")
    selectors = selectors_of(os.getuid(), os.getgid())
    try:
        await agent.step()
        assert "MintEntryX509" in impostor2.calls
        assert agent.snapshot.bundle is not None
        assert b"evilca" not in agent.snapshot.bundle.to_pem()
        assert not agent.snapshot.svids
        with pytest.raises(Exception, match="no valid SVID"):
            agent.svids_for(selectors)
        with pytest.raises(Unauthenticated, match="does not validate"):
            await agent.jwt_svids(selectors, ["db"])
        assert not (write_dir / "svid.pem").exists()
        assert not (write_dir / "bundle.pem").exists()
        answers = await _workload_api(agent, tmp_path)
        assert answers["x509"] == grpc.StatusCode.UNAVAILABLE  # nothing that verifies
        assert answers["x509-bundles"] == grpc.StatusCode.UNAVAILABLE
        assert answers["jwt-bundles"] == grpc.StatusCode.UNAVAILABLE
        assert answers["jwt"] == grpc.StatusCode.UNAUTHENTICATED
    finally:
        link.close()
