from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from ca.errors import (
    IntegrityError,
    InvalidInput,
    InvalidSpiffeId,
    InvalidTTL,
    PolicyViolation,
)
from ca.jwtsvid import (
    JWTSVID,
    SPIFFE_JWT_ALGORITHMS,
    jwt_kid,
    mint_jwt_svid,
    public_jwk,
    public_key_from_jwk,
    validate_jwt_svid,
)
from tests.unit.ca.signers import NoExportSigner

NOW = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
SUB = "spiffe://example.org/acme/prod/web"
AUD = "spiffe://example.org/acme/prod/db"
FIVE_MIN = dt.timedelta(minutes=5)


@pytest.fixture(scope="module")
def signer() -> NoExportSigner:
    return NoExportSigner(ec.generate_private_key(ec.SECP256R1()))


@pytest.fixture(scope="module")
def keys(signer: NoExportSigner) -> dict[str, Any]:
    return {jwt_kid(signer.public_key()): signer.public_key()}


@pytest.fixture(scope="module")
def token(signer: NoExportSigner) -> str:
    return mint_jwt_svid(signer, SUB, AUD, NOW, FIVE_MIN).token


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(value: object) -> str:
    return b64(json.dumps(value, separators=(",", ":")).encode())


def sign_es256(
    signer: ec.EllipticCurvePrivateKey, header: dict[str, Any], claims: dict[str, Any]
) -> str:
    """Craft arbitrary (possibly invalid) tokens with a valid ES256 signature."""
    signing_input = f"{b64json(header)}.{b64json(claims)}"
    r, s = decode_dss_signature(signer.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    return f"{signing_input}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def good_header(signer: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    return {"alg": "ES256", "kid": jwt_kid(signer.public_key()), "typ": "JWT"}


def good_claims() -> dict[str, Any]:
    iat = int(NOW.timestamp())
    return {"sub": SUB, "aud": AUD, "exp": iat + 300, "iat": iat}


def split(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    header, payload, _ = token.split(".")
    pad = lambda s: s + "=" * (-len(s) % 4)  # noqa: E731
    return (
        json.loads(base64.urlsafe_b64decode(pad(header))),
        json.loads(base64.urlsafe_b64decode(pad(payload))),
    )


# --- minting -----------------------------------------------------------------------------------


def test_minted_header_and_claims(signer: NoExportSigner) -> None:
    svid = mint_jwt_svid(signer, SUB, AUD, NOW, FIVE_MIN)
    header, claims = split(svid.token)
    assert header == {"alg": "ES256", "kid": jwt_kid(signer.public_key()), "typ": "JWT"}
    assert claims["sub"] == SUB
    assert claims["aud"] == AUD  # one audience: a plain string
    assert claims["iat"] == int(NOW.timestamp())
    assert claims["exp"] == int((NOW + FIVE_MIN).timestamp())
    assert isinstance(claims["jti"], str) and len(claims["jti"]) >= 22
    assert set(claims) == {"sub", "aud", "exp", "iat", "jti"}
    assert svid.kid == header["kid"]
    assert svid.expires_at == NOW + FIVE_MIN
    assert svid.issued_at == NOW
    assert svid.audience == (AUD,)


def test_token_kept_out_of_repr(signer: NoExportSigner) -> None:
    svid = mint_jwt_svid(signer, SUB, AUD, NOW, FIVE_MIN)
    assert svid.token not in repr(svid)
    assert svid.token.split(".")[2] not in repr(svid)
    assert isinstance(svid, JWTSVID)


def test_multiple_audiences_are_a_list(signer: NoExportSigner) -> None:
    svid = mint_jwt_svid(signer, SUB, ["a", "b", "a"], NOW, FIVE_MIN)
    assert split(svid.token)[1]["aud"] == ["a", "b"]


def test_jti_is_random(signer: NoExportSigner) -> None:
    jtis = {mint_jwt_svid(signer, SUB, AUD, NOW, FIVE_MIN).jti for _ in range(50)}
    assert len(jtis) == 50


def test_minted_token_verifies_with_pyjwt(signer: NoExportSigner, token: str) -> None:
    claims = jwt.decode(
        token,
        signer.public_key(),
        algorithms=["ES256"],
        audience=AUD,
        options={"verify_exp": False, "verify_iat": False},
    )
    assert claims["sub"] == SUB
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "ES256"


def test_es384_with_p384() -> None:
    signer = NoExportSigner(ec.generate_private_key(ec.SECP384R1()))
    svid = mint_jwt_svid(signer, SUB, AUD, NOW, FIVE_MIN)
    assert split(svid.token)[0]["alg"] == "ES384"
    assert len(base64.urlsafe_b64decode(svid.token.split(".")[2] + "==")) == 96
    claims = validate_jwt_svid(svid.token, AUD, {svid.kid: signer.public_key()}, NOW)
    assert claims["sub"] == SUB
    jwt.decode(
        svid.token,
        signer.public_key(),
        algorithms=["ES384"],
        audience=AUD,
        options={"verify_exp": False, "verify_iat": False},
    )


def test_explicit_kid(signer: NoExportSigner) -> None:
    svid = mint_jwt_svid(signer, SUB, AUD, NOW, FIVE_MIN, kid="gen-7")
    assert split(svid.token)[0]["kid"] == "gen-7"
    validate_jwt_svid(svid.token, AUD, {"gen-7": signer.public_key()}, NOW)


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"ttl": dt.timedelta(0)}, InvalidTTL, "at least 1s"),
        ({"ttl": dt.timedelta(seconds=-5)}, InvalidTTL, "at least 1s"),
        ({"ttl": dt.timedelta(hours=25)}, PolicyViolation, "hard ceiling of 24h"),
        ({"audience": []}, InvalidInput, "audience is required"),
        ({"audience": [""]}, InvalidInput, "non-empty string"),
        ({"spiffe_id": "spiffe://example.org"}, InvalidSpiffeId, "has no path"),
        ({"kid": ""}, InvalidInput, "kid must be a non-empty string"),
        ({"spiffe_id": "spiffe://example.org/../x"}, InvalidSpiffeId, "'..'"),
    ],
)
def test_mint_refusals(
    signer: NoExportSigner, kwargs: dict[str, Any], error: type[Exception], fragment: str
) -> None:
    args: dict[str, Any] = {"spiffe_id": SUB, "audience": AUD, "now": NOW, "ttl": FIVE_MIN}
    args.update(kwargs)
    with pytest.raises(error, match=fragment):
        mint_jwt_svid(signer, **args)


