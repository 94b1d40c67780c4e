"""`broker health`: ask a running broker whether it serves (grpc.health.v1 Check over the
same mTLS connection as every other command). The container image's HEALTHCHECK runs it."""

from __future__ import annotations

import click

from broker.cli.options import clients, connection_options
from broker.cli.refusals import Refusal
from broker.cli.render import render

__all__ = ["health"]


@click.command("health")
@click.option(
    "--service",
    default="",
    metavar="NAME",
    help="A gRPC service to check (e.g. broker.v1.CertificateAuthority) [default: the broker].",
)
@connection_options(on_group=False)
@click.pass_context
def health(ctx: click.Context, service: str) -> None:
    """Exit 0 if the broker answers SERVING, 1 otherwise (a container/orchestrator probe)."""
    status = clients(ctx).health.check(service)
    if status != "SERVING":
        raise Refusal(f"{service or 'the broker'} is {status}")
    render(ctx, {"service": service, "status": status}, lambda: status)
