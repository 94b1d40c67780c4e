"""ID-token verification with keys made here and a counting fetcher (no network): every
check names itself in one line; the JWKS is fetched again for an unknown kid (a provider that
rotated its keys), at most once per refresh interval."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from broker.errors import Unauthenticated, Unavailable
from broker.operators.oidc import IdTokenVerifier, ProviderKeys
from ca.clock import FakeClock

ISSUER = "https://idp.example.org"
T0 = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)


class Provider:
    """A discovery document and a JWKS served by a fetch function that counts its calls."""

    def __init__(self) -> None:
        self.keys: dict[str, rsa.RSAPrivateKey] = {"k1": _rsa()}
        self.calls: list[str] = []

    def jwks(self) -> dict[str, Any]:
        out = []
        for kid, key in self.keys.items():
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
            out.append(jwk | {"kid": kid, "use": "sig", "alg": "RS256"})
        return {"keys": out}

    def fetch(self, url: str) -> bytes:
        self.calls.append(url)
        if url.endswith("/.well-known/openid-configuration"):
            return json.dumps({"issuer": ISSUER, "jwks_uri": ISSUER + "/jwks"}).encode()
        if url == ISSUER + "/jwks":
            return json.dumps(self.jwks()).encode()
        raise Unavailable(f"no {url}")

    def token(self, kid: str = "k1", **overrides: Any) -> str:
        claims = {
            "iss": ISSUER,
            "aud": "broker",
            "sub": "alice",
            "iat": int(T0.timestamp()),
            "exp": int(T0.timestamp()) + 3600,
            "nonce": "n-1",
            "amr": ["pwd", "otp"],
        } | overrides
        claims = {k: v for k, v in claims.items() if v is not None}
        return jwt.encode(claims, self.keys[kid], algorithm="RS256", headers={"kid": kid})


def _rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def provider() -> Provider:
    return Provider()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


def verifier(provider: Provider, clock: FakeClock) -> IdTokenVerifier:
    return IdTokenVerifier(ProviderKeys(ISSUER, clock, fetch=provider.fetch), ("broker",))


async def test_a_good_token_verifies(provider: Provider, clock: FakeClock) -> None:
    claims = await verifier(provider, clock).verify(provider.token(), "n-1", clock.now())
    assert claims["sub"] == "alice"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forge(header: dict[str, Any], claims: dict[str, Any], signature: bytes) -> str:
    return ".".join(
        (_b64(json.dumps(header).encode()), _b64(json.dumps(claims).encode()), _b64(signature))
    )


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("expired", "has expired"),
        ("nbf", "not valid yet"),
        ("iat-future", "issued in the future"),
        ("audience", "not meant for this broker"),
        ("issuer", "not the configured provider"),
        ("none", "'none' is not allowed"),
        ("hs256", "'HS256' is not allowed"),
        ("es256-kid-of-rsa", "cannot verify ES256"),
        ("unknown-kid", "not among the provider's signing keys"),
        ("nonce", "nonce does not match"),
        ("no-sub", "lacks the claim 'sub'"),
        ("garbage", "malformed"),
        ("azp", "azp is not this broker"),
    ],
)
async def test_each_check_refuses_in_one_line(
    provider: Provider, clock: FakeClock, case: str, message: str
) -> None:
    v = verifier(provider, clock)
    nonce = "n-1"
    base = jwt.decode(provider.token(), options={"verify_signature": False})
    if case == "expired":
        token = provider.token(exp=int(T0.timestamp()) - 60)
    elif case == "nbf":
        token = provider.token(nbf=int(T0.timestamp()) + 600)
    elif case == "iat-future":
        token = provider.token(iat=int(T0.timestamp()) + 600)
    elif case == "audience":
        token = provider.token(aud="someone-else")
    elif case == "issuer":
        token = provider.token(iss="https://evil.example.org")
    elif case == "none":
        token = _forge({"alg": "none"}, base, b"")
    elif case == "hs256":
        pem = (
            provider.keys["k1"]
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        head = _forge({"alg": "HS256", "kid": "k1"}, base, b"").rsplit(".", 1)[0]
        token = head + "." + _b64(hmac.new(pem, head.encode(), hashlib.sha256).digest())
    elif case == "es256-kid-of-rsa":
        key = ec.generate_private_key(ec.SECP256R1())
        token = jwt.encode(base, key, algorithm="ES256", headers={"kid": "k1"})
        v = IdTokenVerifier(v.keys, ("broker",), ("RS256", "ES256"))
    elif case == "unknown-kid":
        token = jwt.encode(base, _rsa(), algorithm="RS256", headers={"kid": "k9"})
    elif case == "nonce":
        token, nonce = provider.token(), "another"
    elif case == "no-sub":
        token = provider.token(sub=None)
    elif case == "garbage":
        token = "not.a.jwt"
    else:
        token = provider.token(aud=["broker", "other"], azp="other")
    with pytest.raises(Unauthenticated) as info:
        await v.verify(token, nonce, clock.now())
    assert message in str(info.value) and "\n" not in str(info.value)
    assert token not in str(info.value)


async def test_unknown_kid_fetches_the_jwks_again_at_most_once_per_interval(
    provider: Provider, clock: FakeClock
) -> None:
    v = verifier(provider, clock)
    await v.verify(provider.token(), "n-1", clock.now())
    assert v.keys.fetches == 1
    provider.keys["k2"] = _rsa()  # the provider rotates: a new kid
    clock.advance(seconds=5)
    with pytest.raises(Unauthenticated):  # too soon after the last fetch: not fetched again
        await v.verify(provider.token("k2"), "n-1", clock.now())
    assert v.keys.fetches == 1
    clock.advance(seconds=30)
    claims = await v.verify(provider.token("k2"), "n-1", clock.now())
    assert claims["sub"] == "alice" and v.keys.fetches == 2
    await v.verify(provider.token("k1"), "n-1", clock.now())  # known: no fetch
    assert v.keys.fetches == 2


async def test_a_discovery_document_for_another_issuer_is_refused(clock: FakeClock) -> None:
    def fetch(url: str) -> bytes:
        return json.dumps({"issuer": "https://other", "jwks_uri": "https://other/j"}).encode()

    v = IdTokenVerifier(ProviderKeys(ISSUER, clock, fetch=fetch), ("broker",))
    with pytest.raises(Unavailable, match="does not name issuer"):
        await v.verify(Provider().token(), "n-1", clock.now())


def test_jwks_private_material_and_symmetric_keys_are_ignored() -> None:
    from broker.operators.oidc import _parse_keys

    key = _rsa()
    private = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key)) | {"kid": "p"}
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key())) | {"kid": "ok"}
    octet = {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"}
    keys = _parse_keys(json.dumps({"keys": [private, public, octet]}).encode())
    assert set(keys) == {"ok"}
