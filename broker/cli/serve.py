"""`broker serve` (the broker itself) and `broker agent` (the node agent serving the SPIFFE
Workload API): the long-running processes."""

from __future__ import annotations

from pathlib import Path

import click

from broker.cli.clients import agent_health, run_agent
from broker.cli.inputs import read_input_file
from broker.cli.options import (
    DEFAULT_SERVER,
    DURATION,
    data_dir,
    data_dir_option,
    default_attest_server,
    output_option,
    setting,
)
from broker.cli.refusals import Refusal, one_line
from broker.cli.render import render
from broker.errors import BrokerError

__all__ = ["agent", "serve"]


@click.command()
@click.option(
    "--dev", is_flag=True, help="Embedded default: SQLite and a SoftHSM2 token in DATA_DIR."
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Production configuration file (TOML).",
)
@data_dir_option(on_group=False)
@click.option("--listen", metavar="HOST:PORT", help="Address to listen on.")
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    help="Worker processes sharing the port [default: 1, or server.workers].",
)
@click.option(
    "--new-ledger-epoch",
    "new_ledger_epoch",
    metavar="REASON",
    help="Start a new audit ledger epoch (new MAC key, signed record) before serving: only "
    "after the audit MAC key was lost (docs/ledger.md).",
)
@click.pass_context
def serve(
    ctx: click.Context,
    dev: bool,
    config_file: Path | None,
    listen: str | None,
    workers: int | None,
    new_ledger_epoch: str | None,
) -> None:
    """Run the broker until SIGINT/SIGTERM."""
    if dev == (config_file is not None):
        raise click.UsageError("exactly one of --dev or --config is required", ctx)
    from broker.daemon import ServeOptions
    from broker.daemon import serve as run_daemon
    from ca.errors import CAError

    options = ServeOptions(
        dev=dev,
        data_dir=data_dir(ctx),
        listen=listen,
        config_file=config_file,
        workers=workers,
        new_ledger_epoch=new_ledger_epoch,
    )
    try:
        run_daemon(options)
    except (BrokerError, CAError) as exc:
        raise Refusal(one_line(str(exc)) or type(exc).__name__) from None
    except OSError as exc:
        raise Refusal(one_line(f"cannot serve: {exc}")) from None


def _secret_files(secret_files: tuple[str, ...]) -> dict[str, str]:
    secrets: dict[str, str] = {}
    for item in secret_files:
        name, sep, reference = item.partition("=")
        if not sep or not name or not reference.startswith("secret://"):
            raise click.UsageError(f"--secret {item!r}: use NAME=secret://...")
        if name in secrets:
            raise click.UsageError(f"--secret {name!r} given twice")
        if name in ("svid.pem", "key.pem", "bundle.pem"):
            raise click.UsageError(f"--secret {name!r}: that file name is the agent's own")
        secrets[name] = reference
    return secrets


