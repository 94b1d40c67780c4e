"""`broker report compliance`: where the fleet stands against the secrets standard (issue 16).

The broker builds the document (`broker.kms.report`); this command prints it as JSON, CSV or
one offline HTML page (`--out FILE` writes it to a file instead of stdout).
"""

from __future__ import annotations

from pathlib import Path

import click

from broker.cli.options import DURATION, clients, connection_options
from broker.cli.refusals import Refusal
from broker.cli.render import dumps
from broker.kms.report import to_csv, to_html

__all__ = ["report"]


@click.group()
def report() -> None:
    """Reports for operators and auditors."""


@report.command("compliance")
@click.option("--tenant", default="", metavar="T", help="One tenant [default: every tenant].")
@click.option(
    "--window", type=DURATION, default=None, help="Grants and break-glass uses in this window "
    "[default: 30d].",
)  # fmt: skip
@click.option(
    "--output",
    "fmt",
    type=click.Choice(["json", "csv", "html"]),
    default="json",
    show_default=True,
    help="Report format (html: one offline page).",
)
@click.option(
    "--out",
    "out_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the report to this file instead of stdout.",
)
@connection_options(on_group=False, output=False)
@click.pass_context
def report_compliance(
    ctx: click.Context, tenant: str, window: int | None, fmt: str, out_file: Path | None
) -> None:
    """Secrets, keys and database roles (owner, classification, rotation, overdue, missing
    metadata), grants and break-glass uses, operators' last logins, audit ledger status."""
    document = clients(ctx).kms.compliance_report(tenant=tenant, window_seconds=window or 0)
    renderers = {"json": dumps, "csv": to_csv, "html": to_html}
    text = renderers[fmt](document)
    if out_file is None:
        click.echo(text, nl=not text.endswith("\n"))
        return
    try:
        out_file.write_text(text)
    except OSError as exc:
        raise Refusal(f"cannot write {out_file}: {exc.strerror or exc}") from None
