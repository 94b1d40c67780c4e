"""`broker policy ...`, `broker grant ...`, `broker approval ...`, `broker breakglass ...`:
policy as code (Rego), just-in-time grants, two-party approvals and break-glass credentials.

`broker policy set` dispatches on the file extension: `.rego` files (one or more) replace the
Rego policy; one `.toml` or `.json` file replaces the CA policy (as `broker ca policy set`).
JSON documents (`--output json`) are stable: see docs/policy.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from broker.cli.clients import AccessClient, ApprovalView, BreakGlassView, GrantView
from broker.cli.inputs import policy_document_json, read_input_file, read_text_file
from broker.cli.options import DURATION, clients, connection_options, setting
from broker.cli.refusals import Refusal
from broker.cli.render import (
    dumps,
    pem,
    policy_json,
    record_json,
    render,
    table,
    text_time,
    wants_json,
)
from broker.files import write_private_file

__all__ = ["approval", "breakglass", "grant", "policy"]

_REGO = ".rego"
_CA = (".toml", ".json")


def _access(ctx: click.Context) -> AccessClient:
    return clients(ctx).access


def _justification(ctx: click.Context) -> str:
    text = setting(ctx, "justification")
    if not text or not str(text).strip():
        raise click.UsageError("--justification TEXT is required", ctx)
    return str(text)


def _rego_modules(files: tuple[Path, ...]) -> dict[str, str]:
    modules: dict[str, str] = {}
    for path in files:
        text = read_text_file(path, "policy file")
        if path.name in modules:
            raise Refusal(f"two policy files are named {path.name}; module names must differ")
        modules[path.name] = text
    return modules


# -- broker policy -----------------------------------------------------------------------------


@click.group()
def policy() -> None:
    """Authorization policy (Rego) and CA policy: set, get, test."""


@policy.command("set")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path, dir_okay=False))
@connection_options(on_group=False)
@click.pass_context
def policy_set(ctx: click.Context, files: tuple[Path, ...]) -> None:
    """Replace the Rego policy with FILE.rego [FILE.rego ...], or the CA policy with one
    FILE.toml / FILE.json. A policy that does not compile is refused; the one in force stays."""
    suffixes = {f.suffix.lower() for f in files}
    if suffixes == {_REGO}:
        version = _access(ctx).set_rego_policy(_rego_modules(files))
        kind = "rego"
    elif len(files) == 1 and suffixes <= set(_CA):
        document = policy_document_json(files[0], read_input_file(files[0], "policy file"))
        version = clients(ctx).ca.set_policy(document)
        kind = "ca"
    else:
        raise click.UsageError(
            "give one or more .rego files (the authorization policy) or one .toml/.json file "
            "(the CA policy)",
            ctx,
        )
    render(
        ctx,
        {"kind": kind, "version": version},
        f"{'Rego' if kind == 'rego' else 'CA'} policy version {version}",
    )


@policy.command("get")
@click.option("--rego", "which", flag_value="rego", help="Only the Rego policy.")
@click.option("--ca", "which", flag_value="ca", help="Only the CA policy.")
@connection_options(on_group=False)
@click.pass_context
def policy_get(ctx: click.Context, which: str | None) -> None:
    """Print the Rego policy and the CA policy in force (or one of them)."""
    document: dict[str, Any] = {}
    if which in (None, "rego"):
        document["rego"] = record_json(_access(ctx).get_rego_policy())
    if which in (None, "ca"):
        document["ca"] = policy_json(clients(ctx).ca.get_policy())
    if wants_json(ctx):
        click.echo(dumps(document))
        return
    if "rego" in document:
        rego = document["rego"]
        click.echo(
            f"# Rego policy version {rego['version']}, set by {rego['author'] or '-'} "
            f"at {rego['updated_at'] or '-'}"
        )
        for name, text in sorted(rego["modules"].items()):
            click.echo(f"# --- {name} ---")
            click.echo(text, nl=not text.endswith("\n"))
    if "ca" in document:
        ca = document["ca"]
        click.echo(
            f"# CA policy version {ca['version']}, set by {ca['author'] or '-'} "
            f"at {ca['updated_at'] or '-'}"
        )
        click.echo(dumps(ca["document"]))


@policy.command("test")
@click.option(
    "--input",
    "input_file",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="The request (JSON): caller, action, resource, attributes, context.",
)
@click.argument("candidates", nargs=-1, type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--expect",
    type=click.Choice(["allow", "deny"]),
    help="Exit 1 unless the decision is this, 0 when it is (for policy tests in CI).",
)
@connection_options(on_group=False)
@click.pass_context
def policy_test(
    ctx: click.Context, input_file: Path, candidates: tuple[Path, ...], expect: str | None
) -> None:
    """Print the decision for --input and the rule that made it, with the policy in force or
    with candidate .rego files (not stored). Exit 0 on allow, 1 on deny (the decision is
    printed either way); with --expect, 0 when the decision is the expected one."""
    data = read_input_file(input_file, "input file")
    try:
        document = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Refusal(f"input file {input_file} is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise Refusal(f"input file {input_file} must hold a JSON object")
    if any(c.suffix.lower() != _REGO for c in candidates):
        raise click.UsageError("candidate policy files must be .rego files", ctx)
    modules = _rego_modules(candidates) if candidates else None
    result = _access(ctx).test_policy(document, modules)
    verdict = "allow" if result.allowed else "deny"
    render(
        ctx,
        {"decision": verdict} | record_json(result, exclude={"allowed"}),
        lambda: [
            f"{verdict} (rule {result.rule}): {result.reason}",
            *(f"  {key}: {value}" for key, value in sorted(result.flags.items())),
        ],
    )
    if expect is not None and expect != verdict:
        raise Refusal(f"expected {expect}, the policy says {verdict} (rule {result.rule})")
    if expect is None and not result.allowed:
        ctx.exit(1)  # like grep: the answer is on stdout, the status says which


# -- broker grant ------------------------------------------------------------------------------


@click.group()
def grant() -> None:
    """Just-in-time grants (at most 8 h; they expire on their own)."""


def _grant_rows(grants: list[GrantView]) -> list[str]:
    rows = [["ID", "GRANTEE", "ACTION", "RESOURCE", "EXPIRES", "STATE", "BY"]]
    for g in grants:
        rows.append(
            [g.id, g.grantee, g.action, g.resource, text_time(g.expires_at), g.state, g.created_by]
        )
    return table(rows) if len(rows) > 1 else []


@grant.command("create")
@click.option("--to", "grantee", required=True, metavar="SPIFFE_ID", help="Who gets the grant.")
@click.option("--action", required=True, help="The action, e.g. secrets.get.")
@click.option("--resource", required=True, help="The resource (exact, prefix*, or *).")
@click.option("--ttl", required=True, type=DURATION, help="How long, at most 8h.")
@connection_options(on_group=False)
@click.pass_context
def grant_create(ctx: click.Context, grantee: str, action: str, resource: str, ttl: int) -> None:
    """Grant SPIFFE_ID the action on the resource for --ttl (--justification required)."""
    created = _access(ctx).create_grant(grantee, action, resource, ttl, _justification(ctx))
    render(ctx, record_json(created), created.id)
    if not wants_json(ctx):  # the id alone on stdout, for scripts; the rest for people
        click.echo(
            f"{created.grantee} may {created.action} on {created.resource} until "
            f"{text_time(created.expires_at)}",
            err=True,
        )


@grant.command("list")
@click.option("--all", "include_inactive", is_flag=True, help="Also expired and revoked.")
@connection_options(on_group=False)
@click.pass_context
def grant_list(ctx: click.Context, include_inactive: bool) -> None:
    """The grants in force (with --all, every grant)."""
    grants = _access(ctx).list_grants(include_inactive)
    render(ctx, [record_json(g) for g in grants], lambda: _grant_rows(grants))


@grant.command("revoke")
@click.argument("grant_id", metavar="ID")
@connection_options(on_group=False)
@click.pass_context
def grant_revoke(ctx: click.Context, grant_id: str) -> None:
    """Revoke a grant now."""
    revoked = _access(ctx).revoke_grant(grant_id)
    render(ctx, record_json(revoked), f"revoked {revoked.id}")


# -- broker approval ---------------------------------------------------------------------------


@click.group()
def approval() -> None:
    """Two-party approvals: one asks, a different operator approves; single use, expiring."""


def _approval_rows(approvals: list[ApprovalView]) -> list[str]:
    rows = [["ID", "REQUESTER", "ACTION", "RESOURCE", "STATE", "APPROVER", "EXPIRES"]]
    for a in approvals:
        rows.append(
            [
                a.id,
                a.requester,
                a.action,
                a.resource,
                a.state,
                a.approved_by or "-",
                text_time(a.expires_at),
            ]
        )
    return table(rows) if len(rows) > 1 else []


@approval.command("request")
@click.option("--action", required=True, help="The action, e.g. secrets.get or secrets.rotate.")
@click.option("--resource", required=True, help="The resource (e.g. the secret reference).")
@connection_options(on_group=False)
@click.pass_context
def approval_request(ctx: click.Context, action: str, resource: str) -> None:
    """Ask for a second operator's approval; prints its id (--justification required)."""
    created = _access(ctx).request_approval(action, resource, _justification(ctx))
    render(ctx, record_json(created), created.id)


