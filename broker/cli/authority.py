"""`broker svid mint`, `broker jwt mint`, `broker ca bundle|status|rotate|policy get|set`: the
certificate authority and the SVIDs it issues."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from broker.cli.clients import Authority, CAStatusReport
from broker.cli.inputs import policy_document_json, read_input_file
from broker.cli.options import DURATION, clients, connection_options
from broker.cli.refusals import Refusal
from broker.cli.render import (
    dumps,
    pem,
    policy_json,
    record_json,
    render,
    table,
    text_time,
    timestamp,
    wants_json,
)
from broker.files import write_private_file

__all__ = ["ca", "jwt", "status_json", "status_table", "svid"]


def status_json(status: CAStatusReport) -> dict[str, Any]:
    root = status.root
    return record_json(status) | {
        "root": record_json(root) if root is not None else None,
        "issuing": [record_json(a) for a in status.issuing],
    }


def status_table(status: CAStatusReport) -> str:
    lines = table(
        [
            ["trust domain", status.trust_domain],
            ["key backend", status.key_backend],
            ["storage", status.storage],
            ["bundle sequence", str(status.bundle_sequence)],
            ["policy version", str(status.policy_version)],
            ["root rotation", root_phase_text(status)],
        ]
    )

    def order(a: Authority) -> tuple[bool, str, int]:
        return (a.kind != "root", a.kind, a.generation)

    rows = [["KIND", "ID", "GEN", "STATE", "NOT BEFORE", "NOT AFTER", "SHA-256", "KEY"]]
    rows += [
        [
            a.kind,
            a.id,
            str(a.generation),
            a.state,
            text_time(a.not_before),
            text_time(a.not_after),
            a.fingerprint_sha256[:16] or "-",
            a.key_uri or "-",
        ]
        for a in sorted(status.authorities, key=order)
    ]
    return "\n".join([*lines, "", *table(rows)])


def root_phase_text(status: CAStatusReport) -> str:
    """The root rotation's phase in words, e.g. "overlap until 2026-03-08T00:00:00Z"."""
    until = status.root_phase_until
    words = {
        "steady": "none in progress",
        "publishing": "publishing: the new root is in the bundle and signs nothing yet",
        "overlap": "overlap: the new root signs; the old one stays published",
    }
    text = words.get(status.root_phase, status.root_phase)
    if until is not None:
        verb = "activates at" if status.root_phase == "publishing" else "old root retires at"
        text += f" ({verb} {timestamp(until)})"
    return text


# -- svid / jwt -------------------------------------------------------------------------------


@click.group()
def svid() -> None:
    """X.509-SVIDs."""


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
@connection_options(on_group=False)
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
    csr_bytes = read_input_file(csr, "CSR file") if csr is not None else None
    if out_dir.exists() and not out_dir.is_dir():
        raise Refusal(f"--out {out_dir} exists and is not a directory")
    result = clients(ctx).ca.mint_x509(spiffe_id, ttl, csr_bytes, dns_names)
    files: list[tuple[Path, bytes, int]] = [
        (out_dir / "svid.pem", b"".join(pem("CERTIFICATE", c) for c in result.cert_chain), 0o644),
        (out_dir / "bundle.pem", b"".join(pem("CERTIFICATE", c) for c in result.bundle), 0o644),
    ]
    if result.private_key is not None and csr_bytes is None:
        files.append((out_dir / "key.pem", pem("PRIVATE KEY", result.private_key), 0o600))
    try:
        out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for path, data, mode in files:
            write_private_file(path, data, mode)
    except OSError as exc:
        raise Refusal(f"cannot write the SVID to {out_dir}: {exc.strerror or exc}") from None
    written = [str(path) for path, _, _ in files]
    render(
        ctx,
        record_json(result, exclude={"cert_chain", "private_key", "bundle"}) | {"files": written},
        [
            *(f"wrote {name}" for name in written),
            f"{result.spiffe_id} expires at {timestamp(result.expires_at)} "
            f"(serial {result.serial})",
        ],
    )


@click.group()
def jwt() -> None:
    """JWT-SVIDs."""


