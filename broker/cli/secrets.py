"""`broker secrets ...`, `broker kek rotate` and `broker exec`: wrapped static secrets.

JSON documents (`--output json`) are stable: see docs/secrets.md. Values are printed only by
`broker secrets get`; every other command shows metadata only.
"""

from __future__ import annotations

import base64
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from broker.cli.clients import (
    BrokerSecretSource,
    KekRotationResult,
    SecretDetails,
    SecretMeta,
    SecretRefused,
    SecretResolver,
    SecretsClient,
    SecretUnavailable,
)
from broker.cli.inputs import read_input_file
from broker.cli.options import (
    DURATION,
    CliContext,
    clients,
    connection_options,
    data_dir_option,
    output_option,
    rollout_options,
    setting,
    setting_option,
    stage_list,
)
from broker.cli.refusals import CommandNotExecutable, CommandNotFound, Refusal
from broker.cli.render import record_json, render, timestamp, wants_json
from broker.errors import BrokerError
from broker.secretfiles import SecretFiles

__all__ = ["exec_command", "kek", "secrets"]

_F = TypeVar("_F", bound=Callable[..., Any])
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
CLASSIFICATIONS = ("public", "internal", "confidential", "pii")


def _secrets_client(ctx: click.Context) -> SecretsClient:
    return clients(ctx).secrets