# --- kid / JWK ---------------------------------------------------------------------------------


def test_jwt_kid_rfc7638_example() -> None:
    # RFC 7638, section 3.1.
    key = public_key_from_jwk(
        {
            "kty": "RSA",
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1"
            "L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5"
            "v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08q"
            "NLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awa"
            "pJzKnqDKgw",
            "e": "AQAB",
        }
    )
    assert jwt_kid(key) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_jwt_kid_ec_is_thumbprint_of_pyjwt_jwk(signer: NoExportSigner) -> None:
    members = jwt.algorithms.ECAlgorithm.to_jwk(signer.public_key(), as_dict=True)
    canonical = json.dumps(
        {k: members[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"), sort_keys=True
    )
    expected = b64(hashlib.sha256(canonical.encode()).digest())
    assert jwt_kid(signer.public_key()) == expected
    assert public_jwk(signer.public_key()) == {k: members[k] for k in ("kty", "crv", "x", "y")}


def test_jwk_round_trip() -> None:
    for key in (
        ec.generate_private_key(ec.SECP256R1()).public_key(),
        ec.generate_private_key(ec.SECP384R1()).public_key(),
        rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key(),
    ):
        assert public_key_from_jwk(public_jwk(key)) == key


@pytest.mark.parametrize(
    ("jwk", "fragment"),
    [
        ({"kty": "oct", "k": "AAAA"}, "kty 'oct'"),
        ({"kty": "EC", "crv": "P-192", "x": "AA", "y": "AA"}, "crv 'P-192'"),
        ({"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}, "32 bytes"),
        ({"kty": "EC", "crv": "P-256", "x": "A" * 43, "y": "A" * 43}, "not on curve"),
        ({"kty": "EC", "crv": "P-256", "x": "!!", "y": "AA"}, "not base64url"),
        ({"kty": "RSA", "n": "AQAB", "e": "AQAB"}, "under 2048 bits"),
    ],
)
def test_bad_jwks_refused(jwk: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InvalidInput, match=fragment):
        public_key_from_jwk(jwk)


# --- validation: the happy path ----------------------------------------------------------------


def test_validate_round_trip(token: str, keys: dict[str, Any]) -> None:
    claims = validate_jwt_svid(token, AUD, keys, NOW)
    assert claims["sub"] == SUB
    assert claims["aud"] == AUD
    validate_jwt_svid(token, AUD, keys, NOW, trust_domain="example.org")


def test_validate_one_of_many_audiences(signer: NoExportSigner, keys: dict[str, Any]) -> None:
    token = mint_jwt_svid(signer, SUB, ["x", AUD], NOW, FIVE_MIN).token
    assert validate_jwt_svid(token, AUD, keys, NOW)["aud"] == ["x", AUD]


def test_typ_jose_and_absent_typ_accepted(signer: NoExportSigner, keys: dict[str, Any]) -> None:
    for header in (
        {**good_header(signer), "typ": "JOSE"},
        {"alg": "ES256", "kid": next(iter(keys))},
    ):
        validate_jwt_svid(sign_es256(signer, header, good_claims()), AUD, keys, NOW)


# --- validation: refusals ------------------------------------------------------------------------


def test_alg_none_refused(keys: dict[str, Any]) -> None:
    token = f"{b64json({'alg': 'none', 'typ': 'JWT'})}.{b64json(good_claims())}."
    with pytest.raises(IntegrityError, match="algorithm 'none' is not allowed"):
        validate_jwt_svid(token, AUD, keys, NOW)


def test_alg_checked_before_anything_else(keys: dict[str, Any]) -> None:
    # Unknown kid, bad typ, extra header and no signature: the alg is what gets reported.
    header = {"alg": "none", "kid": "nope", "typ": "weird", "jku": "https://evil"}
    token = f"{b64json(header)}.{b64json({'sub': 'x'})}."
    with pytest.raises(IntegrityError, match="algorithm 'none'"):
        validate_jwt_svid(token, AUD, keys, NOW)


def test_hs256_with_public_key_as_secret_refused(
    signer: NoExportSigner, keys: dict[str, Any]
) -> None:
    secret = signer.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "kid": next(iter(keys)), "typ": "JWT"}
    signing_input = f"{b64json(header)}.{b64json(good_claims())}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    token = f"{signing_input}.{b64(mac)}"
    with pytest.raises(IntegrityError, match="algorithm 'HS256' is not allowed"):
        validate_jwt_svid(token, AUD, keys, NOW)


def test_wrong_audience_refused(token: str, keys: dict[str, Any]) -> None:
    with pytest.raises(IntegrityError, match="audience does not include 'other'"):
        validate_jwt_svid(token, "other", keys, NOW)


def test_expired_refused(token: str, keys: dict[str, Any]) -> None:
    exp = NOW + FIVE_MIN
    with pytest.raises(IntegrityError, match="expired at 2026-03-01T12:05:00"):
        validate_jwt_svid(token, AUD, keys, exp)
    validate_jwt_svid(token, AUD, keys, exp - dt.timedelta(seconds=1))
    validate_jwt_svid(token, AUD, keys, exp, leeway=5)
    with pytest.raises(IntegrityError, match="expired"):
        validate_jwt_svid(token, AUD, keys, exp + dt.timedelta(seconds=5), leeway=5)


def test_unknown_kid_refused(token: str, signer: NoExportSigner) -> None:
    with pytest.raises(IntegrityError, match=r"kid .* is not in the trust bundle"):
        validate_jwt_svid(token, AUD, {"someone-else": signer.public_key()}, NOW)


def test_missing_kid_refused(signer: NoExportSigner, keys: dict[str, Any]) -> None:
    token = sign_es256(signer, {"alg": "ES256", "typ": "JWT"}, good_claims())
    with pytest.raises(IntegrityError, match="no kid"):
        validate_jwt_svid(token, AUD, keys, NOW)


def test_tampered_payload_refused(token: str, keys: dict[str, Any]) -> None:
    header, _payload, signature = token.split(".")
    claims = split(token)[1]
    claims["sub"] = "spiffe://example.org/acme/prod/admin"
    forged = f"{header}.{b64json(claims)}.{signature}"
    with pytest.raises(IntegrityError, match="signature does not verify"):
        validate_jwt_svid(forged, AUD, keys, NOW)


def test_tampered_signature_refused(token: str, keys: dict[str, Any]) -> None:
    header, payload, signature = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(signature + "=="))
    raw[10] ^= 0x01
    with pytest.raises(IntegrityError, match="signature does not verify"):
        validate_jwt_svid(f"{header}.{payload}.{b64(bytes(raw))}", AUD, keys, NOW)


def test_signed_by_other_key_refused(keys: dict[str, Any]) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    header = {"alg": "ES256", "kid": next(iter(keys)), "typ": "JWT"}
    with pytest.raises(IntegrityError, match="signature does not verify"):
        validate_jwt_svid(sign_es256(other, header, good_claims()), AUD, keys, NOW)


@pytest.mark.parametrize("claim", ["aud", "exp", "sub"])
def test_missing_required_claim_refused(
    signer: NoExportSigner, keys: dict[str, Any], claim: str
) -> None:
    claims = good_claims()
    del claims[claim]
    with pytest.raises(IntegrityError, match=f"'{claim}'"):
        validate_jwt_svid(sign_es256(signer, good_header(signer), claims), AUD, keys, NOW)


def test_empty_audience_claim_refused(signer: NoExportSigner, keys: dict[str, Any]) -> None:
    claims = {**good_claims(), "aud": []}
    with pytest.raises(IntegrityError, match="'aud'"):
        validate_jwt_svid(sign_es256(signer, good_header(signer), claims), AUD, keys, NOW)


@pytest.mark.parametrize(
    ("header_update", "fragment"),
    [
        ({"typ": "at+jwt"}, "typ 'at\\+jwt' is not allowed"),
        ({"jku": "https://evil.example/keys"}, "parameter\\(s\\) jku are not allowed"),
        ({"crit": ["exp"]}, "crit"),
    ],
)
def test_header_restrictions(
    signer: NoExportSigner, keys: dict[str, Any], header_update: dict[str, Any], fragment: str
) -> None:
    header = {**good_header(signer), **header_update}
    with pytest.raises(IntegrityError, match=fragment):
        validate_jwt_svid(sign_es256(signer, header, good_claims()), AUD, keys, NOW)


def test_key_type_must_match_alg(signer: NoExportSigner) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    kid = jwt_kid(signer.public_key())
    token = sign_es256(signer, good_header(signer), good_claims())
    with pytest.raises(IntegrityError, match="cannot verify ES256"):
        validate_jwt_svid(token, AUD, {kid: rsa_key.public_key()}, NOW)
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    with pytest.raises(IntegrityError, match="cannot verify ES256"):
        validate_jwt_svid(token, AUD, {kid: p384}, NOW)


def test_rs256_from_a_federated_issuer_accepted() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    header = {"alg": "RS256", "kid": "rsa-1", "typ": "JWT"}
    signing_input = f"{b64json(header)}.{b64json(good_claims())}"
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    token = f"{signing_input}.{b64(signature)}"
    assert validate_jwt_svid(token, AUD, {"rsa-1": key.public_key()}, NOW)["sub"] == SUB
    with pytest.raises(IntegrityError, match="'RS256' is not allowed"):
        validate_jwt_svid(
            token, AUD, {"rsa-1": key.public_key()}, NOW, allowed_algorithms={"ES256"}
        )


def test_not_yet_valid_refused(signer: NoExportSigner, keys: dict[str, Any]) -> None:
    claims = {**good_claims(), "nbf": int(NOW.timestamp()) + 60}
    with pytest.raises(IntegrityError, match="not valid yet"):
        validate_jwt_svid(sign_es256(signer, good_header(signer), claims), AUD, keys, NOW)


@pytest.mark.parametrize("exp", ["soon", True, None, [1]])
def test_non_numeric_exp_refused(signer: NoExportSigner, keys: dict[str, Any], exp: Any) -> None:
    claims = {**good_claims(), "exp": exp}
    with pytest.raises(IntegrityError):
        validate_jwt_svid(sign_es256(signer, good_header(signer), claims), AUD, keys, NOW)


@pytest.mark.parametrize("sub", ["web", "spiffe://example.org", "spiffe://EXAMPLE.org/x", 7])
def test_bad_subject_refused(signer: NoExportSigner, keys: dict[str, Any], sub: Any) -> None:
    claims = {**good_claims(), "sub": sub}
    with pytest.raises(IntegrityError):
        validate_jwt_svid(sign_es256(signer, good_header(signer), claims), AUD, keys, NOW)


def test_other_trust_domain_refused(token: str, keys: dict[str, Any]) -> None:
    with pytest.raises(IntegrityError, match=r"not in trust domain 'other.org'"):
        validate_jwt_svid(token, AUD, keys, NOW, trust_domain="other.org")


@pytest.mark.parametrize(
    ("token", "fragment"),
    [
        ("", "empty"),
        ("abc", "compact serialization"),
        ("a.b", "compact serialization"),
        ("a.b.c.d", "compact serialization"),
        ("!!!.e30.", "not base64url"),
        (f"{b64(b'not json')}.e30.", "not valid JSON"),
        (f"{b64(b'[1]')}.e30.", "not a JSON object"),
        ("x" * 20000, "over the limit"),
    ],
)
def test_malformed_tokens_are_invalid_input(
    keys: dict[str, Any], token: str, fragment: str
) -> None:
    with pytest.raises(InvalidInput, match=fragment):
        validate_jwt_svid(token, AUD, keys, NOW)


def test_validator_cannot_be_configured_with_hmac(token: str, keys: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput, match="HS256 are not JWT-SVID algorithms"):
        validate_jwt_svid(token, AUD, keys, NOW, allowed_algorithms={"ES256", "HS256"})
    assert "HS256" not in SPIFFE_JWT_ALGORITHMS
    assert "none" not in SPIFFE_JWT_ALGORITHMS
