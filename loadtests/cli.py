"""``python -m loadtests run``: start what is needed, drive it, print and write the report
(DIR/report.json and DIR/report.html), and with ``--slo`` judge the SLOs.
``python -m loadtests list`` names the scenarios; ``python -m loadtests html DIR`` redoes the
HTML page from DIR/report.json."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from loadtests import csrs, generator, machine, procs, report, servermetrics, slo
from loadtests.durations import seconds
from loadtests.html import write_html
from loadtests.scenarios import SCENARIOS, Scenario, broker_operations
from loadtests.targets import broker as broker_target
from loadtests.targets.grpcclient import GrpcOp, GrpcSpec, _load
from loadtests.targets.http import HttpSpec

__all__ = ["main"]

PEERS = ("openbao",)
FLEET_DESCRIPTION = (
    "thousands of simulated agents (--agents N --procs P) holding sync streams and renewing "
    "SVIDs at half-life; memory per agent, CA rotation push time, renewal latency"
)
SMOKE = {"duration": 2.0, "warmup": 0.5, "concurrency": "2", "csr_pool": 16, "rounds": 1}


def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not levels or any(n < 1 or n > 4096 for n in levels):
        raise argparse.ArgumentTypeError("concurrency levels must be 1..4096")
    return levels


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtests", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="name the scenarios and say what each measures")
    h = sub.add_parser("html", help="write DIR/report.html again from DIR/report.json")
    h.add_argument("report_dir", type=Path)
    from loadtests import preload, remotehsm

    remotehsm.add_parser(sub)
    preload.add_parser(sub)
    r = sub.add_parser("run", help="run a scenario at one or more concurrency levels")
    r.add_argument("--scenario", required=True, choices=sorted([*SCENARIOS, "fleet"]))
    r.add_argument("--concurrency", default=None, help="comma-separated levels (default 1,8,32)")
    r.add_argument("--duration", type=seconds, default=None, help="measured seconds (default 20)")
    r.add_argument("--warmup", type=seconds, default=None, help="unmeasured seconds (default 3)")
    r.add_argument("--report", required=True, type=Path, help="directory for report.json")
    r.add_argument("--compare", choices=PEERS, default=None, help="also drive this peer")
    r.add_argument(
        "--server",
        help="HOST:PORT of a running broker (loopback only); several replicas as A:P,B:P "
        "(IP literals; the load is spread over them and skips one that stops answering)",
    )
    r.add_argument("--data-dir", type=Path, help="that broker's data dir (operator identity)")
    r.add_argument("--server-pid", type=int, help="that broker's pid, to measure its CPU")
    r.add_argument("--tls-server-name", help="override the name checked in the server cert")
    r.add_argument("--processes", type=int, default=2, help="load worker processes (default 2)")
    r.add_argument(
        "--broker-workers",
        type=int,
        default=1,
        help="worker processes of the dev broker it starts (BROKER_WORKERS, default 1)",
    )
    r.add_argument(
        "--grpc-client",
        choices=("aio", "sync"),
        default="aio",
        help="grpc.aio on an event loop, or sync grpc with a thread per user (default aio)",
    )
    r.add_argument("--channels", type=int, default=1, help="gRPC channels per worker process")
    r.add_argument("--rounds", type=int, default=None, help="repeat all levels (default 1)")
    r.add_argument(
        "--rate",
        type=float,
        default=None,
        help="open loop: this many requests/s in all (latency from the intended send time); "
        "--concurrency then bounds the requests in flight. Default: closed loop",
    )
    r.add_argument("--csr-pool", type=int, default=None, help="pre-made keys/CSRs (default 256)")
    r.add_argument("--timeout", type=seconds, default=10.0, help="per-request timeout, seconds")
    r.add_argument("--openbao-tls", choices=("on", "off"), default="on")
    r.add_argument(
        "--openbao-audit",
        choices=("none", "file"),
        default="none",
        help="OpenBao audit device: none (default) or file (every request logged, as the "
        "broker audits every request)",
    )
    r.add_argument("--no-uvloop", action="store_true", help="plain asyncio loop in the workers")
    r.add_argument("--cooldown", type=seconds, default=1.0, help="pause between runs, seconds")
    r.add_argument(
        "--max-error-rate",
        type=float,
        default=0.01,
        help="exit 1 if any run's error rate exceeds this (default 0.01)",
    )
    r.add_argument("--profile", action="store_true", help="py-spy the broker during its runs")
    r.add_argument(
        "--slo",
        action="store_true",
        help="judge the SLOs (p95 latency, availability, rotation success); exit 4 if missed",
    )
    r.add_argument(
        "--slo-p95-ms",
        type=float,
        default=None,
        help="replace every operation's p95 objective (default: the scenario's, 150 ms)",
    )
    r.add_argument(
        "--smoke",
        action="store_true",
        help="tiny run for CI: concurrency 2, 0.5 s warm-up, 2 s measured, 16 CSRs",
    )
    r.add_argument("--keep-temp", action="store_true", help="keep the temp dir (debugging)")
    from loadtests import fleet

    fleet.add_arguments(r)
    r.add_argument(
        "--forward",
        default=None,
        help="the dev broker forwards its audit ledger to this sink during the runs: "
        "syslog+tls (a local rsyslog it starts), syslog+tls://HOST:PORT or https://URL; "
        "each run's notes get entries/s forwarded and the sink's lag (loadtests/forwarding.py)",
    )
    r.add_argument("--forward-ca", type=Path, default=None, help="CA file of a --forward URL")
    r.add_argument(
        "--verify-svids",
        choices=("auto", "on", "off"),
        default="auto",
        help="a relying party verifies every SVID the load receives against the bundle it "
        "holds (loadtests/relyingparty.py); auto: in rotation scenarios. Each run's notes get "
        "svid_verification; --slo fails on any verification failure",
    )
    r.add_argument(
        "--bundle-refresh",
        type=seconds,
        default=None,
        help="the relying party (--verify-svids) refetches the bundle at least this often "
        "(default: on the bundle's spiffe_refresh_hint only)",
    )
    return p


def _resolve(args: argparse.Namespace) -> None:
    defaults = {"duration": 20.0, "warmup": 3.0, "concurrency": "1,8,32", "csr_pool": 256}
    defaults["rounds"] = 1
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, SMOKE[key] if args.smoke else value)
    args.levels = _levels(args.concurrency)
    if args.duration <= 0 or args.duration > 3600 or args.warmup < 0 or args.warmup > 600:
        raise SystemExit("error: --duration must be in (0, 3600] and --warmup in [0, 600]")
    if not 1 <= args.rounds <= 20:
        raise SystemExit("error: --rounds must be 1..20")
    if args.rate is not None and not 0 < args.rate <= 1_000_000:
        raise SystemExit("error: --rate must be in (0, 1000000] requests per second")
    if not 1 <= args.processes <= 64 or not 1 <= args.channels <= 64:
        raise SystemExit("error: --processes and --channels must be 1..64")
    if not 1 <= args.csr_pool <= 100_000:
        raise SystemExit("error: --csr-pool must be 1..100000")
    if args.forward is not None:
        if args.server:
            raise SystemExit("error: --forward configures the dev broker: not with --server")
        if args.forward != "syslog+tls" and not args.forward.startswith(
            ("syslog+tls://", "https://")
        ):
            raise SystemExit(
                "error: --forward takes syslog+tls, syslog+tls://HOST:PORT or https://"
            )
    if bool(args.server) != bool(args.data_dir):
        raise SystemExit("error: --server and --data-dir go together")
    if args.server:
        for address in broker_target.split_servers(args.server):
            host = address.rpartition(":")[0]
            if not procs.is_loopback(host):
                raise SystemExit(f"error: load may only target loopback addresses, not {host!r}")
        try:
            broker_target.grpc_target(args.server)
        except ValueError as exc:
            raise SystemExit(f"error: --server: {exc}") from None


def _log(msg: str) -> None:
    print(f"[loadtests {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


class _Session:
    """Everything one invocation starts, and the results it gathers."""

    def __init__(self, args: argparse.Namespace, scenario: Scenario, tmp: Path) -> None:
        self.args = args
        self.scenario = scenario
        self.tmp = tmp
        self.targets: dict[str, Any] = {}
        self.specs: dict[str, generator.ClientSpec] = {}
        self.pids: dict[str, list[int]] = {}
        self.alive: dict[str, Any] = {}
        self.runs: list[report.RunResult] = []
        self.started_at = _now()
        self.machine = machine.describe()
        self.verdicts: list[slo.Verdict] = []
        self.metrics_url: str | None = None  # the dev broker's /metrics
        self.rsyslog: Any = None  # loadtests.forwarding.LocalRsyslog under --forward syslog+tls

    # -- set-up ----------------------------------------------------------------------------

    def setup_broker(self, stack: contextlib.ExitStack) -> None:
        a = self.args
        info: dict[str, Any] = {"kind": "broker"}
        if a.server:
            # Several replicas: the checks and set-up calls go to the first, the load to all.
            address, data_dir = broker_target.split_servers(a.server)[0], a.data_dir
            info.update(started_by_loadtests=False, address=a.server)
            if a.server_pid:
                self.pids["broker"] = [a.server_pid]
        else:
            workers_env = {"BROKER_WORKERS": str(a.broker_workers)}
            if a.forward is not None:
                workers_env.update(self._forward_sink(stack))
            dev = broker_target.DevBroker(self.tmp / "broker" / "data", extra_env=workers_env)
            stack.callback(dev.stop)
            _log("starting dev broker (SoftHSM2 key backend when softhsm2 is installed)")
            dev.start()
            _log(f"broker ready: {dev.ready_line}")
            address, data_dir = dev.address, dev.data_dir
            # the generator measures this process's whole tree (the workers, if any)
            self.pids["broker"] = [dev.pid]
            self.alive["broker"] = dev.process
            self.metrics_url = dev.metrics_url
            info.update(
                started_by_loadtests=True,
                address=address,
                command="python -m broker.cli serve --dev --data-dir <tmp> --listen " + address,
                env={**broker_target.RATE_LIMIT_ENV, **workers_env},
                ready_line=dev.ready_line,
                source=machine.source_revision(Path(__file__).resolve().parents[1]),
            )
        ident = broker_target.load_identity(data_dir)
        try:
            st = broker_target.status(address, ident, a.tls_server_name)
            info["status"] = st
        except Exception as exc:
            st = {}
            info["status_error"] = str(exc)[:500]
        td = st.get("trust_domain") or broker_target.trust_domain_from_bundle(ident.root_pem)
        if not td:
            raise procs.StartupError("could not learn the broker's trust domain")
        info["trust_domain"] = td
        backend = str(st.get("key_backend", ""))
        if backend and "softhsm" not in backend.lower() and "pkcs11" not in backend.lower():
            _log(f"WARNING: the broker's key backend is {backend!r}, not SoftHSM2")
        self.targets["broker"] = info
        self._broker = (address, ident)

    def _forward_sink(self, stack: contextlib.ExitStack) -> dict[str, str]:
        """The --forward sink for the dev broker (a local rsyslog started here, or a URL)."""
        from loadtests import forwarding

        a = self.args
        if a.forward == "syslog+tls":
            rsyslog = forwarding.LocalRsyslog(self.tmp / "rsyslog")
            stack.callback(rsyslog.stop)
            rsyslog.start()
            self.rsyslog = rsyslog
            _log(f"rsyslog (TLS) on {rsyslog.url}: the broker forwards its ledger there")
            self.targets.setdefault("forwarding", {})["sink"] = "local rsyslog " + rsyslog.url
            return forwarding.sinks_env(rsyslog.url, rsyslog.ca_file)
        self.targets.setdefault("forwarding", {})["sink"] = a.forward
        return forwarding.sinks_env(a.forward, a.forward_ca)

    def make_pool(self) -> None:
        td = self.targets["broker"]["trust_domain"]
        _log(f"making {self.args.csr_pool} EC P-256 keys and CSRs for spiffe://{td}/...")
        self.pool = csrs.make_pool(td, self.args.csr_pool)

    def check_broker(self) -> None:
        a, sc = self.args, self.scenario
        address, ident = self._broker
        parts = broker_operations(sc)
        for part in parts:
            if part.broker_setup is not None:
                part.broker_setup(
                    lambda method, rtype, req: broker_target.call_once(
                        address, ident, a.tls_server_name, method, rtype, req
                    )
                )
        ops, per_op = [], []
        for part in parts:
            if part.broker_requests is None:
                raise SystemExit(f"error: scenario {part.name} has no broker requests")
            reqs = part.broker_requests(self.pool)
            resp = broker_target.call_once(
                address,
                ident,
                a.tls_server_name,
                part.broker_method,
                _load(part.broker_response),
                reqs[0],
            )
            if not getattr(resp, part.broker_require_field):
                raise procs.StartupError(f"{part.name}: answer without {part.broker_require_field}")
            if part.broker_check is not None:
                sample = part.broker_check(resp, self.pool[0])
                key = "sample_certificate" if part.name == "svid-csr" else f"sample_{part.name}"
                self.targets["broker"][key] = sample
            ops.append(
                GrpcOp(
                    part.name,
                    part.broker_method,
                    part.broker_response,
                    part.broker_require_field,
                    part.broker_verify,
                )
            )
            per_op.append(reqs)
        # Interleave the operations' requests (a, b, a, b, ...) for a mixed load.
        requests = [req for group in zip(*per_op, strict=False) for req in group]
        request_ops = [i for _ in range(len(requests) // len(ops)) for i in range(len(ops))]
        replicas = broker_target.split_servers(a.server) if a.server else [address]
        server_name = a.tls_server_name
        if len(replicas) > 1 and server_name is None:
            # One channel over several addresses: check the broker's own name (as the SDK
            # does), not the address dialled.
            from broker.api.client.base import broker_server_name

            server_name = broker_server_name(ident.root_pem)
        self.specs["broker"] = GrpcSpec(
            address=broker_target.grpc_target(",".join(replicas)),
            method=parts[0].broker_method,
            requests=tuple(requests),
            response_type=parts[0].broker_response,
            require_field=parts[0].broker_require_field,
            name=parts[0].name,
            verify=parts[0].broker_verify,
            ops=tuple(ops) if len(ops) > 1 else (),
            request_ops=tuple(request_ops) if len(ops) > 1 else (),
            root_pem=ident.root_pem,
            cert_pem=ident.cert_pem,
            key_pem=ident.key_pem,
            server_name=server_name,
            channels=a.channels,
            timeout_s=a.timeout,
            mode="async" if a.grpc_client == "aio" else "threads",
        )

    def setup_openbao(self, stack: contextlib.ExitStack) -> None:
        from loadtests.targets.openbao import OpenBao

        sc = self.scenario
        if sc.openbao_path is None or sc.openbao_bodies is None:
            raise SystemExit(f"error: scenario {sc.name} has no OpenBao equivalent")
        td = self.targets["broker"]["trust_domain"]
        bao = OpenBao(
            self.tmp / "openbao",
            tls=self.args.openbao_tls == "on",
            trust_domain=td,
            audit=self.args.openbao_audit,
        )
        stack.callback(bao.stop)
        _log(
            f"starting OpenBao ({bao.binary}), raft storage, TLS {self.args.openbao_tls}, "
            f"audit device {self.args.openbao_audit}"
        )
        bao.start()
        _log(f"OpenBao ready at {bao.base_url}: {bao.version}")
        self.targets["openbao"] = {
            "kind": "openbao",
            "version": bao.version,
            "binary": bao.binary,
            "address": bao.base_url,
            "setup": bao.setup_notes,
            "endpoint": f"{sc.openbao_method} {sc.openbao_path}",
        }
        if sc.openbao_setup is not None:
            sc.openbao_setup(bao)
        else:
            data = bao.sign_once(self.pool[0].csr_pem, self.pool[0].spiffe_id)
            from cryptography import x509
            from cryptography.hazmat.primitives.serialization import Encoding

            cert = x509.load_pem_x509_certificate(data["certificate"].encode())
            leaf = csrs.check_certificate(cert.public_bytes(Encoding.DER), self.pool[0])
            self.targets["openbao"]["sample_certificate"] = leaf
        self.pids["openbao"] = [bao.pid]
        self.alive["openbao"] = bao.process
        self.specs["openbao"] = HttpSpec(
            base_url=bao.base_url,
            path=sc.openbao_path,
            headers=(("X-Vault-Token", bao.token), ("Content-Type", "application/json")),
            bodies=tuple(sc.openbao_bodies(self.pool)),
            expect=sc.openbao_expect,
            ca_pem=bao.ca_pem,
            timeout_s=self.args.timeout,
            name=sc.name,
            method=sc.openbao_method,
        )

    # -- runs ------------------------------------------------------------------------------

    def run_one(self, target: str, concurrency: int, rnd: int) -> report.RunResult:
        """One timed window against `target` at `concurrency`, with what runs beside it."""
        proc = self.alive.get(target)
        if proc is not None:
            proc.check_alive()
        extras = self._extras(target, concurrency, rnd)
        started = _now()
        spec = self.specs[target]
        if target == "broker" and isinstance(spec, GrpcSpec) and self._verifies_svids():
            extras.relying_party = self._relying_party()
            spec = dataclasses.replace(spec, verify_queue=extras.relying_party.queue)
        try:
            outcome = self._load(target, concurrency, extras, spec)
        finally:
            verification = extras.relying_party.finish() if extras.relying_party else None
        operations = dict(outcome.operations)
        if extras.rotator:
            operations.update(extras.rotator[0].finish())
        a = self.args
        result = report.RunResult(
            target=target,
            scenario=self.scenario.name,
            concurrency=concurrency,
            round=rnd,
            processes=outcome.processes,
            warmup_s=a.warmup,
            duration_s=a.duration,
            ok=outcome.ok,
            errors=outcome.errors,
            error_samples=outcome.error_samples,
            histogram=outcome.histogram,
            client_cpu_s=outcome.client_cpu_s,
            server_cpu_s=outcome.server_cpu_s,
            started_at=started,
            notes=self._notes(target, concurrency, rnd, outcome, extras),
            operations=operations,
        )
        if verification is not None:
            result.notes["svid_verification"] = verification
            _log(
                f"relying party: {verification['svids_verified']} SVIDs verified, "
                f"{verification['svid_verification_failures']} failures "
                f"{verification['by_kind_and_phase']}"
            )
        _log_run(result)
        return result

    def _extras(self, target: str, concurrency: int, rnd: int) -> _Extras:
        """What starts with the timed window: the profiler (--profile), the rotation calls
        (scenarios with rotate_every_s) and the first /metrics scrape (a dev broker)."""
        extras = _Extras()
        if target != "broker":
            return extras
        a = self.args
        if a.profile and self.pids.get("broker"):
            from loadtests.profile import Profiler

            pid = self.pids["broker"][0]
            path = a.report / f"profile-broker-c{concurrency}-r{rnd}.collapsed.txt"
            extras.starters.append(lambda: extras.profiler.append(Profiler(pid, path, a.duration)))
        every = self.scenario.rotate_every_s
        if every:
            extras.starters.append(lambda: extras.rotator.append(self._start_rotator(every)))
        if self.metrics_url:
            url = self.metrics_url

            def scrape_metrics() -> None:
                with contextlib.suppress(OSError):
                    extras.scraped.append(servermetrics.scrape(url))

            extras.starters.append(scrape_metrics)
            if a.forward is not None:
                from loadtests.forwarding import ForwardWatch

                extras.starters.append(lambda: extras.forward.append(ForwardWatch(url)))
        return extras

    def _start_rotator(self, every: float) -> broker_target.Rotator:
        address, ident = self._broker
        calls = [broker_target.ca_rotation()]
        for part in broker_operations(self.scenario):
            if part.rotation is not None:
                calls.append(broker_target.RotationCall(*part.rotation()))
        a = self.args
        rotator = broker_target.Rotator(
            address,
            ident,
            a.tls_server_name,
            every,
            a.duration,
            calls,
            rollouts=self.scenario.rollouts,
        )
        rotator.start()
        return rotator

    def _verifies_svids(self) -> bool:
        mode = getattr(self.args, "verify_svids", "auto")
        if mode == "off":
            return False
        wanted = mode == "on" or bool(self.scenario.rotate_every_s)
        return wanted and any(p.broker_verify for p in broker_operations(self.scenario))

    def _relying_party(self) -> Any:
        from loadtests.relyingparty import RelyingParty
        from loadtests.scenarios import JWT_AUDIENCE

        address, ident = self._broker
        rp = RelyingParty(
            address,
            ident,
            self.args.tls_server_name,
            self.targets["broker"]["trust_domain"],
            JWT_AUDIENCE,
            getattr(self.args, "bundle_refresh", None),
        )
        rp.start()
        return rp

    def _load(
        self,
        target: str,
        concurrency: int,
        extras: _Extras,
        spec: generator.ClientSpec | None = None,
    ) -> generator.LoadOutcome:
        a = self.args
        return generator.run_load(
            self.specs[target] if spec is None else spec,
            concurrency=concurrency,
            processes=a.processes,
            warmup=a.warmup,
            duration=a.duration,
            request_timeout=a.timeout,
            server_pids=self.pids.get(target, []),
            use_uvloop=not a.no_uvloop,
            on_window_start=extras.start if extras.starters else None,
            rate=a.rate,
        )

    def _notes(
        self,
        target: str,
        concurrency: int,
        rnd: int,
        outcome: generator.LoadOutcome,
        extras: _Extras,
    ) -> dict[str, Any]:
        """The run's notes: workers, load, and what the extras measured (finishing them)."""
        a = self.args
        notes: dict[str, Any] = {"workers": outcome.worker_notes, "loadavg": machine.loadavg()}
        if extras.scraped and self.metrics_url:
            with contextlib.suppress(OSError):
                after = servermetrics.scrape(self.metrics_url)
                notes["server_rpc_latency"] = servermetrics.diff(extras.scraped[0], after)
        if outcome.server_threads:
            notes["server_busiest_threads"] = outcome.server_threads
        if extras.forward:
            forwarded = extras.forward[0].finish()
            if self.rsyslog is not None:
                records, distinct = self.rsyslog.received()
                forwarded.update(receiver_records=records, receiver_distinct_seqs=distinct)
            notes["audit_forwarding"] = forwarded
            _log(
                f"audit forwarding: {forwarded.get('forwarded_per_s')} entries/s to the sink, "
                f"lag max {forwarded.get('lag_entries_max')} median "
                f"{forwarded.get('lag_entries_median')} entries, drained "
                f"{forwarded.get('drained_after_s')} s after the window"
            )
        if extras.profiler:
            summary = extras.profiler[0].finish()
            (a.report / f"profile-broker-c{concurrency}-r{rnd}.top.txt").write_text(summary)
            notes["profiled"] = True
        if target == "broker":
            notes["grpc_client"] = a.grpc_client
            notes["channels_per_process"] = a.channels
        return notes

    def run_all(self) -> None:
        a = self.args
        names = ["broker", *(["openbao"] if a.compare == "openbao" else [])]
        step = 0
        for rnd in range(1, a.rounds + 1):
            for concurrency in a.levels:
                # Alternate who goes first so drift on a noisy machine hits both alike.
                order = names if step % 2 == 0 else list(reversed(names))
                step += 1
                for target in order:
                    if self.runs and a.cooldown > 0:
                        time.sleep(a.cooldown)
                    self.runs.append(self.run_one(target, concurrency, rnd))

    # -- report ----------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        a = self.args
        return {
            "scenario": a.scenario,
            "concurrency": a.levels,
            "duration_s": a.duration,
            "warmup_s": a.warmup,
            "rounds": a.rounds,
            "rate_rps": a.rate,
            "loop": "open" if a.rate else "closed",
            "processes": a.processes,
            "grpc_client": a.grpc_client,
            "channels_per_process": a.channels,
            "csr_pool": a.csr_pool,
            "request_timeout_s": a.timeout,
            "uvloop_in_workers": not a.no_uvloop,
            "compare": a.compare,
            "openbao_tls": a.openbao_tls if a.compare == "openbao" else None,
            "openbao_audit": a.openbao_audit if a.compare == "openbao" else None,
            "profile": a.profile,
            "slo": a.slo,
            "slo_p95_ms": a.slo_p95_ms,
            "rotate_every_s": self.scenario.rotate_every_s,
            "verify_svids": getattr(a, "verify_svids", "auto"),
            "bundle_refresh_s": getattr(a, "bundle_refresh", None),
            "smoke": a.smoke,
            "command": " ".join(["python -m loadtests", *sys.argv[1:]]),
        }

    def finish(self, interrupted: bool, failure: str | None) -> tuple[dict[str, Any], list[Any]]:
        comparisons = (
            report.compare(self.runs, "broker", self.args.compare) if self.args.compare else []
        )
        self.machine["loadavg_at_end"] = machine.loadavg()
        rep = report.build_report(
            scenario=self.scenario.name,
            settings=self.settings(),
            machine=self.machine,
            targets=self.targets,
            runs=self.runs,
            comparisons=comparisons,
            started_at=self.started_at,
            finished_at=_now(),
        )
        rep["interrupted"] = interrupted
        rep["failure"] = failure
        if self.args.slo:
            override = self.args.slo_p95_ms
            verdicts = slo.evaluate(
                self.runs, _p95_objective if override is None else (lambda _op: override)
            )
            rep["slo"] = {
                "met": bool(verdicts) and all(v.ok for v in verdicts) and not failure,
                "missed": [v.to_json() for v in verdicts if not v.ok],
                "verdicts": [v.to_json() for v in verdicts],
            }
            self.verdicts = verdicts
        return rep, comparisons


