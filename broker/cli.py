"""The `broker` command line.

`broker serve` runs the service (`broker.daemon`); every other command is a client of a running
broker, authenticated with mTLS by the operator SVID that `broker serve --dev` writes under its
data directory (or by --cert/--key/--bundle).

Contract kept for scripts: exit 0 on success, 1 when something was refused or failed (server
error, bad file, broker unreachable), 2 for usage errors; every refusal is ONE line on stderr,
starting with "broker: ". `--output json` documents are stable (see `broker.clioutput`).

The client is built by `CliContext.client_factory`, so tests swap in a fake without touching grpc.
"""

from __future__ import annotations

import json
import os
import sys
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, time, timedelta
from pathlib import Path
from typing import Any, NoReturn, Protocol, TypeVar

# gRPC core writes its own log lines to stderr (TLS handshake failures at INFO, a busy port at
# ERROR) unless GRPC_VERBOSITY is set before grpc is first imported. The CLI promises one line
# per refusal and says what went wrong itself; set GRPC_VERBOSITY to see gRPC's logs again.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import click

from broker import clioutput
from broker.api.client import (
    JWTSVID,
    X509SVID,
    AuditEntry,
    AuditVerification,
    BrokerClient,
    Bundle,
    CAStatus,
    ClientCredentials,
    ClientError,
    Policy,
    RotateResult,
)
from broker.config import DEFAULT_DATA_DIR, DEFAULT_LISTEN
from broker.files import write_private_file

__all__ = ["BrokerAPI", "CliContext", "ConnectionSettings", "Refusal", "cli", "main", "run"]

DEFAULT_SERVER = DEFAULT_LISTEN
_SETTINGS = "broker.settings"
_F = TypeVar("_F", bound=Callable[..., Any])


class BrokerAPI(Protocol):
    """What the CLI needs from a broker client (`broker.api.client.BrokerClient`)."""

    def mint_x509(
        self,
        spiffe_id: str,
        ttl_seconds: int | None = None,
        csr: bytes | None = None,
        dns_names: Sequence[str] = (),
        key_type: str = "",
    ) -> X509SVID: ...

    def mint_jwt(
        self, spiffe_id: str, audience: Sequence[str], ttl_seconds: int | None = None
    ) -> JWTSVID: ...

    def bundle(self) -> Bundle: ...

    def status(self) -> CAStatus: ...

    def rotate(self, force: bool = False) -> RotateResult: ...

    def get_policy(self) -> Policy: ...

    def set_policy(self, document_json: str) -> int: ...

    def audit_verify(self, checkpoint_json: str = "") -> AuditVerification: ...

    def audit_checkpoint(self, fresh: bool = False) -> str: ...

    def audit_tail(self, limit: int = 20) -> list[AuditEntry]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ConnectionSettings:
    server: str
    credentials: ClientCredentials
    justification: str | None = None


ClientFactory = Callable[[ConnectionSettings], BrokerAPI]


def _grpc_client(settings: ConnectionSettings) -> BrokerAPI:
    return BrokerClient(settings.server, settings.credentials, justification=settings.justification)


@dataclass
class CliContext:
    """The click context object: how to build a client (swapped in tests)."""

    client_factory: ClientFactory = _grpc_client
    clients: list[BrokerAPI] = field(default_factory=list)


class Refusal(click.ClickException):
    """A runtime refusal: printed as one line "broker: <message>", exit status 1."""

    exit_code = 1

    def show(self, file: Any = None) -> None:
        click.echo(f"broker: {self.format_message()}", err=True)


def default_attest_server(server: str) -> str:
    """The attestation port's address when none is given: the --server port + 1."""
    host, _, port = server.rpartition(":")
    if not host or not port.isdigit():
        raise click.UsageError(f"--server {server!r} must be HOST:PORT")
    return f"{host}:{int(port) + 1}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


# -- connection options -----------------------------------------------------------------------
# Accepted on the group (with env vars) and again after any client subcommand; a value given on
# the subcommand wins. Values are collected in ctx.meta, which click shares across the command
# chain, so the group's callback runs first and the subcommand's may override it.


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    if value is not None and param.name is not None:
        ctx.meta.setdefault(_SETTINGS, {})[param.name] = value


def _setting(ctx: click.Context, name: str) -> Any:
    return ctx.meta.get(_SETTINGS, {}).get(name)


