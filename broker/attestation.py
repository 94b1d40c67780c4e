"""Bootstrap attestation: one-time join tokens and JWT/OIDC tokens from registered issuers.

Join tokens are random (256 bits), shown once and stored only as their SHA-256; the storage
consumes them atomically, so a token works once, before it expires.

A JWT attestor is an issuer (e.g. a Kubernetes cluster's service-account issuer or a CI OIDC
issuer) registered with its JWKS, the audience its tokens must carry, the algorithms it may use
(asymmetric only) and a template mapping claims to a SPIFFE ID. A token is checked, in order:
shape, `alg` on the attestor's allow-list (so `none` and HMAC never reach a key), `kid` known in
the JWKS and of the key type the algorithm needs (no key confusion), then signature, `iss`,
`aud`, `exp` and `nbf` against the injected clock. Every refusal raises `Unauthenticated` with a
message that names the check, never the token. A verified token is usable once: the caller
records `replay_key` (its `jti`, or its hash when it has none) until `token_expiry`; tokens
valid for more than `MAX_JWT_LIFETIME` from now are refused, which bounds that record.

A template must be able to yield a workload ID: one whose path starts at the broker's reserved
`/broker/...` namespace (operators, the broker's own identities) is refused when added.
`template_can_yield` tells whether some claims make a template yield an ID in a given layout
environment (an attestor that can yield production identities needs a second operator), and
`attestor_resource` names an attestor's whole definition for policy and approvals.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from broker.errors import InvalidArgument, Unauthenticated
from ca.errors import CAError
from ca.layout import IdentityLayout
from ca.spiffeid import SpiffeId

__all__ = [
    "ALLOWED_ALGORITHMS",
    "DEFAULT_ALGORITHMS",
    "JwtAttestor",
    "attestor_resource",
    "hash_token",
    "new_join_token",
    "template_can_yield",
    "token_fingerprint",
]

# Asymmetric algorithms only: an HMAC "key" would be the issuer's public key (key confusion).
ALLOWED_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"}
)
DEFAULT_ALGORITHMS = ("RS256", "ES256")
MAX_JWT_BYTES = 16384
MAX_JWT_LIFETIME = dt.timedelta(hours=24)  # an attestation JWT's exp, at most this far ahead
_MAX_JTI = 256
RESERVED_SEGMENT = "broker"  # spiffe://<td>/broker/... belongs to the broker itself
_TEMPLATE_FIELD = re.compile(r"\{([^{}]*)\}")
_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")
_CLAIM_VALUE = "[A-Za-z0-9._-]+"  # what `_SEGMENT` lets a claim put into a segment
TOKEN_PREFIX = "bjt_"  # noqa: S105 (a prefix, not a secret)


def new_join_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def token_fingerprint(token: str) -> str:
    """What the audit ledger records about a bootstrap credential: a short hash, never it."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()[:16]


def replay_key(token: str, claims: Mapping[str, Any]) -> str:
    """What identifies a verified attestation JWT for the replay cache: `jti:<jti>` when it has
    a usable one, else `sha256:<hash of the token>` (the exact token cannot be reused either)."""
    jti = claims.get("jti")
    if isinstance(jti, str) and 0 < len(jti) <= _MAX_JTI and jti.isprintable():
        return "jti:" + jti
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def token_expiry(claims: Mapping[str, Any]) -> dt.datetime:
    """The verified token's `exp` as a UTC datetime (`JwtAttestor.verify` checked it)."""
    return dt.datetime.fromtimestamp(float(claims["exp"]), dt.UTC)


def _key_fits(key: Any, alg: str) -> bool:
    if alg.startswith(("RS", "PS")):
        return isinstance(key, rsa.RSAPublicKey)
    if alg.startswith("ES"):
        return isinstance(key, ec.EllipticCurvePublicKey)
    return False


def unverified_issuer(token: str) -> str:
    """The `iss` claim, read without verification, to choose the attestor."""
    if not isinstance(token, str) or not token or len(token) > MAX_JWT_BYTES:
        raise Unauthenticated("the attestation JWT is empty or too large")
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        raise Unauthenticated("the attestation JWT is malformed") from None
    iss = claims.get("iss")
    if not isinstance(iss, str) or not iss:
        raise Unauthenticated("the attestation JWT has no iss claim")
    return iss