@dataclass
class _Extras:
    """What runs beside one timed window, started when the window opens (after warm-up)."""

    starters: list[Callable[[], None]] = field(default_factory=list)
    profiler: list[Any] = field(default_factory=list)
    rotator: list[broker_target.Rotator] = field(default_factory=list)
    scraped: list[servermetrics.Snapshot] = field(default_factory=list)
    forward: list[Any] = field(default_factory=list)  # loadtests.forwarding.ForwardWatch
    relying_party: Any = None  # loadtests.relyingparty.RelyingParty (verifying SVIDs)

    def start(self) -> None:
        for start in self.starters:
            start()


def _log_run(result: report.RunResult) -> None:
    target, concurrency, rnd = result.target, result.concurrency, result.round
    lat = result.latency()
    _log(
        f"{target:<8} c={concurrency:<4} round {rnd}: {result.throughput:8.1f} req/s  "
        f"p50 {lat['p50']} ms  p99 {lat['p99']} ms  errors {result.error_count}"
        + (f" ({result.error_samples[0]})" if result.error_samples else "")
    )
    for name, op in result.operation_stats().items():
        if slo.is_rotation(name):
            _log(
                f"{target:<8} c={concurrency:<4} round {rnd}: {name}: {op['requests_ok']} "
                f"rotations, {op['error_count']} failed"
                + (f" ({op['error_samples'][0]})" if op["error_samples"] else "")
            )


