"""`broker db ...` (connections, roles, credentials) and `broker lease ...`.

JSON documents (`--output json`) are stable: see docs/database.md. The admin password goes in
by file and never comes back; a credential's password is printed only by `broker db creds`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from broker import clioutput
from broker.api.client.database import Connection, DatabaseClient, Lease, Role
from broker.cli import (
    DURATION,
    Refusal,
    _client,
    _connection_options,
    _output,
    _read_input_file,
    cli,
)
from broker.dsn import password_in_dsn, redact

__all__ = ["db", "lease"]

PLUGINS = ("postgresql", "mysql")


def _db_client(ctx: click.Context) -> DatabaseClient:
    client: Any = _client(ctx)
    return DatabaseClient(client)


def _text_file(path: Path, what: str) -> str:
    data = _read_input_file(path, what)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise Refusal(f"{what} {path} is not UTF-8 text") from None


def connection_json(c: Connection) -> dict[str, Any]:
    return {
        "name": c.name,
        "plugin": c.plugin,
        "dsn": redact(c.dsn),
        "created_at": clioutput.timestamp(c.created_at),
        "root_rotated_at": clioutput.timestamp(c.root_rotated_at),
        "kek_label": c.kek_label,
    }


def role_json(r: Role) -> dict[str, Any]:
    return {
        "name": r.name,
        "connection": r.connection,
        "owner": r.owner,
        "tenant": r.tenant,
        "environment": r.environment,
        "default_ttl": r.default_ttl_seconds,
        "max_ttl": r.max_ttl_seconds,
        "username_template": r.username_template,
        "password_length": r.password_length,
        "password_charset": r.password_charset,
        "creation_statements": r.creation_statements,
        "revocation_statements": r.revocation_statements or None,
        "rollback_statements": r.rollback_statements or None,
        "created_at": clioutput.timestamp(r.created_at),
    }


def lease_json(item: Lease) -> dict[str, Any]:
    return {
        "lease_id": item.id,
        "role": item.role,
        "connection": item.connection,
        "username": item.username,
        "holder": item.holder,
        "state": item.state,
        "created_at": clioutput.timestamp(item.created_at),
        "expires_at": clioutput.timestamp(item.expires_at),
        "max_expires_at": clioutput.timestamp(item.max_expires_at),
        "lease_duration": item.lease_duration,
        "renewable": item.renewable,
        "attempts": item.attempts,
        "last_error": item.last_error or None,
        "next_attempt_at": clioutput.timestamp(item.next_attempt_at),
    }


def _echo_pairs(pairs: list[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in pairs)
    for key, value in pairs:
        shown = "-" if value is None or value == "" else value
        click.echo(f"{key.ljust(width)}  {shown}")


def _echo_table(header: list[str], rows: list[list[str]]) -> None:
    if not rows:
        return
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


@cli.group()
def db() -> None:
    """Dynamic database credentials: connections, roles, credentials."""


# -- connections ----------------------------------------------------------------------------


@db.group("connection")
def connection() -> None:
    """Target databases and their admin logins."""


@connection.command("add")
@click.argument("name")
@click.option("--plugin", type=click.Choice(PLUGINS), required=True, help="The database kind.")
@click.option(
    "--dsn",
    required=True,
    help="postgresql://USER@HOST:PORT/DB or mysql://USER@HOST:PORT/DB (no password).",
)
@click.option(
    "--password-file",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="File holding the admin password (stored encrypted, never shown again).",
)
@click.option("--verify/--no-verify", default=True, show_default=True, help="Connect first.")
@_connection_options(on_group=False)
@click.pass_context
def connection_add(
    ctx: click.Context, name: str, plugin: str, dsn: str, password_file: Path, verify: bool
) -> None:
    """Add connection NAME."""
    where = password_in_dsn(dsn)
    if where is not None:  # refused here too, so the password never even leaves this process
        raise Refusal(
            f"--dsn must not carry a password (it has {where}): give it with --password-file"
        )
    password = _text_file(password_file, "password file").rstrip("\r\n")
    if not password:
        raise Refusal(f"password file {password_file} is empty")
    result = _db_client(ctx).add_connection(name, plugin, dsn, password, verify=verify)
    if _output(ctx) == "json":
        click.echo(clioutput.dumps(connection_json(result)))
    else:
        click.echo(f"connection {result.name} added ({result.plugin}, {redact(result.dsn)})")


@connection.command("list")
@_connection_options(on_group=False)
@click.pass_context
def connection_list(ctx: click.Context) -> None:
    """List connections."""
    items = _db_client(ctx).list_connections()
    if _output(ctx) == "json":
        click.echo(clioutput.dumps([connection_json(c) for c in items]))
        return
    _echo_table(
        ["NAME", "PLUGIN", "DSN", "ROOT ROTATED"],
        [
            [c.name, c.plugin, redact(c.dsn), clioutput.timestamp(c.root_rotated_at) or "-"]
            for c in items
        ],
    )


@connection.command("show")
@click.argument("name")
@_connection_options(on_group=False)
@click.pass_context
def connection_show(ctx: click.Context, name: str) -> None:
    """Show connection NAME (never its password)."""
    document = connection_json(_db_client(ctx).get_connection(name))
    if _output(ctx) == "json":
        click.echo(clioutput.dumps(document))
    else:
        _echo_pairs(list(document.items()))


@connection.command("remove")
@click.argument("name")
@_connection_options(on_group=False)
@click.pass_context
def connection_remove(ctx: click.Context, name: str) -> None:
    """Remove connection NAME (refused while roles or leases use it)."""
    _db_client(ctx).remove_connection(name)
    if _output(ctx) == "json":
        click.echo(clioutput.dumps({"removed": name}))
    else:
        click.echo(f"connection {name} removed")


@connection.command("rotate-root")
@click.argument("name")
@_connection_options(on_group=False)
@click.pass_context
def connection_rotate_root(ctx: click.Context, name: str) -> None:
    """Change NAME's admin password to a fresh random one that nobody sees."""
    result = _db_client(ctx).rotate_root(name)
    if _output(ctx) == "json":
        click.echo(clioutput.dumps(connection_json(result)))
    else:
        when = clioutput.timestamp(result.root_rotated_at)
        click.echo(f"admin password of {name} rotated at {when}")


