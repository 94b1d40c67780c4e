"""`broker rollout status|promote|abort|report REF`: follow and steer a staged rollout started
with `broker secrets rotate REF --stages ...`, or of a static database role (REF `db:ROLE`)
started with `broker db static-role rotate ROLE --stages ...` (see docs/rotation.md). JSON documents
(`--output json`) are the `RolloutView` records field by field."""

from __future__ import annotations

import click

from broker.cli.clients import RolloutsClient, RolloutView
from broker.cli.options import clients, connection_options
from broker.cli.render import record_json, render, table, text_time

__all__ = ["rollout", "rollout_lines"]


def _client(ctx: click.Context) -> RolloutsClient:
    return clients(ctx).rollouts


def _tenant_option(f: click.decorators.FC) -> click.decorators.FC:
    return click.option(
        "--tenant", default="", metavar="T", help="Tenant [default: the broker's default tenant]."
    )(f)


def rollout_lines(view: RolloutView) -> list[str]:
    """The rollout for people: where it stands, its health, its consumers."""
    stages = ",".join(f"{s}%" for s in view.stages)
    to = f"v{view.to_version}" if view.to_version else "(being written)"
    lines = [
        f"rollout {view.id} of {view.reference} (tenant {view.tenant}): {view.state}",
        f"  versions:  v{view.from_version} -> {to}",
        f"  stages:    {stages}; stage {view.stage} of {len(view.stages)} "
        f"({view.stages[view.stage - 1]}%) opened {text_time(view.stage_opened_at)}",
    ]
    if view.bake_ends is not None:
        lines.append(f"  bake ends: {text_time(view.bake_ends)} ({view.bake_seconds}s per stage)")
    lines.append(f"  failures:  {view.failures} (at most {view.max_failures} tolerated)")
    if view.health_check:
        check = view.check or "not run yet"
        detail = f" ({view.check_detail})" if view.check_detail else ""
        lines.append(f"  check:     {view.health_check}: {check}{detail}")
    lines.append(f"  health:    {'healthy' if view.healthy else 'unhealthy'}: {view.health_reason}")
    lines.append(f"  started:   {text_time(view.started_at)} by {view.started_by}")
    lines.append(f"  ticket:    {view.ticket}" + (f" ({view.approver})" if view.approver else ""))
    if view.finished_at is not None:
        lines.append(f"  finished:  {text_time(view.finished_at)}: {view.reason}")
    if view.consumers:
        rows = [
            [
                c.identity,
                str(c.stage),
                f"v{c.served_version}" if c.served_version else "-",
                f"v{c.reported_version}" if c.reported_version else "-",
                (c.health or "-") + (f" ({c.detail})" if c.detail else ""),
            ]
            for c in view.consumers
        ]
        lines += table([["CONSUMER", "STAGE", "SERVED", "REPORTED", "HEALTH"], *rows])
    else:
        lines.append("  no consumer has read or reported yet")
    return lines


def _render(ctx: click.Context, view: RolloutView, head: str | None = None) -> None:
    def text() -> list[str]:
        return ([head] if head else []) + rollout_lines(view)

    render(ctx, record_json(view), text)


@click.group()
def rollout() -> None:
    """Staged rollouts of a new secret version or static role password (start one with
    'secrets rotate --stages' or 'db static-role rotate --stages'; a static role is db:ROLE)."""


@rollout.command("status")
@click.argument("reference")
@_tenant_option
@connection_options(on_group=False)
@click.pass_context
def rollout_status(ctx: click.Context, reference: str, tenant: str) -> None:
    """The latest rollout of a secret (or static role db:ROLE): stage, bake, health, consumers."""
    _render(ctx, _client(ctx).status(reference, tenant=tenant))


@rollout.command("promote")
@click.argument("reference")
@_tenant_option
@connection_options(on_group=False)
@click.pass_context
def rollout_promote(ctx: click.Context, reference: str, tenant: str) -> None:
    """Open the next stage now (the final stage always bakes before the old version goes)."""
    view = _client(ctx).promote(reference, tenant=tenant)
    _render(ctx, view, f"promoted: stage {view.stage} ({view.stages[view.stage - 1]}%) open")


@rollout.command("abort")
@click.argument("reference")
@_tenant_option
@connection_options(on_group=False)
@click.pass_context
def rollout_abort(ctx: click.Context, reference: str, tenant: str) -> None:
    """Put every consumer back on the old version; the new version is revoked."""
    view = _client(ctx).abort(reference, tenant=tenant)
    _render(ctx, view, f"aborted: every consumer is back on v{view.from_version}")


@rollout.command("report")
@click.argument("reference")
@click.option(
    "--version",
    "version",
    type=click.IntRange(1),
    required=True,
    help="The version "
    "this consumer now uses (a static role's: the version 'db static-creds' gave).",
)
@click.option("--healthy/--unhealthy", default=True, help="Whether it works with it.")
@click.option("--detail", default="", help="Why, when unhealthy (at most 200 characters).")
@_tenant_option
@connection_options(on_group=False)
@click.pass_context
def rollout_report(
    ctx: click.Context, reference: str, version: int, healthy: bool, detail: str, tenant: str
) -> None:
    """A consumer's report during a rollout (what agents and the SDK send): the version it
    uses and whether it is healthy. An unhealthy report of the new version counts a failure."""
    answer = _client(ctx).report(
        reference, version=version, healthy=healthy, detail=detail, tenant=tenant
    )
    document = {"tracked": answer.tracked, "rollout_id": answer.rollout_id, "state": answer.state}
    text = (
        f"reported to rollout {answer.rollout_id} ({answer.state})"
        if answer.tracked
        else f"no rollout of {reference} is running; the report was not recorded"
    )
    render(ctx, document, text)
