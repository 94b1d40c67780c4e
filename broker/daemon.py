"""Process entry point for `broker serve`: load config, wire the service, serve until stopped.

With `workers > 1` this process is a supervisor: it bootstraps the CA and storage once, then
starts that many worker processes that share the listen port (SO_REUSEPORT, the kernel spreads
connections across them), prints the listening line once every worker is ready, forwards
SIGTERM/SIGINT, and stops them all if one dies. Workers coordinate only through storage: the
audit chain is serialised by the database, one worker at a time holds the rotation lease, and
the others pick up rotations and policy changes within seconds (`CAService.sync`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import multiprocessing
import multiprocessing.connection
import os
import resource
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker.app import Application
from broker.audit import Verification
from broker.config import DEFAULT_LISTEN, Config, ServerConfig, load_config
from broker.errors import BrokerError, FailedPrecondition, InvalidArgument, Unavailable
from broker.logs import configure as configure_logs
from broker.metrics import (
    MetricsServer,
    Readiness,
    mark_worker_dead,
    multiprocess_dir,
    serve_metrics,
)
from ca.clock import SystemClock
from ca.keys import open_backend

if TYPE_CHECKING:
    from broker.tracing.provider import Tracing

__all__ = ["DEFAULT_LISTEN", "ServeOptions", "raise_fd_limit", "serve"]

log = logging.getLogger("broker")

STOP_JOBS_SECONDS = 2.0
STOP_GRACE_SECONDS = 3.0
STOP_CLOSE_SECONDS = 3.0

_READY_TIMEOUT = 120.0
_STOP_TIMEOUT = 15.0


@dataclass(frozen=True)
class ServeOptions:
    dev: bool
    data_dir: Path
    listen: str | None = None  # overrides the config file / dev default
    config_file: Path | None = None
    workers: int | None = None  # overrides server.workers
    new_ledger_epoch: str | None = None  # the operator's reason to start a new ledger epoch


def _warn(message: str) -> None:
    print(f"broker: warning: {message}", file=sys.stderr, flush=True)


def build_config(options: ServeOptions) -> Config:
    if options.dev:
        from broker.devmode import prepare

        config = prepare(options.data_dir, options.listen, _warn)
    else:
        assert options.config_file is not None
        config = load_config(options.config_file)
        if options.listen:
            config = replace(config, server=replace(config.server, listen=options.listen))
    if options.workers is not None:
        config = replace(config, server=replace(config.server, workers=options.workers))
    return config.validate()


LOCK_FILE = "broker.lock"
_held_locks: dict[Path, int] = {}


def lock_data_dir(data_dir: Path) -> None:
    """Hold an exclusive lock on `data_dir` for the life of this process (`flock` on
    `<data_dir>/broker.lock`, which names the holder's pid). Raises FailedPrecondition when
    another process holds it: two brokers on one data dir would both write its CA, token and
    operator identity."""
    data_dir = data_dir.resolve()
    if data_dir in _held_locks:
        return
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = data_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip()
        os.close(fd)
        who = f" (pid {holder})" if holder.isdigit() else ""
        raise FailedPrecondition(
            f"the data dir {data_dir} is in use by another broker{who}; stop it first, "
            "or give this one its own --data-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held_locks[data_dir] = fd


def check_addresses(*addresses: str) -> None:
    """Raises Unavailable when one of the HOST:PORT `addresses` cannot be bound now (in use,
    not an address of this host): checked before any state is created, so a broker that
    cannot serve leaves nothing behind. Empty addresses and port 0 are skipped."""
    for address in addresses:
        host, _, port_text = address.rpartition(":")
        if not address or not port_text.isdigit() or int(port_text) == 0:
            continue
        bind_host = host.strip("[]") or None  # no host: every interface, as gRPC binds it
        try:
            family, kind, proto, _, where = socket.getaddrinfo(
                bind_host, int(port_text), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(where)
        except OSError as exc:
            raise Unavailable(
                f"cannot listen on {address}: {exc.strerror or exc}; nothing was created"
            ) from None


def _dev_addresses(options: ServeOptions) -> tuple[str, str]:
    """The listen and metrics addresses `serve --dev` will use (before its config exists)."""
    listen = options.listen or os.environ.get("BROKER_LISTEN") or DEFAULT_LISTEN
    metrics = os.environ.get("BROKER_METRICS_LISTEN", ServerConfig().metrics_listen)
    return listen, metrics


def _configure_logging() -> None:
    # JSON lines on stderr, secret fields redacted (broker.logs).
    configure_logs(logging.INFO, sys.stderr)


def raise_fd_limit() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit, so that idle or slow
    connections cannot exhaust the fds the broker needs (the gRPC servers cap connections
    below it: `broker.api.server.serving.connection_budget`). Logs one line saying what it did and
    returns (before, after); a refusal by the kernel is logged and the old limit kept."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard or soft == resource.RLIM_INFINITY:
        log.info("file descriptor limit: %s (already the hard limit)", _limit_text(soft))
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning(
            "file descriptor limit stays at %s: cannot raise it to the hard limit %s (%s)",
            _limit_text(soft),
            _limit_text(hard),
            exc,
        )
        return soft, soft
    log.info(
        "file descriptor limit raised from %s to the hard limit %s",
        _limit_text(soft),
        _limit_text(hard),
    )
    return soft, hard


def _limit_text(limit: int) -> str:
    return "unlimited" if limit == resource.RLIM_INFINITY else str(limit)


def _run(coro: Any) -> None:
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(coro)


def serve(options: ServeOptions) -> None:
    """Serve until SIGINT/SIGTERM. Prints one line saying where, once ready.

    Before anything is created (a dev token, a CA, a database), the data dir is locked for
    this process (a second broker on it is refused) and the listen and metrics addresses are
    checked to be free.

    Raises `broker.errors.BrokerError` or `ca.errors.CAError` for configuration problems
    (the CLI turns them into one line on stderr).
    """
    _configure_logging()
    if options.dev:
        lock_data_dir(options.data_dir)
        check_addresses(*_dev_addresses(options))
    config = build_config(options)
    if not options.dev:
        lock_data_dir(config.data_dir)
    check_addresses(config.server.listen, config.server.metrics_listen)
    raise_fd_limit()  # inherited by the worker processes
    if config.server.workers == 1:
        _run(_serve(config, new_epoch=options.new_ledger_epoch))
    else:
        _supervise(config, options.new_ledger_epoch)


async def _open(config: Config, *, traced: bool = False) -> Application:
    """Keys, storage and the Application over them; `traced` (a serving process): with
    OpenTelemetry when an endpoint is configured."""
    from broker.storage.factory import open_storage
    from broker.storage.sql import SqlStorage

    keys = open_backend(config.keys.uri, config.keys.pin_source)
    try:
        storage = await open_storage(config.storage.resolved_dsn())
    except BaseException:
        keys.close()
        raise
    if config.server.workers > 1 and isinstance(storage, SqlStorage):
        storage.single_hop_writes = True
    tracing = _open_tracing(config) if traced else None
    if tracing is not None:  # the interfaces are wrapped before anything is built on them
        keys, storage = tracing.keys(keys), tracing.storage(storage)
    return Application(config, keys, storage, SystemClock(), tracing=tracing)


def _open_tracing(config: Config) -> Tracing | None:
    """OpenTelemetry for this process (each worker has its own), when an OTLP endpoint is
    configured; None otherwise (nothing of it is imported then)."""
    if not config.tracing.enabled:
        return None
    from broker.api.otlp import span_exporter
    from broker.tracing.provider import open_tracing

    tracing = open_tracing(config.tracing, span_exporter(config.tracing))
    log.info("traces to %s (OTLP/gRPC)", config.tracing.endpoint)
    return tracing


async def _serve(
    config: Config,
    worker: int = 0,
    ready: multiprocessing.connection.Connection | None = None,
    new_epoch: str | None = None,
) -> None:
    """Serve in this process. A worker (`ready` given) reports its port instead of printing."""
    from broker.api.server.serving import serve_application

    app = await _open(config, traced=True)
    metrics_server = None
    try:
        await app.start(new_ledger_epoch=new_epoch)
        if worker == 0:
            app.write_operator_identity()
        served = await serve_application(app, reuse_port=ready is not None)
        stop = asyncio.Event()

        def readiness() -> list[str]:
            reasons = ["shutting down"] if stop.is_set() else []
            try:
                app.ledger.ensure_writable()
            except BrokerError as exc:
                reasons.append(str(exc))
            return reasons

        if ready is None and config.server.metrics_listen:
            metrics_server = _start_metrics(config.server.metrics_listen, readiness=readiness)
        server, port = served.server, served.port
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if ready is None:
            attest = served.attest_port
            host = config.server.listen.rpartition(":")[0]
            extra = f"; attestation on {host}:{attest}" if attest else ""
            line = _listening_line(config, port, app.keys.description, app.storage.dialect, extra)
            print(line, flush=True)
        else:
            ready.send(
                ("ready", port, app.keys.description, app.storage.dialect, served.attest_port)
            )
        background = asyncio.create_task(
            app.run_background(
                served.material, served.credentials.update, write_operator=worker == 0
            )
        )
        reaper = asyncio.create_task(app.lease_reaper.run())  # database leases, own cadence
        forwarder = asyncio.create_task(app.forwarder.run())  # audit stream to the sinks
        notifier = asyncio.create_task(app.notifier.run())  # signed webhook notifications
        rotation = asyncio.create_task(app.static_rotation.run())  # static database roles
        rollouts = asyncio.create_task(app.rollout_job.run())  # staged secret rollouts
        await stop.wait()
        log.info("shutting down")
        # A stop is bounded (an orchestrator SIGKILLs after its grace period): the jobs get
        # STOP_JOBS_SECONDS to wind down, in-flight RPCs STOP_GRACE_SECONDS, closing the
        # storage, engines and token STOP_CLOSE_SECONDS; a step that overruns is logged and left
        # (leases, intents and the ledger are in storage, so nothing is lost by leaving it).
        jobs = [forwarder, notifier, rotation, rollouts, background, reaper]
        for job in jobs:
            job.cancel()
        _, pending = await asyncio.wait(jobs, timeout=STOP_JOBS_SECONDS)
        if pending:
            log.warning("shutting down: %d background jobs did not stop in time", len(pending))
        await server.stop(grace=STOP_GRACE_SECONDS)
    finally:
        if metrics_server is not None:
            metrics_server.close()
        try:
            await asyncio.wait_for(app.close(), timeout=STOP_CLOSE_SECONDS)
        except TimeoutError:
            log.warning(
                "shutting down: closing storage, engines and the token took over %s s",
                STOP_CLOSE_SECONDS,
            )
        if app.tracing is not None:
            app.tracing.close()  # flushes the spans still buffered


def _start_metrics(
    listen: str, owned_dir: Path | None = None, readiness: Readiness | None = None
) -> MetricsServer:
    """The /metrics, /healthz and /readyz endpoint (see broker.metrics); says where on
    stderr."""
    try:
        served = serve_metrics(listen, owned_dir=owned_dir, readiness=readiness)
    except OSError as exc:
        raise Unavailable(f"cannot serve metrics on {listen}: {exc.strerror or exc}") from exc
    log.info(
        "metrics on http://%s:%d/metrics (probes: /healthz, /readyz)", served.host, served.port
    )
    return served


def _listening_line(config: Config, port: int, keys: str, storage: str, extra: str = "") -> str:
    """The one line `broker serve` prints on stdout once it is ready."""
    host = config.server.listen.rpartition(":")[0]
    return (
        f"broker listening on {host}:{port} (trust domain {config.trust_domain}; "
        f"keys: {keys}; storage: {storage}{extra})"
    )


# -- several worker processes ----------------------------------------------------------------


def new_ledger_epoch(options: ServeOptions) -> tuple[int, int]:
    """`broker audit new-epoch`: open storage and keys as `serve` would, start a new audit
    ledger epoch (see broker.audit), stop. Returns (epoch, seq of its record)."""
    _configure_logging()
    config = build_config(options)
    reason = options.new_ledger_epoch or ""

    async def run() -> tuple[int, int]:
        app = await _open(config)
        try:
            await app.storage.migrate()
            await app.ledger.open(new_epoch_reason=reason, actor="operator (audit new-epoch)")
            (record,) = await app.ledger.tail(1)
            return app.ledger.epoch, record.seq
        finally:
            await app.close()

    result: list[tuple[int, int]] = []

    async def keep() -> None:
        result.append(await run())

    _run(keep())
    return result[0]


def verify_ledger(options: ServeOptions, checkpoint_json: str = "") -> Verification:
    """`broker audit verify --offline`: verify the ledger straight from storage and the key
    backend, without a running broker (and without writing anything)."""
    from broker.audit import parse_checkpoint

    _configure_logging()
    config = build_config(options)
    checkpoint = parse_checkpoint(checkpoint_json) if checkpoint_json else None
    result: list[Verification] = []

    async def run() -> None:
        app = await _open(config)
        try:
            result.append(await app.ledger.verify(checkpoint=checkpoint))
        finally:
            await app.close()

    _run(run())
    return result[0]


async def _bootstrap(config: Config, new_epoch: str | None = None) -> None:
    """Migrate, create the CA on first start and write the operator identity, once, before
    the workers start (so they never race to create the root)."""
    app = await _open(config)
    try:
        await app.start(new_ledger_epoch=new_epoch)
        app.write_operator_identity()
    finally:
        await app.close()


def _reserve_port(listen: str) -> tuple[str, socket.socket | None]:
    """For port 0, pick a free port for all workers: hold a bound (not listening) socket with
    SO_REUSEPORT until the workers have bound theirs."""
    host, _, port = listen.rpartition(":")
    if int(port) != 0:
        return listen, None
    family = socket.AF_INET6 if host.startswith("[") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host.strip("[]"), 0))
    return f"{host}:{sock.getsockname()[1]}", sock


def _worker_main(config: Config, index: int, conn: multiprocessing.connection.Connection) -> None:
    _configure_logging()
    try:
        _run(_serve(config, index, conn))
    except Exception as exc:
        with contextlib.suppress(OSError):
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None


def _supervise(config: Config, new_epoch: str | None = None) -> None:
    _run(_bootstrap(config, new_epoch))
    # Workers inherit PROMETHEUS_MULTIPROC_DIR and write their samples there; this process
    # serves their sum (see broker.metrics).
    metrics_dir = multiprocess_dir() if config.server.metrics_listen else None
    metrics_server: MetricsServer | None = None
    listen, holder = _reserve_port(config.server.listen)
    config = replace(config, server=replace(config.server, listen=listen))
    ctx = multiprocessing.get_context("spawn")
    workers: list[Any] = []
    pipes: list[multiprocessing.connection.Connection] = []
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    old_term = signal.signal(signal.SIGTERM, request_stop)
    old_int = signal.signal(signal.SIGINT, request_stop)
    try:
        for index in range(config.server.workers):
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main, args=(config, index, child_end), name=f"broker-worker-{index}"
            )
            proc.start()
            child_end.close()
            workers.append(proc)
            pipes.append(parent_end)
        info = _wait_ready(workers, pipes, lambda: stopping)
        if holder is not None:
            holder.close()
        if info is None:
            return
        port, keys, storage, attest = info
        host = config.server.listen.rpartition(":")[0]
        attest_text = f"; attestation on {host}:{attest}" if attest else ""
        if config.server.metrics_listen:

            def readiness() -> list[str]:
                reasons = ["shutting down"] if stopping else []
                reasons += [f"{w.name} exited" for w in workers if not w.is_alive()]
                return reasons

            metrics_server = _start_metrics(
                config.server.metrics_listen, metrics_dir, readiness=readiness
            )
        print(
            _listening_line(config, port, keys, storage, f"; workers: {len(workers)}{attest_text}"),
            flush=True,
        )
        while not stopping:
            dead = [p for p in workers if not p.is_alive()]
            if dead:
                raise Unavailable(
                    f"worker {dead[0].name} exited with status {dead[0].exitcode}; "
                    "stopping the others"
                )
            time.sleep(0.2)
        log.info("shutting down %d workers", len(workers))
    finally:
        _stop_all(workers)
        for proc in workers:
            if proc.pid is not None:
                mark_worker_dead(proc.pid)
        if metrics_server is not None:
            metrics_server.close()
        elif metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)
        if holder is not None:
            holder.close()


def _wait_ready(
    workers: list[Any],
    pipes: list[multiprocessing.connection.Connection],
    stopping: Any,
) -> tuple[int, str, str, int | None] | None:
    deadline = time.monotonic() + _READY_TIMEOUT
    pending = dict(zip(pipes, workers, strict=True))
    info: tuple[int, str, str, int | None] | None = None
    while pending:
        if stopping():
            return None
        if time.monotonic() > deadline:
            raise Unavailable(f"workers did not start within {_READY_TIMEOUT:.0f} s")
        for ready in multiprocessing.connection.wait(list(pending), timeout=0.2):
            assert isinstance(ready, multiprocessing.connection.Connection)
            proc = pending.pop(ready)
            try:
                message = ready.recv()
            except EOFError:
                raise Unavailable(
                    f"worker {proc.name} exited before it was ready (status {proc.exitcode})"
                ) from None
            if message[0] == "error":
                raise InvalidArgument(f"worker {proc.name} could not start: {message[1]}")
            attest = int(message[4]) if len(message) > 4 and message[4] else None
            info = (int(message[1]), str(message[2]), str(message[3]), attest)
    return info


def _stop_all(workers: list[Any]) -> None:
    for proc in workers:
        if proc.is_alive():
            proc.terminate()  # SIGTERM: graceful stop, audit ledger drained
    deadline = time.monotonic() + _STOP_TIMEOUT
    for proc in workers:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()