# -- roles ----------------------------------------------------------------------------------


@db.group("role")
def role() -> None:
    """What a credential may do: creation and revocation statements, TTLs, owner."""


@role.command("add")
@click.argument("name")
@click.option("--connection", "connection_name", required=True, help="The connection to use.")
@click.option(
    "--creation-statements",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="SQL file with {{name}}, {{password}}, {{expiration}}.",
)
@click.option(
    "--revocation-statements",
    type=click.Path(path_type=Path, dir_okay=False),
    help="SQL file with {{name}} [default: end sessions and drop the user].",
)
@click.option(
    "--rollback-statements",
    type=click.Path(path_type=Path, dir_okay=False),
    help="SQL file run when creation fails [default: the default revocation].",
)
@click.option("--default-ttl", type=DURATION, default="1h", show_default=True)
@click.option("--max-ttl", type=DURATION, default="24h", show_default=True)
@click.option(
    "--username-template",
    default="",
    help="Placeholders {{role}}, {{holder}}, {{unix_time}}, {{random}} (required) "
    "[default: v_{{role}}_{{random}}].",
)
@click.option(
    "--owner", default="", help="The service that may obtain credentials [default: NAME]."
)
@click.option("--tenant", default="", help="Its tenant [default: default].")
@click.option("--environment", default="", help="Its environment [default: dev].")
@click.option("--password-length", type=click.IntRange(16, 128), default=32, show_default=True)
@click.option(
    "--password-charset",
    default="alphanumeric",
    show_default=True,
    help="alphanumeric, alphanumeric-symbols, or the characters to use.",
)
@_connection_options(on_group=False)
@click.pass_context
def role_add(
    ctx: click.Context,
    name: str,
    connection_name: str,
    creation_statements: Path,
    revocation_statements: Path | None,
    rollback_statements: Path | None,
    default_ttl: int,
    max_ttl: int,
    username_template: str,
    owner: str,
    tenant: str,
    environment: str,
    password_length: int,
    password_charset: str,
) -> None:
    """Add role NAME."""
    if default_ttl <= 0 or max_ttl <= 0:
        raise click.BadParameter("TTLs must be positive", param_hint="--default-ttl/--max-ttl")
    result = _db_client(ctx).add_role(
        name,
        connection_name,
        _text_file(creation_statements, "creation statements"),
        revocation_statements=(
            None
            if revocation_statements is None
            else _text_file(revocation_statements, "revocation statements")
        ),
        rollback_statements=(
            None
            if rollback_statements is None
            else _text_file(rollback_statements, "rollback statements")
        ),
        default_ttl_seconds=default_ttl,
        max_ttl_seconds=max_ttl,
        username_template=username_template,
        owner=owner,
        tenant=tenant,
        environment=environment,
        password_length=password_length,
        password_charset=password_charset,
    )
    if _output(ctx) == "json":
        click.echo(clioutput.dumps(role_json(result)))
    else:
        click.echo(
            f"role {result.name} added on {result.connection} (owner {result.tenant}/"
            f"{result.environment}/{result.owner}, ttl {result.default_ttl_seconds}s, "
            f"max {result.max_ttl_seconds}s)"
        )


