"""JWT attestation: every refusal the issue lists, and the claim template."""

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

from broker.attestation import (
    JwtAttestor,
    attestor_resource,
    hash_token,
    new_join_token,
    replay_key,
    template_can_yield,
    token_expiry,
    token_fingerprint,
)
from broker.errors import InvalidArgument, Unauthenticated
from ca.layout import IdentityLayout

NOW = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)
ISSUER = "https://kubernetes.default.svc"
TEMPLATE = "spiffe://{td}/ns/{kubernetes.io.namespace}/sa/{kubernetes.io.serviceaccount.name}"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _jwk(key: Any, kid: str) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPublicKey):
        doc = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key))
    else:
        doc = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key))
    doc["kid"] = kid
    return dict(doc)


@pytest.fixture(scope="module")
def attestor(rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> JwtAttestor:
    jwks = {"keys": [_jwk(rsa_key.public_key(), "rsa1"), _jwk(ec_key.public_key(), "ec1")]}
    return JwtAttestor.build(
        name="k8s",
        issuer=ISSUER,
        audience="broker",
        jwks_json=json.dumps(jwks),
        template=TEMPLATE,
        algorithms=("RS256", "ES256"),
        trust_domain="example.org",
    )


def _claims(**over: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": "broker",
        "sub": "system:serviceaccount:shop:web",
        "exp": int((NOW + dt.timedelta(minutes=10)).timestamp()),
        "nbf": int((NOW - dt.timedelta(minutes=1)).timestamp()),
        "kubernetes.io": {"namespace": "shop", "serviceaccount": {"name": "web"}},
    }
    claims.update(over)
    return claims


def _sign(key: Any, claims: dict[str, Any], alg: str = "RS256", kid: str = "rsa1") -> str:
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_a_valid_token_maps_to_the_templated_id(attestor: JwtAttestor, rsa_key: Any) -> None:
    claims = attestor.verify(_sign(rsa_key, _claims()), NOW)
    assert attestor.spiffe_id_for(claims) == "spiffe://example.org/ns/shop/sa/web"


def test_an_ec_signed_token_verifies(attestor: JwtAttestor, ec_key: Any) -> None:
    token = _sign(ec_key, _claims(), alg="ES256", kid="ec1")
    assert attestor.verify(token, NOW)["sub"] == "system:serviceaccount:shop:web"


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        (_claims(aud="someone-else"), "audience"),
        (_claims(iss="https://evil.example"), "issuer"),
        (_claims(exp=int((NOW - dt.timedelta(seconds=1)).timestamp())), "expired"),
        (_claims(nbf=int((NOW + dt.timedelta(minutes=5)).timestamp())), "not valid yet"),
    ],
)
def test_wrong_claims_are_refused(
    attestor: JwtAttestor, rsa_key: Any, claims: dict[str, Any], message: str
) -> None:
    with pytest.raises(Unauthenticated, match=message):
        attestor.verify(_sign(rsa_key, claims), NOW)


def test_a_token_without_exp_is_refused(attestor: JwtAttestor, rsa_key: Any) -> None:
    claims = _claims()
    del claims["exp"]
    with pytest.raises(Unauthenticated, match="exp"):
        attestor.verify(_sign(rsa_key, claims), NOW)


def test_alg_none_is_refused(attestor: JwtAttestor) -> None:
    header = _b64(json.dumps({"alg": "none", "kid": "rsa1", "typ": "JWT"}).encode())
    payload = _b64(json.dumps(_claims()).encode())
    with pytest.raises(Unauthenticated, match="not allowed"):
        attestor.verify(f"{header}.{payload}.", NOW)


