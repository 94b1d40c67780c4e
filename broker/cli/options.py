"""What every command shares: the connection options and where their values go, `--output`,
durations, the click context object and the clients it builds.

Connection options are accepted on the root group (with env vars) and again after any client
subcommand; a value given on the subcommand wins. Values are collected in ctx.meta, which click
shares across the command chain, so the group's callback runs first and the subcommand's may
override it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import click

from broker.cli.clients import ClientCredentials, Clients, ConnectionSettings, GrpcClients
from broker.cli.refusals import Refusal
from broker.config import DEFAULT_DATA_DIR, DEFAULT_LISTEN

__all__ = [
    "DEFAULT_SERVER",
    "DURATION",
    "SERVER_KEY",
    "SETTINGS_KEY",
    "CliContext",
    "DurationType",
    "broker_home",
    "client_certificate",
    "clients",
    "connection_options",
    "data_dir",
    "data_dir_option",
    "default_attest_server",
    "output_format",
    "rollout_options",
    "setting",
    "setting_option",
    "stage_list",
]

DEFAULT_SERVER = DEFAULT_LISTEN
SETTINGS_KEY = "broker.settings"  # ctx.meta: the connection options' values
SERVER_KEY = "broker.server"  # ctx.meta: the address a refusal names
_F = TypeVar("_F", bound=Callable[..., Any])


@dataclass
class CliContext:
    """The click context object: how to connect (swapped for fakes in tests) and the clients
    opened so far (closed when the command ends)."""

    connect: Callable[[ConnectionSettings], Clients] = GrpcClients
    opened: list[Clients] = field(default_factory=list)

    def close_all(self) -> None:
        while self.opened:
            self.opened.pop().close()


def default_attest_server(server: str) -> str:
    """The attestation port's address when none is given: the --server port + 1 (for each
    address of a comma-separated list)."""
    out = []
    for one in server.split(","):
        host, _, port = one.strip().rpartition(":")
        if not host or not port.isdigit():
            raise click.UsageError(f"--server {one.strip()!r} must be HOST:PORT")
        out.append(f"{host}:{int(port) + 1}")
    return ",".join(out)


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    if value is not None and param.name is not None:
        ctx.meta.setdefault(SETTINGS_KEY, {})[param.name] = value


def setting(ctx: click.Context, name: str) -> Any:
    """The value of connection option `name` (None when not given anywhere)."""
    return ctx.meta.get(SETTINGS_KEY, {}).get(name)


def setting_option(
    *decls: str, on_group: bool, envvar: str | list[str] | None = None, **attrs: Any
) -> Callable[[_F], _F]:
    """An option that only records its value in ctx.meta (read back with `setting`)."""
    return click.option(
        *decls,
        expose_value=False,
        callback=_remember,
        envvar=envvar if on_group else None,
        show_envvar=on_group and envvar is not None,
        **attrs,
    )


# The connection's PEM files: --cert/--key/--bundle, each with its BROKER_<NAME> variable.
_PEM_FILES = (
    ("cert", "Client certificate chain (PEM) [default: DATA_DIR/operator/svid.pem]."),
    ("key", "Client private key (PEM) [default: DATA_DIR/operator/key.pem]."),
    ("bundle", "Trust bundle (PEM) to verify the broker [default: DATA_DIR/bundle.pem]."),
)


def connection_options(*, on_group: bool, output: bool = True) -> Callable[[_F], _F]:
    options = [
        setting_option(
            "--server",
            on_group=on_group,
            envvar=["BROKER_ADDR", "BROKER_SERVER"],
            metavar="HOST:PORT[,HOST:PORT...]",
            help=f"The broker to talk to; several comma-separated addresses (or a name with "
            f"several DNS records) fail over [default: {DEFAULT_SERVER}].",
        ),
        data_dir_option(on_group=on_group),
        *(
            setting_option(
                f"--{name}",
                on_group=on_group,
                envvar=f"BROKER_{name.upper()}",
                type=click.Path(path_type=Path, dir_okay=False),
                help=help,
            )
            for name, help in _PEM_FILES
        ),
        setting_option(
            "--tls-server-name",
            on_group=on_group,
            envvar="BROKER_TLS_SERVER_NAME",
            metavar="NAME",
            help="The name the broker's certificate must carry [default: the broker's own "
            "name for the bundle's trust domain, whatever host --server names].",
        ),
        setting_option(
            "--justification",
            on_group=on_group,
            envvar="BROKER_JUSTIFICATION",
            metavar="TEXT",
            help="Why you are doing this; recorded in the audit ledger.",
        ),
    ]
    if output:
        options.append(output_option(on_group=on_group))

    def decorate(f: _F) -> _F:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def output_option(*, on_group: bool) -> Callable[[_F], _F]:
    return setting_option(
        "-o",
        "--output",
        on_group=on_group,
        envvar="BROKER_OUTPUT",
        type=click.Choice(["text", "json"]),
        help="Output format [default: text].",
    )


def data_dir_option(*, on_group: bool) -> Callable[[_F], _F]:
    return setting_option(
        "--data-dir",
        on_group=on_group,
        envvar="BROKER_DATA_DIR",
        type=click.Path(path_type=Path, file_okay=False),
        help=f"The broker's state directory [default: {DEFAULT_DATA_DIR}].",
    )


def data_dir(ctx: click.Context) -> Path:
    """--data-dir, or the default state directory."""
    return Path(setting(ctx, "data_dir") or DEFAULT_DATA_DIR)


def output_format(ctx: click.Context) -> str:
    """ "json" or "text" (the default)."""
    return str(setting(ctx, "output") or "text")


def broker_home() -> Path:
    """Where `broker login` keeps the operator identity: $BROKER_HOME, default
    ~/.config/broker (its operator/ holds svid.pem, key.pem (0600) and bundle.pem)."""
    home = os.environ.get("BROKER_HOME")
    return Path(home) if home else Path.home() / ".config" / "broker"


def _read_credential(path: Path, what: str, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise Refusal(f"no {what} at {path} (start 'broker serve --dev' or pass {flag})") from None
    except OSError as exc:
        raise Refusal(f"cannot read {what} at {path}: {exc.strerror or exc}") from None


def _identity_paths(ctx: click.Context) -> tuple[Path, Path, Path]:
    """The default client identity: the login under $BROKER_HOME when there is one and
    neither --data-dir nor --cert was given, else the operator identity `serve --dev` writes
    under DATA_DIR (as before logins existed)."""
    if setting(ctx, "data_dir") is None and setting(ctx, "cert") is None:
        login = broker_home() / "operator"
        if (login / "svid.pem").is_file():
            return login / "svid.pem", login / "key.pem", login / "bundle.pem"
    directory = data_dir(ctx)
    return (
        directory / "operator" / "svid.pem",
        directory / "operator" / "key.pem",
        directory / "bundle.pem",
    )


def client_certificate(ctx: click.Context) -> tuple[Path, bytes]:
    """The client certificate chain the connection options name (path, PEM), refused in one
    line when missing: what `broker status` reports as "who you are"."""
    default_cert, _, _ = _identity_paths(ctx)
    cert = Path(setting(ctx, "cert") or default_cert)
    return cert, _read_credential(cert, "client certificate", "--cert")


def clients(ctx: click.Context) -> Clients:
    """Connect with the connection options (reading the client identity files, refused in one
    line when one is missing); the root group closes the clients when the command ends."""
    default_cert, default_key, default_bundle = _identity_paths(ctx)
    cert = Path(setting(ctx, "cert") or default_cert)
    key = Path(setting(ctx, "key") or default_key)
    bundle = Path(setting(ctx, "bundle") or default_bundle)
    credentials = ClientCredentials(
        cert_chain=_read_credential(cert, "client certificate", "--cert"),
        private_key=_read_credential(key, "client key", "--key"),
        root_certificates=_read_credential(bundle, "trust bundle", "--bundle"),
    )
    server = str(setting(ctx, "server") or DEFAULT_SERVER)
    ctx.meta[SERVER_KEY] = server
    obj = ctx.find_object(CliContext) or CliContext()
    opened = obj.connect(
        ConnectionSettings(
            server,
            credentials,
            setting(ctx, "justification"),
            setting(ctx, "tls_server_name") or None,
        )
    )
    obj.opened.append(opened)
    return opened


class DurationType(click.ParamType[int]):
    """A duration like 30s, 15m, 1h (see `ca.duration`) as whole seconds; 0s is allowed
    (the broker judges it)."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        from ca.duration import parse_duration
        from ca.errors import InvalidTTL

        try:
            parsed = parse_duration(str(value))
        except InvalidTTL as exc:
            self.fail(str(exc), param, ctx)
        if parsed < timedelta(0):
            self.fail(f"duration {value!r} is negative", param, ctx)
        if parsed % timedelta(seconds=1):
            self.fail(f"duration {value!r} is not a whole number of seconds", param, ctx)
        return int(parsed.total_seconds())


