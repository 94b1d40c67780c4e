"""Root CA rotation end to end: a real `broker serve --dev`, several real `broker agent`
processes, and py-spiffe reading their Workload API (in a subprocess: py-spiffe's copy of the
package-less proto cannot share this process with ours).

- Emergency (`broker ca rotate --root --compromised`): every agent serves, within N seconds, an
  SVID chaining only to the new root, with a bundle holding only the new root, as py-spiffe sees
  them; each agent keeps the new root in its trust store.
- Planned (`broker ca rotate --root --activate-after ...`): the agents receive both roots before
  the new one signs, every SVID they serve verifies against the bundle served with it, and an
  SVID minted after activation verifies against the bundle every agent holds, with no restart
  and no new `--bundle` file (the roots are in each agent's trust store).
"""

from __future__ import annotations

import base64
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from cryptography import x509

from ca.errors import CAError
from ca.x509svid import verify_chain
from tests.e2e.conftest import BrokerCli, BrokerProcess

pytestmark = pytest.mark.e2e

TD = "broker.local"
READY_TIMEOUT = 60.0
REACH_SECONDS = 60.0  # N: every agent serves the new root's SVIDs within this
_ATTEST = re.compile(r"attestation on (\S+?):(\d+)\)")

_PROBE = """
import base64, json, sys
from cryptography.hazmat.primitives.serialization import Encoding
from spiffe import WorkloadApiClient
from spiffe.spiffe_id.spiffe_id import TrustDomain
with WorkloadApiClient(sys.argv[1]) as client:
    ctx = client.fetch_x509_context()
    svid = ctx.default_svid
    bundle = ctx.x509_bundle_set.get_bundle_for_trust_domain(TrustDomain(sys.argv[2]))
    print(json.dumps({
        "spiffe_id": str(svid.spiffe_id),
        "chain": [base64.b64encode(c.public_bytes(Encoding.DER)).decode() for c in svid.cert_chain],
        "bundle": [base64.b64encode(c.public_bytes(Encoding.DER)).decode()
                   for c in bundle.x509_authorities],
    }))
"""


