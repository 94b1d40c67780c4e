"""`broker login`, `broker login status`, `broker logout`, `broker operator list|revoke`:
operators log in with the organisation's OpenID Connect provider (SSO + MFA) and get a
short-lived operator certificate under $BROKER_HOME/operator/ (default ~/.config/broker), which
every client command then uses when no --cert is given."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path
from typing import Any

import click
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from broker.cli.clients import (
    ClientError,
    OperatorsClient,
    OperatorSession,
    login,
    login_config,
)
from broker.cli.inputs import read_input_file
from broker.cli.options import (
    DEFAULT_SERVER,
    DURATION,
    SERVER_KEY,
    SETTINGS_KEY,
    broker_home,
    clients,
    connection_options,
    data_dir,
    default_attest_server,
    setting,
)
from broker.cli.refusals import Refusal, client_error_message
from broker.cli.render import record_json, render, table, timestamp
from broker.files import write_private_file
from broker.operators.flows import CodeFlow, DeviceFlow, LoginFlowError, discover

__all__ = ["login_group", "logout", "operator", "session_json"]


def _operators(ctx: click.Context) -> OperatorsClient:
    return clients(ctx).operators


def session_json(s: OperatorSession) -> dict[str, Any]:
    return record_json(s)


def _login_bundle(ctx: click.Context) -> bytes:
    given = setting(ctx, "bundle")
    candidates = (
        [Path(given)]
        if given
        else [
            data_dir(ctx) / "bundle.pem",
            broker_home() / "operator" / "bundle.pem",
        ]
    )
    for path in candidates:
        if given or path.is_file():
            return read_input_file(path, "trust bundle")
    raise Refusal(
        "no trust bundle to verify the broker: pass --bundle FILE (the broker's bundle.pem)"
    )


def _csr(key: ec.EllipticCurvePrivateKey) -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.DER)


def _id_token(
    ctx: click.Context,
    attest: str,
    bundle: bytes,
    *,
    device: bool,
    issuer: str | None,
    client_id: str | None,
    wait: int,
) -> tuple[str, str]:
    """(ID token, nonce) from the provider, by the code + PKCE or device flow."""
    scopes: list[str] = ["openid", "email", "groups"]
    if not issuer or not client_id:
        cfg = login_config(attest, bundle)
        issuer, client_id, scopes = issuer or cfg.issuer, client_id or cfg.client_id, cfg.scopes
    try:
        metadata = discover(issuer)
        if device:
            flow = DeviceFlow(metadata, client_id, scopes)
            grant = flow.start()
            where = grant.verification_uri_complete or grant.verification_uri
            click.echo(f"To sign in, open {where} and enter the code {grant.user_code}", err=True)
            return flow.poll(grant), ""
        with CodeFlow(metadata, client_id, scopes) as code_flow:
            click.echo(f"Open this URL in a browser to sign in:\n  {code_flow.url}", err=True)
            return code_flow.wait(timeout=wait), code_flow.nonce
    except LoginFlowError as exc:
        raise Refusal(str(exc)) from None


@click.group("login", invoke_without_command=True)
@connection_options(on_group=False)
@click.option("--device", is_flag=True, help="Device flow (RFC 8628) for a headless machine.")
@click.option(
    "--id-token-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Use an ID token you already hold (automation).",
)
@click.option("--nonce", default="", help="The nonce the ID token in --id-token-file carries.")
@click.option("--issuer", metavar="URL", help="The OpenID provider [default: the broker's].")
@click.option("--client-id", help="The client id at the provider [default: the broker's].")
@click.option("--ttl", type=DURATION, help="Certificate lifetime [default: the broker's, 1h].")
@click.option(
    "--attest-server",
    metavar="HOST:PORT",
    help="The broker's attestation port [default: the --server port + 1].",
)
@click.option("--wait", default=300, show_default=True, help="Seconds to wait for sign-in.")
@click.pass_context
def login_group(
    ctx: click.Context,
    device: bool,
    id_token_file: Path | None,
    nonce: str,
    issuer: str | None,
    client_id: str | None,
    ttl: int | None,
    attest_server: str | None,
    wait: int,
) -> None:
    """Log in with the OpenID Connect provider (SSO + MFA) and store an operator certificate
    under $BROKER_HOME/operator/."""
    if ctx.invoked_subcommand is not None:
        return
    if device and id_token_file is not None:
        raise click.UsageError("--device and --id-token-file exclude each other", ctx)
    server = str(setting(ctx, "server") or DEFAULT_SERVER)
    attest = attest_server or default_attest_server(server)
    ctx.meta[SERVER_KEY] = attest
    bundle = _login_bundle(ctx)
    if id_token_file is not None:
        token = read_input_file(id_token_file, "ID token file").decode(errors="replace").strip()
    else:
        token, nonce = _id_token(
            ctx, attest, bundle, device=device, issuer=issuer, client_id=client_id, wait=wait
        )
    key = ec.generate_private_key(ec.SECP256R1())
    result = login(
        attest, bundle, id_token=token, nonce=nonce, csr_der=_csr(key), ttl_seconds=ttl or 0
    )
    out = broker_home() / "operator"
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_private_file(out / "key.pem", key_pem)
    write_private_file(out / "svid.pem", result.chain_pem, 0o644)
    write_private_file(out / "bundle.pem", result.bundle_pem, 0o644)
    s = result.session
    render(
        ctx,
        session_json(s) | {"dir": str(out)},
        f"logged in as {s.subject} ({s.spiffe_id}), roles {', '.join(s.roles)}, until "
        f"{timestamp(s.expires_at)}; credentials in {out}",
    )


@login_group.command("status")
@connection_options(on_group=False)
@click.pass_context
def login_status(ctx: click.Context) -> None:
    """Who you are, your roles and when your login expires."""
    cert_path = Path(setting(ctx, "cert") or broker_home() / "operator" / "svid.pem")
    if not cert_path.is_file():
        raise Refusal(f"not logged in (no {cert_path}); run 'broker login'")
    try:
        leaf = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError:
        raise Refusal(f"{cert_path} is not a certificate; run 'broker login' again") from None
    if leaf.not_valid_after_utc <= dt.datetime.now(dt.UTC):
        expired = timestamp(leaf.not_valid_after_utc)
        raise Refusal(f"your login expired at {expired}; run 'broker login'")
    s = _operators(ctx).whoami()
    render(
        ctx,
        session_json(s),
        [
            f"subject:   {s.subject}",
            f"identity:  {s.spiffe_id}",
            f"roles:     {', '.join(s.roles) or '-'}",
            f"mfa:       {', '.join(s.amr) or '-'}",
            f"expires:   {timestamp(s.expires_at)}",
        ],
    )


@click.command("logout")
@connection_options(on_group=False, output=False)
@click.pass_context
def logout(ctx: click.Context) -> None:
    """Deny your operator certificate at the broker and remove it from $BROKER_HOME."""
    out = broker_home() / "operator"
    if not (out / "svid.pem").is_file():
        raise Refusal(f"not logged in (no {out / 'svid.pem'})")
    ctx.meta.setdefault(SETTINGS_KEY, {}).update(
        cert=out / "svid.pem", key=out / "key.pem", bundle=out / "bundle.pem"
    )
    error: str | None = None
    try:
        s = _operators(ctx).logout()
    except ClientError as exc:
        server = ctx.meta.get(SERVER_KEY, DEFAULT_SERVER)
        error = client_error_message(exc, server)
    shutil.rmtree(out, ignore_errors=True)
    if error is not None:
        raise Refusal(f"removed the local login; the broker did not confirm: {error}")
    click.echo(f"logged out {s.subject}: certificate {s.serial} denied, {out} removed")


@click.group("operator")
def operator() -> None:
    """Operators who logged in: list their certificates, revoke them."""


@operator.command("list")
@connection_options(on_group=False)
@click.option("--all", "include_inactive", is_flag=True, help="Include expired and revoked.")
@click.pass_context
def operator_list(ctx: click.Context, include_inactive: bool) -> None:
    """Active operator certificates: subject, roles, expiry."""
    sessions = _operators(ctx).list_sessions(include_inactive)
    rows = [["SUBJECT", "ROLES", "EXPIRES", "SERIAL", "STATE"]]
    for s in sessions:
        state = "revoked" if s.revoked_at else "active"
        rows.append([s.subject, ",".join(s.roles), timestamp(s.expires_at) or "-", s.serial, state])
    render(ctx, [session_json(s) for s in sessions], table(rows))  # a bare array, as every list


@operator.command("revoke")
@click.argument("target", metavar="SUBJECT|SERIAL")
@connection_options(on_group=False)
@click.pass_context
def operator_revoke(ctx: click.Context, target: str) -> None:
    """Deny every active certificate of SUBJECT, or the one with SERIAL (hex)."""
    revoked = _operators(ctx).revoke(target)
    render(
        ctx,
        {"revoked": [session_json(s) for s in revoked]},
        lambda: [f"revoked {s.subject} certificate {s.serial}" for s in revoked],
    )
