"""`broker audit verify|checkpoint|new-epoch|tail`: the tamper-evident audit ledger."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from broker.cli.clients import AuditEntry
from broker.cli.inputs import read_input_file
from broker.cli.options import clients, connection_options, data_dir, data_dir_option
from broker.cli.refusals import Refusal, one_line
from broker.cli.render import dumps, record_json, render, wants_json

__all__ = ["audit", "audit_entry_line"]


def audit_entry_line(entry: AuditEntry) -> str:
    event = entry.event

    def field(name: str) -> str:
        value = event.get(name)
        return "-" if value in (None, "") else " ".join(str(value).split())

    parts = [
        str(entry.seq),
        field("when"),
        field("who"),
        field("what"),
        field("resource"),
        field("decision"),
        field("outcome"),
    ]
    if event.get("error"):
        parts.append(f"({field('error')})")
    return "  ".join(parts)


@click.group()
def audit() -> None:
    """The tamper-evident audit ledger."""


@audit.command("verify")
@click.option(
    "--checkpoint",
    "checkpoint_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="An exported checkpoint: also check that the ledger still holds what it witnessed.",
)
@click.option(
    "--offline",
    is_flag=True,
    help="Read the database and key backend directly (the dev data dir, or --config), not "
    "through a broker: for a broker that refuses to start or to write.",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="With --offline: the broker's configuration file (TOML).",
)
@connection_options(on_group=False)
@click.pass_context
def audit_verify(
    ctx: click.Context, checkpoint_file: Path | None, offline: bool, config_file: Path | None
) -> None:
    """Check the whole hash chain and every MAC; exit 1 if anything is broken."""
    checkpoint_json = ""
    if checkpoint_file is not None:
        from broker.audit import parse_checkpoint
        from broker.errors import InvalidArgument

        text = read_input_file(checkpoint_file, "checkpoint file").decode(errors="replace")
        try:
            parse_checkpoint(text)  # offline: format and signature, before asking the broker
        except InvalidArgument as exc:
            raise Refusal(one_line(f"{checkpoint_file}: {exc}")) from None
        checkpoint_json = text
    if config_file is not None and not offline:
        raise click.UsageError("--config goes with --offline", ctx)
    result: Any
    if offline:
        result = _verify_offline(ctx, config_file, checkpoint_json)
    else:
        result = clients(ctx).audit.audit_verify(checkpoint_json)
    if wants_json(ctx):
        click.echo(dumps(record_json(result)))  # also when broken: scripts read the reason
    if not result.intact:
        raise Refusal(
            one_line(
                f"audit ledger broken at entry {result.first_broken_seq}: "
                f"{result.reason or 'no reason given'}"
            )
        )
    if not wants_json(ctx):
        click.echo(f"audit ledger intact: {result.entries} entries")
        for note in result.notes:
            click.echo(f"  note: {one_line(note)}")


def _offline_options(ctx: click.Context, config_file: Path | None, reason: str | None) -> Any:
    from broker.daemon import ServeOptions

    directory = data_dir(ctx)
    if config_file is None and not directory.is_dir():
        raise Refusal(f"no broker data directory at {directory} (give --data-dir or --config)")
    return ServeOptions(
        dev=config_file is None,
        data_dir=directory,
        config_file=config_file,
        new_ledger_epoch=reason,
    )


def _verify_offline(ctx: click.Context, config_file: Path | None, checkpoint_json: str) -> Any:
    from broker.daemon import verify_ledger
    from broker.errors import BrokerError
    from ca.errors import CAError

    try:
        return verify_ledger(_offline_options(ctx, config_file, None), checkpoint_json)
    except (BrokerError, CAError) as exc:
        raise Refusal(one_line(str(exc)) or type(exc).__name__) from None


@audit.command("checkpoint")
@click.option(
    "--out",
    "output_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the checkpoint to FILE instead of stdout.",
)
@click.option("--new", "fresh", is_flag=True, help="Make a new checkpoint of the ledger now.")
@connection_options(on_group=False)
@click.pass_context
def audit_checkpoint(ctx: click.Context, output_file: Path | None, fresh: bool) -> None:
    """Export the latest signed ledger checkpoint (made now if there is none, or with --new).

    Keep it somewhere the broker's database cannot reach: `broker audit verify --checkpoint
    FILE` then proves the ledger still holds that past, even if the database is replaced."""
    text = clients(ctx).audit.audit_checkpoint(fresh)
    if output_file is None:
        click.echo(text, nl=False)
        return
    try:
        output_file.write_text(text)
    except OSError as exc:
        raise Refusal(f"cannot write {output_file}: {exc.strerror or exc}") from None


@audit.command("new-epoch")
@click.option("--reason", required=True, help="Why (recorded and signed in the ledger).")
@click.option("--dev", is_flag=True, help="The embedded default data directory.")
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Production configuration file (TOML).",
)
@data_dir_option(on_group=False)
@click.pass_context
def audit_new_epoch(ctx: click.Context, reason: str, dev: bool, config_file: Path | None) -> None:
    """Offline, with the broker stopped: start a new ledger epoch after the audit MAC key was
    lost (docs/ledger.md, key-loss runbook). Creates a new MAC key and writes a signed record
    of the reason and of the state the ledger was found in."""
    if dev == (config_file is not None):
        raise click.UsageError("exactly one of --dev or --config is required", ctx)
    from broker.daemon import ServeOptions, new_ledger_epoch
    from broker.errors import BrokerError
    from ca.errors import CAError

    options = ServeOptions(
        dev=dev, data_dir=data_dir(ctx), config_file=config_file, new_ledger_epoch=reason
    )
    try:
        epoch, seq = new_ledger_epoch(options)
    except (BrokerError, CAError) as exc:
        raise Refusal(one_line(str(exc)) or type(exc).__name__) from None
    click.echo(f"audit ledger epoch {epoch} started at entry {seq}")


@audit.command("tail")
@click.option(
    "-n",
    "--lines",
    "limit",
    type=click.IntRange(1, 1000),
    default=20,
    show_default=True,
    help="How many of the newest entries.",
)
@connection_options(on_group=False)
@click.pass_context
def audit_tail(ctx: click.Context, limit: int) -> None:
    """Show the newest audit entries, oldest first."""
    entries = clients(ctx).audit.audit_tail(limit)
    render(
        ctx,
        [record_json(e, exclude={"event_json"}) for e in entries],
        lambda: [audit_entry_line(e) for e in entries],
    )
