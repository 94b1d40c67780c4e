"""OpenID Connect ID-token verification for operator login.

`ProviderKeys` reads the provider's discovery document (`ISSUER/.well-known/openid-configuration`)
and its JWKS, caches the keys, and fetches them again when a token names a `kid` it does not
know (at most once per `refresh_interval`, so made-up kids cannot hammer the provider).
`IdTokenVerifier.verify` checks, in order: size and shape, `alg` on the allow-list (so `none`
and HMAC never reach a key), `kid` known and of the key type the algorithm needs (no key
confusion), the signature, `iss`, `aud` (and `azp` when several audiences), `exp`, `nbf`,
`iat` against the injected clock, then the `nonce` the client sent. Every refusal raises
`Unauthenticated` with one line naming the check, never the token.

HTTP runs off the event loop (`asyncio.to_thread`); the fetcher is injected so tests can count
fetches.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from broker.errors import Unauthenticated, Unavailable
from ca.clock import Clock

__all__ = [
    "ALLOWED_ALGORITHMS",
    "Fetcher",
    "IdTokenVerifier",
    "ProviderKeys",
    "http_fetch",
]

ALLOWED_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"}
)
MAX_TOKEN_BYTES = 16384
_MAX_DOCUMENT_BYTES = 1 << 20
_LEEWAY = dt.timedelta(seconds=30)  # clock skew tolerated on exp / nbf / iat

Fetcher = Callable[[str], bytes]


def http_fetch(url: str, timeout: float = 10.0) -> bytes:
    """GET `url` (https, or http to a loopback host); raises Unavailable."""
    parts = urlsplit(url)
    loopback = parts.hostname in ("127.0.0.1", "::1", "localhost")
    if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
        raise Unavailable(f"refusing to fetch {url}: the provider must use https")
    request = urllib.request.Request(url, headers={"accept": "application/json"})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return bytes(response.read(_MAX_DOCUMENT_BYTES))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise Unavailable(f"the OpenID provider is unreachable ({url}): {reason}") from None


def _key_fits(key: Any, alg: str) -> bool:
    if alg.startswith(("RS", "PS")):
        return isinstance(key, rsa.RSAPublicKey)
    if alg.startswith("ES"):
        return isinstance(key, ec.EllipticCurvePublicKey)
    return False


def _parse_keys(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise Unavailable("the provider's JWKS is not JSON") from None
    keys: dict[str, Any] = {}
    for entry in doc.get("keys", []) if isinstance(doc, dict) else []:
        if not isinstance(entry, dict) or not isinstance(entry.get("kid"), str):
            continue  # a key without a kid can never be chosen
        if entry.get("use", "sig") != "sig" or entry.get("kty") not in ("RSA", "EC"):
            continue
        if any(k in entry for k in ("d", "p", "q", "dp", "dq", "qi")):
            continue  # private material: never trust it as a verification key
        try:
            keys[entry["kid"]] = jwt.PyJWK.from_dict(entry).key
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, KeyError):
            continue
    return keys


class ProviderKeys:
    """The provider's discovery document and signing keys, cached."""

    def __init__(
        self,
        issuer: str,
        clock: Clock,
        *,
        fetch: Fetcher = http_fetch,
        refresh_interval: dt.timedelta = dt.timedelta(seconds=30),
    ) -> None:
        self.issuer = issuer
        self._clock = clock
        self._fetch = fetch
        self._refresh_interval = refresh_interval
        self._jwks_uri: str | None = None
        self._keys: dict[str, Any] = {}
        self._fetched_at: dt.datetime | None = None
        self._lock = asyncio.Lock()
        self.fetches = 0  # JWKS fetches (for tests and metrics)

    async def _discover(self) -> str:
        if self._jwks_uri is None:
            url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
            body = await asyncio.to_thread(self._fetch, url)
            try:
                doc = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise Unavailable("the provider's discovery document is not JSON") from None
            if not isinstance(doc, dict) or doc.get("issuer") != self.issuer:
                raise Unavailable(
                    f"the discovery document at {url} does not name issuer {self.issuer}"
                )
            uri = doc.get("jwks_uri")
            if not isinstance(uri, str) or not uri:
                raise Unavailable("the provider's discovery document has no jwks_uri")
            self._jwks_uri = uri
        return self._jwks_uri

    async def _refresh(self) -> None:
        uri = await self._discover()
        body = await asyncio.to_thread(self._fetch, uri)
        self._keys = _parse_keys(body)
        self._fetched_at = self._clock.now()
        self.fetches += 1

    async def key(self, kid: str) -> Any | None:
        """The verification key for `kid`, fetching the JWKS again if `kid` is unknown and the
        last fetch is older than the refresh interval. None when still unknown."""
        if kid in self._keys:
            return self._keys[kid]
        async with self._lock:
            if kid in self._keys:
                return self._keys[kid]
            now = self._clock.now()
            if self._fetched_at is None or now - self._fetched_at >= self._refresh_interval:
                await self._refresh()
        return self._keys.get(kid)


