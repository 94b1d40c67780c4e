"""CLI for workload identity: `broker token create`, `broker attestor add|resource|list|remove`,
`broker entry create|list|show|delete`, `broker svid deny`, and `broker agent`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import click

from broker import clioutput
from broker.api.client.base import BrokerClient
from broker.api.client.identity import Attestor, Entry, IdentityClient
from broker.attestation import attestor_resource
from broker.cli import (
    DEFAULT_SERVER,
    DURATION,
    Refusal,
    _client,
    _connection_options,
    _output,
    _read_input_file,
    _setting,
    cli,
    default_attest_server,
    svid,
)
from broker.errors import BrokerError

__all__ = ["agent", "attestor", "entry", "token"]


def _identity(ctx: click.Context) -> IdentityClient:
    return IdentityClient(cast(BrokerClient, _client(ctx)))


def _entry_json(e: Entry) -> dict[str, Any]:
    return {
        "id": e.id,
        "spiffe_id": e.spiffe_id,
        "parent_id": e.parent_id,
        "selectors": e.selectors,
        "x509_ttl_seconds": e.x509_ttl_seconds,
        "jwt_ttl_seconds": e.jwt_ttl_seconds,
        "dns_names": e.dns_names,
        "created_at": clioutput.timestamp(e.created_at),
    }


def _entry_line(e: Entry) -> str:
    ttl = f" x509_ttl={e.x509_ttl_seconds}s" if e.x509_ttl_seconds else ""
    jwt = f" jwt_ttl={e.jwt_ttl_seconds}s" if e.jwt_ttl_seconds else ""
    dns = f" dns={','.join(e.dns_names)}" if e.dns_names else ""
    return (
        f"{e.id}  {e.spiffe_id}  parent={e.parent_id}  "
        f"selectors={','.join(e.selectors)}{ttl}{jwt}{dns}"
    )


def _attestor_json(a: Attestor) -> dict[str, Any]:
    return {
        "name": a.name,
        "issuer": a.issuer,
        "audience": a.audience,
        "template": a.template,
        "algorithms": a.algorithms,
        "key_ids": a.key_ids,
        "created_at": clioutput.timestamp(a.created_at),
    }


# -- join tokens ------------------------------------------------------------------------------


@cli.group()
def token() -> None:
    """One-time join tokens for agent attestation."""


@token.command("create")
@click.option("--spiffe-id", required=True, help="The agent's SPIFFE ID.")
@click.option("--ttl", type=DURATION, help="Lifetime [default: 10m, at most 24h].")
@_connection_options(on_group=False)
@click.pass_context
def token_create(ctx: click.Context, spiffe_id: str, ttl: int | None) -> None:
    """Create a one-time join token bound to an ID (shown once; stored hashed)."""
    result = _identity(ctx).create_join_token(spiffe_id, ttl)
    if _output(ctx) == "json":
        click.echo(
            clioutput.dumps(
                {
                    "token": result.token,
                    "spiffe_id": result.spiffe_id,
                    "expires_at": clioutput.timestamp(result.expires_at),
                }
            )
        )
    else:
        click.echo(result.token)


# -- JWT attestors ----------------------------------------------------------------------------


@cli.group()
def attestor() -> None:
    """JWT/OIDC issuers whose tokens attest agents."""


def _definition_options(command: Any) -> Any:
    """The options that define an attestor (shared by `add` and `resource`)."""
    options = (
        click.option("--name", required=True, help="A short name for the issuer."),
        click.option("--issuer", required=True, help="The expected iss claim."),
        click.option("--audience", required=True, help="The expected aud claim."),
        click.option(
            "--jwks-file",
            type=click.Path(path_type=Path, dir_okay=False),
            help="The issuer's JWKS (public keys) as a JSON file.",
        ),
        click.option("--jwks", "jwks_inline", metavar="JSON", help="The JWKS inline."),
        click.option(
            "--template",
            required=True,
            help="SPIFFE ID template, e.g. spiffe://{td}/ns/{kubernetes.io.namespace}/sa/"
            "{kubernetes.io.serviceaccount.name}",
        ),
        click.option(
            "--algorithm",
            "algorithms",
            multiple=True,
            help="Allowed JWS algorithm (repeatable) [default: RS256, ES256].",
        ),
    )
    for option in reversed(options):
        command = option(command)
    return command


def _jwks_text(jwks_file: Path | None, jwks_inline: str | None) -> str:
    if (jwks_file is None) == (jwks_inline is None):
        raise click.UsageError("give exactly one of --jwks-file or --jwks")
    if jwks_file is not None:
        return _read_input_file(jwks_file, "JWKS file").decode("utf-8", "replace")
    return jwks_inline or ""


@attestor.command("add")
@_definition_options
@_connection_options(on_group=False)
@click.pass_context
def attestor_add(
    ctx: click.Context,
    name: str,
    issuer: str,
    audience: str,
    jwks_file: Path | None,
    jwks_inline: str | None,
    template: str,
    algorithms: tuple[str, ...],
) -> None:
    """Register a JWT issuer with its JWKS, audience and SPIFFE ID template. One whose template
    can yield a production identity needs a second operator's approval of `attestor.admin` on
    the resource `broker attestor resource` prints for the same options."""
    text = _jwks_text(jwks_file, jwks_inline)
    result = _identity(ctx).add_attestor(name, issuer, audience, text, template, algorithms)
    if _output(ctx) == "json":
        click.echo(clioutput.dumps(_attestor_json(result)))
    else:
        click.echo(f"added attestor {result.name} for {result.issuer}")


@attestor.command("resource")
@_definition_options
def attestor_resource_command(
    name: str,
    issuer: str,
    audience: str,
    jwks_file: Path | None,
    jwks_inline: str | None,
    template: str,
    algorithms: tuple[str, ...],
) -> None:
    """Print the resource an approval of this attestor names (attestor:NAME@sha256:HEX over its
    whole definition), computed locally: what the requester asks for and what the approving
    operator checks against the definition they were shown. Contacts no broker."""
    text = _jwks_text(jwks_file, jwks_inline)
    try:
        click.echo(attestor_resource(name, issuer, audience, text, template, algorithms))
    except ValueError as exc:
        raise Refusal(f"the JWKS is not JSON: {exc}") from None


@attestor.command("list")
@_connection_options(on_group=False)
@click.pass_context
def attestor_list(ctx: click.Context) -> None:
    """List the registered attestors."""
    result = _identity(ctx).list_attestors()
    if _output(ctx) == "json":
        click.echo(clioutput.dumps({"attestors": [_attestor_json(a) for a in result]}))
        return
    for a in result:
        click.echo(f"{a.name}  {a.issuer}  aud={a.audience}  {a.template}")


@attestor.command("remove")
@click.argument("name")
@_connection_options(on_group=False)
@click.pass_context
def attestor_remove(ctx: click.Context, name: str) -> None:
    """Remove an attestor."""
    _identity(ctx).remove_attestor(name)
    if _output(ctx) == "json":
        click.echo(clioutput.dumps({"removed": name}))
    else:
        click.echo(f"removed attestor {name}")


# -- registration entries ---------------------------------------------------------------------


@cli.group()
def entry() -> None:
    """Registration entries: which workloads an agent may serve, under which SPIFFE ID."""


@entry.command("create")
@click.option("--spiffe-id", required=True, help="The workload's SPIFFE ID.")
@click.option("--parent-id", required=True, help="The SPIFFE ID of the agent that serves it.")
@click.option(
    "--selector",
    "selectors",
    multiple=True,
    required=True,
    help="unix:uid:N, unix:gid:N, unix:user:NAME or unix:group:NAME (repeatable; all must match).",
)
@click.option("--x509-ttl", type=DURATION, help="X.509-SVID lifetime [default: CA policy].")
@click.option("--jwt-ttl", type=DURATION, help="JWT-SVID lifetime [default: CA policy].")
@click.option("--dns", "dns_names", multiple=True, metavar="NAME", help="DNS SAN (repeatable).")
@_connection_options(on_group=False)
@click.pass_context
def entry_create(
    ctx: click.Context,
    spiffe_id: str,
    parent_id: str,
    selectors: tuple[str, ...],
    x509_ttl: int | None,
    jwt_ttl: int | None,
    dns_names: tuple[str, ...],
) -> None:
    """Create a registration entry."""
    result = _identity(ctx).create_entry(
        spiffe_id, parent_id, selectors, x509_ttl or 0, jwt_ttl or 0, dns_names
    )
    if _output(ctx) == "json":
        click.echo(clioutput.dumps(_entry_json(result)))
    else:
        click.echo(result.id)


@entry.command("list")
@click.option("--parent-id", default="", help="Only the entries of this agent.")
@_connection_options(on_group=False)
@click.pass_context
def entry_list(ctx: click.Context, parent_id: str) -> None:
    """List registration entries."""
    result = _identity(ctx).list_entries(parent_id)
    if _output(ctx) == "json":
        click.echo(clioutput.dumps({"entries": [_entry_json(e) for e in result]}))
        return
    for e in result:
        click.echo(_entry_line(e))


@entry.command("show")
@click.argument("entry_id")
@_connection_options(on_group=False)
@click.pass_context
def entry_show(ctx: click.Context, entry_id: str) -> None:
    """Show one registration entry."""
    result = _identity(ctx).get_entry(entry_id)
    if _output(ctx) == "json":
        click.echo(clioutput.dumps(_entry_json(result)))
    else:
        click.echo(_entry_line(result))


@entry.command("delete")
@click.argument("entry_id")
@_connection_options(on_group=False)
@click.pass_context
def entry_delete(ctx: click.Context, entry_id: str) -> None:
    """Delete a registration entry."""
    _identity(ctx).delete_entry(entry_id)
    if _output(ctx) == "json":
        click.echo(clioutput.dumps({"deleted": entry_id}))
    else:
        click.echo(f"deleted entry {entry_id}")


# -- denylist ---------------------------------------------------------------------------------


@svid.command("deny")
@click.argument("target", metavar="SPIFFE_ID|SERIAL")
@_connection_options(on_group=False)
@click.pass_context
def svid_deny(ctx: click.Context, target: str) -> None:
    """Deny renewal to a SPIFFE ID or a certificate serial (emergency revocation)."""
    kind, value = _identity(ctx).deny(target)
    if _output(ctx) == "json":
        click.echo(clioutput.dumps({"kind": kind, "value": value}))
    else:
        click.echo(f"denied {kind} {value}")


# -- the agent --------------------------------------------------------------------------------


@cli.command("agent")
@click.option("--server", "agent_server", metavar="HOST:PORT", help="The broker (mTLS port).")
@click.option(
    "--attest-server",
    metavar="HOST:PORT",
    help="The broker's attestation port [default: the --server port + 1].",
)
@click.option(
    "--bundle",
    "agent_bundle",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Trust bundle (PEM) to verify the broker.",
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
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Unix socket path for the SPIFFE Workload API.",
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
@click.option("--sync-interval", type=float, default=5.0, hidden=True)
@click.pass_context
def agent(
    ctx: click.Context,
    agent_server: str | None,
    attest_server: str | None,
    agent_bundle: Path,
    join_token: str | None,
    jwt_file: Path | None,
    socket_path: Path,
    write_dir: Path | None,
    on_rotate: str | None,
    secret_files: tuple[str, ...],
    secret_interval: int,
    sync_interval: float,
) -> None:
    """Attest to the broker and serve the SPIFFE Workload API on a Unix socket."""
    from broker.api.workload import AgentOptions, run_agent

    if (join_token is None) == (jwt_file is None):
        raise click.UsageError("give exactly one of --join-token or --jwt-file")
    if on_rotate and write_dir is None:
        raise click.UsageError("--on-rotate needs --write-dir")
    if secret_files and write_dir is None:
        raise click.UsageError("--secret needs --write-dir")
    if secret_interval < 1:
        raise click.UsageError("--secret-interval must be at least 1s")
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
    server = agent_server or str(_setting(ctx, "server") or DEFAULT_SERVER)
    jwt = None
    if jwt_file is not None:
        jwt = _read_input_file(jwt_file, "JWT file").decode("utf-8", "replace").strip()
    bundle = _read_input_file(agent_bundle, "trust bundle")
    if not socket_path.parent.is_dir():
        raise Refusal(f"the directory of --socket {socket_path} does not exist")
    if not 0.1 <= sync_interval <= 3600:
        raise click.UsageError("--sync-interval must be between 0.1 and 3600 seconds")
    try:
        run_agent(
            AgentOptions(
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
            )
        )
    except BrokerError as exc:
        raise Refusal(str(exc)) from None
