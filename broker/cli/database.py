"""`broker db ...` (connections, roles, credentials) and `broker lease ...`.

JSON documents (`--output json`) are stable: see docs/database.md. The admin password goes in
by file and never comes back; a credential's password is printed only by `broker db creds`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from broker.cli.clients import Connection, DatabaseClient, Lease, Role
from broker.cli.inputs import read_text_file
from broker.cli.options import DURATION, clients, connection_options
from broker.cli.refusals import Refusal
from broker.cli.render import record_json, render, table, timestamp, wants_json
from broker.dsn import password_in_dsn, redact

__all__ = ["connection_json", "db", "lease", "lease_json", "role_json"]

PLUGINS = ("postgresql", "mysql")


def _db_client(ctx: click.Context) -> DatabaseClient:
    return clients(ctx).database


def connection_json(c: Connection) -> dict[str, Any]:
    """The connection, its DSN redacted (it never carries the password anyway)."""
    return record_json(c, convert={"dsn": redact})


def role_json(r: Role) -> dict[str, Any]:
    """The role; `classification` and `rotation_period` are null when not set."""
    return record_json(
        r,
        rename={
            "default_ttl_seconds": "default_ttl",
            "max_ttl_seconds": "max_ttl",
            "rotation_period_seconds": "rotation_period",
        },
        null_if_empty={
            "revocation_statements",
            "rollback_statements",
            "classification",
            "rotation_period_seconds",
        },
        convert={"rotation_period_seconds": lambda v: v or ""},
    )


def lease_json(item: Lease) -> dict[str, Any]:
    return record_json(item, rename={"id": "lease_id"}, null_if_empty={"last_error"})


def _pair_lines(pairs: list[tuple[str, Any]]) -> list[str]:
    width = max(len(k) for k, _ in pairs)
    return [
        f"{key.ljust(width)}  {'-' if value is None or value == '' else value}"
        for key, value in pairs
    ]


def _table_lines(header: list[str], rows: list[list[str]]) -> list[str]:
    return table([header, *rows]) if rows else []


_LEASE_TERMS = ("lease_id", "lease_duration", "renewable", "expires_at")


def _lease_terms(item: Lease) -> dict[str, Any]:
    """What a holder needs of its lease (`db creds`, `lease renew`)."""
    document = lease_json(item)
    return {key: document[key] for key in _LEASE_TERMS}


@click.group()
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
@connection_options(on_group=False)
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
    password = read_text_file(password_file, "password file").rstrip("\r\n")
    if not password:
        raise Refusal(f"password file {password_file} is empty")
    result = _db_client(ctx).add_connection(name, plugin, dsn, password, verify=verify)
    render(
        ctx,
        connection_json(result),
        f"connection {result.name} added ({result.plugin}, {redact(result.dsn)})",
    )


@connection.command("list")
@connection_options(on_group=False)
@click.pass_context
def connection_list(ctx: click.Context) -> None:
    """List connections."""
    items = _db_client(ctx).list_connections()
    render(
        ctx,
        [connection_json(c) for c in items],
        lambda: _table_lines(
            ["NAME", "PLUGIN", "DSN", "ROOT ROTATED"],
            [[c.name, c.plugin, redact(c.dsn), timestamp(c.root_rotated_at) or "-"] for c in items],
        ),
    )


@connection.command("show")
@click.argument("name")
@connection_options(on_group=False)
@click.pass_context
def connection_show(ctx: click.Context, name: str) -> None:
    """Show connection NAME (never its password)."""
    document = connection_json(_db_client(ctx).get_connection(name))
    render(ctx, document, lambda: _pair_lines(list(document.items())))


@connection.command("remove")
@click.argument("name")
@connection_options(on_group=False)
@click.pass_context
def connection_remove(ctx: click.Context, name: str) -> None:
    """Remove connection NAME (refused while roles or leases use it)."""
    _db_client(ctx).remove_connection(name)
    render(ctx, {"removed": name}, f"connection {name} removed")


@connection.command("rotate-root")
@click.argument("name")
@connection_options(on_group=False)
@click.pass_context
def connection_rotate_root(ctx: click.Context, name: str) -> None:
    """Change NAME's admin password to a fresh random one that nobody sees."""
    result = _db_client(ctx).rotate_root(name)
    when = timestamp(result.root_rotated_at)
    render(ctx, connection_json(result), f"admin password of {name} rotated at {when}")


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
@click.option(
    "--classification",
    type=click.Choice(["public", "internal", "confidential", "pii"]),
    help="Data classification: prod + pii needs the owner or two operators for db creds.",
)
@click.option("--rotation-period", type=DURATION, help="Rotation period (metadata, e.g. 90d).")
@connection_options(on_group=False)
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
    classification: str | None,
    rotation_period: int | None,
) -> None:
    """Add role NAME."""
    if default_ttl <= 0 or max_ttl <= 0:
        raise click.BadParameter("TTLs must be positive", param_hint="--default-ttl/--max-ttl")
    result = _db_client(ctx).add_role(
        name,
        connection_name,
        read_text_file(creation_statements, "creation statements"),
        revocation_statements=(
            None
            if revocation_statements is None
            else read_text_file(revocation_statements, "revocation statements")
        ),
        rollback_statements=(
            None
            if rollback_statements is None
            else read_text_file(rollback_statements, "rollback statements")
        ),
        default_ttl_seconds=default_ttl,
        max_ttl_seconds=max_ttl,
        username_template=username_template,
        owner=owner,
        tenant=tenant,
        environment=environment,
        password_length=password_length,
        password_charset=password_charset,
        classification=classification or "",
        rotation_period_seconds=rotation_period or 0,
    )
    render(
        ctx,
        role_json(result),
        f"role {result.name} added on {result.connection} (owner {result.tenant}/"
        f"{result.environment}/{result.owner}, ttl {result.default_ttl_seconds}s, "
        f"max {result.max_ttl_seconds}s)",
    )


