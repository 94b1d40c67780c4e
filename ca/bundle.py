"""SPIFFE trust bundles: the trust domain's X.509 authorities and JWT keys, and their JWKS form.

Format (SPIFFE Trust Domain and Bundle, X509-SVID section 6, JWT-SVID):

    {"keys": [
        {"kty": "EC", "use": "x509-svid", "crv": "P-256", "x": ..., "y": ...,
         "x5c": ["<standard base64 DER of one CA certificate>"]},     # never a kid
        {"kty": "EC", "use": "jwt-svid", "kid": "<RFC 7638 thumbprint>", "crv": ..., ...}],
     "spiffe_sequence": 7,          # increases on every change
     "spiffe_refresh_hint": 300}    # seconds

The Workload API wants other shapes of the same data: `x509_der_concat()` (X509BundlesResponse)
and `to_jwt_jwks_json()` (JWTBundlesResponse: JWT keys only, each with its kid).

Parsing (`from_jwks`) follows the spec's consumer rules: entries with an unknown `kty` or `use`
are ignored; anything malformed (an x509-svid entry without exactly one certificate or with a
kid, a jwt-svid entry without kid, duplicate kids, key members that disagree with the
certificate, bad base64 or JSON) is refused with `InvalidInput`.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import types
from collections.abc import Mapping, Sequence
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ca.errors import InvalidInput
from ca.jwtsvid import JWTPublicKey, public_jwk, public_key_from_jwk
from ca.spiffeid import TrustDomain

__all__ = ["DEFAULT_REFRESH_HINT_SECONDS", "MAX_BUNDLE_BYTES", "TrustBundle"]

DEFAULT_REFRESH_HINT_SECONDS: Final = 300
MAX_BUNDLE_BYTES: Final = 1 << 20

_KNOWN_KTY: Final = frozenset({"EC", "RSA"})
_X509_USE: Final = "x509-svid"
_JWT_USE: Final = "jwt-svid"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class TrustBundle:
    """One trust domain's bundle. Immutable: `x509_authorities` is stored as a tuple and
    `jwt_authorities` as a read-only mapping (kid -> public key).
    """

    trust_domain: str
    x509_authorities: Sequence[x509.Certificate]
    jwt_authorities: Mapping[str, JWTPublicKey]
    sequence: int = 0
    refresh_hint_seconds: int = DEFAULT_REFRESH_HINT_SECONDS

    def __post_init__(self) -> None:
        td = TrustDomain.of(self.trust_domain)
        object.__setattr__(self, "trust_domain", td.name)
        authorities = tuple(self.x509_authorities)
        if not all(isinstance(c, x509.Certificate) for c in authorities):
            raise InvalidInput("bundle X.509 authorities must be certificates")
        object.__setattr__(self, "x509_authorities", authorities)
        keys = dict(self.jwt_authorities)
        for kid, key in keys.items():
            if not isinstance(kid, str) or not kid:
                raise InvalidInput("bundle JWT authority kids must be non-empty strings")
            if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
                raise InvalidInput(f"bundle JWT authority {kid!r} must be an EC or RSA public key")
        object.__setattr__(self, "jwt_authorities", types.MappingProxyType(keys))
        if not _is_int(self.sequence) or self.sequence < 0:
            raise InvalidInput("bundle sequence must be a non-negative integer")
        if not _is_int(self.refresh_hint_seconds) or self.refresh_hint_seconds < 0:
            raise InvalidInput("bundle refresh hint must be a non-negative number of seconds")

    @property
    def trust_domain_id(self) -> TrustDomain:
        return TrustDomain(self.trust_domain)

    def to_jwks(self) -> dict[str, Any]:
        """The SPIFFE bundle document (a JWK Set with spiffe_sequence and spiffe_refresh_hint)."""
        keys: list[dict[str, Any]] = []
        for cert in self.x509_authorities:
            public_key = cert.public_key()
            if not isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
                raise InvalidInput("bundle X.509 authority keys must be EC or RSA")
            entry: dict[str, Any] = {"use": _X509_USE, **public_jwk(public_key)}
            der = cert.public_bytes(serialization.Encoding.DER)
            entry["x5c"] = [base64.standard_b64encode(der).decode("ascii")]
            keys.append(entry)
        for kid, key in self.jwt_authorities.items():
            keys.append({"use": _JWT_USE, "kid": kid, **public_jwk(key)})
        return {
            "keys": keys,
            "spiffe_sequence": self.sequence,
            "spiffe_refresh_hint": self.refresh_hint_seconds,
        }

    def to_jwks_json(self) -> bytes:
        return json.dumps(self.to_jwks(), separators=(",", ":"), sort_keys=True).encode()

    def to_jwt_jwks(self) -> dict[str, Any]:
        """A plain JWKS of the JWT keys only, each with kid (Workload API JWTBundlesResponse)."""
        return {
            "keys": [
                {"use": _JWT_USE, "kid": kid, **public_jwk(key)}
                for kid, key in self.jwt_authorities.items()
            ]
        }

    def to_jwt_jwks_json(self) -> bytes:
        return json.dumps(self.to_jwt_jwks(), separators=(",", ":"), sort_keys=True).encode()

    def to_pem(self) -> bytes:
        """Concatenated PEM of the X.509 authorities."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.x509_authorities)

    def x509_der_concat(self) -> bytes:
        """Concatenated DER of the X.509 authorities (Workload API X509BundlesResponse)."""
        return b"".join(c.public_bytes(serialization.Encoding.DER) for c in self.x509_authorities)

    @classmethod
    def from_jwks(
        cls, trust_domain: TrustDomain | str, data: bytes | str | Mapping[str, Any]
    ) -> TrustBundle:
        """Parse a SPIFFE bundle document for `trust_domain`; `InvalidInput` if malformed.

        A missing `spiffe_sequence` reads as 0 and a missing `spiffe_refresh_hint` as
        `DEFAULT_REFRESH_HINT_SECONDS`.
        """
        doc = _load_document(data)
        entries = doc.get("keys")
        if not isinstance(entries, list):
            raise InvalidInput("bundle 'keys' is missing or not a list")
        sequence = doc.get("spiffe_sequence", 0)
        if not _is_int(sequence) or sequence < 0:
            raise InvalidInput("bundle 'spiffe_sequence' must be a non-negative integer")
        hint = doc.get("spiffe_refresh_hint", DEFAULT_REFRESH_HINT_SECONDS)
        if not _is_int(hint) or hint < 0:
            raise InvalidInput("bundle 'spiffe_refresh_hint' must be a non-negative integer")
        authorities: list[x509.Certificate] = []
        jwt_keys: dict[str, JWTPublicKey] = {}
        for index, entry in enumerate(entries):
            where = f"bundle keys[{index}]"
            if not isinstance(entry, dict):
                raise InvalidInput(f"{where} is not a JSON object")
            kty, use = entry.get("kty"), entry.get("use")
            if not isinstance(kty, str) or not isinstance(use, str):
                raise InvalidInput(f"{where} must have string 'kty' and 'use'")
            if kty not in _KNOWN_KTY or use not in (_X509_USE, _JWT_USE):
                continue  # the spec says: ignore unknown key types and uses
            try:
                key = public_key_from_jwk(entry)
            except InvalidInput as exc:
                raise InvalidInput(f"{where}: {exc}") from None
            if use == _X509_USE:
                authorities.append(_x509_entry(entry, key, where))
            else:
                kid = entry.get("kid")
                if not isinstance(kid, str) or not kid:
                    raise InvalidInput(f"{where}: a jwt-svid key must have a non-empty 'kid'")
                if kid in jwt_keys:
                    raise InvalidInput(f"{where}: kid {kid!r} appears twice")
                jwt_keys[kid] = key
        return cls(
            trust_domain=TrustDomain.of(trust_domain).name,
            x509_authorities=authorities,
            jwt_authorities=jwt_keys,
            sequence=sequence,
            refresh_hint_seconds=hint,
        )


