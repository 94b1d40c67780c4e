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

from broker import clioutput
from broker.api.client import ClientError
from broker.api.secrets_client import SecretsClient
from broker.cli import (
    DURATION,
    CliContext,
    Refusal,
    _client,
    _connection_options,
    _output,
    broker_home,
    cli,
)
from broker.devvault import (
    MAX_TTL,
    DevVault,
    PullRefused,
    VaultError,
    VaultSource,
    pull,
)
from broker.secretrefs import BadReference, UnresolvedReference, parse_dotenv, resolve_environ

__all__ = ["dev"]


def vault_dir() -> Path:
    return broker_home() / "dev-vault"


def _use_softhsm() -> bool:
    if os.environ.get("BROKER_DEV_VAULT_KEY", "") == "file":
        return False
    from ca.keys.softhsm import softhsm_available

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


@cli.group()
def dev() -> None:
    """Expiring dev secrets in a local dev vault ($BROKER_HOME/dev-vault)."""


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
@_connection_options(on_group=False)
@click.pass_context
def dev_pull(ctx: click.Context, environment: str, service: str, ttl: int, tenant: str) -> None:
    """Copy the dev secrets you may read into the dev vault (values never printed)."""
    with _vault() as vault:
        try:
            from broker.devvault import check_pull

            check_pull(environment, dt.timedelta(seconds=ttl))
            api = SecretsClient(_client(ctx))  # type: ignore[arg-type]
            report = pull(
                vault,
                api,
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
        if _output(ctx) == "json":
            click.echo(
                clioutput.dumps(
                    {
                        "stored": report.stored,
                        "dropped": report.dropped,
                        "refused": [{"reference": r, "reason": w} for r, w in report.refused],
                        "expires_at": clioutput.timestamp(report.expires_at),
                    }
                )
            )
            return
        click.echo(
            f"pulled {report.stored} secret(s) of {environment} into {vault.directory} until "
            f"{clioutput.timestamp(report.expires_at)}"
            + (f"; dropped {len(report.dropped)} no longer readable" if report.dropped else "")
        )


@dev.command("ls")
@click.option("--output", type=click.Choice(["text", "json"]), default="text")
def dev_ls(output: str) -> None:
    """Names, versions and expiry of what the dev vault holds (never values)."""
    with _vault() as vault:
        entries = vault.entries()
    if output == "json":
        click.echo(
            clioutput.dumps(
                [
                    {
                        "reference": e.reference,
                        "environment": e.environment,
                        "version": e.version,
                        "pulled_at": clioutput.timestamp(e.pulled_at),
                        "expires_at": clioutput.timestamp(e.expires_at),
                    }
                    for e in entries
                ]
            )
        )
        return
    for e in entries:
        click.echo(f"{e.reference}  v{e.version}  expires {clioutput.timestamp(e.expires_at)}")


@dev.command("gc")
def dev_gc() -> None:
    """Destroy expired entries (every `broker dev` command does this first)."""
    with _vault(gc=False) as vault:
        gone = vault.gc()
    click.echo(f"destroyed {len(gone)} expired entr{'y' if len(gone) == 1 else 'ies'}")


@dev.command("clear")
def dev_clear() -> None:
    """Destroy the dev vault: every entry and its key (token or key file)."""
    vault = DevVault(vault_dir())
    count = vault.clear()
    click.echo(f"cleared the dev vault ({count} entr{'y' if count == 1 else 'ies'})")


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
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise Refusal(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
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
        while obj.clients:
            obj.clients.pop().close()
    environ.update(resolved)
    try:
        os.execvpe(command[0], list(command), environ)  # noqa: S606 (the developer's command)
    except OSError as exc:
        raise Refusal(f"cannot run {command[0]}: {exc.strerror or exc}") from None