@jwt.command("mint")
@click.option("--spiffe-id", required=True, help="The SPIFFE ID to issue for.")
@click.option("--audience", multiple=True, required=True, help="Audience (repeatable).")
@click.option("--ttl", type=DURATION, help="Lifetime, e.g. 5m [default: CA policy].")
@connection_options(on_group=False)
@click.pass_context
def jwt_mint(
    ctx: click.Context, spiffe_id: str, audience: tuple[str, ...], ttl: int | None
) -> None:
    """Issue a JWT-SVID and print it."""
    result = clients(ctx).ca.mint_jwt(spiffe_id, audience, ttl)
    render(ctx, record_json(result), result.token)


# -- ca ---------------------------------------------------------------------------------------


@click.group()
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
@connection_options(on_group=False, output=False)
@click.pass_context
def ca_bundle(ctx: click.Context, bundle_format: str) -> None:
    """Print the trust domain's bundle."""
    result = clients(ctx).ca.bundle()
    text = result.pem if bundle_format == "pem" else result.jwks.decode("utf-8")
    click.echo(text, nl=not text.endswith("\n"))


@ca.command("status")
@connection_options(on_group=False)
@click.pass_context
def ca_status(ctx: click.Context) -> None:
    """Show the root and issuing CAs, the key backend and storage."""
    status = clients(ctx).ca.status()
    render(ctx, status_json(status), lambda: status_table(status))


@ca.command("rotate")
@click.option("--force", is_flag=True, help="Activate a new issuing CA now.")
@click.option(
    "--root",
    is_flag=True,
    help="Rotate the root CA: publish a new root now, sign with it after --activate-after.",
)
@click.option(
    "--compromised",
    is_flag=True,
    help="With --root: remove the old root from the bundle at once and replace its issuing CAs.",
)
@click.option(
    "--activate-after",
    type=DURATION,
    help="With --root: how long both roots are published first [default: bundle refresh hint].",
)
@click.option(
    "--agent-grace",
    type=DURATION,
    help="With --root --compromised: how long agents may still renew their own SVID issued "
    "under the old root (nothing else accepts it) [default: 10m; 0s refuses at once].",
)
@connection_options(on_group=False)
@click.pass_context
def ca_rotate(
    ctx: click.Context,
    force: bool,
    root: bool,
    compromised: bool,
    activate_after: int | None,
    agent_grace: int | None,
) -> None:
    """Run the rotation schedule now (with --force, rotate the issuing CA at once; with
    --root, rotate the root CA)."""
    if (compromised or activate_after is not None) and not root:
        raise click.UsageError("--compromised and --activate-after need --root")
    if root and force:
        raise click.UsageError("--force rotates the issuing CA and --root the root CA: not both")
    if compromised and activate_after is not None:
        raise click.UsageError("--activate-after is for a planned rotation, not --compromised")
    if agent_grace is not None and not compromised:
        raise click.UsageError("--agent-grace needs --root --compromised")
    if root:
        result = clients(ctx).ca.rotate(
            root=True,
            compromised=compromised,
            activate_after_seconds=activate_after,
            agent_grace_seconds=agent_grace,
        )
    else:
        result = clients(ctx).ca.rotate(force)

    def lines() -> Iterator[str]:
        yield from result.actions or ["nothing to do"]
        if root:
            yield f"root rotation: {root_phase_text(result.status)}"
        for authority in result.status.issuing:
            if authority.state == "active":
                yield (
                    f"active issuing CA: {authority.id} (generation {authority.generation}, "
                    f"until {timestamp(authority.not_after)})"
                )

    render(ctx, {"actions": result.actions, "status": status_json(result.status)}, lines)


@ca.group("policy")
def policy() -> None:
    """The CA policy (TTL limits and rules)."""


@policy.command("get")
@connection_options(on_group=False)
@click.pass_context
def policy_get(ctx: click.Context) -> None:
    """Print the current CA policy."""
    result = clients(ctx).ca.get_policy()
    document = policy_json(result)
    if wants_json(ctx):
        click.echo(dumps(document))
        return
    updated = timestamp(result.updated_at) or "-"
    click.echo(f"version {result.version}, set by {result.author or '-'} at {updated}")
    click.echo(dumps(document["document"]))


@policy.command("set")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@connection_options(on_group=False)
@click.pass_context
def policy_set(ctx: click.Context, file: Path) -> None:
    """Replace the CA policy with FILE (TOML or JSON)."""
    document_json = policy_document_json(file, read_input_file(file, "policy file"))
    version = clients(ctx).ca.set_policy(document_json)
    render(ctx, {"version": version}, f"policy version {version}")