def _setting_option(
    *decls: str, on_group: bool, envvar: str | None = None, **attrs: Any
) -> Callable[[_F], _F]:
    """An option that only records its value in ctx.meta (read back with `_setting`)."""
    return click.option(
        *decls,
        expose_value=False,
        callback=_remember,
        envvar=envvar if on_group else None,
        show_envvar=on_group and envvar is not None,
        **attrs,
    )


def _connection_options(*, on_group: bool, output: bool = True) -> Callable[[_F], _F]:
    options = [
        _setting_option(
            "--server",
            on_group=on_group,
            envvar="BROKER_ADDR",
            metavar="HOST:PORT",
            help=f"The broker to talk to [default: {DEFAULT_SERVER}].",
        ),
        _data_dir_option(on_group=on_group),
        _setting_option(
            "--cert",
            on_group=on_group,
            envvar="BROKER_CERT",
            type=click.Path(path_type=Path, dir_okay=False),
            help="Client certificate chain (PEM) [default: DATA_DIR/operator/svid.pem].",
        ),
        _setting_option(
            "--key",
            on_group=on_group,
            envvar="BROKER_KEY",
            type=click.Path(path_type=Path, dir_okay=False),
            help="Client private key (PEM) [default: DATA_DIR/operator/key.pem].",
        ),
        _setting_option(
            "--bundle",
            on_group=on_group,
            envvar="BROKER_BUNDLE",
            type=click.Path(path_type=Path, dir_okay=False),
            help="Trust bundle (PEM) to verify the broker [default: DATA_DIR/bundle.pem].",
        ),
        _setting_option(
            "--justification",
            on_group=on_group,
            envvar="BROKER_JUSTIFICATION",
            metavar="TEXT",
            help="Why you are doing this; recorded in the audit ledger.",
        ),
    ]
    if output:
        options.append(
            _setting_option(
                "--output",
                on_group=on_group,
                type=click.Choice(["text", "json"]),
                help="Output format [default: text].",
            )
        )

    def decorate(f: _F) -> _F:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def _data_dir_option(*, on_group: bool) -> Callable[[_F], _F]:
    return _setting_option(
        "--data-dir",
        on_group=on_group,
        envvar="BROKER_DATA_DIR",
        type=click.Path(path_type=Path, file_okay=False),
        help=f"The broker's state directory [default: {DEFAULT_DATA_DIR}].",
    )


def _output(ctx: click.Context) -> str:
    return str(_setting(ctx, "output") or "text")


