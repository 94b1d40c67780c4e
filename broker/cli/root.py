"""The root `broker` group: feature groups attached, client errors turned into one-line
refusals, clients closed; and the entry points.

The arrows: this module imports every feature module (authority, audit, identity, database,
secrets, access, operators, kms, report, scan, dev, serve, health); feature modules import
only the shared modules (clients, options, inputs, refusals, render), never each other nor this
one.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import click

from broker.cli.access import approval, breakglass, grant, policy
from broker.cli.audit import audit
from broker.cli.authority import ca, jwt, svid
from broker.cli.clients import ClientError
from broker.cli.database import db, lease
from broker.cli.dev import dev
from broker.cli.health import health
from broker.cli.identity import attestor, entry, svid_deny, token
from broker.cli.kms import key
from broker.cli.operators import login_group, logout, operator
from broker.cli.options import (
    DEFAULT_SERVER,
    SERVER_KEY,
    CliContext,
    connection_options,
)
from broker.cli.refusals import Refusal, client_error_message, one_line
from broker.cli.report import report
from broker.cli.revocation import revoke
from broker.cli.rollout import rollout
from broker.cli.scan import scan
from broker.cli.secrets import exec_command, kek, secrets
from broker.cli.serve import agent, serve
from broker.cli.static_roles import static_creds, static_role
from broker.cli.status import status

__all__ = ["cli", "main", "run"]


class _BrokerGroup(click.Group):
    """The root group: turns client errors from any subcommand into one-line refusals."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ClientError as exc:
            server = ctx.meta.get(SERVER_KEY, DEFAULT_SERVER)
            raise Refusal(client_error_message(exc, server)) from None
        finally:
            obj = ctx.find_object(CliContext)
            if obj is not None:
                obj.close_all()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("credential-broker")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


@click.group(cls=_BrokerGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(
    version=_version(), prog_name="broker", message="%(prog)s %(version)s", package_name=None
)
@connection_options(on_group=True)
def cli() -> None:
    """HSM-rooted SPIFFE CA and credential broker."""


@click.command("completion")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script for SHELL; e.g. add
    'eval "$(broker completion bash)"' to ~/.bashrc (zsh: ~/.zshrc;
    fish: 'broker completion fish | source' in ~/.config/fish/config.fish)."""
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    assert cls is not None  # the choice above names only shells click supports
    click.echo(cls(cli, {}, "broker", "_BROKER_COMPLETE").source())


# Every feature's commands, attached once (click lists them alphabetically in --help).
svid.add_command(svid_deny)
db.add_command(static_role)
db.add_command(static_creds)
for command in (
    serve,
    agent,
    svid,
    jwt,
    ca,
    audit,
    token,
    attestor,
    entry,
    db,
    lease,
    revoke,
    secrets,
    kek,
    exec_command,
    policy,
    grant,
    approval,
    breakglass,
    login_group,
    logout,
    operator,
    key,
    report,
    scan,
    dev,
    completion,
    status,
    health,
    rollout,
):
    cli.add_command(command)


def run(args: Sequence[str] | None = None, obj: CliContext | None = None) -> int:
    """Run the CLI and return its exit status; every error is one line on stderr."""
    try:
        result = cli.main(
            args=list(args) if args is not None else None,
            prog_name="broker",
            standalone_mode=False,
            obj=obj if obj is not None else CliContext(),
        )
    except click.exceptions.NoArgsIsHelpError as exc:
        exc.show()  # a bare group: its help, as click would print it
        return exc.exit_code
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        click.echo(f"broker: {one_line(exc.format_message())}{hint}", err=True)
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:
        click.echo("broker: aborted", err=True)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `broker audit tail | head`); nothing more to say. Point
        # stdout at /dev/null so the interpreter's final flush does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:
        # A bug, not a refusal: still one line, unless BROKER_DEBUG asks for the traceback.
        if os.environ.get("BROKER_DEBUG"):
            raise
        click.echo(
            f"broker: unexpected error: {type(exc).__name__}: {one_line(str(exc))}", err=True
        )
        return 1
    return result if isinstance(result, int) else 0


def main() -> NoReturn:
    """Console-script entry point (`broker = "broker.cli:main"`)."""
    sys.exit(run())