def test_hs256_signed_with_the_public_key_is_refused(attestor: JwtAttestor, rsa_key: Any) -> None:
    """Key confusion: an HMAC keyed with the issuer's public key (which anyone has)."""
    public_pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = _b64(json.dumps({"alg": "HS256", "kid": "rsa1", "typ": "JWT"}).encode())
    payload = _b64(json.dumps(_claims()).encode())
    signature = hmac.new(public_pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    with pytest.raises(Unauthenticated, match="not allowed"):
        attestor.verify(f"{header}.{payload}.{_b64(signature)}", NOW)


def test_rs256_header_naming_the_ec_key_is_refused(attestor: JwtAttestor, rsa_key: Any) -> None:
    with pytest.raises(Unauthenticated, match="cannot verify"):
        attestor.verify(_sign(rsa_key, _claims(), kid="ec1"), NOW)


def test_unknown_kid_is_refused(attestor: JwtAttestor, rsa_key: Any) -> None:
    with pytest.raises(Unauthenticated, match="kid is unknown"):
        attestor.verify(_sign(rsa_key, _claims(), kid="rotated-away"), NOW)


def test_a_forged_signature_is_refused(attestor: JwtAttestor) -> None:
    impostor = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(Unauthenticated, match="signature"):
        attestor.verify(_sign(impostor, _claims()), NOW)


def test_a_tampered_payload_is_refused(attestor: JwtAttestor, rsa_key: Any) -> None:
    header, _, signature = _sign(rsa_key, _claims()).split(".")
    evil = _claims(
        **{"kubernetes.io": {"namespace": "kube-system", "serviceaccount": {"name": "x"}}}
    )
    with pytest.raises(Unauthenticated, match="signature"):
        attestor.verify(f"{header}.{_b64(json.dumps(evil).encode())}.{signature}", NOW)


@pytest.mark.parametrize("value", ["a/b", "..", "", "x y"])
def test_a_claim_that_is_not_one_path_segment_is_refused(attestor: JwtAttestor, value: str) -> None:
    claims = _claims(**{"kubernetes.io": {"namespace": value, "serviceaccount": {"name": "web"}}})
    with pytest.raises(Unauthenticated):
        attestor.spiffe_id_for(claims)


def test_a_missing_template_claim_is_refused(attestor: JwtAttestor) -> None:
    with pytest.raises(Unauthenticated, match="lacks the claim"):
        attestor.spiffe_id_for({"iss": ISSUER})


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("algorithms", ("HS256",), "not allowed"),
        ("algorithms", ("none",), "not allowed"),
        ("jwks_json", "not json", "not valid JSON"),
        ("jwks_json", '{"keys": []}', "non-empty"),
        ("jwks_json", '{"keys": [{"kty": "oct", "kid": "h", "k": "c2VjcmV0"}]}', "RSA and EC"),
        ("template", "spiffe://other.org/{x}", "example.org"),
        ("template", "https://x/{y}", "spiffe://"),
        ("name", "Bad Name", "attestor name"),
        # Issue 20 finding 14: templates that can only yield the broker's reserved IDs
        ("template", "spiffe://{td}/broker/operator/{sub}", "reserved"),
        ("template", "spiffe://example.org/broker/server", "reserved"),
        ("template", "spiffe://{td}/broker/{sub}", "reserved"),
    ],
)
def test_bad_attestor_definitions_are_refused(
    rsa_key: Any, field: str, value: Any, message: str
) -> None:
    args: dict[str, Any] = dict(
        name="k8s",
        issuer=ISSUER,
        audience="broker",
        jwks_json=json.dumps({"keys": [_jwk(rsa_key.public_key(), "rsa1")]}),
        template=TEMPLATE,
        algorithms=("RS256",),
        trust_domain="example.org",
    )
    args[field] = value
    with pytest.raises(InvalidArgument, match=message):
        JwtAttestor.build(**args)


def test_a_jwks_with_private_material_is_refused(rsa_key: Any) -> None:
    private = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key))
    private["kid"] = "oops"
    with pytest.raises(InvalidArgument, match="private"):
        JwtAttestor.build(
            name="k8s",
            issuer=ISSUER,
            audience="broker",
            jwks_json=json.dumps({"keys": [private]}),
            template=TEMPLATE,
            algorithms=(),
            trust_domain="example.org",
        )


def test_join_tokens_are_random_and_only_their_hash_is_kept() -> None:
    a, b = new_join_token(), new_join_token()
    assert a != b and len(a) > 40
    assert hash_token(a) == hashlib.sha256(a.encode()).digest()
    assert a not in token_fingerprint(a) and token_fingerprint(a).startswith("sha256:")


def test_a_template_that_may_yield_other_ids_is_accepted(rsa_key: Any) -> None:
    """Only templates that can *only* make reserved IDs are refused at add time; a claim that
    happens to say "broker" is refused by the CA at mint time (tests/integration)."""
    attestor = JwtAttestor.build(
        name="k8s",
        issuer=ISSUER,
        audience="broker",
        jwks_json=json.dumps({"keys": [_jwk(rsa_key.public_key(), "rsa1")]}),
        template="spiffe://{td}/{sub}/x",
        algorithms=("RS256",),
        trust_domain="example.org",
    )
    assert attestor.template == "spiffe://{td}/{sub}/x"


def test_a_token_valid_for_more_than_a_day_is_refused(attestor: JwtAttestor, rsa_key: Any) -> None:
    """The replay cache keeps a token's record until its exp: exp is bounded to keep it small."""
    far = int((NOW + dt.timedelta(hours=24, seconds=1)).timestamp())
    with pytest.raises(Unauthenticated, match="more than 24h"):
        attestor.verify(_sign(rsa_key, _claims(exp=far)), NOW)
    near = int((NOW + dt.timedelta(hours=24)).timestamp())
    claims = attestor.verify(_sign(rsa_key, _claims(exp=near)), NOW)
    assert token_expiry(claims) == NOW + dt.timedelta(hours=24)


