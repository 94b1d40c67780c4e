"""`broker db static-role ...` and `broker db static-creds`: static database roles (users that
already exist, whose password the broker rotates). Attached to `broker db` by the root group.

JSON documents (`--output json`) are stable: see docs/database.md. The password is printed only
by `broker db static-creds`, to the owning service.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from broker.cli.clients import StaticRole, StaticRolesClient
from broker.cli.inputs import read_text_file
from broker.cli.options import DURATION, clients, connection_options, rollout_options, stage_list
from broker.cli.render import record_json, render, table, timestamp

__all__ = ["static_creds", "static_role", "static_role_json"]


def _client(ctx: click.Context) -> StaticRolesClient:
    return clients(ctx).static_roles


def static_role_json(r: StaticRole) -> dict[str, Any]:
    return record_json(
        r,
        rename={"rotation_period_seconds": "rotation_period"},
        null_if_empty={"rotation_statements"},
    )


def _pairs(document: dict[str, Any]) -> list[str]:
    width = max(len(k) for k in document)
    return [f"{k.ljust(width)}  {'-' if v is None or v == '' else v}" for k, v in document.items()]


@click.group("static-role")
def static_role() -> None:
    """Static roles: existing database users whose password the broker rotates."""


@static_role.command("add")
@click.argument("name")
@click.option("--connection", "connection_name", required=True, help="The db connection.")
@click.option("--username", required=True, help="The existing database user.")
@click.option("--rotation-period", type=DURATION, default="30d", show_default=True)
@click.option(
    "--rotation-statements",
    type=click.Path(path_type=Path, dir_okay=False),
    help="SQL file with {{name}} and {{password}} (ALTER ROLE/ALTER USER/SET PASSWORD only) "
    "[default: the engine's].",
)
@click.option("--owner", default="", help="The service that may read it [default: NAME].")
@click.option("--tenant", default="", help="Its tenant [default: default].")
@click.option("--environment", default="", help="Its environment [default: dev].")
@connection_options(on_group=False)
@click.pass_context
def static_role_add(
    ctx: click.Context,
    name: str,
    connection_name: str,
    username: str,
    rotation_period: int,
    rotation_statements: Path | None,
    owner: str,
    tenant: str,
    environment: str,
) -> None:
    """Add static role NAME for an existing user; its password is rotated at once, so from
    then on only the broker knows it."""
    if rotation_period <= 0:
        raise click.BadParameter("must be positive", param_hint="--rotation-period")
    result = _client(ctx).add(
        name,
        connection_name,
        username,
        rotation_period_seconds=rotation_period,
        rotation_statements=(
            None
            if rotation_statements is None
            else read_text_file(rotation_statements, "rotation statements")
        ),
        owner=owner,
        tenant=tenant,
        environment=environment,
    )
    render(
        ctx,
        static_role_json(result),
        f"static role {result.name} added for {result.username} on {result.connection} "
        f"(version {result.version}, next rotation {timestamp(result.next_rotation_at)})",
    )


@static_role.command("list")
@connection_options(on_group=False)
@click.pass_context
def static_role_list(ctx: click.Context) -> None:
    """List static roles."""
    items = _client(ctx).list()
    render(
        ctx,
        [static_role_json(r) for r in items],
        lambda: (
            table(
                [
                    ["NAME", "CONNECTION", "USERNAME", "OWNER", "VERSION", "NEXT ROTATION"],
                    *[
                        [
                            r.name,
                            r.connection,
                            r.username,
                            f"{r.tenant}/{r.environment}/{r.owner}",
                            str(r.version),
                            timestamp(r.next_rotation_at) or "-",
                        ]
                        for r in items
                    ],
                ]
            )
            if items
            else []
        ),
    )


@static_role.command("show")
@click.argument("name")
@connection_options(on_group=False)
@click.pass_context
def static_role_show(ctx: click.Context, name: str) -> None:
    """Show static role NAME (never its password)."""
    document = static_role_json(_client(ctx).get(name))
    render(ctx, document, lambda: _pairs(document))


@static_role.command("delete")
@click.argument("name")
@connection_options(on_group=False)
@click.pass_context
def static_role_delete(ctx: click.Context, name: str) -> None:
    """Forget static role NAME (the user keeps its last password, known to nobody)."""
    _client(ctx).delete(name)
    render(ctx, {"deleted": name}, f"static role {name} deleted")


@static_role.command("rotate")
@click.argument("name")
@click.option("--reason", required=True, help="Why, e.g. personnel-change.")
@click.option("--ticket", required=True, help="The change or incident ticket.")
@rollout_options(
    "Roll the new password out in stages of consumers on a second user, e.g. "
    "10%,50%,100% (follow it with 'broker rollout status db:NAME').",
)
@connection_options(on_group=False)
@click.pass_context
def static_role_rotate(
    ctx: click.Context,
    name: str,
    reason: str,
    ticket: str,
    stages: str | None,
    health_check: str | None,
    bake: int | None,
    max_failures: int | None,
) -> None:
    """Rotate static role NAME's password now. With --stages, roll the new password out
    stage by stage on the role's second user instead (the old user and password keep working
    until the final stage baked; rolled back automatically when a stage fails)."""
    if stages is not None:
        view = clients(ctx).rollouts.start(
            f"db:{name}",
            environment="",
            ticket=ticket,
            justification=reason,
            stages=stage_list(stages),
            bake_seconds=300 if bake is None else bake,
            max_failures=0 if max_failures is None else max_failures,
            health_check=health_check or "",
        )
        percent = view.stages[view.stage - 1]
        render(
            ctx,
            record_json(view),
            f"rollout {view.id} of {view.reference} started: v{view.from_version} -> "
            f"v{view.to_version} on the role's second user, stage {view.stage} of "
            f"{len(view.stages)} ({percent}%) open until {timestamp(view.bake_ends) or '-'}; "
            f"follow it with 'broker rollout status {view.reference}'",
        )
        return
    for option, given in (
        ("--health-check", health_check),
        ("--bake", bake),
        ("--max-failures", max_failures),
    ):
        if given is not None:
            raise click.UsageError(f"{option} is only used with --stages")
    result = _client(ctx).rotate(name, reason, ticket)
    render(
        ctx,
        static_role_json(result),
        f"static role {result.name} rotated (version {result.version}, next rotation "
        f"{timestamp(result.next_rotation_at)})",
    )


@click.command("static-creds")
@click.argument("name")
@connection_options(on_group=False)
@click.pass_context
def static_creds(ctx: click.Context, name: str) -> None:
    """The current username and password of static role NAME (its owning service only)."""
    result = _client(ctx).creds(name)
    document = {
        "username": result.username,
        "password": result.password,
        "version": result.version,
        "next_rotation_at": timestamp(result.next_rotation_at),
    }
    render(ctx, document, lambda: _pairs(document))