@role.command("list")
@_connection_options(on_group=False)
@click.pass_context
def role_list(ctx: click.Context) -> None:
    """List roles."""
    items = _db_client(ctx).list_roles()
    if _output(ctx) == "json":
        click.echo(clioutput.dumps([role_json(r) for r in items]))
        return
    _echo_table(
        ["NAME", "CONNECTION", "OWNER", "DEFAULT TTL", "MAX TTL"],
        [
            [
                r.name,
                r.connection,
                f"{r.tenant}/{r.environment}/{r.owner}",
                f"{r.default_ttl_seconds}s",
                f"{r.max_ttl_seconds}s",
            ]
            for r in items
        ],
    )


@role.command("show")
@click.argument("name")
@_connection_options(on_group=False)
@click.pass_context
def role_show(ctx: click.Context, name: str) -> None:
    """Show role NAME with its statements."""
    document = role_json(_db_client(ctx).get_role(name))
    if _output(ctx) == "json":
        click.echo(clioutput.dumps(document))
        return
    statements = {k: document.pop(k) for k in list(document) if k.endswith("_statements")}
    _echo_pairs(list(document.items()))
    for key, text in statements.items():
        if text:
            click.echo(f"\n-- {key.replace('_', ' ')}\n{text.rstrip()}")


@role.command("remove")
@click.argument("name")
@_connection_options(on_group=False)
@click.pass_context
def role_remove(ctx: click.Context, name: str) -> None:
    """Remove role NAME (its live leases are still revoked when they end)."""
    _db_client(ctx).remove_role(name)
    if _output(ctx) == "json":
        click.echo(clioutput.dumps({"removed": name}))
    else:
        click.echo(f"role {name} removed")


# -- credentials ----------------------------------------------------------------------------


@db.command("creds")
@click.argument("role_name", metavar="ROLE")
@click.option("--ttl", type=DURATION, help="Lease duration [default: the role's].")
@_connection_options(on_group=False)
@click.pass_context
def creds(ctx: click.Context, role_name: str, ttl: int | None) -> None:
    """A fresh database login for ROLE, under a lease."""
    result = _db_client(ctx).creds(role_name, ttl)
    document = {
        "username": result.username,
        "password": result.password,
        "lease_id": result.lease.id,
        "lease_duration": result.lease.lease_duration,
        "renewable": result.lease.renewable,
        "expires_at": clioutput.timestamp(result.lease.expires_at),
    }
    if _output(ctx) == "json":
        click.echo(clioutput.dumps(document))
    else:
        _echo_pairs(list(document.items()))