@role.command("list")
@connection_options(on_group=False)
@click.pass_context
def role_list(ctx: click.Context) -> None:
    """List roles."""
    items = _db_client(ctx).list_roles()
    render(
        ctx,
        [role_json(r) for r in items],
        lambda: _table_lines(
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
        ),
    )


@role.command("show")
@click.argument("name")
@connection_options(on_group=False)
@click.pass_context
def role_show(ctx: click.Context, name: str) -> None:
    """Show role NAME with its statements."""
    document = role_json(_db_client(ctx).get_role(name))

    def lines() -> list[str]:
        pairs = [(k, v) for k, v in document.items() if not k.endswith("_statements")]
        statements = [(k, v) for k, v in document.items() if k.endswith("_statements") and v]
        return _pair_lines(pairs) + [
            f"\n-- {key.replace('_', ' ')}\n{text.rstrip()}" for key, text in statements
        ]

    render(ctx, document, lines)


@role.command("remove")
@click.argument("name")
@connection_options(on_group=False)
@click.pass_context
def role_remove(ctx: click.Context, name: str) -> None:
    """Remove role NAME (its live leases are still revoked when they end)."""
    _db_client(ctx).remove_role(name)
    render(ctx, {"removed": name}, f"role {name} removed")


# -- credentials ----------------------------------------------------------------------------


@db.command("creds")
@click.argument("role_name", metavar="ROLE")
@click.option("--ttl", type=DURATION, help="Lease duration [default: the role's].")
@connection_options(on_group=False)
@click.pass_context
def creds(ctx: click.Context, role_name: str, ttl: int | None) -> None:
    """A fresh database login for ROLE, under a lease."""
    result = _db_client(ctx).creds(role_name, ttl)
    document = {
        "username": result.username,
        "password": result.password,
        **_lease_terms(result.lease),
    }
    render(ctx, document, lambda: _pair_lines(list(document.items())))


# -- leases ---------------------------------------------------------------------------------


@click.group()
def lease() -> None:
    """Leases of dynamic credentials: renew, revoke, list."""


@lease.command("renew")
@click.argument("lease_id")
@click.option("--increment", type=DURATION, help="New duration from now [default: the role's].")
@connection_options(on_group=False)
@click.pass_context
def lease_renew(ctx: click.Context, lease_id: str, increment: int | None) -> None:
    """Extend LEASE_ID (never past its role's max TTL)."""
    result = _db_client(ctx).renew(lease_id, increment)
    document = _lease_terms(result)
    capped = "" if result.renewable else " (capped at the max TTL)"
    render(ctx, document, f"lease {result.id} renewed until {document['expires_at']}{capped}")


@lease.command("revoke")
@click.argument("lease_id", required=False)
@click.option("--prefix", help="Revoke every lease whose id starts with PREFIX (db/ROLE/...).")
@connection_options(on_group=False)
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
    render(ctx, {"revoked": revoked, "errors": errors}, f"revoked {revoked} lease(s)")
    if errors:
        raise Refusal(
            f"{len(errors)} lease(s) could not be revoked (the reaper keeps trying): {errors[0]}"
        )


@lease.command("list")
@click.option("--prefix", default="", help="Only leases whose id starts with PREFIX.")
@connection_options(on_group=False)
@click.pass_context
def lease_list(ctx: click.Context, prefix: str) -> None:
    """List leases (pending, active, revoking and irrevocable)."""
    items = _db_client(ctx).list_leases(prefix)
    render(
        ctx,
        [lease_json(i) for i in items],
        lambda: _table_lines(
            [
                "LEASE",
                "USERNAME",
                "STATE",
                "EXPIRES",
                "HOLDER",
                "ATTEMPTS",
                "NEXT RETRY",
                "LAST ERROR",
            ],
            [
                [
                    i.id,
                    i.username,
                    i.state,
                    timestamp(i.expires_at) or "-",
                    i.holder,
                    str(i.attempts),
                    timestamp(i.next_attempt_at) or "-",
                    _short(i.last_error),
                ]
                for i in items
            ],
        ),
    )
    stuck = sum(1 for i in items if i.state == "irrevocable")
    if stuck and not wants_json(ctx):
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