def _load_document(data: bytes | str | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(data, Mapping):
        return data
    if not isinstance(data, bytes | str):
        raise InvalidInput("bundle must be JSON bytes, text or a mapping")
    if len(data) > MAX_BUNDLE_BYTES:
        raise InvalidInput(f"bundle is {len(data)} bytes, over the limit of {MAX_BUNDLE_BYTES}")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput("bundle is not valid JSON") from None
    if not isinstance(doc, dict):
        raise InvalidInput("bundle is not a JSON object")
    return doc


def _x509_entry(entry: Mapping[str, Any], key: JWTPublicKey, where: str) -> x509.Certificate:
    if "kid" in entry:
        raise InvalidInput(f"{where}: an x509-svid entry must not have a 'kid'")
    chain = entry.get("x5c")
    if not isinstance(chain, list) or len(chain) != 1 or not isinstance(chain[0], str):
        raise InvalidInput(f"{where}: an x509-svid entry must have exactly one 'x5c' certificate")
    try:
        der = base64.b64decode(chain[0], validate=True)
        cert = x509.load_der_x509_certificate(der)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{where}: 'x5c' is not a base64 DER certificate") from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    try:
        cert_key = cert.public_key().public_bytes(serialization.Encoding.DER, spki)
    except ValueError:
        raise InvalidInput(f"{where}: 'x5c' certificate has an unsupported key") from None
    if cert_key != key.public_bytes(serialization.Encoding.DER, spki):
        raise InvalidInput(f"{where}: the JWK members do not match the 'x5c' certificate's key")
    return cert