# -- leases ---------------------------------------------------------------------------------


@cli.group()
def lease() -> None:
    """Leases of dynamic credentials: renew, revoke, list."""


@lease.command("renew")
@click.argument("lease_id")
@click.option("--increment", type=DURATION, help="New duration from now [default: the role's].")
@_connection_options(on_group=False)
@click.pass_context
def lease_renew(ctx: click.Context, lease_id: str, increment: int | None) -> None:
    """Extend LEASE_ID (never past its role's max TTL)."""
    result = _db_client(ctx).renew(lease_id, increment)
    document = {
        "lease_id": result.id,
        "lease_duration": result.lease_duration,
        "renewable": result.renewable,
        "expires_at": clioutput.timestamp(result.expires_at),
    }
    if _output(ctx) == "json":
        click.echo(clioutput.dumps(document))
    else:
        capped = "" if result.renewable else " (capped at the max TTL)"
        click.echo(f"lease {result.id} renewed until {document['expires_at']}{capped}")


@lease.command("revoke")
@click.argument("lease_id", required=False)
@click.option("--prefix", help="Revoke every lease whose id starts with PREFIX (db/ROLE/...).")
@_connection_options(on_group=False)
@click.pass_context
def lease_revoke(ctx: click.Context, lease_id: str | None, prefix: str | None) -> None:
    """Revoke LEASE_ID now (or every lease under --prefix): the user's sessions end and the
    user is dropped."""
    if (lease_id is None) == (prefix is None):
        raise click.UsageError("give either LEASE_ID or --prefix PREFIX")
    client = _db_client(ctx)
    errors: list[str] = []
    if lease_id is not None:
        revoked = client.revoke(lease_id)
    else:
        assert prefix is not None
        revoked, errors = client.revoke_prefix(prefix)
    if _output(ctx) == "json":
        click.echo(clioutput.dumps({"revoked": revoked, "errors": errors}))
    else:
        click.echo(f"revoked {revoked} lease(s)")
    if errors:
        raise Refusal(
            f"{len(errors)} lease(s) could not be revoked (the reaper keeps trying): {errors[0]}"
        )


@lease.command("list")
@click.option("--prefix", default="", help="Only leases whose id starts with PREFIX.")
@_connection_options(on_group=False)
@click.pass_context
def lease_list(ctx: click.Context, prefix: str) -> None:
    """List leases (pending, active, revoking and irrevocable)."""
    items = _db_client(ctx).list_leases(prefix)
    if _output(ctx) == "json":
        click.echo(clioutput.dumps([lease_json(i) for i in items]))
        return
    _echo_table(
        ["LEASE", "USERNAME", "STATE", "EXPIRES", "HOLDER", "ATTEMPTS", "NEXT RETRY", "LAST ERROR"],
        [
            [
                i.id,
                i.username,
                i.state,
                clioutput.timestamp(i.expires_at) or "-",
                i.holder,
                str(i.attempts),
                clioutput.timestamp(i.next_attempt_at) or "-",
                _short(i.last_error),
            ]
            for i in items
        ],
    )
    stuck = sum(1 for i in items if i.state == "irrevocable")
    if stuck:
        click.echo(
            f"warning: {stuck} irrevocable lease(s): their users may still log in; the broker "
            "keeps retrying (see LAST ERROR)",
            err=True,
        )


def _short(text: str, limit: int = 60) -> str:
    line = " ".join(text.split())
    if not line:
        return "-"
    return line if len(line) <= limit else line[: limit - 3] + "..."
