"""`broker dev pull|run|ls|clear|gc`: expiring dev secrets in a local dev vault.

The vault lives in `$BROKER_HOME/dev-vault/` (see `broker.devvault`); every command except
`clear` first destroys expired entries. `BROKER_DEV_VAULT_KEY=file` forces the software key
file (tests, machines where SoftHSM2 cannot run); without SoftHSM2 it is used with a warning.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from broker.cli.clients import ClientError
from broker.cli.inputs import read_text_file
from broker.cli.options import (
    DURATION,
    CliContext,
    broker_home,
    clients,
    connection_options,
    output_option,
)
from broker.cli.refusals import Refusal
from broker.cli.render import record_json, render, text_time
from broker.devvault import (
    MAX_TTL,
    DevVault,
    Entry,
    PullRefused,
    PullReport,
    VaultError,
    VaultSource,
    check_pull,
    pull,
)
from broker.secretrefs import BadReference, UnresolvedReference, parse_dotenv, resolve_environ

__all__ = ["dev"]


def vault_dir() -> Path:
    return broker_home() / "dev-vault"


def _use_softhsm() -> bool:
    if os.environ.get("BROKER_DEV_VAULT_KEY", "") == "file":
        return False
    from broker.softhsm import softhsm_available

    if softhsm_available():
        return True
    click.echo(
        "broker dev: warning: SoftHSM2 is not installed; the dev vault key is a software key "
        "file (mode 0600) instead of a non-extractable token key",
        err=True,
    )
    return False


@contextmanager
def _vault(*, gc: bool = True) -> Iterator[DevVault]:
    vault = DevVault(vault_dir())
    try:
        if gc:
            gone = vault.gc()
            if gone:
                click.echo(f"broker dev: destroyed {len(gone)} expired entr(y/ies)", err=True)
        yield vault
    except VaultError as exc:
        raise Refusal(str(exc)) from None
    finally:
        vault.close()


def _entries(count: int) -> str:
    return f"entr{'y' if count == 1 else 'ies'}"


@click.group()
def dev() -> None:
    """Expiring dev secrets in a local dev vault ($BROKER_HOME/dev-vault)."""


def pull_json(report: PullReport) -> dict[str, object]:
    """`broker dev pull --output json`: what was stored, dropped and refused (never values)."""
    return record_json(
        report,
        convert={"refused": lambda pairs: [{"reference": r, "reason": w} for r, w in pairs]},
    )


def entry_json(entry: Entry) -> dict[str, object]:
    """One line of `broker dev ls --output json` (never the value)."""
    return record_json(entry)


@dev.command("pull")
@click.option("--env", "environment", required=True, help="The environment to pull (never prod).")
@click.option("--service", default="", help="Only this service's secrets.")
@click.option(
    "--ttl",
    type=DURATION,
    default=int(MAX_TTL.total_seconds()),
    help=f"How long the pulled values live [default and cap: {MAX_TTL.total_seconds() / 3600:g}h].",
)
@click.option("--tenant", default="", help="The tenant [default: yours].")
@connection_options(on_group=False)
@click.pass_context
def dev_pull(ctx: click.Context, environment: str, service: str, ttl: int, tenant: str) -> None:
    """Copy the dev secrets you may read into the dev vault (values never printed)."""
    with _vault() as vault:
        try:
            check_pull(environment, dt.timedelta(seconds=ttl))
            report = pull(
                vault,
                clients(ctx).secrets,
                environment,
                dt.timedelta(seconds=ttl),
                service=service,
                tenant=tenant,
                softhsm=_use_softhsm(),
                on_error=ClientError,
            )
        except PullRefused as exc:
            raise Refusal(str(exc)) from None
        for ref, why in report.refused:
            click.echo(f"broker dev: not pulled {ref}: {why}", err=True)
        render(
            ctx,
            pull_json(report),
            f"pulled {report.stored} secret(s) of {environment} into {vault.directory} until "
            f"{text_time(report.expires_at)}"
            + (f"; dropped {len(report.dropped)} no longer readable" if report.dropped else ""),
        )


@dev.command("ls")
@output_option(on_group=False)
@click.pass_context
def dev_ls(ctx: click.Context) -> None:
    """Names, versions and expiry of what the dev vault holds (never values)."""
    with _vault() as vault:
        entries = vault.entries()
    render(
        ctx,
        [entry_json(e) for e in entries],
        [f"{e.reference}  v{e.version}  expires {text_time(e.expires_at)}" for e in entries],
    )


@dev.command("gc")
def dev_gc() -> None:
    """Destroy expired entries (every `broker dev` command does this first)."""
    with _vault(gc=False) as vault:
        gone = vault.gc()
    click.echo(f"destroyed {len(gone)} expired {_entries(len(gone))}")


@dev.command("clear")
def dev_clear() -> None:
    """Destroy the dev vault: every entry and its key (token or key file)."""
    vault = DevVault(vault_dir())
    count = vault.clear()
    click.echo(f"cleared the dev vault ({count} {_entries(count)})")


@dev.command("run", context_settings={"allow_interspersed_args": False})
@click.option(
    "--env-file",
    "env_files",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="A .env template whose NAME=secret://... lines are resolved too (repeatable).",
)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def dev_run(ctx: click.Context, env_files: tuple[Path, ...], command: tuple[str, ...]) -> None:
    """Run COMMAND with the secret:// references of its environment (and of --env-file
    templates) resolved from the dev vault:

    broker dev run --env-file .env.example -- ./manage.py runserver
    """
    environ = dict(os.environ)
    for path in env_files:
        text = read_text_file(path, "env file")
        try:
            for name, value in parse_dotenv(text, str(path)).items():
                environ.setdefault(name, value)  # the real environment wins over a template
        except BadReference as exc:
            raise Refusal(str(exc)) from None
    with _vault() as vault:
        try:
            resolved = resolve_environ(environ, VaultSource(vault))
        except (BadReference, UnresolvedReference) as exc:
            raise Refusal(str(exc)) from None
    obj = ctx.find_object(CliContext)
    if obj is not None:
        obj.close_all()
    environ.update(resolved)
    try:
        os.execvpe(command[0], list(command), environ)  # noqa: S606 (the developer's command)
    except OSError as exc:
        raise Refusal(f"cannot run {command[0]}: {exc.strerror or exc}") from None