@click.group("agent", invoke_without_command=True)
@click.option("--server", "agent_server", metavar="HOST:PORT", help="The broker (mTLS port).")
@click.option(
    "--attest-server",
    metavar="HOST:PORT",
    help="The broker's attestation port [default: the --server port + 1].",
)
@click.option(
    "--bundle",
    "agent_bundle",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Trust bundle (PEM) to verify the broker.  [required]",
)
@click.option(
    "--join-token",
    metavar="TOKEN",
    envvar="BROKER_JOIN_TOKEN",
    show_envvar=True,
    help="One-time join token (the environment variable keeps it out of the process list).",
)
@click.option(
    "--jwt-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="A JWT from a registered issuer (e.g. a projected service-account token).",
)
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Unix socket path for the SPIFFE Workload API.  [required]",
)
@click.option(
    "--health-socket",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also answer health probes on this Unix socket (read with 'broker agent status').",
)
@click.option(
    "--write-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Also write svid.pem, key.pem and bundle.pem here on every rotation.",
)
@click.option("--on-rotate", metavar="CMD", help="Run CMD after each write to --write-dir.")
@click.option(
    "--secret",
    "secret_files",
    multiple=True,
    metavar="NAME=secret://...",
    help="Also keep this secret as the 0600 file NAME in --write-dir, read as the workload "
    "whose SVID is written there; refreshed on rotation (repeatable).",
)
@click.option(
    "--secret-interval",
    type=DURATION,
    default="10s",
    show_default=True,
    help="How often --secret files are refreshed.",
)
@click.option(
    "--trust-store",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Keep the roots learned from the broker in this file (PEM) and trust them after a "
    "restart, so a root rotation needs no new --bundle file (used when newer than --bundle).",
)
@click.option(
    "--health-check",
    "secret_health_check",
    metavar="CMD",
    help="After --secret files change (and --on-rotate ran): run CMD; exit 0 is healthy. "
    "Reported to the broker during a staged rollout of the secret (see 'broker rollout').",
)
@click.option("--sync-interval", type=float, default=5.0, hidden=True)
@click.pass_context
def agent(
    ctx: click.Context,
    agent_server: str | None,
    attest_server: str | None,
    agent_bundle: Path | None,
    join_token: str | None,
    jwt_file: Path | None,
    socket_path: Path | None,
    health_socket: Path | None,
    write_dir: Path | None,
    on_rotate: str | None,
    secret_files: tuple[str, ...],
    secret_interval: int,
    secret_health_check: str | None,
    sync_interval: float,
    trust_store: Path | None = None,
) -> None:
    """Attest to the broker and serve the SPIFFE Workload API on a Unix socket
    ('broker agent status' asks a running agent how it is)."""
    if ctx.invoked_subcommand is not None:
        return
    if agent_bundle is None:
        raise click.UsageError("Missing option '--bundle'.", ctx)
    if socket_path is None:
        raise click.UsageError("Missing option '--socket'.", ctx)
    if (join_token is None) == (jwt_file is None):
        raise click.UsageError("give exactly one of --join-token or --jwt-file")
    if on_rotate and write_dir is None:
        raise click.UsageError("--on-rotate needs --write-dir")
    if secret_files and write_dir is None:
        raise click.UsageError("--secret needs --write-dir")
    if secret_interval < 1:
        raise click.UsageError("--secret-interval must be at least 1s")
    if secret_health_check and not secret_files:
        raise click.UsageError("--health-check needs --secret")
    secrets = _secret_files(secret_files)
    server = agent_server or str(setting(ctx, "server") or DEFAULT_SERVER)
    jwt = None
    if jwt_file is not None:
        jwt = read_input_file(jwt_file, "JWT file").decode("utf-8", "replace").strip()
    bundle = read_input_file(agent_bundle, "trust bundle")
    for flag, path in (("--socket", socket_path), ("--health-socket", health_socket)):
        if path is not None and not path.parent.is_dir():
            raise Refusal(f"the directory of {flag} {path} does not exist")
    if not 0.1 <= sync_interval <= 3600:
        raise click.UsageError("--sync-interval must be between 0.1 and 3600 seconds")
    try:
        run_agent(
            server=server,
            attest_server=attest_server or default_attest_server(server),
            bundle_pem=bundle,
            socket_path=socket_path.absolute(),
            join_token=join_token,
            jwt=jwt,
            write_dir=write_dir,
            on_rotate=on_rotate,
            sync_interval=sync_interval,
            secrets=secrets,
            secret_interval=float(secret_interval),
            health_socket=None if health_socket is None else health_socket.absolute(),
            trust_store=None if trust_store is None else trust_store.absolute(),
            bundle_mtime=agent_bundle.stat().st_mtime,
            health_check=secret_health_check,
        )
    except BrokerError as exc:
        raise Refusal(str(exc)) from None


@agent.command("status")
@click.option(
    "--health-socket",
    "status_socket",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="The agent's --health-socket.",
)
@output_option(on_group=False)
@click.pass_context
def agent_status(ctx: click.Context, status_socket: Path) -> None:
    """Ask a running agent how it is: 'ready' (exit 0), or 'degraded'/'starting' with the
    reasons (exit 1), as a probe would."""
    try:
        document = agent_health(status_socket)
    except BrokerError as exc:
        raise Refusal(one_line(str(exc))) from None
    reasons = [one_line(str(r)) for r in document["reasons"]]  # type: ignore[attr-defined]
    state = str(document["state"])
    render(ctx, document, [state, *(f"  {r}" for r in reasons)])
    if state != "ready":
        ctx.exit(1)
