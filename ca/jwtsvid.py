"""JWT-SVIDs: minting with an HSM-friendly signer, and strict validation.

Minting never hands a private key to a JWT library: the signing input (`b64url(header) "."
b64url(claims)`) is built here and signed with `signer.sign(data, ECDSA(hash))`, which may run in
an HSM; the DER signature is converted to the fixed-width raw `r || s` JWS wants. The header
carries only `alg`, `kid`, `typ` ("JWT"); the claims are `sub`, `aud` (a string for one audience),
`exp`, `iat` and a random `jti`.

Validation checks `alg` against the SPIFFE list before anything else, then the header, the key
(by `kid`), the signature (PyJWT), and `aud`/`exp`/`sub` against an injected `now`. Malformed
tokens raise `InvalidInput`; well-formed tokens that do not validate raise `IntegrityError`.

`kid` is the RFC 7638 JWK thumbprint of the public key (`jwt_kid`), so it is stable, derived
from public data only, and identical in the trust bundle.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import hashlib
import json
import math
import re
import secrets
from collections.abc import Collection, Mapping, Sequence
from typing import Any, Final

import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from ca.clock import utc
from ca.duration import format_duration
from ca.errors import (
    CAStateError,
    IntegrityError,
    InvalidInput,
    InvalidSpiffeId,
    InvalidTTL,
    PolicyViolation,
)
from ca.policy import HARD_MAX_TTL
from ca.spiffeid import SpiffeId, TrustDomain

__all__ = [
    "ALLOWED_HEADER_PARAMETERS",
    "JWTSVID",
    "MAX_TOKEN_BYTES",
    "SPIFFE_JWT_ALGORITHMS",
    "JWTPublicKey",
    "jwt_kid",
    "mint_jwt_svid",
    "public_jwk",
    "public_key_from_jwk",
    "validate_jwt_svid",
]

JWTPublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
"""Key types a JWT-SVID may be verified with (the SPIFFE algorithm list is RS/PS/ES only)."""

SPIFFE_JWT_ALGORITHMS: Final = frozenset(
    {"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512"}
)
ALLOWED_HEADER_PARAMETERS: Final = frozenset({"alg", "kid", "typ"})
MAX_TOKEN_BYTES: Final = 16384

_CURVES: Final[dict[str, tuple[str, str, type[hashes.HashAlgorithm], int]]] = {
    # curve name -> (JWK crv, JWS alg, hash, coordinate bytes)
    "secp256r1": ("P-256", "ES256", hashes.SHA256, 32),
    "secp384r1": ("P-384", "ES384", hashes.SHA384, 48),
    "secp521r1": ("P-521", "ES512", hashes.SHA512, 66),
}
_CRV_TO_CURVE: Final[dict[str, ec.EllipticCurve]] = {
    "P-256": ec.SECP256R1(),
    "P-384": ec.SECP384R1(),
    "P-521": ec.SECP521R1(),
}
_MIN_TTL: Final = dt.timedelta(seconds=1)
_B64URL: Final = re.compile(r"[A-Za-z0-9_-]+")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str, what: str) -> bytes:
    # The stdlib decoder silently skips characters outside the alphabet: check them first.
    if not isinstance(text, str) or not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise InvalidInput(f"{what} is not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{what} is not base64url") from None


def _uint_b64(value: int, length: int | None = None) -> str:
    size = length if length is not None else max(1, (value.bit_length() + 7) // 8)
    return _b64url(value.to_bytes(size, "big"))


def public_jwk(public_key: JWTPublicKey) -> dict[str, str]:
    """The RFC 7517 public members of `public_key` (EC: kty, crv, x, y; RSA: kty, n, e)."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        try:
            crv, _, _, size = _CURVES[public_key.curve.name]
        except KeyError:
            raise InvalidInput(f"EC curve {public_key.curve.name} has no JWK name") from None
        numbers = public_key.public_numbers()
        return {
            "kty": "EC",
            "crv": crv,
            "x": _uint_b64(numbers.x, size),
            "y": _uint_b64(numbers.y, size),
        }
    if isinstance(public_key, rsa.RSAPublicKey):
        rsa_numbers = public_key.public_numbers()
        return {"kty": "RSA", "n": _uint_b64(rsa_numbers.n), "e": _uint_b64(rsa_numbers.e)}
    raise InvalidInput(f"{type(public_key).__name__} cannot be a JWT-SVID key (EC or RSA only)")