DURATION = DurationType()


def stage_list(text: str) -> list[int]:
    """`10%,50%,100%` as numbers; the broker checks the order and the final 100%."""
    out = []
    for part in text.split(","):
        number = part.strip().removesuffix("%")
        if not number.isdigit() or len(number) > 3:
            raise click.BadParameter(
                f"stage {part.strip()!r} is not a percentage (e.g. 10%,50%,100%)",
                param_hint="--stages",
            )
        out.append(int(number))
    return out


def rollout_options(stages_help: str) -> Callable[[_F], _F]:
    """`--stages/--health-check/--bake/--max-failures`: a staged rollout of a new version
    (secrets and static database roles alike; `broker rollout`)."""
    options = [
        click.option("--stages", default=None, metavar="P%,...,100%", help=stages_help),
        click.option(
            "--health-check",
            default=None,
            metavar="URL|CMD",
            help="With --stages: an http(s) URL (2xx passes) or a command (exit 0 passes) the "
            "broker runs during each stage.",
        ),
        click.option(
            "--bake",
            type=DURATION,
            default=None,
            metavar="DURATION",
            help="With --stages: how long each stage bakes before the next [default: 5m].",
        ),
        click.option(
            "--max-failures",
            type=int,
            default=None,
            metavar="N",
            help="With --stages: failures tolerated before the automatic rollback [default: 0].",
        ),
    ]

    def attach(command: _F) -> _F:
        for option in reversed(options):
            command = option(command)
        return command

    return attach
