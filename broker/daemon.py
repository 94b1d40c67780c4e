"""Process entry point for `broker serve`: load config, wire the service, serve until stopped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from broker.app import Application
from broker.config import Config, load_config
from broker.daemon_defaults import DEFAULT_LISTEN
from ca.clock import SystemClock
from ca.keys import open_backend

__all__ = ["DEFAULT_LISTEN", "ServeOptions", "serve"]

log = logging.getLogger("broker")


@dataclass(frozen=True)
class ServeOptions:
    dev: bool
    data_dir: Path
    listen: str | None = None  # overrides the config file / dev default
    config_file: Path | None = None


def _warn(message: str) -> None:
    print(f"broker: warning: {message}", file=sys.stderr, flush=True)


def build_config(options: ServeOptions) -> Config:
    if options.dev:
        from broker.devmode import prepare

        return prepare(options.data_dir, options.listen, _warn)
    assert options.config_file is not None
    config = load_config(options.config_file)
    if options.listen:
        config = replace(config, server=replace(config.server, listen=options.listen)).validate()
    return config


def serve(options: ServeOptions) -> None:
    """Serve until SIGINT/SIGTERM. Prints one line saying where, once ready.

    Raises `broker.errors.BrokerError` or `ca.errors.CAError` for configuration problems
    (the CLI turns them into one line on stderr).
    """
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format='{"ts":"%(asctime)s","level":"%(levelname)s","logger":"%(name)s","msg":%(message)r}',
    )
    config = build_config(options)
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve(config))


async def _serve(config: Config) -> None:
    from broker.api.interceptors import RequestPipeline
    from broker.api.server import ServingCredentials, start_server
    from broker.api.servicers import METHOD_SPECS, AuditServicer, CertificateAuthorityServicer
    from broker.storage.factory import open_storage

    keys = open_backend(config.keys.uri, config.keys.pin_source)
    try:
        storage = await open_storage(config.storage.resolved_dsn())
    except BaseException:
        keys.close()
        raise
    app = Application(config, keys, storage, SystemClock())
    try:
        await app.start()
        app.write_operator_identity()
        material = app.serving_material()
        credentials = ServingCredentials(material)
        pipeline = RequestPipeline(
            METHOD_SPECS,
            app.authenticator,
            app.limiter,
            app.policy,
            app.ledger,
            app.clock,
            max_request_bytes=config.server.max_message_bytes,
        )
        server, port = await start_server(
            listen=config.server.listen,
            credentials=credentials,
            pipeline=pipeline,
            ca=CertificateAuthorityServicer(app.ca),
            audit=AuditServicer(app.ledger),
            max_message_bytes=config.server.max_message_bytes,
        )
        host = config.server.listen.rpartition(":")[0]
        print(
            f"broker listening on {host}:{port} (trust domain {config.trust_domain}; "
            f"keys: {keys.description}; storage: {storage.dialect})",
            flush=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        background = asyncio.create_task(app.run_background(material, credentials.update))
        await stop.wait()
        log.info("shutting down")
        background.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await background
        await server.stop(grace=5)
    finally:
        await app.close()