def public_key_from_jwk(jwk: Mapping[str, Any]) -> JWTPublicKey:
    """Rebuild a public key from its JWK members; `InvalidInput` if malformed or unsupported."""
    kty = jwk.get("kty")
    if kty == "EC":
        crv = jwk.get("crv")
        if crv not in _CRV_TO_CURVE:
            raise InvalidInput(f"JWK crv {crv!r} is not supported (P-256, P-384, P-521)")
        curve = _CRV_TO_CURVE[crv]
        size = _CURVES[curve.name][3]
        x = _b64url_decode(jwk.get("x", ""), "JWK member 'x'")
        y = _b64url_decode(jwk.get("y", ""), "JWK member 'y'")
        if len(x) != size or len(y) != size:
            raise InvalidInput(f"JWK coordinates for {crv} must be {size} bytes each")
        try:
            return ec.EllipticCurvePublicNumbers(
                int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve
            ).public_key()
        except ValueError:
            raise InvalidInput(f"JWK point is not on curve {crv}") from None
    if kty == "RSA":
        n = int.from_bytes(_b64url_decode(jwk.get("n", ""), "JWK member 'n'"), "big")
        e = int.from_bytes(_b64url_decode(jwk.get("e", ""), "JWK member 'e'"), "big")
        if n.bit_length() < 2048:
            raise InvalidInput(f"JWK RSA modulus of {n.bit_length()} bits is under 2048 bits")
        try:
            return rsa.RSAPublicNumbers(e, n).public_key()
        except ValueError:
            raise InvalidInput("JWK RSA key is invalid") from None
    raise InvalidInput(f"JWK kty {kty!r} is not supported (EC or RSA)")


