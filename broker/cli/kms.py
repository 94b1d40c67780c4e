"""`broker key ...`: KMS keys for services' own data (issue 16), administered by operators.

Every version of a key is generated inside the key backend and never leaves it; services use
their keys through the Kms API (the SDK: `broker.api.client.kms`). JSON documents
(`--output json`) are stable: see docs/kms.md.
"""

from __future__ import annotations

from typing import Any

import click

from broker.cli.clients import KeyDetails, KeyMeta, KmsClient
from broker.cli.options import DURATION, clients, connection_options
from broker.cli.refusals import Refusal
from broker.cli.render import record_json, render, text_time

__all__ = ["key"]

PURPOSES = ("encrypt", "sign", "mac")
KEY_TYPES = ("aes-256", "ec-p256", "ec-p384", "rsa-3072", "hmac-sha256")
CLASSIFICATIONS = ("public", "internal", "confidential", "pii")


def _kms(ctx: click.Context) -> KmsClient:
    return clients(ctx).kms


_tenant_option = click.option(
    "--tenant", default="", metavar="T", help="Tenant [default: the broker's default tenant]."
)


def meta_json(m: KeyMeta) -> dict[str, Any]:
    return record_json(m)


def details_json(d: KeyDetails) -> dict[str, Any]:
    """The metadata's fields with the versions after them (docs/kms.md)."""
    return {**meta_json(d.metadata), "versions": [record_json(v) for v in d.versions]}


def _t(value: Any) -> str:
    return text_time(value)


def _line(m: KeyMeta) -> str:
    return (
        f"{m.name}  tenant={m.tenant} {m.purpose}/{m.key_type} owner={m.owner} "
        f"env={m.environment} class={m.classification} v{m.current_version} {m.state} "
        f"rotation-due={_t(m.rotation_due)}"
        + (f" destroy-after={_t(m.destroy_after)}" if m.destroy_after else "")
    )


def _show(ctx: click.Context, details: KeyDetails, verb: str) -> None:
    m = details.metadata
    render(
        ctx,
        details_json(details),
        f"{verb} key {m.name} (tenant {m.tenant}, version {m.current_version}, {m.state})",
    )


def _details_text(details: KeyDetails) -> list[str]:
    lines = [_line(details.metadata)]
    for v in details.versions:
        extra = f" destroyed {_t(v.destroyed_at)}" if v.destroyed_at else ""
        lines.append(f"  v{v.version}  {v.state:<9} created {_t(v.created_at)}{extra}")
    return lines


@click.group()
def key() -> None:
    """KMS keys for services' own data: data keys, encryption, signatures (docs/kms.md)."""


@key.command("create")
@click.argument("name")
@click.option("--purpose", required=True, type=click.Choice(PURPOSES))
@click.option("--type", "key_type", required=True, type=click.Choice(KEY_TYPES))
@click.option("--owner", required=True, metavar="SERVICE", help="The service that uses it.")
@click.option("--environment", required=True, metavar="ENV", help="e.g. prod.")
@click.option(
    "--classification", required=True, type=click.Choice(CLASSIFICATIONS), help="Data class."
)
@click.option(
    "--rotation-period", type=DURATION, help="1d..3650d [default: 90d, the standard's DEKs]."
)
@_tenant_option
@connection_options(on_group=False)
@click.pass_context
def key_create(
    ctx: click.Context,
    name: str,
    purpose: str,
    key_type: str,
    owner: str,
    environment: str,
    classification: str,
    rotation_period: int | None,
    tenant: str,
) -> None:
    """Create a key; version 1 is generated inside the key backend."""
    if rotation_period is not None and rotation_period <= 0:
        raise Refusal("the rotation period must be between 1 day and 10 years")
    details = _kms(ctx).create_key(
        name,
        purpose=purpose,
        key_type=key_type,
        owner=owner,
        environment=environment,
        classification=classification,
        rotation_period_seconds=rotation_period or 0,
        tenant=tenant,
    )
    _show(ctx, details, "created")


@key.command("list")
@_tenant_option
@connection_options(on_group=False)
@click.pass_context
def key_list(ctx: click.Context, tenant: str) -> None:
    """List the tenant's keys."""
    items = _kms(ctx).list_keys(tenant=tenant)
    render(ctx, [meta_json(m) for m in items], lambda: [_line(m) for m in items])


@key.command("show")
@click.argument("name")
@_tenant_option
@connection_options(on_group=False)
@click.pass_context
def key_show(ctx: click.Context, name: str, tenant: str) -> None:
    """Metadata and versions of one key."""
    details = _kms(ctx).show_key(name, tenant=tenant)
    render(ctx, details_json(details), lambda: _details_text(details))


def _simple(name: str, method: str, verb: str, doc: str) -> None:
    @key.command(name, help=doc)
    @click.argument("key_name", metavar="NAME")
    @_tenant_option
    @connection_options(on_group=False)
    @click.pass_context
    def command(ctx: click.Context, key_name: str, tenant: str) -> None:
        _show(ctx, getattr(_kms(ctx), method)(key_name, tenant=tenant), verb)


_simple("rotate", "rotate_key", "rotated", "A new version, made current (old ones still decrypt).")
_simple("disable", "disable_key", "disabled", "Refuse every use of the key until enabled.")
_simple("enable", "enable_key", "enabled", "Allow use of a disabled key again.")
_simple(
    "cancel-destroy", "cancel_destroy", "kept", "Cancel a scheduled destruction (key disabled)."
)


@key.command("schedule-destroy")
@click.argument("name")
@click.option("--after", required=True, type=DURATION, help="1d..365d, e.g. 30d.")
@_tenant_option
@connection_options(on_group=False)
@click.pass_context
def key_schedule_destroy(ctx: click.Context, name: str, after: int, tenant: str) -> None:
    """Destroy every version of a disabled key after a waiting period (cancel-destroy undoes)."""
    details = _kms(ctx).schedule_destroy(name, after_seconds=after, tenant=tenant)
    _show(ctx, details, "destruction scheduled for")
