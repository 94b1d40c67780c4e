"""CLI for workload identity: `broker token create`, `broker attestor add|resource|list|remove`,
`broker entry create|list|show|delete` and `broker svid deny` (attached to `svid` by the root)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from broker.attestation import attestor_resource
from broker.cli.clients import Attestor, Entry, IdentityClient
from broker.cli.inputs import read_input_file
from broker.cli.options import DURATION, clients, connection_options
from broker.cli.refusals import Refusal
from broker.cli.render import record_json, render

__all__ = ["attestor", "entry", "svid_deny", "token"]


def _identity(ctx: click.Context) -> IdentityClient:
    return clients(ctx).identity


def entry_json(e: Entry) -> dict[str, Any]:
    return record_json(e)


def _entry_line(e: Entry) -> str:
    ttl = f" x509_ttl={e.x509_ttl_seconds}s" if e.x509_ttl_seconds else ""
    jwt = f" jwt_ttl={e.jwt_ttl_seconds}s" if e.jwt_ttl_seconds else ""
    dns = f" dns={','.join(e.dns_names)}" if e.dns_names else ""
    return (
        f"{e.id}  {e.spiffe_id}  parent={e.parent_id}  "
        f"selectors={','.join(e.selectors)}{ttl}{jwt}{dns}"
    )


def attestor_json(a: Attestor) -> dict[str, Any]:
    return record_json(a)


# -- join tokens ------------------------------------------------------------------------------


@click.group()
def token() -> None:
    """One-time join tokens for agent attestation."""


@token.command("create")
@click.option("--spiffe-id", required=True, help="The agent's SPIFFE ID.")
@click.option("--ttl", type=DURATION, help="Lifetime [default: 10m, at most 24h].")
@connection_options(on_group=False)
@click.pass_context
def token_create(ctx: click.Context, spiffe_id: str, ttl: int | None) -> None:
    """Create a one-time join token bound to an ID (shown once; stored hashed)."""
    result = _identity(ctx).create_join_token(spiffe_id, ttl)
    render(ctx, record_json(result), result.token)


# -- JWT attestors ----------------------------------------------------------------------------


@click.group()
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
        return read_input_file(jwks_file, "JWKS file").decode("utf-8", "replace")
    return jwks_inline or ""


@attestor.command("add")
@_definition_options
@connection_options(on_group=False)
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
    render(ctx, attestor_json(result), f"added attestor {result.name} for {result.issuer}")


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
@connection_options(on_group=False)
@click.pass_context
def attestor_list(ctx: click.Context) -> None:
    """List the registered attestors."""
    result = _identity(ctx).list_attestors()
    render(
        ctx,
        [attestor_json(a) for a in result],  # a list is a bare JSON array (docs/cli.md)
        lambda: [f"{a.name}  {a.issuer}  aud={a.audience}  {a.template}" for a in result],
    )


@attestor.command("remove")
@click.argument("name")
@connection_options(on_group=False)
@click.pass_context
def attestor_remove(ctx: click.Context, name: str) -> None:
    """Remove an attestor."""
    _identity(ctx).remove_attestor(name)
    render(ctx, {"removed": name}, f"removed attestor {name}")


# -- registration entries ---------------------------------------------------------------------


@click.group()
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
@connection_options(on_group=False)
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
    render(ctx, entry_json(result), result.id)


@entry.command("list")
@click.option("--parent-id", default="", help="Only the entries of this agent.")
@connection_options(on_group=False)
@click.pass_context
def entry_list(ctx: click.Context, parent_id: str) -> None:
    """List registration entries."""
    result = _identity(ctx).list_entries(parent_id)
    render(ctx, [entry_json(e) for e in result], lambda: [_entry_line(e) for e in result])


@entry.command("show")
@click.argument("entry_id")
@connection_options(on_group=False)
@click.pass_context
def entry_show(ctx: click.Context, entry_id: str) -> None:
    """Show one registration entry."""
    result = _identity(ctx).get_entry(entry_id)
    render(ctx, entry_json(result), _entry_line(result))


@entry.command("delete")
@click.argument("entry_id")
@connection_options(on_group=False)
@click.pass_context
def entry_delete(ctx: click.Context, entry_id: str) -> None:
    """Delete a registration entry."""
    _identity(ctx).delete_entry(entry_id)
    render(ctx, {"deleted": entry_id}, f"deleted entry {entry_id}")


# -- denylist ---------------------------------------------------------------------------------


@click.command("deny")
@click.argument("target", metavar="SPIFFE_ID|SERIAL")
@connection_options(on_group=False)
@click.pass_context
def svid_deny(ctx: click.Context, target: str) -> None:
    """Deny renewal to a SPIFFE ID or a certificate serial (emergency revocation)."""
    kind, value = _identity(ctx).deny(target)
    render(ctx, {"kind": kind, "value": value}, f"denied {kind} {value}")