@dataclass(frozen=True)
class JwtAttestor:
    name: str
    issuer: str
    audience: str
    jwks: Mapping[str, Any]  # kid -> public key
    template: str
    algorithms: tuple[str, ...]
    trust_domain: str

    @classmethod
    def build(
        cls,
        *,
        name: str,
        issuer: str,
        audience: str,
        jwks_json: str,
        template: str,
        algorithms: Sequence[str],
        trust_domain: str,
    ) -> JwtAttestor:
        """Validate an attestor definition; raises InvalidArgument naming the problem."""
        if not re.match(r"^[a-z0-9][a-z0-9._-]{0,62}$", name or ""):
            raise InvalidArgument(
                "attestor name must be 1-63 characters of a-z, 0-9, '.', '_' or '-'"
            )
        if not issuer or not audience:
            raise InvalidArgument("an attestor needs an issuer and an audience")
        algs = tuple(algorithms) or DEFAULT_ALGORITHMS
        bad = sorted(set(algs) - ALLOWED_ALGORITHMS)
        if bad:
            raise InvalidArgument(
                f"algorithm(s) {', '.join(bad)} are not allowed; use asymmetric ones: "
                f"{', '.join(sorted(ALLOWED_ALGORITHMS))}"
            )
        keys = _parse_jwks(jwks_json)
        attestor = cls(name, issuer, audience, keys, template, algs, trust_domain)
        attestor._check_template()
        return attestor

    def _check_template(self) -> None:
        if not self.template.startswith("spiffe://"):
            raise InvalidArgument("the template must start with spiffe://")
        sample = _TEMPLATE_FIELD.sub(
            lambda m: self.trust_domain if m.group(1) == "td" else "x", self.template
        )
        try:
            sid = SpiffeId.parse(sample).require_workload()
        except CAError as exc:
            raise InvalidArgument(f"the template does not make a SPIFFE ID: {exc}") from None
        if not sid.member_of(self.trust_domain):
            raise InvalidArgument(f"the template must make IDs in {self.trust_domain}")
        first = self.template[len("spiffe://") :].partition("/")[2].partition("/")[0]
        if first == RESERVED_SEGMENT:
            raise InvalidArgument(
                f"the template can only make IDs under spiffe://{self.trust_domain}/broker/, "
                "which is reserved for the broker's own identities (operators, the server) and "
                "never minted"
            )

    def verify(self, token: str, now: dt.datetime) -> dict[str, Any]:
        """The verified claims; raises Unauthenticated."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise Unauthenticated("the attestation JWT is malformed") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise Unauthenticated(
                f"attestation JWT algorithm {str(alg)[:20]!r} is not allowed by attestor "
                f"{self.name} ({', '.join(self.algorithms)})"
            )
        kid = header.get("kid")
        if not isinstance(kid, str) or kid not in self.jwks:
            raise Unauthenticated(f"attestation JWT kid is unknown to attestor {self.name}")
        key = self.jwks[kid]
        if not _key_fits(key, alg):
            raise Unauthenticated(f"attestation JWT kid {kid[:64]!r} cannot verify {alg}")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                options={
                    "require": ["iss", "aud", "exp"],
                    "verify_exp": False,
                    "verify_nbf": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise Unauthenticated("attestation JWT signature does not verify") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated("attestation JWT audience is wrong") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated("attestation JWT issuer is wrong") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(f"attestation JWT lacks the claim {exc.claim!r}") from None
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(f"attestation JWT is invalid: {exc}") from None
        moment = now.timestamp()
        exp = claims.get("exp")
        if isinstance(exp, bool) or not isinstance(exp, int | float) or moment >= exp:
            raise Unauthenticated("attestation JWT has expired")
        if exp - moment > MAX_JWT_LIFETIME.total_seconds():
            raise Unauthenticated(
                "attestation JWT expires more than 24h from now; use a short-lived token"
            )
        nbf = claims.get("nbf")
        if nbf is not None and (not isinstance(nbf, int | float) or moment < nbf):
            raise Unauthenticated("attestation JWT is not valid yet (nbf)")
        return claims

    def spiffe_id_for(self, claims: Mapping[str, Any]) -> str:
        """Fill the template from the claims; every value must be one path segment."""

        def fill(match: re.Match[str]) -> str:
            name = match.group(1)
            if name == "td":
                return self.trust_domain
            value = _claim(claims, name.split("."))
            if isinstance(value, bool) or not isinstance(value, str | int):
                raise Unauthenticated(f"attestation JWT lacks the claim {name!r} for the template")
            text = str(value)
            if not _SEGMENT.match(text) or text in (".", ".."):
                raise Unauthenticated(f"attestation JWT claim {name!r} is not a path segment")
            return text

        text = _TEMPLATE_FIELD.sub(fill, self.template)
        try:
            return SpiffeId.parse(text).require_member_of(self.trust_domain).id_string
        except CAError as exc:
            raise Unauthenticated(f"attestation JWT maps to no valid SPIFFE ID: {exc}") from None


def attestor_resource(
    name: str,
    issuer: str,
    audience: str,
    jwks_json: str,
    template: str,
    algorithms: Sequence[str],
) -> str:
    """`attestor:NAME@sha256:HEX`, the hash over the attestor's whole definition (issuer,
    audience, JWKS with sorted keys, template, algorithms as given or the defaults): what policy
    decides and a second operator approves, so an approval for one definition cannot be spent
    on other signing keys or another template. Call after `JwtAttestor.build` accepted it."""
    definition = {
        "name": name,
        "issuer": issuer,
        "audience": audience,
        "jwks": json.loads(jwks_json),
        "template": template,
        "algorithms": list(algorithms or DEFAULT_ALGORITHMS),
    }
    digest = hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()
    return f"attestor:{name}@sha256:{digest}"


def _segment_patterns(template: str, trust_domain: str) -> list[re.Pattern[str]]:
    """One pattern per path segment of `template`, matching every value that segment can take:
    `{td}` is the trust domain, any other placeholder one claim value (a claim never holds a
    '/', so the segments are fixed by the template)."""
    tokens = _TEMPLATE_FIELD.split(template.removeprefix("spiffe://"))
    segments: list[list[str]] = [[]]
    for index, piece in enumerate(tokens):
        if index % 2:  # a placeholder's name
            segments[-1].append(re.escape(trust_domain) if piece == "td" else _CLAIM_VALUE)
            continue
        first, *rest = piece.split("/")
        segments[-1].append(re.escape(first))
        segments.extend([re.escape(part)] for part in rest)
    return [re.compile("".join(parts)) for parts in segments[1:]]  # [0] is the trust domain


def template_can_yield(
    template: str, trust_domain: str, layout: IdentityLayout, environment: str
) -> bool:
    """Whether some claims make `template` (already accepted by `JwtAttestor.build`) yield an
    ID that the layout reads as being in `environment`. Each placeholder is taken as free of
    the others (a claim used twice is not tied to one value), so the answer errs towards True:
    an attestor may be asked for an approval it could do without, never the other way."""
    patterns = _segment_patterns(template, trust_domain)
    parts = layout.template.split("/")
    if len(patterns) < len(parts):
        return False  # too few segments: the layout reads no environment from its IDs
    for part, pattern in zip(parts, patterns, strict=False):
        if part == "{environment}":
            wanted = environment
        elif part in ("{tenant}", "{service}"):
            continue  # any one segment will do
        else:
            wanted = part  # a literal segment of the layout
        if not pattern.fullmatch(wanted):
            return False
    return True


def _claim(claims: Mapping[str, Any], parts: list[str]) -> Any:
    """Resolve a dotted name in nested claims, where keys may themselves contain dots
    ("kubernetes.io" -> "namespace"): the longest key that matches is taken first."""
    if not parts:
        return claims
    for cut in range(len(parts), 0, -1):
        key = ".".join(parts[:cut])
        if key in claims:
            value = claims[key]
            if cut == len(parts):
                return value
            if isinstance(value, Mapping):
                found = _claim(value, parts[cut:])
                if found is not None:
                    return found
    return None


def _parse_jwks(text: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        raise InvalidArgument("the JWKS is not valid JSON") from None
    entries = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not entries:
        raise InvalidArgument("the JWKS must be an object with a non-empty 'keys' list")
    keys: dict[str, Any] = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("kid"), str):
            raise InvalidArgument("every JWKS key needs a 'kid'")
        if entry.get("kty") not in ("RSA", "EC"):
            raise InvalidArgument(f"JWKS key {entry['kid']!r}: only RSA and EC keys are accepted")
        if any(k in entry for k in ("d", "p", "q", "dp", "dq", "qi")):
            raise InvalidArgument(f"JWKS key {entry['kid']!r} holds private material; refused")
        try:
            keys[entry["kid"]] = jwt.PyJWK.from_dict(entry).key
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, KeyError) as exc:
            raise InvalidArgument(f"JWKS key {entry['kid']!r} is not usable: {exc}") from None
    return keys