def jwt_kid(public_key: JWTPublicKey) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url without padding) of `public_key`."""
    members = public_jwk(public_key)
    required = ("crv", "kty", "x", "y") if members["kty"] == "EC" else ("e", "kty", "n")
    canonical = json.dumps({k: members[k] for k in required}, separators=(",", ":"), sort_keys=True)
    return _b64url(hashlib.sha256(canonical.encode("ascii")).digest())


@dataclasses.dataclass(frozen=True, slots=True)
class JWTSVID:
    """A minted JWT-SVID. `token` is a bearer credential: it is kept out of `repr`."""

    token: str = dataclasses.field(repr=False)
    spiffe_id: SpiffeId
    audience: tuple[str, ...]
    kid: str
    jti: str
    issued_at: dt.datetime
    expires_at: dt.datetime


def _audience_list(audience: Sequence[str] | str) -> tuple[str, ...]:
    values = (audience,) if isinstance(audience, str) else tuple(audience)
    if not values:
        raise InvalidInput("JWT-SVID audience is required (at least one value)")
    for value in values:
        if not isinstance(value, str) or not value:
            raise InvalidInput("each JWT-SVID audience must be a non-empty string")
    return tuple(dict.fromkeys(values))


def mint_jwt_svid(
    signer: ec.EllipticCurvePrivateKey,
    spiffe_id: SpiffeId | str,
    audience: Sequence[str] | str,
    now: dt.datetime,
    ttl: dt.timedelta,
    *,
    kid: str | None = None,
) -> JWTSVID:
    """Sign a JWT-SVID for `spiffe_id` (ES256 on P-256, ES384 on P-384).

    `iat` = floor(now), `exp` = floor(now + ttl). `kid` defaults to `jwt_kid(signer's public key)`.
    Raises `InvalidSpiffeId` (no path), `InvalidInput` (no audience), `InvalidTTL` (under 1 s),
    `PolicyViolation` (over `HARD_MAX_TTL`), `CAStateError` (unsupported curve, or the signer
    produced a signature that does not verify).
    """
    sid = spiffe_id if isinstance(spiffe_id, SpiffeId) else SpiffeId.parse(spiffe_id)
    sid.require_workload()
    audiences = _audience_list(audience)
    if not isinstance(ttl, dt.timedelta) or ttl < _MIN_TTL:
        shown = format_duration(ttl) if isinstance(ttl, dt.timedelta) else repr(ttl)
        raise InvalidTTL(f"JWT-SVID TTL {shown} must be at least 1s")
    if ttl > HARD_MAX_TTL:
        raise PolicyViolation(
            f"JWT-SVID TTL {format_duration(ttl)} exceeds the hard ceiling of "
            f"{format_duration(HARD_MAX_TTL)}"
        )
    try:
        _, alg, hash_cls, size = _CURVES[signer.curve.name]
    except KeyError:
        raise CAStateError(f"JWT signer curve {signer.curve.name} is not supported") from None
    public_key = signer.public_key()
    key_id = kid if kid is not None else jwt_kid(public_key)
    if not isinstance(key_id, str) or not key_id:
        raise InvalidInput("JWT-SVID kid must be a non-empty string")
    now = utc(now)
    issued_at = math.floor(now.timestamp())
    expires_at = math.floor((now + ttl).timestamp())
    jti = _b64url(secrets.token_bytes(16))
    header = {"alg": alg, "kid": key_id, "typ": "JWT"}
    claims: dict[str, Any] = {
        "sub": sid.id_string,
        "aud": audiences[0] if len(audiences) == 1 else list(audiences),
        "exp": expires_at,
        "iat": issued_at,
        "jti": jti,
    }
    signing_input = (
        _b64url(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + _b64url(json.dumps(claims, separators=(",", ":")).encode())
    ).encode("ascii")
    der = signer.sign(signing_input, ec.ECDSA(hash_cls()))
    try:
        # A faulty token or driver must not hand out a token nobody can verify.
        public_key.verify(der, signing_input, ec.ECDSA(hash_cls()))
    except InvalidSignature:
        raise CAStateError("JWT signer produced a signature that does not verify") from None
    r, s = decode_dss_signature(der)
    signature = r.to_bytes(size, "big") + s.to_bytes(size, "big")
    return JWTSVID(
        token=signing_input.decode("ascii") + "." + _b64url(signature),
        spiffe_id=sid,
        audience=audiences,
        kid=key_id,
        jti=jti,
        issued_at=dt.datetime.fromtimestamp(issued_at, dt.UTC),
        expires_at=dt.datetime.fromtimestamp(expires_at, dt.UTC),
    )


def _key_matches_alg(key: object, alg: str) -> bool:
    if alg.startswith("ES"):
        return (
            isinstance(key, ec.EllipticCurvePublicKey)
            and _CURVES.get(key.curve.name, ("", ""))[1] == alg
        )
    return isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048


def _numeric(claims: Mapping[str, Any], name: str) -> float:
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise IntegrityError(f"JWT-SVID claim '{name}' must be a NumericDate (seconds)")
    return float(value)


def validate_jwt_svid(
    token: str,
    audience: str,
    keys_by_kid: Mapping[str, JWTPublicKey],
    now: dt.datetime,
    leeway: float = 0,
    *,
    allowed_algorithms: Collection[str] = SPIFFE_JWT_ALGORITHMS,
    trust_domain: TrustDomain | str | None = None,
) -> dict[str, Any]:
    """Validate `token` for `audience` at `now`; return its claims.

    Order: size and shape (`InvalidInput`), then `alg` in `allowed_algorithms` (a subset of the
    SPIFFE list), header parameters (only alg/kid/typ; typ JWT or JOSE), `kid` known in
    `keys_by_kid` and of the right type for `alg`, signature, `aud`, `exp`, `sub`, `nbf` (all
    `IntegrityError`). `leeway` (seconds) applies to `exp` and `nbf`. If `trust_domain` is given,
    `sub` must be in it.
    """
    if not isinstance(token, str) or not token:
        raise InvalidInput("JWT-SVID is empty or not a string")
    if len(token) > MAX_TOKEN_BYTES:
        raise InvalidInput(f"JWT-SVID is {len(token)} bytes, over the limit of {MAX_TOKEN_BYTES}")
    if not isinstance(audience, str) or not audience:
        raise InvalidInput("the validator's audience must be a non-empty string")
    unsupported = set(allowed_algorithms) - SPIFFE_JWT_ALGORITHMS
    if unsupported:
        raise InvalidInput(
            f"algorithm(s) {', '.join(sorted(unsupported))} are not JWT-SVID algorithms; "
            f"allowed: {', '.join(sorted(SPIFFE_JWT_ALGORITHMS))}"
        )
    parts = token.split(".")
    if len(parts) != 3:
        raise InvalidInput("JWT-SVID is not a JWS compact serialization (header.payload.signature)")
    try:
        header = json.loads(_b64url_decode(parts[0], "JWT-SVID header"))
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput("JWT-SVID header is not valid JSON") from None
    if not isinstance(header, dict):
        raise InvalidInput("JWT-SVID header is not a JSON object")

    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in allowed_algorithms:
        raise IntegrityError(
            f"JWT-SVID algorithm {alg!r} is not allowed; allowed: "
            f"{', '.join(sorted(allowed_algorithms))}"
        )
    extra = set(header) - ALLOWED_HEADER_PARAMETERS
    if extra:
        raise IntegrityError(
            f"JWT-SVID header parameter(s) {', '.join(sorted(map(str, extra)))} are not allowed "
            "(only alg, kid, typ)"
        )
    typ = header.get("typ")
    if typ is not None and typ not in ("JWT", "JOSE"):
        raise IntegrityError(f"JWT-SVID typ {typ!r} is not allowed; use 'JWT' or 'JOSE'")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise IntegrityError("JWT-SVID header has no kid; cannot choose a verification key")
    key = keys_by_kid.get(kid)
    if key is None:
        raise IntegrityError(f"JWT-SVID kid {kid[:100]!r} is not in the trust bundle")
    if not _key_matches_alg(key, alg):
        raise IntegrityError(f"JWT-SVID kid {kid!r} names a key that cannot verify {alg}")

    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key=key,
            algorithms=[alg],
            audience=audience,
            options={
                "verify_signature": True,
                "verify_aud": True,
                "verify_exp": False,  # checked below against the injected `now`
                "verify_nbf": False,
                "verify_iat": False,
                "verify_iss": False,
                "require": ["aud", "exp", "sub"],
            },
        )
    except jwt.InvalidSignatureError:
        raise IntegrityError("JWT-SVID signature does not verify") from None
    except jwt.MissingRequiredClaimError as exc:
        raise IntegrityError(f"JWT-SVID lacks the required claim '{exc.claim}'") from None
    except jwt.InvalidAudienceError:
        raise IntegrityError(f"JWT-SVID audience does not include {audience[:100]!r}") from None
    except jwt.DecodeError:
        raise InvalidInput("JWT-SVID is malformed (could not decode it)") from None
    except jwt.InvalidTokenError as exc:
        raise IntegrityError(f"JWT-SVID is invalid: {exc}") from None

    moment = utc(now).timestamp()
    exp = _numeric(claims, "exp")
    if moment >= exp + leeway:
        expired_at = dt.datetime.fromtimestamp(exp, dt.UTC).isoformat()
        raise IntegrityError(f"JWT-SVID expired at {expired_at}")
    if "nbf" in claims and moment + leeway < _numeric(claims, "nbf"):
        raise IntegrityError("JWT-SVID is not valid yet (nbf is in the future)")
    sub = claims["sub"]
    try:
        sid = SpiffeId.parse(sub).require_workload()
    except InvalidSpiffeId as exc:
        raise IntegrityError(f"JWT-SVID sub is not a workload SPIFFE ID: {exc}") from None
    if trust_domain is not None and not sid.member_of(trust_domain):
        raise IntegrityError(
            f"JWT-SVID sub {sid.id_string!r} is not in trust domain "
            f"{TrustDomain.of(trust_domain).name!r}"
        )
    return claims