@dataclass(frozen=True)
class IdTokenVerifier:
    """Verifies ID tokens of one provider for one audience (the broker's client id)."""

    keys: ProviderKeys
    audiences: tuple[str, ...]
    algorithms: tuple[str, ...] = ("RS256", "ES256")

    @property
    def issuer(self) -> str:
        return self.keys.issuer

    async def verify(self, token: str, nonce: str, now: dt.datetime) -> dict[str, Any]:
        """The verified claims; raises Unauthenticated naming the failed check."""
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_BYTES:
            raise Unauthenticated("the ID token is empty or too large")
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.InvalidTokenError:
            raise Unauthenticated("the ID token is malformed") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise Unauthenticated(
                f"ID token algorithm {str(alg)[:20]!r} is not allowed "
                f"(allowed: {', '.join(self.algorithms)})"
            )
        if unverified.get("iss") != self.issuer:
            raise Unauthenticated(
                f"the ID token is from issuer {str(unverified.get('iss'))[:200]!r}, "
                f"not the configured provider {self.issuer}"
            )
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise Unauthenticated("the ID token has no kid")
        key = await self.keys.key(kid)
        if key is None:
            raise Unauthenticated(
                f"the ID token's kid {kid[:64]!r} is not among the provider's signing keys"
            )
        if not _key_fits(key, alg):
            raise Unauthenticated(f"the provider's key {kid[:64]!r} cannot verify {alg}")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=list(self.audiences),
                issuer=self.issuer,
                options={
                    "require": ["iss", "aud", "exp", "iat", "sub"],
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise Unauthenticated("the ID token's signature does not verify") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated(
                f"the ID token is not meant for this broker (audience must be "
                f"{' or '.join(self.audiences)})"
            ) from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated("the ID token's issuer is wrong") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(f"the ID token lacks the claim {exc.claim!r}") from None
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(f"the ID token is invalid: {exc}") from None
        _check_times(claims, now)
        aud = claims["aud"]
        if isinstance(aud, list) and len(aud) > 1 and claims.get("azp") not in self.audiences:
            raise Unauthenticated("the ID token has several audiences and azp is not this broker")
        got = claims.get("nonce")
        if nonce or got is not None:
            if not isinstance(got, str) or got != nonce:
                raise Unauthenticated("the ID token's nonce does not match this login")
        return claims


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Unauthenticated(f"the ID token's {name} is not a number")
    return float(value)


def _check_times(claims: Mapping[str, Any], now: dt.datetime) -> None:
    moment = now.timestamp()
    leeway = _LEEWAY.total_seconds()
    exp = _number(claims, "exp")
    if exp is None or moment >= exp + leeway:
        raise Unauthenticated("the ID token has expired")
    nbf = _number(claims, "nbf")
    if nbf is not None and moment + leeway < nbf:
        raise Unauthenticated("the ID token is not valid yet (nbf)")
    iat = _number(claims, "iat")
    if iat is None or moment + leeway < iat:
        raise Unauthenticated("the ID token was issued in the future (iat)")


def audiences_of(claims: Mapping[str, Any]) -> Sequence[str]:
    aud = claims.get("aud")
    return [aud] if isinstance(aud, str) else [str(a) for a in aud or ()]
