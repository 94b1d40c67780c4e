"""`broker revoke --identity SPIFFE_ID | --owner SERVICE --reason personnel-change`: end every
lease, grant and static-role password tied to an identity or an owning service, in one command
(see docs/rotation.md). Exit status 1 when any object could not be ended (listed; running the
command again finishes them)."""

from __future__ import annotations

import click

from broker.cli.clients import RevocationClient
from broker.cli.options import clients, connection_options
from broker.cli.refusals import Refusal
from broker.cli.render import record_json, render, table

__all__ = ["revoke"]

REASONS = ("personnel-change", "offboarding", "compromise")


def _client(ctx: click.Context) -> RevocationClient:
    return clients(ctx).revocation


@click.command("revoke")
@click.option("--identity", default="", help="A SPIFFE ID: its leases, grants, static roles.")
@click.option("--owner", default="", help="An owning service: everything of that service.")
@click.option("--reason", required=True, type=click.Choice(REASONS))
@click.option("--ticket", default="", help="The change or incident ticket (audited).")
@connection_options(on_group=False)
@click.pass_context
def revoke(ctx: click.Context, identity: str, owner: str, reason: str, ticket: str) -> None:
    """End every lease, grant and static-role password tied to an identity or owner."""
    if bool(identity) == bool(owner):
        raise click.UsageError("give exactly one of --identity or --owner")
    result = _client(ctx).revoke(identity=identity, owner=owner, reason=reason, ticket=ticket)
    failed = [o for o in result.objects if o.error]
    document = {
        "subject": result.subject,
        "objects": [record_json(o, null_if_empty={"error"}) for o in result.objects],
    }

    def lines() -> list[str]:
        ended = len(result.objects) - len(failed)
        head = [f"{result.subject}: {ended} ended, {len(failed)} failed"]
        rows = [[o.kind, o.id, o.error or "ended"] for o in result.objects]
        return head + (table([["KIND", "ID", "RESULT"], *rows]) if rows else [])

    render(ctx, document, lines)
    if failed:
        raise Refusal(f"{len(failed)} object(s) could not be ended; run the command again")