def _options_requiring_justification(f: _F) -> _F:
    """The connection options, with --justification required (it is also sent as the audit
    'why' header)."""
    options = [
        setting_option(
            "--server", on_group=False, metavar="HOST:PORT", help="The broker to talk to."
        ),
        data_dir_option(on_group=False),
        setting_option(
            "--cert",
            on_group=False,
            type=click.Path(path_type=Path, dir_okay=False),
            help="Client certificate chain (PEM).",
        ),
        setting_option(
            "--key",
            on_group=False,
            type=click.Path(path_type=Path, dir_okay=False),
            help="Client private key (PEM).",
        ),
        setting_option(
            "--bundle",
            on_group=False,
            type=click.Path(path_type=Path, dir_okay=False),
            help="Trust bundle (PEM) to verify the broker.",
        ),
        output_option(on_group=False),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _tenant_option(f: _F) -> _F:
    return click.option(
        "--tenant",
        default="",
        metavar="T",
        help="Tenant [default: the broker's default tenant].",
    )(f)


def _read_value(value_file: Path | None, generate: bool, length: int | None) -> dict[str, Any]:
    if value_file is not None and generate:
        raise click.UsageError("give either --value-file or --generate, not both")
    if length is not None and not generate:
        raise click.UsageError("--length goes with --generate")
    if value_file is not None:
        if str(value_file) == "-":
            data = sys.stdin.buffer.read()
        else:
            data = read_input_file(value_file, "value file")
        if not data:
            raise Refusal(f"value file {value_file} is empty")
        return {"value": data}
    if generate:
        return {"generate_length": length or 32}
    return {}


def meta_json(m: SecretMeta) -> dict[str, Any]:
    return record_json(m)


def details_json(d: SecretDetails) -> dict[str, Any]:
    """The metadata with the versions beside it (one flat object)."""
    return meta_json(d.metadata) | {"versions": [record_json(v) for v in d.versions]}


def _t(value: Any) -> str:
    return timestamp(value) or "-"


def _meta_line(m: SecretMeta) -> str:
    return (
        f"{m.reference}  tenant={m.tenant} owner={m.owner or '-'} "
        f"class={m.classification or '-'} v{m.current_version} {m.state} "
        f"rotation-due={_t(m.rotation_due)}"
        + (f" MISSING={','.join(m.missing)}" if m.missing else "")
    )


def _details_text(d: SecretDetails) -> str:
    m = d.metadata
    period = m.rotation_period_seconds
    lines = [
        f"reference:       {m.reference}",
        f"reference hash:  {m.reference_sha256}",
        f"tenant:          {m.tenant}",
        f"service:         {m.service or '-'}",
        f"environment:     {m.environment or '-'}",
        f"owner:           {m.owner or '-'}",
        f"classification:  {m.classification or '-'}",
        f"rotation period: {period // 86400}d {period % 86400 // 3600}h"
        if period
        else "rotation period: -",
        f"last rotated:    {_t(m.last_rotated)}",
        f"rotation due:    {_t(m.rotation_due)}",
        f"state:           {m.state}",
        f"current version: {m.current_version}",
    ]
    if m.revoked_at:
        lines.append(f"revoked at:      {_t(m.revoked_at)}")
    if m.deleted_at:
        lines.append(f"deleted at:      {_t(m.deleted_at)}")
    if m.missing:
        lines.append(f"MISSING:         {', '.join(m.missing)} (distribution refused)")
    if d.versions:
        lines.append("versions:")
        for v in d.versions:
            extra = ""
            if v.retire_at and v.state == "previous":
                extra = f" (rollback window until {_t(v.retire_at)})"
            elif v.revoked_at:
                extra = f" (revoked {_t(v.revoked_at)})"
            lines.append(f"  v{v.version}  {v.state:<9} created {_t(v.created_at)}  {v.kek}{extra}")
    return "\n".join(lines)


def _show(ctx: click.Context, details: SecretDetails, verb: str) -> None:
    m = details.metadata
    render(
        ctx,
        details_json(details),
        f"{verb} {m.reference} (tenant {m.tenant}, version {m.current_version}, {m.state})",
    )


@click.group()
def secrets() -> None:
    """Wrapped static secrets: API keys, OAuth client secrets, webhook tokens."""


@secrets.command("put")
@click.argument("reference")
@click.option(
    "--value-file",
    type=click.Path(path_type=Path, dir_okay=False, allow_dash=True),
    help="Read the value from this file ('-' for stdin); its bytes are stored exactly.",
)
@click.option("--generate", is_flag=True, help="Have the broker generate a random value.")
@click.option("--length", type=click.IntRange(16, 4096), help="Generated length [default: 32].")
@click.option(
    "--owner",
    default="",
    help="The owning service (may read the secret); must be the reference's namespace "
    "service, which is the default.",
)
@click.option(
    "--classification", required=True, type=click.Choice(CLASSIFICATIONS), help="Data class."
)
@click.option("--rotation-period", required=True, type=DURATION, help="e.g. 90d.")
@_tenant_option
@connection_options(on_group=False)
@click.pass_context
def secrets_put(
    ctx: click.Context,
    reference: str,
    value_file: Path | None,
    generate: bool,
    length: int | None,
    owner: str,
    classification: str,
    rotation_period: int,
    tenant: str,
) -> None:
    """Store a new secret (version 1)."""
    source = _read_value(value_file, generate, length)
    if not source:
        raise click.UsageError("give --value-file F or --generate")
    details = _secrets_client(ctx).put(
        reference,
        owner=owner,
        classification=classification,
        rotation_period_seconds=rotation_period,
        tenant=tenant,
        **source,
    )
    _show(ctx, details, "stored")


_purpose_option = click.option(
    "--purpose",
    default="",
    metavar="TEXT",
    help="What the workload reads secrets for (recorded in the audit event of each read); "
    "people reading prod or pii secrets give --justification instead.",
)


@secrets.command("get")
@click.argument("reference")
@click.option("--version", type=click.IntRange(1), help="A version still readable.")
@_purpose_option
@_tenant_option
@connection_options(on_group=False)
@click.pass_context
def secrets_get(
    ctx: click.Context, reference: str, version: int | None, purpose: str, tenant: str
) -> None:
    """Print the value (exactly its bytes); --output json adds version and metadata."""
    read = _secrets_client(ctx).get(reference, version=version or 0, tenant=tenant, purpose=purpose)
    if wants_json(ctx):
        try:
            value, encoding = read.value.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            value, encoding = base64.b64encode(read.value).decode("ascii"), "base64"
        document = {
            "value": value,
            "encoding": encoding,
            "version": read.version,
            "created_at": timestamp(read.created_at),
            "metadata": meta_json(read.metadata),
        }
        render(ctx, document, "")
        return
    sys.stdout.buffer.write(read.value)
    sys.stdout.buffer.flush()


@secrets.command("list")
@click.option("--prefix", default="", help="Only references starting with this.")
@_tenant_option
@connection_options(on_group=False)
@click.pass_context
def secrets_list(ctx: click.Context, prefix: str, tenant: str) -> None:
    """List secrets (metadata only)."""
    items = _secrets_client(ctx).list_secrets(prefix=prefix, tenant=tenant)
    render(ctx, [meta_json(m) for m in items], lambda: [_meta_line(m) for m in items])


@secrets.command("show")
@click.argument("reference")
@_tenant_option
@connection_options(on_group=False)
@click.pass_context
def secrets_show(ctx: click.Context, reference: str, tenant: str) -> None:
    """Metadata and versions of one secret (never the value)."""
    details = _secrets_client(ctx).show(reference, tenant=tenant)
    render(ctx, details_json(details), lambda: _details_text(details))


@secrets.command("rotate")
@click.argument("reference")
@click.option("--env", "environment", required=True, help="Must match the reference's.")
@click.option(
    "--value-file",
    type=click.Path(path_type=Path, dir_okay=False, allow_dash=True),
    help="The new value ('-' for stdin) [default: generate one].",
)
@click.option("--generate", is_flag=True, help="Generate the new value (the default).")
@click.option("--length", type=click.IntRange(16, 4096), help="Generated length [default: 32].")
@click.option("--ticket", required=True, metavar="ID", help="Change ticket, e.g. SEC-1234.")
@setting_option(
    "--justification", on_group=False, required=True, metavar="TEXT", help="Why (audited)."
)
@rollout_options(
    "Roll the new version out in stages of consumers, e.g. 10%,50%,100% (see 'broker rollout').",
)
@_tenant_option
@_options_requiring_justification
@click.pass_context
def secrets_rotate(
    ctx: click.Context,
    reference: str,
    environment: str,
    value_file: Path | None,
    generate: bool,
    length: int | None,
    ticket: str,
    stages: str | None,
    health_check: str | None,
    bake: int | None,
    max_failures: int | None,
    tenant: str,
) -> None:
    """Make a new version current; the previous stays readable for the rollback window.
    With --stages, roll it out to consumers stage by stage instead (rolled back
    automatically when a stage fails)."""
    source = _read_value(value_file, generate, length) or {"generate_length": 32}
    justification = str(setting(ctx, "justification"))
    if stages is None:
        for name, given in (
            ("--health-check", health_check),
            ("--bake", bake),
            ("--max-failures", max_failures),
        ):
            if given is not None:
                raise click.UsageError(f"{name} is only used with --stages")
    else:
        view = clients(ctx).rollouts.start(
            reference,
            environment=environment,
            ticket=ticket,
            justification=justification,
            stages=stage_list(stages),
            bake_seconds=300 if bake is None else bake,
            max_failures=0 if max_failures is None else max_failures,
            health_check=health_check or "",
            tenant=tenant,
            **source,
        )
        percent = view.stages[view.stage - 1]
        render(
            ctx,
            record_json(view),
            f"rollout {view.id} of {view.reference} started: v{view.from_version} -> "
            f"v{view.to_version}, stage {view.stage} of {len(view.stages)} ({percent}%) open "
            f"until {timestamp(view.bake_ends) or '-'}; follow it with 'broker rollout status "
            f"{view.reference}'",
        )
        return
    details = _secrets_client(ctx).rotate(
        reference,
        environment=environment,
        ticket=ticket,
        justification=justification,
        tenant=tenant,
        **source,
    )
    _show(ctx, details, "rotated")


@secrets.command("rollback")
@click.argument("reference")
@_tenant_option
@connection_options(on_group=False)
@click.pass_context
def secrets_rollback(ctx: click.Context, reference: str, tenant: str) -> None:
    """Make the previous version current again (within its rollback window)."""
    _show(ctx, _secrets_client(ctx).rollback(reference, tenant=tenant), "rolled back")


@secrets.command("revoke")
@click.argument("reference")
@setting_option(
    "--justification", on_group=False, required=True, metavar="TEXT", help="Why (audited)."
)
@_tenant_option
@_options_requiring_justification
@click.pass_context
def secrets_revoke(ctx: click.Context, reference: str, tenant: str) -> None:
    """Refuse every version of the secret from now on."""
    justification = str(setting(ctx, "justification"))
    details = _secrets_client(ctx).revoke(reference, justification=justification, tenant=tenant)
    _show(ctx, details, "revoked")


@secrets.command("delete")
@click.argument("reference")
@_tenant_option
@connection_options(on_group=False)
@click.pass_context
def secrets_delete(ctx: click.Context, reference: str, tenant: str) -> None:
    """Soft delete; the data keys are destroyed after the retention period."""
    _show(ctx, _secrets_client(ctx).delete(reference, tenant=tenant), "deleted")


@secrets.command("due")
@_tenant_option
@connection_options(on_group=False)
@click.pass_context
def secrets_due(ctx: click.Context, tenant: str) -> None:
    """Secrets past their rotation period."""
    items = _secrets_client(ctx).due(tenant=tenant)
    render(ctx, [meta_json(m) for m in items], lambda: [_meta_line(m) for m in items])


def _file_pair(value: str) -> tuple[str, str]:
    name, sep, reference = value.partition("=")
    if not sep or not reference.startswith("secret://"):
        raise click.BadParameter(f"{value!r} is not NAME=secret://...", param_hint="--file")
    return name, reference


@secrets.command("sync")
@click.option(
    "--write-dir",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Directory for the files (use a tmpfs, e.g. /run/<service>/secrets).",
)
@click.option(
    "--file",
    "pairs",
    multiple=True,
    required=True,
    metavar="NAME=secret://...",
    help="Keep the secret in WRITE_DIR/NAME, mode 0600 (repeatable).",
)
@click.option("--interval", type=DURATION, default="60s", help="Poll interval [default: 60s].")
@click.option("--once", is_flag=True, help="Sync once and exit (1 if any file failed).")
@_purpose_option
@_tenant_option
@connection_options(on_group=False)
@click.pass_context
def secrets_sync(
    ctx: click.Context,
    write_dir: Path,
    pairs: tuple[str, ...],
    interval: int,
    once: bool,
    purpose: str,
    tenant: str,
) -> None:
    """Keep secrets as 0600 files, rewritten on rotation and removed when refused."""
    wanted = dict(_file_pair(p) for p in pairs)
    try:
        files = SecretFiles(
            BrokerSecretSource(_secrets_client(ctx), tenant=tenant, purpose=purpose),
            write_dir,
            wanted,
        )
    except BrokerError as exc:
        raise click.BadParameter(str(exc), param_hint="--file") from None
    if interval < 1:
        raise click.BadParameter("must be at least 1s", param_hint="--interval")
    while True:
        try:
            results = files.sync()
        except OSError as exc:
            raise Refusal(f"cannot write to {write_dir}: {exc.strerror or exc}") from None
        for r in results:
            if not r.error:
                click.echo(f"{r.name}: {r.outcome} (version {r.version})")
            elif not once:  # a long-running sync reports each failure and carries on
                click.echo(f"broker: {r.name}: {r.outcome}: {r.error}", err=True)
        failed = [f"{r.name} {r.outcome} ({r.error})" for r in results if r.error]
        if once:
            if failed:
                raise Refusal(f"could not sync: {'; '.join(failed)}")
            return
        time.sleep(interval)


@click.group()
def kek() -> None:
    """Key-encryption keys (per tenant, held in the key backend)."""


@kek.command("rotate")
@click.option("--tenant", default="", metavar="T", help="One tenant [default: every tenant].")
@connection_options(on_group=False)
@click.pass_context
def kek_rotate(ctx: click.Context, tenant: str) -> None:
    """New KEK, every data key rewrapped under it, old KEK destroyed when unused."""
    rotations = _secrets_client(ctx).rotate_kek(tenant=tenant)
    render(ctx, [record_json(r) for r in rotations], lambda: [_rotation_line(r) for r in rotations])


def _rotation_line(r: KekRotationResult) -> str:
    gone = ", ".join(r.destroyed) or "none"
    line = f"{r.tenant}: now {r.new_kek}; {r.rewrapped} data key(s) rewrapped; destroyed {gone}"
    if r.kept:
        line += f"; kept {', '.join(r.kept)} (still in use: rotate again)"
    return line


def _env_pair(value: str) -> tuple[str, str]:
    name, sep, reference = value.partition("=")
    if not sep or not _ENV_NAME.fullmatch(name):
        raise click.BadParameter(f"{value!r} is not NAME=secret://...", param_hint="--env")
    if not reference.startswith("secret://"):
        raise click.BadParameter(f"{name}: {reference!r} is not a secret:// reference")
    return name, reference


@click.command("exec", context_settings={"allow_interspersed_args": False})
@click.option(
    "--env",
    "pairs",
    multiple=True,
    required=True,
    metavar="NAME=secret://...",
    help="Set NAME to the secret's value (repeatable).",
)
@_purpose_option
@_tenant_option
@connection_options(on_group=False, output=False)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def exec_command(
    ctx: click.Context,
    pairs: tuple[str, ...],
    purpose: str,
    tenant: str,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND with secrets in its environment (nothing is written to disk):

    broker exec --env API_KEY=secret://payments/prod/stripe/api-key -- ./server
    """
    wanted = dict(_env_pair(p) for p in pairs)
    resolver = SecretResolver(
        BrokerSecretSource(_secrets_client(ctx), tenant=tenant, purpose=purpose)
    )
    try:
        values = resolver.resolve_env(wanted)
    except (SecretRefused, SecretUnavailable) as exc:
        raise Refusal(f"cannot resolve the secrets for {command[0]}: {exc}") from None
    except UnicodeDecodeError:
        raise Refusal("a secret is not UTF-8 text; it cannot go into an environment") from None
    obj = ctx.find_object(CliContext)
    if obj is not None:
        obj.close_all()
    env = dict(os.environ)
    env.update(values)
    try:
        os.execvpe(command[0], list(command), env)  # noqa: S606 (the operator's command)
    except OSError as exc:
        # As the shell says it: 127 not found, 126 found but cannot be executed.
        kind = CommandNotFound if isinstance(exc, FileNotFoundError) else CommandNotExecutable
        raise kind(f"cannot run {command[0]}: {exc.strerror or exc}") from None
