"""`broker agent` end to end: a broker subprocess, an agent subprocess attested with a join token
or a JWT, and ordinary SPIFFE clients (py-spiffe) reading the Workload API from its socket."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from spiffe import JwtSvid, WorkloadApiClient, X509Source
from spiffe._proto import workload_pb2, workload_pb2_grpc

from tests.e2e import conftest as e2e
from tests.e2e.conftest import BrokerCli, BrokerProcess

pytestmark = pytest.mark.e2e

TD = "broker.local"  # the trust domain of `broker serve --dev`
READY_TIMEOUT = 30.0
_ATTEST = re.compile(r"attestation on (\S+?):(\d+)\)")


def attest_address(server: BrokerProcess) -> str:
    match = _ATTEST.search(server.listening_line)
    assert match, server.listening_line
    return f"{match.group(1)}:{match.group(2)}"


class AgentProcess:
    """`broker agent` as a subprocess; `start()` returns once it printed its serving line."""

    def __init__(
        self,
        server: BrokerProcess,
        socket_dir: Path,
        log_dir: Path,
        *args: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.server = server
        self.extra_env = env or {}
        self.socket = socket_dir / "agent.sock"
        self.log_dir = log_dir
        self.args = args
        self.line = ""
        self.startup_seconds = 0.0
        self._process: subprocess.Popen[str] | None = None
        self._stderr: IO[str] | None = None

    def start(self) -> None:
        self._stderr = open(self.log_dir / "agent.stderr", "a")  # noqa: SIM115
        started = time.perf_counter()
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "broker.cli",
                "agent",
                "--server",
                self.server.address,
                "--attest-server",
                attest_address(self.server),
                "--bundle",
                str(self.server.data_dir / "bundle.pem"),
                "--socket",
                str(self.socket),
                "--sync-interval",
                "0.5",
                *self.args,
            ],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            stdin=subprocess.DEVNULL,
            text=True,
            env={
                **{k: v for k, v in os.environ.items() if not k.startswith("BROKER_")},
                **self.extra_env,
            },
        )
        lines: queue.Queue[str | None] = queue.Queue()
        stdout = self._process.stdout
        assert stdout is not None

        def pump() -> None:
            for line in stdout:
                lines.put(line.rstrip("\n"))
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        try:
            line = lines.get(timeout=READY_TIMEOUT)
        except queue.Empty:
            line = None
        self.startup_seconds = time.perf_counter() - started
        if line is None or "serving the Workload API" not in line:
            self.stop()
            pytest.fail(f"agent did not start: {line!r}; stderr:\n{self.stderr_text()}")
        self.line = line

    def stderr_text(self) -> str:
        path = self.log_dir / "agent.stderr"
        return path.read_text(errors="replace") if path.exists() else ""

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"

    def stop(self) -> None:
        if self._process is not None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            if self._process.stdout is not None:
                self._process.stdout.close()
            self._process = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A directory other users can traverse (tmp_path is 0700), for the uid test."""
    path = Path(tempfile.mkdtemp(prefix="agent-sock-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        agent.stop()


def _entry(cli: BrokerCli, spiffe_id: str, parent: str, *extra: str) -> dict[str, Any]:
    result = cli.ok(
        "entry", "create", "--spiffe-id", spiffe_id, "--parent-id", parent, *extra,
        "--output", "json",
    )  # fmt: skip
    return dict(result.json())


def _join_agent(
    cli: BrokerCli, socket_dir: Path, tmp_path: Path, agents: list[AgentProcess], name: str,
    *args: str,
) -> AgentProcess:  # fmt: skip
    token = cli.ok("token", "create", "--spiffe-id", f"spiffe://{TD}/agents/{name}").stdout.strip()
    # The token in the environment, not on the command line (where `ps` would show it).
    agent = AgentProcess(cli.server, socket_dir, tmp_path, *args, env={"BROKER_JOIN_TOKEN": token})
    agents.append(agent)
    agent.start()
    return agent


def test_a_workload_gets_every_kind_of_svid_through_py_spiffe(
    broker_cli: BrokerCli, socket_dir: Path, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    web = f"spiffe://{TD}/acme/dev/web"
    _entry(broker_cli, web, f"spiffe://{TD}/agents/node-a", "--selector", f"unix:uid:{os.getuid()}")
    out = tmp_path / "files"
    agent = _join_agent(broker_cli, socket_dir, tmp_path, agents, "node-a", "--write-dir", str(out))
    assert f"spiffe://{TD}/agents/node-a" in agent.line
    assert agent.startup_seconds < 30  # the benchmark measures the figure; this is a sanity bound

    with WorkloadApiClient(agent.endpoint) as client:
        svid = client.fetch_x509_svid()
        assert str(svid.spiffe_id) == web
        assert svid.leaf.public_key() == svid.private_key.public_key()
        bundles = client.fetch_x509_bundles()
        bundle = bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
        assert bundle is not None
        roots = list(bundle.x509_authorities)
        store = x509.verification.Store(roots)
        builder = x509.verification.PolicyBuilder().store(store)
        verifier = builder.build_client_verifier()
        verifier.verify(svid.leaf, list(svid.cert_chain[1:]))  # raises if it does not chain

        jwt_svid = client.fetch_jwt_svid(audience={"db"})
        assert str(jwt_svid.spiffe_id) == web
        jwt_bundles = client.fetch_jwt_bundles()
        jwt_bundle = jwt_bundles.get_bundle_for_trust_domain(jwt_svid.spiffe_id.trust_domain)
        assert jwt_bundle is not None
        parsed = JwtSvid.parse_and_validate(jwt_svid.token, jwt_bundle, {"db"})
        assert str(parsed.spiffe_id) == web
        validated = client.validate_jwt_svid(jwt_svid.token, "db")
        assert str(validated.spiffe_id) == web
        with pytest.raises(Exception, match="audience"):
            client.validate_jwt_svid(jwt_svid.token, "someone-else")

    assert stat.S_IMODE(os.stat(out / "key.pem").st_mode) == 0o600
    leaf = x509.load_pem_x509_certificates((out / "svid.pem").read_bytes())[0]
    key = serialization.load_pem_private_key((out / "key.pem").read_bytes(), None)
    assert leaf.public_key() == key.public_key()  # type: ignore[union-attr]
    assert (out / "bundle.pem").read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")


def _raw_stub(agent: AgentProcess) -> tuple[grpc.Channel, Any]:
    channel = grpc.insecure_channel(f"unix:{agent.socket}")
    return channel, workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)


def test_the_security_header_is_required_and_unknown_rpcs_are_unimplemented(
    broker_cli: BrokerCli, socket_dir: Path, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    _entry(
        broker_cli, f"spiffe://{TD}/acme/dev/hdr", f"spiffe://{TD}/agents/node-h",
        "--selector", f"unix:uid:{os.getuid()}",
    )  # fmt: skip
    agent = _join_agent(broker_cli, socket_dir, tmp_path, agents, "node-h")
    channel, stub = _raw_stub(agent)
    with channel:
        with pytest.raises(grpc.RpcError) as err:
            stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["x"]), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "security header" in (err.value.details() or "")
        with pytest.raises(grpc.RpcError) as err:
            next(iter(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), timeout=10)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        header = [("workload.spiffe.io", "true")]
        response = stub.FetchJWTSVID(
            workload_pb2.JWTSVIDRequest(audience=["x"]), metadata=header, timeout=10
        )
        assert response.svids[0].spiffe_id == f"spiffe://{TD}/acme/dev/hdr"
        with pytest.raises(grpc.RpcError) as err:
            stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(), metadata=header, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        unknown = channel.unary_unary("/SpiffeWorkloadAPI/FetchWITSVID")
        with pytest.raises(grpc.RpcError) as err:
            unknown(b"", metadata=header, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        names = {s.name for s in next(iter(answers)).list_services_response.service}
        assert "SpiffeWorkloadAPI" in names


_UID_PROBE = """
import os, sys
import grpc._channel  # grpc imports this lazily, on the first channel
from spiffe import WorkloadApiClient
# The interpreter and its modules may live where only root can read (a checkout in a 0700
# directory): load them and build the client first, then become the other user before the
# first call connects (gRPC connects lazily; the kernel records the peer's uid at connect time).
uid = int(sys.argv[2])
client = WorkloadApiClient(sys.argv[1])
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
try:
    with client:
        print("GOT", client.fetch_x509_svid().spiffe_id)
except Exception as exc:
    print("ERROR", type(exc).__name__, exc)
"""


def _as_uid(uid: int, endpoint: str) -> str:
    completed = subprocess.run(
        [sys.executable, "-c", _UID_PROBE, endpoint, str(uid)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        check=False,
    )
    return completed.stdout + completed.stderr


def test_callers_are_identified_by_their_uid(
    broker_cli: BrokerCli, socket_dir: Path, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    nobody = 65534
    _entry(
        broker_cli, f"spiffe://{TD}/acme/dev/root-only", f"spiffe://{TD}/agents/node-u",
        "--selector", "unix:uid:0",
    )  # fmt: skip
    agent = _join_agent(broker_cli, socket_dir, tmp_path, agents, "node-u")
    denied = _as_uid(nobody, agent.endpoint)
    assert "ERROR" in denied and "PERMISSION_DENIED" in denied.upper().replace(" ", "_"), denied
    # Give uid 65534 an entry: now the same process gets its own ID, not root's.
    _entry(
        broker_cli, f"spiffe://{TD}/acme/dev/nobody", f"spiffe://{TD}/agents/node-u",
        "--selector", f"unix:uid:{nobody}",
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        result = _as_uid(nobody, agent.endpoint)
        if "GOT" in result:
            break
        time.sleep(0.3)
    assert f"GOT spiffe://{TD}/acme/dev/nobody" in result, result


def test_an_x509_source_sees_a_rotation(
    broker_cli: BrokerCli, socket_dir: Path, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    _entry(
        broker_cli, f"spiffe://{TD}/acme/dev/short", f"spiffe://{TD}/agents/node-s",
        "--selector", f"unix:uid:{os.getuid()}", "--x509-ttl", "30s",
    )  # fmt: skip
    # 30 s: the shortest entry TTL; the agent renews it ~15 s after it arrived.
    agent = _join_agent(broker_cli, socket_dir, tmp_path, agents, "node-s")
    source = X509Source(socket_path=agent.endpoint, timeout_in_seconds=20)
    try:
        first = source.get_x509_context().default_svid
        assert str(first.spiffe_id) == f"spiffe://{TD}/acme/dev/short"
        deadline = time.monotonic() + 45
        current = first
        while time.monotonic() < deadline:
            current = source.get_x509_context().default_svid
            if current.leaf.serial_number != first.leaf.serial_number:
                break
            time.sleep(0.1)
        assert current.leaf.serial_number != first.leaf.serial_number, "no rotation seen"
        assert current.leaf.not_valid_before_utc >= first.leaf.not_valid_before_utc
        assert current.leaf.public_key() == current.private_key.public_key()
    finally:
        source.close()


def test_the_agent_serves_through_a_broker_restart(
    tmp_path: Path, socket_dir: Path, agents: list[AgentProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = BrokerProcess(tmp_path / "data", tmp_path)
    server.start()
    try:
        cli = BrokerCli(server, tmp_path)
        _entry(
            cli, f"spiffe://{TD}/acme/dev/steady", f"spiffe://{TD}/agents/node-r",
            "--selector", f"unix:uid:{os.getuid()}", "--x509-ttl", "30s",
        )  # fmt: skip
        agent = _join_agent(cli, socket_dir, tmp_path, agents, "node-r")
        with WorkloadApiClient(agent.endpoint) as client:
            before = client.fetch_x509_svid()

        # Broker down: the agent keeps serving what it holds.
        port = server.port
        assert server.stop() == 0
        with WorkloadApiClient(agent.endpoint) as client:
            held = client.fetch_x509_svid()
        assert str(held.spiffe_id) == f"spiffe://{TD}/acme/dev/steady"
        assert held.leaf.not_valid_before_utc >= before.leaf.not_valid_before_utc

        # Same address again (the agent was told where the broker is): it renews there.
        monkeypatch.setattr(e2e, "free_port", lambda: port)
        server.start()
        deadline = time.monotonic() + 60
        renewed = None
        while time.monotonic() < deadline:
            with WorkloadApiClient(agent.endpoint) as client:
                current = client.fetch_x509_svid()
            if current.leaf.not_valid_before_utc > held.leaf.not_valid_before_utc:
                renewed = current
                break
            time.sleep(0.3)
        assert renewed is not None, f"no renewal after the restart:\n{agent.stderr_text()}"
    finally:
        for agent in agents:
            agent.stop()
        server.ensure_stopped()


def test_jwt_attestation_and_bundle_pushes_on_ca_rotation(
    broker_cli: BrokerCli, socket_dir: Path, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    issuer_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(issuer_key.public_key()))
    jwk["kid"] = "cluster-1"
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps({"keys": [jwk]}))
    broker_cli.ok(
        "attestor", "add", "--name", "k8s", "--issuer", "https://k8s.example",
        "--audience", "broker", "--jwks-file", str(jwks_file),
        "--template", "spiffe://{td}/k8s/ns/{kubernetes.io.namespace}/sa/"
        "{kubernetes.io.serviceaccount.name}",
    )  # fmt: skip
    listed = broker_cli.ok("attestor", "list", "--output", "json").json()
    assert [a["name"] for a in listed] == ["k8s"]
    agent_id = f"spiffe://{TD}/k8s/ns/infra/sa/agent"
    _entry(
        broker_cli, f"spiffe://{TD}/acme/dev/pods", agent_id,
        "--selector", f"unix:uid:{os.getuid()}",
    )  # fmt: skip
    now = int(time.time())
    token = jwt.encode(
        {
            "iss": "https://k8s.example",
            "aud": "broker",
            "sub": "system:serviceaccount:infra:agent",
            "exp": now + 600,
            "kubernetes.io": {"namespace": "infra", "serviceaccount": {"name": "agent"}},
        },
        issuer_key,
        algorithm="RS256",
        headers={"kid": "cluster-1"},
    )
    token_file = tmp_path / "token.jwt"
    token_file.write_text(token)
    agent = AgentProcess(broker_cli.server, socket_dir, tmp_path, "--jwt-file", str(token_file))
    agents.append(agent)
    agent.start()
    assert agent_id in agent.line

    channel, stub = _raw_stub(agent)
    header = [("workload.spiffe.io", "true")]
    with channel:
        stream = stub.FetchJWTBundles(workload_pb2.JWTBundlesRequest(), metadata=header, timeout=60)
        first = json.loads(next(stream).bundles[f"spiffe://{TD}"])
        before = {k["kid"] for k in first["keys"]}
        broker_cli.ok("ca", "rotate", "--force")
        second = json.loads(next(stream).bundles[f"spiffe://{TD}"])
        after = {k["kid"] for k in second["keys"]}
        stream.cancel()
    assert after - before, "the new CA generation's JWT key was not pushed"
    with WorkloadApiClient(agent.endpoint) as client:
        fresh = client.fetch_jwt_svid(audience={"after-rotation"})
        bundle = client.fetch_jwt_bundles().get_bundle_for_trust_domain(
            fresh.spiffe_id.trust_domain
        )
        assert bundle is not None
        JwtSvid.parse_and_validate(fresh.token, bundle, {"after-rotation"})


def test_entry_and_token_cli_contract(broker_cli: BrokerCli, tmp_path: Path) -> None:
    parent = f"spiffe://{TD}/agents/cli"
    entry_args = (
        f"spiffe://{TD}/acme/dev/cli", parent, "--selector", "unix:uid:1000",
        "--selector", "unix:gid:1000", "--x509-ttl", "10m", "--jwt-ttl", "1m",
        "--dns", "cli.example",
    )  # fmt: skip
    # An entry is checked against CA policy when created (issue 15): the default policy
    # allows no DNS names, so the entry is refused until a rule allows this one.
    forbidden = broker_cli.run("entry", "create", "--spiffe-id", entry_args[0], "--parent-id",
                               *entry_args[1:])  # fmt: skip
    assert forbidden.returncode == 1 and len(forbidden.stderr_lines) == 1, forbidden.describe()
    assert forbidden.stderr.startswith("broker: permission denied:")
    assert "cli.example" in forbidden.stderr
    original = broker_cli.ok("ca", "policy", "get", "--output", "json").json()["document"]
    allowing = json.loads(json.dumps(original))
    for rule in allowing["rules"]:
        rule["dns_names"] = ["cli.example"]
    (tmp_path / "dns.json").write_text(json.dumps(allowing))
    broker_cli.ok("ca", "policy", "set", str(tmp_path / "dns.json"))
    try:
        created = _entry(broker_cli, *entry_args)
        duplicate = broker_cli.run(
            "entry", "create", "--spiffe-id", entry_args[0], "--parent-id", *entry_args[1:]
        )  # fmt: skip
        assert duplicate.returncode == 1 and "already exists" in duplicate.stderr, (
            duplicate.describe()
        )
        assert created["id"] in duplicate.stderr
    finally:
        (tmp_path / "restore.json").write_text(json.dumps(original))
        broker_cli.ok("ca", "policy", "set", str(tmp_path / "restore.json"))
    assert created["selectors"] == ["unix:gid:1000", "unix:uid:1000"]
    # One operator alone does not hand a production identity to an agent (issue 20 finding 4):
    # one line naming the approval to ask a second operator for, nothing stored.
    prod = f"spiffe://{TD}/acme/prod/cli"
    alone = broker_cli.run(
        "entry", "create", "--spiffe-id", prod, "--parent-id", parent, "--selector", "unix:uid:1",
    )  # fmt: skip
    assert alone.returncode == 1 and len(alone.stderr_lines) == 1, alone.describe()
    assert alone.stderr.startswith("broker: permission denied:")
    assert f"broker approval request --action entry.admin --resource {prod}" in alone.stderr
    assert created["x509_ttl_seconds"] == 600 and created["dns_names"] == ["cli.example"]
    shown = broker_cli.ok("entry", "show", created["id"], "--output", "json").json()
    assert shown == created
    listed = broker_cli.ok("entry", "list", "--parent-id", parent, "--output", "json").json()
    assert [e["id"] for e in listed] == [created["id"]]
    broker_cli.ok("entry", "delete", created["id"])
    missing = broker_cli.run("entry", "show", created["id"])
    assert missing.returncode == 1 and missing.stderr.startswith("broker: not found")
    bad = broker_cli.run(
        "entry", "create", "--spiffe-id", f"spiffe://{TD}/x", "--parent-id", parent,
        "--selector", "docker:label:x",
    )  # fmt: skip
    assert bad.returncode == 1 and len(bad.stderr_lines) == 1
    assert bad.stderr.startswith("broker: invalid argument")
    token = broker_cli.ok(
        "token", "create", "--spiffe-id", parent, "--ttl", "1m", "--output", "json"
    ).json()
    assert token["spiffe_id"] == parent and token["token"].startswith("bjt_")
    denied = broker_cli.ok("svid", "deny", parent, "--output", "json").json()
    assert denied == {"kind": "spiffe_id", "value": parent}
    usage = broker_cli.run("agent", "--bundle", "x", "--socket", "/tmp/x.sock")
    assert usage.returncode == 2 and usage.stderr.startswith("broker: ")


def test_a_prod_capable_attestor_needs_a_second_operator(
    broker_cli: BrokerCli, tmp_path: Path
) -> None:
    """Issue 20 finding 4 by proxy: an attestor with the operator's own keys whose template
    takes the environment from a claim (the README's Kubernetes example under the default
    layout) would hand any prod identity to whoever signs a token."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk["kid"] = "mine"
    jwks_file = tmp_path / "mine.json"
    jwks_file.write_text(json.dumps({"keys": [jwk]}))
    args = [
        "attestor", "add", "--name", "mine", "--issuer", "https://mine.example",
        "--audience", "broker", "--jwks-file", str(jwks_file),
    ]  # fmt: skip
    prod_capable = ["--template", "spiffe://{td}/ns/{kubernetes.io.namespace}/sa/{sub}"]
    alone = broker_cli.run(*args, *prod_capable)
    assert alone.returncode == 1 and len(alone.stderr_lines) == 1, alone.describe()
    assert alone.stderr.startswith("broker: permission denied:")
    # The resource to ask approval for is what `attestor resource` computes locally from the
    # same definition (what the approving operator checks).
    resource = broker_cli.ok("attestor", "resource", *args[2:], *prod_capable).stdout.strip()
    assert resource.startswith("attestor:mine@sha256:")
    command = f"broker approval request --action attestor.admin --resource {resource}"
    assert command in alone.stderr, alone.describe()
    listed = broker_cli.ok("attestor", "list", "--output", "json").json()
    assert "mine" not in [a["name"] for a in listed]
    # A template that can only yield dev identities is the operator's to add alone.
    broker_cli.ok(*args, "--template", "spiffe://{td}/ci/dev/{sub}")
    broker_cli.ok("attestor", "remove", "mine")


def test_the_agent_never_replaces_a_file_that_is_not_a_socket(
    broker_cli: BrokerCli, tmp_path: Path
) -> None:
    precious = tmp_path / "notes.txt"
    precious.write_text("keep me")
    token = broker_cli.ok("token", "create", "--spiffe-id", f"spiffe://{TD}/agents/careful")
    result = broker_cli.run(
        "agent", "--server", broker_cli.server.address,
        "--attest-server", attest_address(broker_cli.server),
        "--bundle", str(broker_cli.server.data_dir / "bundle.pem"),
        "--join-token", token.stdout.strip(), "--socket", str(precious),
    )  # fmt: skip
    assert result.returncode == 1, result.describe()
    assert result.stderr_lines == [
        f"broker: {precious} exists and is not a socket; not replacing it"
    ]
    assert precious.read_text() == "keep me"


def test_sidecar_files_from_the_agent_feed_secrets_sync(
    broker_cli: BrokerCli, socket_dir: Path, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    """Secrets as files: the agent's --write-dir identity is the workload's mTLS identity for
    `broker secrets sync` (the secrets feature's file delivery), with no operator credentials."""
    service = "agentdemo"
    reference = f"secret://{service}/dev/db/password"
    _entry(
        broker_cli, f"spiffe://{TD}/default/dev/{service}", f"spiffe://{TD}/agents/node-f",
        "--selector", f"unix:uid:{os.getuid()}",
    )  # fmt: skip
    identity = tmp_path / "identity"
    _join_agent(broker_cli, socket_dir, tmp_path, agents, "node-f", "--write-dir", str(identity))
    value_file = tmp_path / "value"
    value_file.write_bytes(os.urandom(16).hex().encode())
    broker_cli.ok(
        "secrets", "put", reference, "--value-file", str(value_file), "--owner", service,
        "--classification", "confidential", "--rotation-period", "90d",
    )  # fmt: skip
    secrets_dir = tmp_path / "secrets"
    synced = broker_cli.ok(
        "secrets", "sync", "--once", "--write-dir", str(secrets_dir),
        "--file", f"db-password={reference}",
        "--cert", str(identity / "svid.pem"), "--key", str(identity / "key.pem"),
        "--bundle", str(identity / "bundle.pem"),
    )  # fmt: skip
    assert "db-password: written" in synced.stdout
    assert (secrets_dir / "db-password").read_bytes() == value_file.read_bytes()
    assert stat.S_IMODE(os.stat(secrets_dir / "db-password").st_mode) == 0o600


def _wait_for(predicate: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_the_agent_writes_selected_secrets_into_its_write_dir(
    broker_cli: BrokerCli, socket_dir: Path, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    """`broker agent --write-dir D --secret NAME=secret://...`: the secret as a 0600 file in D,
    read as the workload whose SVID the agent writes there, rewritten when the secret rotates,
    removed when it is revoked."""
    service = "filedemo"
    reference = f"secret://{service}/dev/api/token"
    _entry(
        broker_cli, f"spiffe://{TD}/default/dev/{service}", f"spiffe://{TD}/agents/node-g",
        "--selector", f"unix:uid:{os.getuid()}",
    )  # fmt: skip
    value_file = tmp_path / "value"
    value_file.write_bytes(os.urandom(16).hex().encode())
    broker_cli.ok(
        "secrets", "put", reference, "--value-file", str(value_file), "--owner", service,
        "--classification", "confidential", "--rotation-period", "90d",
    )  # fmt: skip
    out = tmp_path / "files"
    _join_agent(
        broker_cli, socket_dir, tmp_path, agents, "node-g", "--write-dir", str(out),
        "--secret", f"api-token={reference}", "--secret-interval", "1s",
    )  # fmt: skip
    target = out / "api-token"
    _wait_for(lambda: target.exists(), "the secret file")
    assert target.read_bytes() == value_file.read_bytes()
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert (out / "svid.pem").exists()

    rotated = tmp_path / "rotated"
    rotated.write_bytes(os.urandom(16).hex().encode())
    broker_cli.ok(
        "secrets", "rotate", reference, "--env", "dev", "--value-file", str(rotated),
        "--ticket", "CHG-1", "--justification", "test rotation",
    )  # fmt: skip
    _wait_for(
        lambda: target.exists() and target.read_bytes() == rotated.read_bytes(), "the rotation"
    )

    broker_cli.ok("secrets", "revoke", reference, "--justification", "leaked")
    _wait_for(lambda: not target.exists(), "the file to be removed after the revocation")
    assert (out / "svid.pem").exists()  # the identity files stay


def test_agent_secret_files_refuse_bad_names(broker_cli: BrokerCli, tmp_path: Path) -> None:
    for args, message in (
        (["--secret", "x=secret://a/dev/b"], "--secret needs --write-dir"),
        (["--write-dir", str(tmp_path), "--secret", "x"], "use NAME=secret://"),
        (["--write-dir", str(tmp_path), "--secret", "key.pem=secret://a/dev/b"], "agent's own"),
    ):
        result = broker_cli.run(
            "agent", "--bundle", str(tmp_path / "none.pem"), "--join-token", "t",
            "--socket", str(tmp_path / "s.sock"), *args,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert message in result.stderr


def test_agent_health_socket_and_json_logs(
    broker_cli: BrokerCli, socket_dir: Path, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    """Issue 15: `broker agent status` reads the agent's health socket (ready, exit 0), and the
    agent's log lines are JSON from broker.logs like the server's."""
    _entry(
        broker_cli, f"spiffe://{TD}/acme/dev/healthy", f"spiffe://{TD}/agents/node-h",
        "--selector", f"unix:uid:{os.getuid()}",
    )  # fmt: skip
    health = socket_dir / "health.sock"
    agent = _join_agent(
        broker_cli, socket_dir, tmp_path, agents, "node-h", "--health-socket", str(health)
    )
    status = broker_cli.run("agent", "status", "--health-socket", str(health), "--output", "json")
    assert status.returncode == 0, status.describe()
    assert status.json() == {
        "state": "ready",
        "reasons": [],
        "agent_id": f"spiffe://{TD}/agents/node-h",
    }
    agent.stop()
    assert not health.exists()  # removed on a clean stop
    down = broker_cli.run("agent", "status", "--health-socket", str(health))
    assert down.returncode == 1 and len(down.stderr_lines) == 1, down.describe()
    logged = [line for line in agent.stderr_text().splitlines() if line.strip()]
    assert logged, "the agent logged nothing"
    for line in logged:
        record = json.loads(line)
        assert {"ts", "level", "logger", "pid", "msg"} <= set(record), line
    assert any("attested as" in json.loads(line)["msg"] for line in logged)
