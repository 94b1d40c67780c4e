"""The `broker agent` process: attest, keep the SVIDs fresh, serve the Workload API, and keep
the configured secrets as files. The grpc-free logic lives in `broker.agent`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from broker.agent import Agent, FileDelivery
from broker.agenthealth import serve_health
from broker.agentstream import SyncStream
from broker.agenttrust import TrustStore
from broker.errors import InvalidArgument
from broker.logs import configure as configure_logs
from broker.rollout.consumer import ConsumerReports, Synced
from broker.secretfiles import SecretFiles
from ca.clock import Clock, SystemClock

from ..client.base import BrokerClient, ClientCredentials
from ..client.identity import GrpcBrokerLink
from ..client.rollout import BrokerRolloutReporter, RolloutsClient
from ..client.secrets import BrokerSecretSource, SecretsClient
from .endpoint import serve_workload_api
from .peercred import selectors_of

__all__ = ["RESERVED_FILES", "AgentOptions", "pinned_roots", "run_agent"]

log = logging.getLogger("broker.agent")


@dataclass(frozen=True)
class AgentOptions:
    server: str
    attest_server: str
    bundle_pem: bytes
    socket_path: Path
    join_token: str | None = None
    jwt: str | None = None
    write_dir: Path | None = None
    on_rotate: str | None = None
    sync_interval: float = 5.0
    # Secrets to keep as 0600 files in `write_dir` (file name -> secret://...), fetched with
    # the identity the agent writes there (the workload's own), refreshed every
    # `secret_interval` seconds and right after each SVID rotation.
    secrets: dict[str, str] = field(default_factory=dict)
    secret_interval: float = 10.0
    health_socket: Path | None = None  # answers ready/degraded (broker.agenthealth)
    # Where the roots learned from the broker are kept (broker.agenttrust.TrustStore), and the
    # --bundle file's modification time (the newer of the two is trusted at start).
    trust_store: Path | None = None
    bundle_mtime: float = 0.0
    # Run after `secrets` files were written (and `on_rotate` ran): exit 0 is healthy; the
    # result is reported to the broker while a staged rollout of the secret runs.
    health_check: str | None = None


RESERVED_FILES = frozenset({"svid.pem", "key.pem", "bundle.pem"})


class _SecretFileSync:
    """Keeps `AgentOptions.secrets` as files in the write dir, as the workload whose SVID the
    agent writes there: its mTLS identity is the one the policy sees."""

    def __init__(self, options: AgentOptions) -> None:
        assert options.write_dir is not None
        for name in options.secrets:
            if name in RESERVED_FILES:
                raise InvalidArgument(f"secret file name {name!r} is taken by the agent's SVID")
        self._options = options
        self._dir = options.write_dir
        self._identity: bytes = b""
        self._files: SecretFiles | None = None
        self._client: BrokerClient | None = None
        self._reports: ConsumerReports | None = None
        self.wake = asyncio.Event()

    def _source_for_identity(self) -> bool:
        """(Re)build the client when the SVID in the write dir changed; False if none yet."""
        try:
            chain = (self._dir / "svid.pem").read_bytes()
            key = (self._dir / "key.pem").read_bytes()
            bundle = (self._dir / "bundle.pem").read_bytes()
        except FileNotFoundError:
            return False
        if chain + bundle != self._identity:
            if self._client is not None:
                self._client.close()
            self._client = BrokerClient(self._options.server, ClientCredentials(chain, key, bundle))
            source = BrokerSecretSource(SecretsClient(self._client))
            self._files = SecretFiles(source, self._dir, self._options.secrets)
            self._reports = ConsumerReports(
                BrokerRolloutReporter(RolloutsClient(self._client)),
                on_rotate=self._options.on_rotate,
                health_check=self._options.health_check,
            )
            self._identity = chain + bundle
        return True

    def sync_once(self) -> None:
        if not self._source_for_identity() or self._files is None:
            return
        results = self._files.sync()
        for result in results:
            if result.outcome in ("removed", "kept"):
                log.warning("secret file %s %s: %s", result.name, result.outcome, result.error)
        if self._reports is not None:
            synced = [
                Synced(r.name, self._options.secrets[r.name], r.outcome == "written", r.version)
                for r in results
            ]
            for reference, healthy in self._reports.after_sync(synced).items():
                if not healthy:
                    log.warning("secret %s: the health check failed after the update", reference)

    async def run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.sync_once)
            except Exception:
                log.exception("secret file sync failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self._options.secret_interval)
            self.wake.clear()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def pinned_roots(bundle_pem: bytes) -> list[x509.Certificate]:
    """The roots of the `--bundle` file: what the agent trusts before the broker says more."""
    try:
        roots = x509.load_pem_x509_certificates(bundle_pem)
    except ValueError:
        raise InvalidArgument("the --bundle file holds no PEM certificates") from None
    return roots


async def _agent_main(options: AgentOptions, clock: Clock) -> None:
    pinned_roots(options.bundle_pem)  # a --bundle file without certificates is refused
    trust = TrustStore(options.bundle_pem, options.trust_store, options.bundle_mtime)
    link = GrpcBrokerLink(
        options.server,
        options.attest_server,
        trust.pem(),
        join_token=options.join_token,
        jwt=options.jwt,
    )
    delivery = None
    secret_files = None
    loop = asyncio.get_running_loop()
    if options.write_dir is not None:
        wake: Callable[[], None] | None = None
        if options.secrets:
            secret_files = _SecretFileSync(options)
            event = secret_files.wake

            def wake() -> None:  # deliver() may run on a worker thread: go through the loop
                loop.call_soon_threadsafe(event.set)

        delivery = FileDelivery(
            options.write_dir,
            selectors_of(os.getuid(), os.getgid()),
            options.on_rotate,
            on_written=wake,
        )
    agent = Agent(
        link,
        clock,
        trust_anchors=trust.roots,
        sync_interval=options.sync_interval,
        delivery=delivery,
        trust_store=trust,
    )
    endpoint = await serve_workload_api(agent, options.socket_path)
    health = (
        None if options.health_socket is None else await serve_health(agent, options.health_socket)
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = asyncio.create_task(agent.run())
    # The broker pushes syncs over a stream; the agent polls only while it is down.
    streamer = asyncio.create_task(SyncStream(agent, link).run())
    secrets_task = None if secret_files is None else asyncio.create_task(secret_files.run())
    announced = asyncio.create_task(agent.ready.wait())
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({announced, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if announced.done():
            print(
                f"broker agent serving the Workload API on unix://{options.socket_path} "
                f"as {agent.agent_id}",
                flush=True,
            )
        await stopping
    finally:
        for task in (runner, announced, stopping, streamer):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await streamer
        if secrets_task is not None:
            secrets_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await secrets_task
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        await endpoint.stop()
        if health is not None and options.health_socket is not None:
            health.close()
            await health.wait_closed()
            with contextlib.suppress(OSError):
                options.health_socket.unlink()
        link.close()
        if secret_files is not None:
            secret_files.close()


def run_agent(options: AgentOptions, clock: Clock | None = None) -> None:
    """Run the agent until SIGTERM/SIGINT."""
    configure_logs(logging.INFO, sys.stderr)  # JSON lines, secrets redacted, as the server
    try:
        import uvloop

        loop_factory: Any = uvloop.new_event_loop
    except ImportError:  # pragma: no cover
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_agent_main(options, clock or SystemClock()))
