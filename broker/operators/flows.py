"""The client side of `broker login`: getting an ID token from an OpenID Connect provider.

- `CodeFlow`: authorization code + PKCE (S256) with a loopback redirect (RFC 8252): a one-shot
  HTTP listener on 127.0.0.1 and a random port; the user opens the printed URL, signs in, and
  the provider redirects the browser to the listener with the code, which is exchanged for
  tokens. `state` and the PKCE verifier tie the answer to this login; the `nonce` goes into the
  ID token and on to the broker, which checks it.
- `DeviceFlow`: the device authorization grant (RFC 8628) for headless machines: print a code
  and a URL, poll the token endpoint at the interval the provider asks.

No grpc here, and no broker state: the CLI passes the ID token on to the broker's Login RPC.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import secrets
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from broker.operators.oidc import http_fetch

__all__ = [
    "CodeFlow",
    "DeviceAuthorization",
    "DeviceFlow",
    "LoginFlowError",
    "ProviderMetadata",
    "discover",
    "pkce_pair",
]

_DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


class LoginFlowError(Exception):
    """The provider refused or the flow could not finish; the message is one line."""


@dataclass(frozen=True)
class ProviderMetadata:
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    device_authorization_endpoint: str | None


def discover(issuer: str, fetch: Callable[[str], bytes] = http_fetch) -> ProviderMetadata:
    """Read ISSUER/.well-known/openid-configuration; raises LoginFlowError."""
    url = issuer.rstrip("/") + "/.well-known/openid-configuration"
    try:
        doc = json.loads(fetch(url))
    except Exception as exc:  # Unavailable, bad JSON: one line either way
        raise LoginFlowError(f"cannot read the provider's configuration at {url}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("issuer") != issuer:
        raise LoginFlowError(f"{url} does not describe issuer {issuer}")
    try:
        return ProviderMetadata(
            issuer,
            str(doc["authorization_endpoint"]),
            str(doc["token_endpoint"]),
            doc.get("device_authorization_endpoint"),
        )
    except KeyError as exc:
        raise LoginFlowError(f"the provider's configuration lacks {exc.args[0]}") from None


def pkce_pair() -> tuple[str, str]:
    """(code_verifier, S256 code_challenge)."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _post_form(url: str, form: dict[str, str], timeout: float = 15.0) -> tuple[int, dict[str, Any]]:
    data = urllib.parse.urlencode(form).encode()
    request = urllib.request.Request(  # noqa: S310 (the provider's own endpoint)
        url, data=data, headers={"accept": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return response.status, json.loads(response.read(1 << 20))
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read(1 << 16))
        except (json.JSONDecodeError, ValueError):
            body = {}
        return exc.code, body if isinstance(body, dict) else {}
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise LoginFlowError(f"cannot reach the provider at {url}: {exc}") from None


def _id_token(status: int, body: dict[str, Any]) -> str:
    if status == 200 and isinstance(body.get("id_token"), str):
        return str(body["id_token"])
    error = body.get("error_description") or body.get("error") or f"HTTP {status}"
    raise LoginFlowError(f"the provider refused the token request: {error}")


class _Redirect(http.server.BaseHTTPRequestHandler):
    server: _RedirectServer

    def do_GET(self) -> None:
        parts = urllib.parse.urlsplit(self.path)
        if parts.path != "/callback":
            self.send_error(404)
            return
        params = dict(urllib.parse.parse_qsl(parts.query))
        self.server.result = params
        ok = "code" in params
        body = (
            b"Signed in; you can close this window and return to the terminal.\n"
            if ok
            else b"Sign-in failed; see the terminal.\n"
        )
        self.send_response(200 if ok else 400)
        self.send_header("content-type", "text/plain; charset=utf-8")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.server.done.set()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the CLI prints its own one-line messages


class _RedirectServer(http.server.HTTPServer):
    result: dict[str, str]
    done: threading.Event


class CodeFlow:
    """Authorization code + PKCE with a loopback redirect. Use as a context manager:
    `url` to print, then `wait()` for the ID token."""

    def __init__(
        self,
        metadata: ProviderMetadata,
        client_id: str,
        scopes: Sequence[str] = ("openid", "email", "groups"),
    ) -> None:
        self.metadata = metadata
        self.client_id = client_id
        self.nonce = secrets.token_urlsafe(24)
        self._state = secrets.token_urlsafe(24)
        self._verifier, challenge = pkce_pair()
        self._server = _RedirectServer(("127.0.0.1", 0), _Redirect)
        self._server.result = {}
        self._server.done = threading.Event()
        self.redirect_uri = f"http://127.0.0.1:{self._server.server_address[1]}/callback"
        query = urllib.parse.urlencode(
            {
                "response_type": "code",
                "client_id": client_id,
                "redirect_uri": self.redirect_uri,
                "scope": " ".join(scopes),
                "state": self._state,
                "nonce": self.nonce,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            }
        )
        self.url = f"{metadata.authorization_endpoint}?{query}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def __enter__(self) -> CodeFlow:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def wait(self, timeout: float = 300.0) -> str:
        """Wait for the redirect, check `state`, exchange the code; the ID token."""
        if not self._server.done.wait(timeout):
            raise LoginFlowError(f"no sign-in within {int(timeout)} s; run 'broker login' again")
        params = self._server.result
        if params.get("state") != self._state:
            raise LoginFlowError("the provider's answer does not belong to this login (state)")
        if "code" not in params:
            error = params.get("error_description") or params.get("error") or "no code"
            raise LoginFlowError(f"the provider refused the sign-in: {error}")
        status, body = _post_form(
            self.metadata.token_endpoint,
            {
                "grant_type": "authorization_code",
                "code": params["code"],
                "redirect_uri": self.redirect_uri,
                "client_id": self.client_id,
                "code_verifier": self._verifier,
            },
        )
        return _id_token(status, body)


@dataclass(frozen=True)
class DeviceAuthorization:
    device_code: str
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    interval: float
    expires_in: float


class DeviceFlow:
    """The device authorization grant: `start()`, show the code, `poll()` for the ID token."""

    def __init__(
        self,
        metadata: ProviderMetadata,
        client_id: str,
        scopes: Sequence[str] = ("openid", "email", "groups"),
        *,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not metadata.device_authorization_endpoint:
            raise LoginFlowError("the provider does not offer the device flow")
        self.metadata = metadata
        self.client_id = client_id
        self.scopes = tuple(scopes)
        self._sleep = sleep
        self._monotonic = monotonic

    def start(self) -> DeviceAuthorization:
        assert self.metadata.device_authorization_endpoint is not None
        status, body = _post_form(
            self.metadata.device_authorization_endpoint,
            {"client_id": self.client_id, "scope": " ".join(self.scopes)},
        )
        if status != 200 or "device_code" not in body:
            error = body.get("error_description") or body.get("error") or f"HTTP {status}"
            raise LoginFlowError(f"the provider refused the device login: {error}")
        return DeviceAuthorization(
            str(body["device_code"]),
            str(body["user_code"]),
            str(body["verification_uri"]),
            body.get("verification_uri_complete"),
            float(body.get("interval", 5)),
            float(body.get("expires_in", 600)),
        )

    def poll(self, device: DeviceAuthorization) -> str:
        """Poll until the user approved (the ID token), refused or the code expired."""
        interval = max(device.interval, 1.0)
        deadline = self._monotonic() + device.expires_in
        while self._monotonic() < deadline:
            self._sleep(interval)
            status, body = _post_form(
                self.metadata.token_endpoint,
                {
                    "grant_type": _DEVICE_GRANT,
                    "device_code": device.device_code,
                    "client_id": self.client_id,
                },
            )
            error = body.get("error")
            if error == "authorization_pending":
                continue
            if error == "slow_down":
                interval += 5
                continue
            return _id_token(status, body)
        raise LoginFlowError("the device code expired before sign-in; run 'broker login' again")