def _probe(endpoint: str) -> dict[str, list[x509.Certificate]] | None:
    """What py-spiffe gets from the agent: the SVID chain and the trust domain's bundle."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, endpoint, TD],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        return None
    doc = json.loads(done.stdout)
    return {
        key: [x509.load_der_x509_certificate(base64.b64decode(d)) for d in doc[key]]
        for key in ("chain", "bundle")
    }


def _verifies(chain: list[x509.Certificate], roots: list[x509.Certificate]) -> bool:
    try:
        verify_chain(chain[0], chain[1:], roots, chain[0].not_valid_before_utc, trust_domain=TD)
    except CAError:
        return False
    return True


class Agent:
    def __init__(self, server: BrokerProcess, name: str, token: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"rootrot-{name}-", dir="/tmp"))
        self.socket = self.dir / "agent.sock"
        self.trust_store = self.dir / "trust.pem"
        self._stderr: IO[str] = open(self.dir / "agent.stderr", "w")  # noqa: SIM115
        match = _ATTEST.search(server.listening_line)
        assert match, server.listening_line
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "broker.cli",
                "agent",
                "--server",
                server.address,
                "--attest-server",
                f"{match.group(1)}:{match.group(2)}",
                "--bundle",
                str(server.data_dir / "bundle.pem"),
                "--socket",
                str(self.socket),
                "--trust-store",
                str(self.trust_store),
                "--sync-interval",
                "0.5",
            ],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            stdin=subprocess.DEVNULL,
            text=True,
            env={
                **{k: v for k, v in os.environ.items() if not k.startswith("BROKER_")},
                "BROKER_JOIN_TOKEN": token,
            },
        )
        lines: queue.Queue[str | None] = queue.Queue()
        stdout = self.process.stdout
        assert stdout is not None

        def pump() -> None:
            for line in stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        try:
            line = lines.get(timeout=READY_TIMEOUT)
        except queue.Empty:
            line = None
        if line is None or "serving the Workload API" not in line:
            self.stop()
            pytest.fail(f"agent {name} did not start: {line!r}\n{self.stderr()}")

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"

    def stderr(self) -> str:
        return (self.dir / "agent.stderr").read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    started: list[Agent] = []
    yield started
    for agent in started:
        agent.stop()


def _start_agents(cli: BrokerCli, agents: list[Agent], count: int, prefix: str) -> None:
    for i in range(count):
        name = f"{prefix}-{i}"
        parent = f"spiffe://{TD}/agents/{name}"
        cli.ok(
            "entry", "create", "--spiffe-id", f"spiffe://{TD}/acme/dev/{name}",
            "--parent-id", parent, "--selector", f"unix:uid:{os.getuid()}",
        )  # fmt: skip
        token = cli.ok("token", "create", "--spiffe-id", parent).stdout.strip()
        agents.append(Agent(cli.server, name, token))


def _until(what: str, check: Any, within: float, detail: Any = None) -> float:
    started = time.monotonic()
    while True:
        if check():
            return time.monotonic() - started
        if time.monotonic() - started > within:
            more = f"\n{detail()[-4000:]}" if detail is not None else ""
            pytest.fail(f"{what} not within {within:.0f} s{more}")
        time.sleep(0.25)


def _roots(cli: BrokerCli) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(cli.ok("ca", "bundle").stdout.encode())


def test_an_emergency_root_rotation_reaches_every_agent(
    broker_cli: BrokerCli, agents: list[Agent]
) -> None:
    _start_agents(broker_cli, agents, 3, "em")
    (old_root,) = _roots(broker_cli)
    for agent in agents:
        _until("first SVID", lambda a=agent: _probe(a.endpoint) is not None, READY_TIMEOUT)

    rotated_at = time.monotonic()
    broker_cli.ok("ca", "rotate", "--root", "--compromised")
    new_roots: list[x509.Certificate] = []

    def new_root_known() -> bool:
        result = broker_cli.run("ca", "bundle")  # the CLI's identity is re-issued in seconds
        if result.returncode != 0:
            return False
        new_roots[:] = x509.load_pem_x509_certificates(result.stdout.encode())
        return new_roots != [old_root]

    _until("the new root", new_root_known, REACH_SECONDS)
    (new_root,) = new_roots
    for agent in agents:

        def on_new_root(a: Agent = agent) -> bool:
            seen = _probe(a.endpoint)
            return (
                seen is not None
                and seen["bundle"] == [new_root]  # py-spiffe sees the new bundle
                and _verifies(seen["chain"], [new_root])
                and not _verifies(seen["chain"], [old_root])  # chains only to the new root
            )

        _until(f"agent {agent.dir.name} on the new root", on_new_root, REACH_SECONDS, agent.stderr)
        assert x509.load_pem_x509_certificates(agent.trust_store.read_bytes()) == [new_root]
    # Measured (probing each agent in turn through a py-spiffe subprocess, so an upper bound).
    print(
        f"all {len(agents)} agents on the new root "
        f"{time.monotonic() - rotated_at:.1f} s after the rotate command"
    )


def test_a_planned_root_rotation_reaches_every_agent_without_a_verification_failure(
    broker_cli: BrokerCli, agents: list[Agent], tmp_path: Path
) -> None:
    _start_agents(broker_cli, agents, 2, "pl")
    roots_before = _roots(broker_cli)
    for agent in agents:
        _until("first SVID", lambda a=agent: _probe(a.endpoint) is not None, READY_TIMEOUT)
    broker_cli.ok("ca", "rotate", "--root", "--activate-after", "5s")
    published = _roots(broker_cli)
    assert len(published) == 2 and set(roots_before) < set(published)
    (new_root,) = [r for r in published if r not in roots_before]
    failures: list[str] = []
    bundles: dict[str, list[x509.Certificate]] = {}

    def check_agents() -> bool:
        """Every SVID served verifies against the bundle served with it; True once every
        agent's bundle holds the new root."""
        for agent in agents:
            seen = _probe(agent.endpoint)
            if seen is None:
                continue
            if not _verifies(seen["chain"], seen["bundle"]):
                failures.append(agent.dir.name)
            bundles[agent.dir.name] = seen["bundle"]
        return len(bundles) == len(agents) and all(new_root in b for b in bundles.values())

    _until("both roots at every agent", check_agents, 60.0)

    def activated() -> bool:
        broker_cli.ok("ca", "rotate")  # the maintenance job, run now (activates when due)
        status = broker_cli.ok("ca", "status", "--output", "json").json()
        return bool(status["root_phase"] == "overlap")

    _until("the new root signing", activated, 60.0)
    # An SVID minted now chains to the new root and verifies against the bundle every agent
    # (and so every workload through py-spiffe) holds, and against the old root alone (the
    # cross-certificate in its chain).
    out = tmp_path / "svid"
    broker_cli.ok("svid", "mint", "--spiffe-id", f"spiffe://{TD}/acme/dev/late", "--out", str(out))
    chain = x509.load_pem_x509_certificates((out / "svid.pem").read_bytes())
    assert _verifies(chain, [new_root])
    assert _verifies(chain, roots_before)
    check_agents()
    for name, bundle in bundles.items():
        assert _verifies(chain, bundle), name
    assert failures == []
    for agent in agents:  # kept for a restart: no new --bundle file needed
        stored = x509.load_pem_x509_certificates(agent.trust_store.read_bytes())
        assert new_root in stored and roots_before[0] in stored