def test_the_replay_key_is_the_jti_or_the_tokens_hash(rsa_key: Any) -> None:
    token = _sign(rsa_key, _claims(jti="abc-1"))
    assert replay_key(token, {"jti": "abc-1"}) == "jti:abc-1"
    hashed = "sha256:" + hashlib.sha256(token.encode()).hexdigest()
    for claims in ({}, {"jti": ""}, {"jti": 7}, {"jti": "x" * 257}, {"jti": "a\nb"}):
        assert replay_key(token, claims) == hashed


# -- which templates can yield a production identity -----------------------------------------

DEFAULT_LAYOUT = IdentityLayout()  # {tenant}/{environment}/{service}
K8S_LAYOUT = IdentityLayout("ns/{environment}/sa/{service}", default_tenant="default")


@pytest.mark.parametrize(
    ("template", "layout", "can"),
    [
        # the environment segment is a claim: a token saying "prod" yields a prod ID
        (TEMPLATE, DEFAULT_LAYOUT, True),
        ("spiffe://{td}/acme/{env}/web", DEFAULT_LAYOUT, True),
        ("spiffe://{td}/{a}/{b}/{c}/{d}", DEFAULT_LAYOUT, True),
        ("spiffe://{td}/acme/prod/{sa}", DEFAULT_LAYOUT, True),
        # part of a segment is enough ("p" + "rod")
        ("spiffe://{td}/acme/p{x}/web", DEFAULT_LAYOUT, True),
        ("spiffe://{td}/ns/{n}/sa/{s}", K8S_LAYOUT, True),
        # a literal non-prod environment, too few segments, a literal the layout does not have
        ("spiffe://{td}/acme/dev/{sa}", DEFAULT_LAYOUT, False),
        ("spiffe://{td}/acme/staging{x}/web", DEFAULT_LAYOUT, False),
        ("spiffe://{td}/ci/{repository}", DEFAULT_LAYOUT, False),
        ("spiffe://{td}/k8s/{n}/sa/{s}", K8S_LAYOUT, False),
        ("spiffe://{td}/ns/dev/sa/{s}", K8S_LAYOUT, False),
        # {td} is the trust domain, never a claim
        ("spiffe://{td}/acme/{td}/web", DEFAULT_LAYOUT, False),
    ],
)
def test_template_can_yield_prod(template: str, layout: IdentityLayout, can: bool) -> None:
    assert template_can_yield(template, "example.org", layout, "prod") is can


def test_the_verdict_matches_what_a_token_makes(attestor: JwtAttestor) -> None:
    """The template said to yield prod does yield a prod ID from a token with those claims."""
    assert template_can_yield(TEMPLATE, "example.org", DEFAULT_LAYOUT, "prod")
    made = attestor.spiffe_id_for(
        {"kubernetes.io": {"namespace": "prod", "serviceaccount": {"name": "web"}}}
    )
    assert DEFAULT_LAYOUT.parse(made).environment == "prod"


def test_the_attestor_resource_names_its_whole_definition(rsa_key: Any, ec_key: Any) -> None:
    jwks = json.dumps({"keys": [_jwk(rsa_key.public_key(), "rsa1")]})
    base = ("k8s", ISSUER, "broker", jwks, TEMPLATE, ("RS256",))
    name = attestor_resource(*base)
    assert name.startswith("attestor:k8s@sha256:") and len(name) == len("attestor:k8s@sha256:") + 64
    # The same definition with its JWKS written differently names the same resource ...
    reordered = json.dumps(json.loads(jwks), sort_keys=True, indent=2)
    assert attestor_resource("k8s", ISSUER, "broker", reordered, TEMPLATE, ("RS256",)) == name
    # ... and every change of what it trusts or yields names another one.
    others = json.dumps({"keys": [_jwk(ec_key.public_key(), "rsa1")]})
    for changed in (
        ("k8s", ISSUER, "broker", others, TEMPLATE, ("RS256",)),
        ("k8s", "https://evil", "broker", jwks, TEMPLATE, ("RS256",)),
        ("k8s", ISSUER, "other", jwks, TEMPLATE, ("RS256",)),
        ("k8s", ISSUER, "broker", jwks, "spiffe://{td}/acme/prod/{sa}", ("RS256",)),
        ("k8s", ISSUER, "broker", jwks, TEMPLATE, ("RS256", "ES256")),
        ("k9s", ISSUER, "broker", jwks, TEMPLATE, ("RS256",)),
    ):
        assert attestor_resource(*changed) != name, changed
