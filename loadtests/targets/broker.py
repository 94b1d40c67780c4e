"""The broker under test: a dev broker started here, or a running one given by address and
data dir. Either way the client identity is the dev operator's (DIR/operator/svid.pem,
DIR/operator/key.pem, trust anchors DIR/bundle.pem).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtests import procs

__all__ = [
    "RATE_LIMIT_ENV",
    "BrokerIdentity",
    "DevBroker",
    "RotationCall",
    "Rotator",
    "ca_rotation",
    "call_once",
    "grpc_target",
    "load_identity",
    "split_servers",
    "status",
]

# The benchmark measures the signing path, not the per-identity limiter: lift it.
RATE_LIMIT_ENV = {"BROKER_RATE_LIMIT_RPS": "100000", "BROKER_RATE_LIMIT_BURST": "100000"}

CA_SERVICE = "/broker.v1.CertificateAuthority"


@dataclass(frozen=True)
class BrokerIdentity:
    root_pem: bytes
    cert_pem: bytes
    key_pem: bytes


def load_identity(data_dir: Path) -> BrokerIdentity:
    paths = [data_dir / "bundle.pem", data_dir / "operator/svid.pem", data_dir / "operator/key.pem"]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise procs.StartupError(f"broker operator identity not found: {', '.join(missing)}")
    root, cert, key = (p.read_bytes() for p in paths)
    return BrokerIdentity(root_pem=root, cert_pem=cert, key_pem=key)


class DevBroker:
    """`broker serve --dev` as a subprocess of this Python, on a free loopback port."""

    def __init__(self, data_dir: Path, *, extra_env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = procs.free_port()
        self.address = f"127.0.0.1:{self.port}"
        # Its Prometheus endpoint, scraped around each run (loadtests.servermetrics).
        self.metrics_port = procs.free_port()
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        metrics_env = {"BROKER_METRICS_LISTEN": f"127.0.0.1:{self.metrics_port}"}
        self.env = {**os.environ, **RATE_LIMIT_ENV, **metrics_env, **(extra_env or {})}
        self.process: procs.ManagedProcess | None = None
        self.ready_line = ""

    def start(self, timeout: float = 180.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable,
            "-m",
            "broker.cli",
            "serve",
            "--dev",
            "--data-dir",
            str(self.data_dir),
            "--listen",
            self.address,
        ]
        self.process = procs.ManagedProcess(
            "broker",
            argv,
            log_path=self.data_dir.parent / "broker.log",
            env=self.env,
            ready=r"(?i)listening",
        )
        self.ready_line = self.process.wait_ready(timeout)
        m = re.search(r"(127\.0\.0\.1|localhost|\[::1\]):(\d+)", self.ready_line)
        if m and int(m.group(2)) != self.port:
            self.address = f"127.0.0.1:{m.group(2)}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None


def split_servers(servers: str) -> list[str]:
    """`--server A:P,B:P` -> ["A:P", "B:P"] (order kept, blanks and repeats dropped)."""
    from broker.api.client.failover import split_targets

    return split_targets(servers)


def grpc_target(servers: str) -> str:
    """The gRPC target for one or several broker replicas: one address as given; several as
    gRPC's own address list (`ipv4:a:p,b:p` / `ipv6:[a]:p,...`), which a channel with the
    `round_robin` policy spreads its calls over, leaving out a replica that stops answering
    (its calls in flight fail; the next ones go to the others). Several need IP literals of
    one family: ValueError otherwise."""
    items = split_servers(servers)
    if len(items) <= 1:
        return items[0] if items else servers
    families = set()
    for item in items:
        host = item.rpartition(":")[0].strip("[]")
        try:
            families.add(ipaddress.ip_address(host).version)
        except ValueError:
            raise ValueError(f"several replicas need IP addresses, not {host!r}") from None
    if len(families) != 1:
        raise ValueError("several replicas need addresses of one IP family")
    return ("ipv4:" if families == {4} else "ipv6:") + ",".join(items)


def _channel(address: str, ident: BrokerIdentity, server_name: str | None) -> Any:
    import grpc

    creds = grpc.ssl_channel_credentials(
        root_certificates=ident.root_pem,
        private_key=ident.key_pem,
        certificate_chain=ident.cert_pem,
    )
    opts = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(address, creds, opts)


def status(address: str, ident: BrokerIdentity, server_name: str | None) -> dict[str, Any]:
    """GetStatus over mTLS: trust domain, key backend and storage, for the report."""
    from broker.api._proto import ca_pb2

    with _channel(address, ident, server_name) as ch:
        call = ch.unary_unary(
            f"{CA_SERVICE}/GetStatus",
            request_serializer=ca_pb2.GetStatusRequest.SerializeToString,
            response_deserializer=ca_pb2.GetStatusResponse.FromString,
        )
        st = call(ca_pb2.GetStatusRequest(), timeout=30)
    return {
        "trust_domain": st.trust_domain,
        "key_backend": st.key_backend,
        "storage": st.storage,
        "authorities": [
            {"id": a.id, "kind": a.kind, "state": a.state, "key_uri": a.key_uri}
            for a in st.authorities
        ],
    }


def trust_domain_from_bundle(root_pem: bytes) -> str | None:
    """The trust domain named by the first CA certificate's SPIFFE URI SAN, if any."""
    from cryptography import x509

    for cert in x509.load_pem_x509_certificates(root_pem):
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            continue
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
            m = re.match(r"spiffe://([^/]+)", uri)
            if m:
                return m.group(1)
    return None