def _p95_objective(operation: str) -> float:
    sc = SCENARIOS.get(operation)
    return sc.slo_p95_ms if sc is not None else SCENARIOS["svid-csr"].slo_p95_ms


def run(args: argparse.Namespace) -> int:
    _resolve(args)
    scenario = SCENARIOS[args.scenario]
    args.report = args.report.resolve()
    args.report.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="loadtests-"))
    session = _Session(args, scenario, tmp)
    interrupted, failure, status = False, None, 0
    try:
        with _sigterm_as_interrupt(), contextlib.ExitStack() as stack:
            session.setup_broker(stack)
            session.make_pool()
            session.check_broker()
            if args.compare == "openbao":
                session.setup_openbao(stack)
            session.run_all()
            _log("stopping servers")
    except KeyboardInterrupt:
        interrupted, status = True, 130
        _log("interrupted: servers stopped, writing what was measured")
    except (procs.StartupError, generator.WorkerFailed) as exc:
        failure, status = str(exc), 3
        _log(f"failed: {exc}")
    finally:
        if args.keep_temp:
            _log(f"temp dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    rep, comparisons = session.finish(interrupted, failure)
    path = report.write_report(args.report, rep)
    page = write_html(args.report, rep)
    if session.runs:
        print()
        print(report.format_table(session.runs))
        if comparisons:
            print()
            print(report.format_comparisons(comparisons))
    if args.slo:
        print()
        print(slo.format_verdicts(session.verdicts))
    print(f"\nreport: {path}\nhtml:   {page}")
    if status:
        return status
    if args.slo and not rep["slo"]["met"]:
        missed = sorted({f"{v.slo} of {v.operation}" for v in session.verdicts if not v.ok})
        _log(f"SLO missed: {'; '.join(missed) or 'no run was judged'}")
        return 4
    bad = [r for r in session.runs if r.ok == 0 or r.error_rate > args.max_error_rate]
    if bad:
        _log(f"{len(bad)} run(s) had no successes or an error rate above {args.max_error_rate}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run" and args.scenario == "fleet":
        from loadtests import fleet

        return fleet.run(args)
    if args.command == "run":
        return run(args)
    if args.command == "preload":
        from loadtests import preload

        return preload.run(args)
    if args.command == "remote-hsm":
        from loadtests import remotehsm

        return remotehsm.run(args)
    if args.command == "list":
        width = max(len(name) for name in SCENARIOS)
        for name, sc in SCENARIOS.items():
            peers = " [--compare openbao]" if sc.openbao_path else ""
            print(f"{name:<{width}}  {sc.description}{peers}")
        print(f"{'fleet':<{width}}  {FLEET_DESCRIPTION}")
        return 0
    if args.command == "html":
        import json

        rep = json.loads((args.report_dir / "report.json").read_text())
        print(write_html(args.report_dir, rep))
        return 0
    return 2