def test_a_planned_root_rotation_under_the_rotation_load_has_no_verification_failure(
    tmp_path: Path,
) -> None:
    """`python -m loadtests run --scenario rotation` (forced issuing-CA and secret rotations
    every 2 s under the mixed load) against a dev broker while its root is rotated. The load's
    relying party (loadtests/relyingparty.py) verifies every X.509-SVID and JWT-SVID the load
    generator receives against the bundle it holds (refetched every 2 s, less than
    --activate-after; once more on a failure): hundreds of SVIDs verified in both the
    publishing and the overlap phase, zero failures. Beside it a client mints SVIDs through
    the CLI and verifies each against the bundle it holds and against the bundle from before
    the rotation (through the cross-certificate); zero failed requests in the load."""
    server = BrokerProcess(tmp_path / "data", tmp_path)
    cli = BrokerCli(server, tmp_path)
    server.start()
    load = None
    try:
        report = tmp_path / "report"
        load = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "loadtests",
                "run",
                "--scenario",
                "rotation",
                "--server",
                server.address,
                "--data-dir",
                str(server.data_dir),
                "--concurrency",
                "2",
                "--processes",
                "1",
                "--warmup",
                "1",
                "--duration",
                "40",
                "--csr-pool",
                "16",
                "--bundle-refresh",
                "2",
                "--report",
                str(report),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        initial = _roots(cli)
        held, held_at = initial, time.monotonic()
        failures: list[str] = []
        issuers: set[bytes] = set()
        phases: set[str] = set()
        rotated = False
        started = time.monotonic()
        n = 0
        while load.poll() is None and time.monotonic() - started < 120:
            if time.monotonic() - held_at > 3:
                held, held_at = _roots(cli), time.monotonic()
            if not rotated and time.monotonic() - started > 5:
                result = cli.run("ca", "rotate", "--root", "--activate-after", "10s")
                rotated = result.returncode == 0  # refused while a forced rotation runs: again
            elif rotated:
                cli.run("ca", "rotate")  # the maintenance job, now (activates when due)
            out = tmp_path / f"svid-{n}"
            n += 1
            minted = cli.run(
                "svid", "mint", "--spiffe-id", f"spiffe://{TD}/acme/dev/load", "--out", str(out)
            )
            if minted.returncode != 0:
                failures.append(f"mint: {minted.stderr.strip()[:200]}")
                continue
            chain = x509.load_pem_x509_certificates((out / "svid.pem").read_bytes())
            issuers.add(chain[1].fingerprint(_sha256()))
            if not _verifies(chain, held):
                failures.append(f"SVID {n} does not verify against the bundle held")
            if not _verifies(chain, initial):
                failures.append(f"SVID {n} does not verify against the pre-rotation bundle")
            status = cli.run("ca", "status", "--output", "json")
            if status.returncode == 0:
                phases.add(json.loads(status.stdout)["root_phase"])
        _, errors = load.communicate(timeout=120)
        assert load.returncode == 0, errors[-3000:]
        assert rotated and failures == []
        assert {"publishing", "overlap"} <= phases
        assert len(issuers) >= 2  # SVIDs under both roots were minted and verified
        rep = json.loads((report / "report.json").read_text())
        ops = rep["runs"][0]["operations"]
        for name in ("svid-csr", "jwt-mint", "secret-get"):
            assert ops[name]["requests_ok"] > 0 and ops[name]["error_count"] == 0, name
        # Every SVID the load generator received, verified by its relying party.
        checked = rep["runs"][0]["notes"]["svid_verification"]
        assert checked["svid_verification_failures"] == 0, checked["failure_samples"]
        phases = checked["by_kind_and_phase"]
        assert phases["x509 publishing"]["verified"] >= 100, phases
        assert phases["x509 overlap"]["verified"] >= 100, phases
        assert checked["svids_verified"] >= 400, checked
        assert len(checked["bundle_sequences_seen"]) >= 2  # it saw the bundle change
        print(f"{n} SVIDs minted through the CLI and verified across the root rotation")
        print(
            f"relying party: {checked['svids_verified']} SVIDs verified, "
            f"{checked['svid_verification_failures']} failures: {json.dumps(phases)}; "
            f"bundle fetches {checked['bundle_fetches']}, verified only after a refetch "
            f"{checked['verified_after_refetch']}"
        )
    finally:
        if load is not None:
            if load.poll() is None:
                load.kill()
            load.communicate()
        server.ensure_stopped()


def _sha256() -> Any:
    from cryptography.hazmat.primitives import hashes

    return hashes.SHA256()