def _read_credential(path: Path, what: str, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise Refusal(f"no {what} at {path} (start 'broker serve --dev' or pass {flag})") from None
    except OSError as exc:
        raise Refusal(f"cannot read {what} at {path}: {exc.strerror or exc}") from None


def broker_home() -> Path:
    """Where `broker login` keeps the operator identity: $BROKER_HOME, default
    ~/.config/broker (its operator/ holds svid.pem, key.pem (0600) and bundle.pem)."""
    home = os.environ.get("BROKER_HOME")
    return Path(home) if home else Path.home() / ".config" / "broker"


def _identity_paths(ctx: click.Context) -> tuple[Path, Path, Path]:
    """The default client identity: the login under $BROKER_HOME when there is one and
    neither --data-dir nor --cert was given, else the operator identity `serve --dev` writes
    under DATA_DIR (as before logins existed)."""
    if _setting(ctx, "data_dir") is None and _setting(ctx, "cert") is None:
        login = broker_home() / "operator"
        if (login / "svid.pem").is_file():
            return login / "svid.pem", login / "key.pem", login / "bundle.pem"
    data_dir = Path(_setting(ctx, "data_dir") or DEFAULT_DATA_DIR)
    return (
        data_dir / "operator" / "svid.pem",
        data_dir / "operator" / "key.pem",
        (data_dir / "bundle.pem"),
    )


def _client(ctx: click.Context) -> BrokerAPI:
    default_cert, default_key, default_bundle = _identity_paths(ctx)
    cert = Path(_setting(ctx, "cert") or default_cert)
    key = Path(_setting(ctx, "key") or default_key)
    bundle = Path(_setting(ctx, "bundle") or default_bundle)
    credentials = ClientCredentials(
        cert_chain=_read_credential(cert, "client certificate", "--cert"),
        private_key=_read_credential(key, "client key", "--key"),
        root_certificates=_read_credential(bundle, "trust bundle", "--bundle"),
    )
    server = str(_setting(ctx, "server") or DEFAULT_SERVER)
    ctx.meta["broker.server"] = server
    obj = ctx.find_object(CliContext) or CliContext()
    client = obj.client_factory(
        ConnectionSettings(server, credentials, _setting(ctx, "justification"))
    )
    obj.clients.append(client)
    return client


_CODE_TEXT = {
    "INVALID_ARGUMENT": "invalid argument",
    "PERMISSION_DENIED": "permission denied",
    "UNAUTHENTICATED": "not authenticated",
    "NOT_FOUND": "not found",
    "ALREADY_EXISTS": "already exists",
    "FAILED_PRECONDITION": "failed precondition",
    "RESOURCE_EXHAUSTED": "resource exhausted",
    "DEADLINE_EXCEEDED": "timed out",
    "UNIMPLEMENTED": "not supported by this broker",
    "INTERNAL": "internal error",
    "CANCELLED": "cancelled",
}


def client_error_message(error: ClientError, server: str) -> str:
    """The one line (without "broker: ") for a failed call."""
    if error.code_name == "UNAVAILABLE" and error.message.startswith("key backend error: "):
        # The broker answered: its token (HSM) failed, e.g. a mechanism it does not offer.
        return _one_line(error.message)
    if error.code_name == "UNAVAILABLE":
        return _one_line(f"cannot reach the broker at {server}: {error.message}")
    text = _CODE_TEXT.get(error.code_name, error.code_name.lower().replace("_", " "))
    return _one_line(f"{text}: {error.message}")


class _BrokerGroup(click.Group):
    """The root group: turns client errors from any subcommand into one-line refusals."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ClientError as exc:
            server = ctx.meta.get("broker.server", DEFAULT_SERVER)
            raise Refusal(client_error_message(exc, server)) from None
        finally:
            obj = ctx.find_object(CliContext)
            if obj is not None:
                while obj.clients:
                    obj.clients.pop().close()


# -- parameter types --------------------------------------------------------------------------


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


# -- the command tree -------------------------------------------------------------------------


@click.group(cls=_BrokerGroup, context_settings={"help_option_names": ["-h", "--help"]})
@_connection_options(on_group=True)
def cli() -> None:
    """HSM-rooted SPIFFE CA and credential broker."""


@cli.command()
@click.option(
    "--dev", is_flag=True, help="Embedded default: SQLite and a SoftHSM2 token in DATA_DIR."
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Production configuration file (TOML).",
)
@_data_dir_option(on_group=False)
@click.option("--listen", metavar="HOST:PORT", help="Address to listen on.")
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    help="Worker processes sharing the port [default: 1, or server.workers].",
)
@click.option(
    "--new-ledger-epoch",
    "new_ledger_epoch",
    metavar="REASON",
    help="Start a new audit ledger epoch (new MAC key, signed record) before serving: only "
    "after the audit MAC key was lost (docs/ledger.md).",
)
@click.pass_context
def serve(
    ctx: click.Context,
    dev: bool,
    config_file: Path | None,
    listen: str | None,
    workers: int | None,
    new_ledger_epoch: str | None,
) -> None:
    """Run the broker until SIGINT/SIGTERM."""
    if dev == (config_file is not None):
        raise click.UsageError("exactly one of --dev or --config is required", ctx)
    from broker.daemon import ServeOptions
    from broker.daemon import serve as run_daemon
    from broker.errors import BrokerError
    from ca.errors import CAError

    options = ServeOptions(
        dev=dev,
        data_dir=Path(_setting(ctx, "data_dir") or DEFAULT_DATA_DIR),
        listen=listen,
        config_file=config_file,
        workers=workers,
        new_ledger_epoch=new_ledger_epoch,
    )
    try:
        run_daemon(options)
    except (BrokerError, CAError) as exc:
        raise Refusal(_one_line(str(exc)) or type(exc).__name__) from None
    except OSError as exc:
        raise Refusal(_one_line(f"cannot serve: {exc}")) from None


@cli.group()
def svid() -> None:
    """X.509-SVIDs."""


def _read_input_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise Refusal(f"cannot read {what} {path}: {exc.strerror or exc}") from None


@svid.command("mint")
@click.option("--spiffe-id", required=True, help="The SPIFFE ID to issue for.")
@click.option("--ttl", type=DURATION, help="Lifetime, e.g. 1h [default: CA policy].")
@click.option(
    "--csr",
    type=click.Path(path_type=Path, dir_okay=False),
    help="PKCS#10 request (PEM or DER); the key stays with you.",
)
@click.option("--dns", "dns_names", multiple=True, metavar="NAME", help="DNS SAN (repeatable).")
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Directory for svid.pem, bundle.pem and key.pem.",
)
@_connection_options(on_group=False)
@click.pass_context
def svid_mint(
    ctx: click.Context,
    spiffe_id: str,
    ttl: int | None,
    csr: Path | None,
    dns_names: tuple[str, ...],
    out_dir: Path,
) -> None:
    """Issue an X.509-SVID and write it to --out."""
    csr_bytes = _read_input_file(csr, "CSR file") if csr is not None else None
    if out_dir.exists() and not out_dir.is_dir():
        raise Refusal(f"--out {out_dir} exists and is not a directory")
    result = _client(ctx).mint_x509(spiffe_id, ttl, csr_bytes, dns_names)
    files: list[tuple[Path, bytes, int]] = [
        (
            out_dir / "svid.pem",
            b"".join(clioutput.pem("CERTIFICATE", c) for c in result.cert_chain),
            0o644,
        ),
        (
            out_dir / "bundle.pem",
            b"".join(clioutput.pem("CERTIFICATE", c) for c in result.bundle),
            0o644,
        ),
    ]
    if result.private_key is not None and csr_bytes is None:
        files.append((out_dir / "key.pem", clioutput.pem("PRIVATE KEY", result.private_key), 0o600))
    try:
        out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for path, data, mode in files:
            write_private_file(path, data, mode)
    except OSError as exc:
        raise Refusal(f"cannot write the SVID to {out_dir}: {exc.strerror or exc}") from None
    written = [str(path) for path, _, _ in files]
    if _output(ctx) == "json":
        click.echo(
            clioutput.dumps(
                {
                    "spiffe_id": result.spiffe_id,
                    "serial": result.serial,
                    "expires_at": clioutput.timestamp(result.expires_at),
                    "files": written,
                }
            )
        )
        return
    for name in written:
        click.echo(f"wrote {name}")
    click.echo(
        f"{result.spiffe_id} expires at {clioutput.timestamp(result.expires_at)} "
        f"(serial {result.serial})"
    )


@cli.group()
def jwt() -> None:
    """JWT-SVIDs."""


@jwt.command("mint")
@click.option("--spiffe-id", required=True, help="The SPIFFE ID to issue for.")
@click.option("--audience", multiple=True, required=True, help="Audience (repeatable).")
@click.option("--ttl", type=DURATION, help="Lifetime, e.g. 5m [default: CA policy].")
@_connection_options(on_group=False)
@click.pass_context
def jwt_mint(
    ctx: click.Context, spiffe_id: str, audience: tuple[str, ...], ttl: int | None
) -> None:
    """Issue a JWT-SVID and print it."""
    result = _client(ctx).mint_jwt(spiffe_id, audience, ttl)
    if _output(ctx) == "json":
        click.echo(
            clioutput.dumps(
                {
                    "spiffe_id": result.spiffe_id,
                    "token": result.token,
                    "expires_at": clioutput.timestamp(result.expires_at),
                }
            )
        )
    else:
        click.echo(result.token)


@cli.group()
def ca() -> None:
    """The certificate authority: bundle, status, rotation, policy."""


@ca.command("bundle")
@click.option(
    "--format",
    "bundle_format",
    type=click.Choice(["pem", "jwks"]),
    default="pem",
    show_default=True,
)
@_connection_options(on_group=False, output=False)
@click.pass_context
def ca_bundle(ctx: click.Context, bundle_format: str) -> None:
    """Print the trust domain's bundle."""
    result = _client(ctx).bundle()
    text = result.pem if bundle_format == "pem" else result.jwks.decode("utf-8")
    click.echo(text, nl=not text.endswith("\n"))


@ca.command("status")
@_connection_options(on_group=False)
@click.pass_context
def ca_status(ctx: click.Context) -> None:
    """Show the root and issuing CAs, the key backend and storage."""
    status = _client(ctx).status()
    if _output(ctx) == "json":
        click.echo(clioutput.dumps(clioutput.status_json(status)))
    else:
        click.echo(clioutput.status_table(status))


@ca.command("rotate")
@click.option("--force", is_flag=True, help="Activate a new issuing CA now.")
@_connection_options(on_group=False)
@click.pass_context
def ca_rotate(ctx: click.Context, force: bool) -> None:
    """Run the rotation schedule now (with --force, rotate the issuing CA at once)."""
    result = _client(ctx).rotate(force)
    if _output(ctx) == "json":
        click.echo(
            clioutput.dumps(
                {"actions": result.actions, "status": clioutput.status_json(result.status)}
            )
        )
        return
    for action in result.actions or ["nothing to do"]:
        click.echo(action)
    for authority in result.status.issuing:
        if authority.state == "active":
            click.echo(
                f"active issuing CA: {authority.id} (generation {authority.generation}, "
                f"until {clioutput.timestamp(authority.not_after)})"
            )


@ca.group("policy")
def policy() -> None:
    """The CA policy (TTL limits and rules)."""


@policy.command("get")
@_connection_options(on_group=False)
@click.pass_context
def policy_get(ctx: click.Context) -> None:
    """Print the current CA policy."""
    result = _client(ctx).get_policy()
    document = clioutput.policy_json(result)
    if _output(ctx) == "json":
        click.echo(clioutput.dumps(document))
        return
    updated = clioutput.timestamp(result.updated_at) or "-"
    click.echo(f"version {result.version}, set by {result.author or '-'} at {updated}")
    click.echo(clioutput.dumps(document["document"]))


def _json_value(value: Any) -> Any:
    if isinstance(value, date | time):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not representable in JSON")


def policy_document_json(path: Path, data: bytes) -> str:
    """The policy file as JSON text: .toml is TOML, .json is JSON, anything else is sniffed
    (JSON first). Raises Refusal naming the file and the parse error."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise Refusal(f"policy file {path} is not UTF-8 text") from None
    suffix = path.suffix.lower()
    document: Any
    if suffix == ".toml":
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise Refusal(_one_line(f"policy file {path} is not valid TOML: {exc}")) from None
    elif suffix == ".json":
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise Refusal(_one_line(f"policy file {path} is not valid JSON: {exc}")) from None
    else:
        try:
            document = json.loads(text)
        except json.JSONDecodeError as json_error:
            try:
                document = tomllib.loads(text)
            except tomllib.TOMLDecodeError:
                raise Refusal(
                    _one_line(f"policy file {path} is neither JSON nor TOML: {json_error}")
                ) from None
    if not isinstance(document, dict):
        raise Refusal(f"policy file {path} must hold an object (a table), not a list or value")
    return json.dumps(document, default=_json_value, ensure_ascii=False)


@policy.command("set")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@_connection_options(on_group=False)
@click.pass_context
def policy_set(ctx: click.Context, file: Path) -> None:
    """Replace the CA policy with FILE (TOML or JSON)."""
    document_json = policy_document_json(file, _read_input_file(file, "policy file"))
    version = _client(ctx).set_policy(document_json)
    if _output(ctx) == "json":
        click.echo(clioutput.dumps({"version": version}))
    else:
        click.echo(f"policy version {version}")


@cli.group()
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
@_connection_options(on_group=False)
@click.pass_context
def audit_verify(
    ctx: click.Context, checkpoint_file: Path | None, offline: bool, config_file: Path | None
) -> None:
    """Check the whole hash chain and every MAC; exit 1 if anything is broken."""
    checkpoint_json = ""
    if checkpoint_file is not None:
        from broker.audit import parse_checkpoint
        from broker.errors import InvalidArgument

        text = _read_input_file(checkpoint_file, "checkpoint file").decode(errors="replace")
        try:
            parse_checkpoint(text)  # offline: format and signature, before asking the broker
        except InvalidArgument as exc:
            raise Refusal(_one_line(f"{checkpoint_file}: {exc}")) from None
        checkpoint_json = text
    if config_file is not None and not offline:
        raise click.UsageError("--config goes with --offline", ctx)
    result: Any
    if offline:
        result = _verify_offline(ctx, config_file, checkpoint_json)
    else:
        result = _client(ctx).audit_verify(checkpoint_json)
    if _output(ctx) == "json":
        click.echo(
            clioutput.dumps(
                {
                    "intact": result.intact,
                    "entries": result.entries,
                    "first_broken_seq": result.first_broken_seq,
                    "reason": result.reason,
                    "notes": list(result.notes),
                }
            )
        )
    if not result.intact:
        raise Refusal(
            _one_line(
                f"audit ledger broken at entry {result.first_broken_seq}: "
                f"{result.reason or 'no reason given'}"
            )
        )
    if _output(ctx) != "json":
        click.echo(f"audit ledger intact: {result.entries} entries")
        for note in result.notes:
            click.echo(f"  note: {_one_line(note)}")


def _offline_options(ctx: click.Context, config_file: Path | None, reason: str | None) -> Any:
    from broker.daemon import ServeOptions

    data_dir = Path(_setting(ctx, "data_dir") or DEFAULT_DATA_DIR)
    if config_file is None and not data_dir.is_dir():
        raise Refusal(f"no broker data directory at {data_dir} (give --data-dir or --config)")
    return ServeOptions(
        dev=config_file is None,
        data_dir=data_dir,
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
        raise Refusal(_one_line(str(exc)) or type(exc).__name__) from None


@audit.command("checkpoint")
@click.option(
    "--out",
    "output_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the checkpoint to FILE instead of stdout.",
)
@click.option("--new", "fresh", is_flag=True, help="Make a new checkpoint of the ledger now.")
@_connection_options(on_group=False)
@click.pass_context
def audit_checkpoint(ctx: click.Context, output_file: Path | None, fresh: bool) -> None:
    """Export the latest signed ledger checkpoint (made now if there is none, or with --new).

    Keep it somewhere the broker's database cannot reach: `broker audit verify --checkpoint
    FILE` then proves the ledger still holds that past, even if the database is replaced."""
    text = _client(ctx).audit_checkpoint(fresh)
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
@_data_dir_option(on_group=False)
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
        dev=dev,
        data_dir=Path(_setting(ctx, "data_dir") or DEFAULT_DATA_DIR),
        config_file=config_file,
        new_ledger_epoch=reason,
    )
    try:
        epoch, seq = new_ledger_epoch(options)
    except (BrokerError, CAError) as exc:
        raise Refusal(_one_line(str(exc)) or type(exc).__name__) from None
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
@_connection_options(on_group=False)
@click.pass_context
def audit_tail(ctx: click.Context, limit: int) -> None:
    """Show the newest audit entries, oldest first."""
    entries = _client(ctx).audit_tail(limit)
    if _output(ctx) == "json":
        click.echo(clioutput.dumps([clioutput.audit_entry_json(e) for e in entries]))
        return
    for entry in entries:
        click.echo(clioutput.audit_entry_line(entry))


# -- feature command groups ----------------------------------------------------------------------
# Each module in broker/commands/ attaches its groups to `cli` with the helpers above; they are
# imported here, once those helpers exist. One line per feature:
# from broker.commands import <feature> as _<feature>_commands
from broker.commands import access as _access_commands  # noqa: E402, F401
from broker.commands import database as _database_commands  # noqa: E402, F401
from broker.commands import dev as _dev_commands  # noqa: E402, F401
from broker.commands import identity as _identity_commands  # noqa: E402, F401
from broker.commands import operators as _operators_commands  # noqa: E402, F401
from broker.commands import scan as _scan_commands  # noqa: E402, F401
from broker.commands import secrets as _secrets_commands  # noqa: E402, F401

# -- entry points ------------------------------------------------------------------------------


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
        click.echo(f"broker: {_one_line(exc.format_message())}{hint}", err=True)
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
            f"broker: unexpected error: {type(exc).__name__}: {_one_line(str(exc))}", err=True
        )
        return 1
    return result if isinstance(result, int) else 0


def main() -> NoReturn:
    """Console-script entry point (`broker = "broker.cli:main"`)."""
    sys.exit(run())


if __name__ == "__main__":
    # `python -m broker.cli`: run the importable module, so that the feature command groups
    # (which import broker.cli) attach to the same `cli` object that runs.
    from broker.cli import main as _main

    _main()