@approval.command("approve")
@click.argument("approval_id", metavar="ID")
@connection_options(on_group=False)
@click.pass_context
def approval_approve(ctx: click.Context, approval_id: str) -> None:
    """Approve someone else's request (never your own)."""
    approved = _access(ctx).approve(approval_id)
    render(
        ctx,
        record_json(approved),
        f"approved {approved.id}: {approved.requester} may {approved.action} on "
        f"{approved.resource} once, until {text_time(approved.expires_at)}",
    )


@approval.command("list")
@click.option("--all", "include_inactive", is_flag=True, help="Also used and expired.")
@connection_options(on_group=False)
@click.pass_context
def approval_list(ctx: click.Context, include_inactive: bool) -> None:
    """Pending and approved requests (with --all, every request)."""
    approvals = _access(ctx).list_approvals(include_inactive)
    render(ctx, [record_json(a) for a in approvals], lambda: _approval_rows(approvals))


# -- broker breakglass -------------------------------------------------------------------------


@click.group()
def breakglass() -> None:
    """Break-glass credentials: approved by a second operator, single use, at most 8 h."""


def _breakglass_rows(records: list[BreakGlassView]) -> list[str]:
    rows = [["ID", "OPERATOR", "ACTION", "RESOURCE", "STATE", "EXPIRES"]]
    for b in records:
        rows.append([b.id, b.operator, b.action, b.resource, b.state, text_time(b.expires_at)])
    return table(rows) if len(rows) > 1 else []