def call_once(
    address: str,
    ident: BrokerIdentity,
    server_name: str | None,
    method: str,
    response_type: Any,
    request: bytes,
) -> Any:
    """One call of any unary method outside the timed window (checks the path end to end)."""
    with _channel(address, ident, server_name) as ch:
        call = ch.unary_unary(method, response_deserializer=response_type.FromString)
        return call(request, timeout=30)


@dataclass(frozen=True)
class RotationCall:
    """One rotation the Rotator makes at each tick: `operation` names it in the report; the
    answer must have a non-empty `require_field`."""

    operation: str
    method: str
    response_type: Any
    request: bytes
    require_field: str


def ca_rotation() -> RotationCall:
    from broker.api._proto import ca_pb2

    return RotationCall(
        "ca-rotate",
        f"{CA_SERVICE}/Rotate",
        ca_pb2.RotateResponse,
        ca_pb2.RotateRequest(force=True).SerializeToString(),
        "actions",
    )


class _RotationTally:
    def __init__(self) -> None:
        from loadtests import hist

        self.hist = hist.new_histogram()
        self.ok = 0
        self.errors: dict[str, int] = {}
        self.samples: list[str] = []
        self.ok_per_s: dict[int, int] = {}
        self.errors_per_s: dict[int, int] = {}

    def success(self, micros: int, second: int) -> None:
        from loadtests import hist

        hist.record_us(self.hist, micros)
        self.ok += 1
        self.ok_per_s[second] = self.ok_per_s.get(second, 0) + 1

    def failure(self, kind: str, detail: str, second: int) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        self.errors_per_s[second] = self.errors_per_s.get(second, 0) + 1
        if len(self.samples) < 5:
            self.samples.append(f"{kind}: {detail[:300]}")

    def to_json(self) -> dict[str, Any]:
        from loadtests import hist

        return {
            "ok": self.ok,
            "errors": dict(self.errors),
            "samples": list(self.samples),
            "histogram": hist.encode(self.hist),
            "ok_per_s": dict(self.ok_per_s),
            "errors_per_s": dict(self.errors_per_s),
        }


ROLLOUT_REF = "secret://bench/dev/rollout-key"
ROLLOUT_OPERATION = "secret-rollout-rotate"  # a `*-rotate`: judged by its success rate
_ROLLOUT_DONE = ("completed", "rolled-back", "aborted")


