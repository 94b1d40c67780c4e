"""`broker status`: can I reach the broker, who am I to it, what state is its CA in, and when
does my credential expire. One screen (or one JSON document) for the first look."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import click
from cryptography import x509

from broker.cli.clients import ClientError
from broker.cli.options import SERVER_KEY, client_certificate, clients, connection_options
from broker.cli.refusals import Refusal, client_error_message
from broker.cli.render import render, timestamp

__all__ = ["status"]


def _identity(pem: bytes) -> dict[str, Any]:
    try:
        leaf = x509.load_pem_x509_certificates(pem)[0]
    except (ValueError, IndexError):
        raise Refusal("the client certificate is not a PEM certificate chain") from None
    try:
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    expires = leaf.not_valid_after_utc
    remaining = int((expires - datetime.now(UTC)).total_seconds())
    return {
        "spiffe_id": next((u for u in uris if u.startswith("spiffe://")), None),
        "expires_at": timestamp(expires),
        "expires_in_seconds": remaining,
        "expired": remaining <= 0,
    }


def _duration_text(seconds: int) -> str:
    if seconds <= 0:
        return "expired"
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


@click.command("status")
@connection_options(on_group=False)
@click.pass_context
def status(ctx: click.Context) -> None:
    """Reachability, who you are, the CA's state and your credential's expiry (exit 1 when
    the broker cannot be asked)."""
    cert_path, pem = client_certificate(ctx)
    identity = {"certificate": str(cert_path), **_identity(pem)}
    document: dict[str, Any] = {"server": None, "reachable": False, "error": None}
    document["identity"] = identity
    document["ca"] = None
    try:
        report = clients(ctx).ca.status()
    except ClientError as exc:
        document["error"] = client_error_message(exc, ctx.meta.get(SERVER_KEY, ""))
    else:
        document["reachable"] = True
        root = report.root
        active = [a for a in report.issuing if a.state == "active"]
        document["ca"] = {
            "trust_domain": report.trust_domain,
            "key_backend": report.key_backend,
            "bundle_sequence": report.bundle_sequence,
            "policy_version": report.policy_version,
            "root": None
            if root is None
            else {"id": root.id, "state": root.state, "not_after": timestamp(root.not_after)},
            "issuing": [{"id": a.id, "not_after": timestamp(a.not_after)} for a in active],
        }
    document["server"] = ctx.meta.get(SERVER_KEY)

    def text() -> list[str]:
        lines = [
            f"broker:     {document['server']} "
            + ("reachable" if document["reachable"] else f"NOT reachable: {document['error']}"),
            f"you:        {identity['spiffe_id'] or '(no SPIFFE ID)'} ({cert_path})",
            f"credential: expires {identity['expires_at']} "
            f"({_duration_text(identity['expires_in_seconds'])})",
        ]
        ca = document["ca"]
        if ca is not None:
            root = ca["root"]
            lines.append(
                f"CA:         {ca['trust_domain']}, keys {ca['key_backend']}, root "
                + (f"{root['id']} {root['state']} until {root['not_after']}" if root else "none")
                + f", {len(ca['issuing'])} active issuing, bundle {ca['bundle_sequence']}, "
                f"policy v{ca['policy_version']}"
            )
        return lines

    render(ctx, document, text)
    if not document["reachable"]:
        ctx.exit(1)