@breakglass.command("issue")
@click.option("--approval", "approval_id", required=True, help="Your approved request's id.")
@click.option("--ttl", type=DURATION, default="1h", show_default=True, help="At most 8h.")
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Directory for svid.pem, key.pem and bundle.pem.",
)
@connection_options(on_group=False)
@click.pass_context
def breakglass_issue(ctx: click.Context, approval_id: str, ttl: int, out_dir: Path) -> None:
    """Exchange an approved request for a break-glass credential (use it with --cert/--key)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise Refusal(f"--out {out_dir} exists and is not a directory")
    issued = _access(ctx).issue_breakglass(approval_id, ttl)
    files = [
        (
            out_dir / "svid.pem",
            b"".join(pem("CERTIFICATE", c) for c in issued.cert_chain),
            0o644,
        ),
        (out_dir / "key.pem", pem("PRIVATE KEY", issued.private_key), 0o600),
        (
            out_dir / "bundle.pem",
            b"".join(pem("CERTIFICATE", c) for c in issued.bundle),
            0o644,
        ),
    ]
    try:
        out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for path, data, mode in files:
            write_private_file(path, data, mode)
    except OSError as exc:
        raise Refusal(f"cannot write the credential to {out_dir}: {exc.strerror or exc}") from None
    record = issued.record
    if wants_json(ctx):
        click.echo(dumps(record_json(record) | {"files": [str(p) for p, _, _ in files]}))
        return
    click.echo(record.id)
    click.echo(
        f"{record.spiffe_id} may {record.action} on {record.resource} once, until "
        f"{text_time(record.expires_at)}; every request with it is flagged in the audit ledger. "
        f"Use: broker --cert {files[0][0]} --key {files[1][0]} ...",
        err=True,
    )


@breakglass.command("list")
@click.option("--all", "include_inactive", is_flag=True, help="Also used, revoked and expired.")
@connection_options(on_group=False)
@click.pass_context
def breakglass_list(ctx: click.Context, include_inactive: bool) -> None:
    """Break-glass credentials that can still be used (with --all, every one)."""
    records = _access(ctx).list_breakglass(include_inactive)
    render(ctx, [record_json(b) for b in records], lambda: _breakglass_rows(records))


@breakglass.command("revoke")
@click.argument("record_id", metavar="ID")
@connection_options(on_group=False)
@click.pass_context
def breakglass_revoke(ctx: click.Context, record_id: str) -> None:
    """Revoke a break-glass credential before it is used or expires."""
    revoked = _access(ctx).revoke_breakglass(record_id)
    render(ctx, record_json(revoked), f"revoked {revoked.id}")