class Rotator:
    """Makes each of `calls` (the CA's `Rotate` with force, a secret's `Rotate`, ...) every
    `every_s` seconds for `duration_s` seconds, from a thread of the parent while the load
    runs, and tallies each as a request of its operation (latency, failures by gRPC status,
    per-second counts)."""

    def __init__(
        self,
        address: str,
        ident: BrokerIdentity,
        server_name: str | None,
        every_s: float,
        duration_s: float,
        calls: list[RotationCall] | None = None,
        timeout_s: float = 30.0,
        rollouts: bool = False,
    ) -> None:
        import threading

        self._args = (address, ident, server_name)
        self._every, self._duration, self._timeout = every_s, duration_s, timeout_s
        self.calls = calls if calls is not None else [ca_rotation()]
        self.tallies = {c.operation: _RotationTally() for c in self.calls}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rotator", daemon=True)
        # Staged rollouts (issue 12), one after another: each a Rollouts/Start (stages 50%,
        # 100%, 1 s bake, the broker's own health check) followed to its end; a success is a
        # completed rollout, its latency start to completion.
        self._rollouts: threading.Thread | None = None
        if rollouts:
            self.tallies[ROLLOUT_OPERATION] = _RotationTally()
            self._rollouts = threading.Thread(
                target=self._run_rollouts, name="rollouts", daemon=True
            )

    def start(self) -> None:
        self._thread.start()
        if self._rollouts is not None:
            self._rollouts.start()

    def _run_rollouts(self) -> None:
        import time

        import grpc

        from broker.api._proto import rollout_pb2, secrets_pb2

        tally = self.tallies[ROLLOUT_OPERATION]
        t0 = time.monotonic()
        with _channel(*self._args) as ch:
            put = ch.unary_unary(
                "/broker.v1.Secrets/Put", response_deserializer=secrets_pb2.SecretInfo.FromString
            )
            start = ch.unary_unary(
                "/broker.v1.Rollouts/Start",
                response_deserializer=rollout_pb2.RolloutStatus.FromString,
            )
            status = ch.unary_unary(
                "/broker.v1.Rollouts/Status",
                response_deserializer=rollout_pb2.RolloutStatus.FromString,
            )
            with contextlib.suppress(grpc.RpcError):  # stored by an earlier run
                put(
                    secrets_pb2.PutSecretRequest(
                        reference=ROLLOUT_REF,
                        generate_length=32,
                        owner="bench",
                        classification="confidential",
                        rotation_period_seconds=90 * 86400,
                    ).SerializeToString(),
                    timeout=self._timeout,
                )
            request = rollout_pb2.StartRolloutRequest(
                reference=ROLLOUT_REF,
                environment="dev",
                ticket="LOADTEST-2",
                justification="load test: staged rollouts while the load runs",
                generate_length=32,
                stages=[50, 100],
                bake_seconds=1,
                health_check="/bin/true",
            ).SerializeToString()
            ask = rollout_pb2.RolloutRequest(reference=ROLLOUT_REF).SerializeToString()
            while not self._stop.is_set() and time.monotonic() < t0 + self._duration:
                second = int(time.monotonic() - t0)
                started = time.perf_counter_ns()
                try:
                    answer = start(request, timeout=self._timeout)
                except grpc.RpcError as exc:
                    code = exc.code()
                    kind = f"grpc {code.name}" if code is not None else "grpc ?"
                    tally.failure(kind, str(exc.details()), second)
                    self._stop.wait(1.0)
                    continue
                # Follow it to its end; a status poll that fails in transit is asked again
                # (the rollout runs in the broker either way).
                deadline = time.monotonic() + 120
                while answer.state not in _ROLLOUT_DONE and time.monotonic() < deadline:
                    time.sleep(0.1)
                    with contextlib.suppress(grpc.RpcError):
                        answer = status(ask, timeout=self._timeout)
                if answer.state == "completed":
                    tally.success((time.perf_counter_ns() - started) // 1000, second)
                else:
                    tally.failure(f"rollout {answer.state or 'timed out'}", answer.reason, second)

    def _run(self) -> None:
        import time

        import grpc

        t0 = time.monotonic()
        with _channel(*self._args) as ch:
            stubs = [
                ch.unary_unary(c.method, response_deserializer=c.response_type.FromString)
                for c in self.calls
            ]
            k = 0
            # The first tick half an interval in, then one every interval, all started inside
            # the window.
            while not self._stop.is_set():
                due = t0 + self._every * (k + 0.5)
                if due >= t0 + self._duration:
                    return
                if self._stop.wait(max(0.0, due - time.monotonic())):
                    return
                k += 1
                for c, stub in zip(self.calls, stubs, strict=True):
                    tally = self.tallies[c.operation]
                    second = int(time.monotonic() - t0)
                    started = time.perf_counter_ns()
                    try:
                        resp = stub(c.request, timeout=self._timeout)
                    except grpc.RpcError as exc:
                        code = exc.code()
                        kind = f"grpc {code.name}" if code is not None else "grpc ?"
                        tally.failure(kind, str(exc.details()), second)
                        continue
                    except Exception as exc:
                        tally.failure(type(exc).__name__, str(exc), second)
                        continue
                    if not getattr(resp, c.require_field):
                        tally.failure("empty answer", f"no {c.require_field}", second)
                        continue
                    tally.success((time.perf_counter_ns() - started) // 1000, second)

    def finish(self) -> dict[str, dict[str, Any]]:
        """Wait for the last tick; per operation, the tally in the generator's shape."""
        self._thread.join(self._duration + self._timeout * len(self.calls) + 5)
        if self._rollouts is not None:
            self._rollouts.join(self._timeout + 125)
        self._stop.set()
        return {name: tally.to_json() for name, tally in self.tallies.items()}
