"""X.509 certificate profiles: the trust domain's root, its issuing CAs and X509-SVID leaves.

Hierarchy: root (self-signed, in the trust bundle) -> issuing CA (pathlen 0, rotated often) ->
leaf SVID. Workloads receive `leaf + issuing CA` as their chain and the root(s) as their bundle,
so rotating the issuing CA never invalidates an SVID that is still within its validity.

Every builder takes only a *signer* (`ec.EllipticCurvePrivateKey` whose `sign()` may run in an
HSM); no code here ever asks a key for its private bytes. Times come from the caller (`now`),
never from the system clock.

Leaf profile (X509-SVID standard, section 3-4):
- exactly one URI SAN, the SPIFFE ID; the SAN is critical when the subject is empty (default);
  optional DNS SANs;
- BasicConstraints CA:false (critical); KeyUsage critical digitalSignature only (plus
  keyEncipherment for RSA keys), never keyCertSign/cRLSign; EKU serverAuth + clientAuth;
- SKI and AKI; a random positive serial with at least 64 bits of entropy;
- notBefore backdated by a small clock skew allowance, never before the issuer's notBefore;
  notAfter = min(now + ttl, issuer notAfter, notBefore + `HARD_MAX_TTL`): the 24 h ceiling is on
  the whole validity window, backdate included;
- optionally a non-critical lineage extension (`Lineage`, OID `LINEAGE_OID`): who minted the
  SVID on someone else's behalf and the serials of the certificates it was minted through, so
  that a relying party (the broker) can deny a whole self-minted chain by one serial and count
  an operator-minted SVID as the operator.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import json
from collections.abc import Iterable, Sequence
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from ca.clock import utc
from ca.csr import SubjectPublicKey, key_type_of
from ca.duration import format_duration
from ca.errors import (
    CAStateError,
    IntegrityError,
    InvalidInput,
    InvalidSpiffeId,
    InvalidTTL,
    PolicyViolation,
)
from ca.policy import HARD_MAX_TTL, SERVER_NAME_DOMAIN, is_reserved_dns_name
from ca.spiffeid import SpiffeId, TrustDomain

__all__ = [
    "DEFAULT_BACKDATE",
    "LINEAGE_OID",
    "MAX_LINEAGE",
    "SERVER_NAME_DOMAIN",
    "SERVER_PATH",
    "IssuedSVID",
    "LeafIssuer",
    "Lineage",
    "build_intermediate",
    "build_leaf",
    "build_root",
    "chain_der",
    "chain_pem",
    "is_reserved_dns_name",
    "server_name",
    "spiffe_id_of",
    "trust_domain_of_roots",
    "verify_chain",
]

DEFAULT_BACKDATE: Final = dt.timedelta(seconds=30)
"""How far notBefore is set before `now`, to tolerate clock skew between hosts."""

_UB_NAME: Final = 64
_MAX_BACKDATE: Final = dt.timedelta(minutes=10)
_HASH_FOR_CURVE: Final[dict[str, type[hashes.SHA256 | hashes.SHA384 | hashes.SHA512]]] = {
    "secp256r1": hashes.SHA256,
    "secp384r1": hashes.SHA384,
    "secp521r1": hashes.SHA512,
}
_CA_KEY_USAGE: Final = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


@dataclasses.dataclass(frozen=True, slots=True)
class IssuedSVID:
    """An issued X509-SVID. `chain` is leaf first, then intermediates; never the root."""

    cert: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    not_after: dt.datetime
    serial: int

    @classmethod
    def of(cls, cert: x509.Certificate, intermediates: Sequence[x509.Certificate]) -> IssuedSVID:
        return cls(
            cert=cert,
            chain=(cert, *intermediates),
            not_after=cert.not_valid_after_utc,
            serial=cert.serial_number,
        )

    @property
    def spiffe_id(self) -> SpiffeId:
        return spiffe_id_of(self.cert)

    def chain_der(self) -> bytes:
        """Concatenated DER, leaf first (the Workload API's `x509_svid` field)."""
        return chain_der(self.chain)

    def chain_pem(self) -> bytes:
        return chain_pem(self.chain)


LINEAGE_OID: Final = x509.ObjectIdentifier("2.25.135983794404665652223373681657808187328")
"""A UUID-based OID (ITU-T X.667) for the broker's lineage extension."""

MAX_LINEAGE: Final = 16
"""How many ancestor serials a lineage keeps (the most recent ones)."""

_MAX_LINEAGE_BYTES: Final = 4096
_SERIAL_CHARS: Final = frozenset("0123456789abcdef")


def _der_utf8(text: str) -> bytes:
    data = text.encode()
    size = len(data)
    if size < 0x80:
        return bytes((0x0C, size)) + data
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes((0x0C, 0x80 | len(length))) + length + data


def _der_utf8_decode(der: bytes) -> str:
    if len(der) < 2 or der[0] != 0x0C:
        raise InvalidInput("lineage extension is not a UTF8String")
    size, offset = der[1], 2
    if size & 0x80:
        count = size & 0x7F
        if not 0 < count <= 2 or len(der) < 2 + count:
            raise InvalidInput("lineage extension has a bad length")
        size, offset = int.from_bytes(der[2 : 2 + count], "big"), 2 + count
    if len(der) != offset + size:
        raise InvalidInput("lineage extension has a bad length")
    return der[offset:].decode()


@dataclasses.dataclass(frozen=True, slots=True)
class Lineage:
    """Where an SVID came from, when it was minted through another certificate.

    - `minted_by`: the SPIFFE ID of the operator who minted it (or an ancestor of it) for an ID
      other than the operator's own; "" when a workload minted its own identity.
    - `ancestors`: serials (lower-case hex) of the certificates it was minted through, oldest
      first, at most `MAX_LINEAGE` (the most recent ones).
    - `capped_until`: when set, no SVID minted through this one may outlive this moment (the
      end of the first self-minted certificate's parent): renewal cannot extend a chain that
      self-minting created.
    """

    minted_by: str = ""
    ancestors: tuple[str, ...] = ()
    capped_until: dt.datetime | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.minted_by, str) or len(self.minted_by) > 2048:
            raise InvalidInput("lineage minted_by must be a SPIFFE ID")
        ancestors = tuple(self.ancestors)[-MAX_LINEAGE:]
        for serial in ancestors:
            if not isinstance(serial, str) or not 0 < len(serial) <= 40:
                raise InvalidInput("lineage serials must be 1..40 hex digits")
            if not set(serial) <= _SERIAL_CHARS:
                raise InvalidInput("lineage serials must be lower-case hex")
        object.__setattr__(self, "ancestors", ancestors)
        if self.capped_until is not None:
            object.__setattr__(self, "capped_until", utc(self.capped_until))

    def child(
        self, serial: str, *, minted_by: str | None = None, capped_until: dt.datetime | None
    ) -> Lineage:
        """The lineage of an SVID minted through the certificate `serial` that has this lineage:
        the serial is appended, `minted_by` is inherited unless given, and the cap is the
        earlier of this one and `capped_until`."""
        caps = [c for c in (self.capped_until, capped_until) if c is not None]
        return Lineage(
            minted_by=self.minted_by if minted_by is None else minted_by,
            ancestors=(*self.ancestors, serial),
            capped_until=min(caps) if caps else None,
        )

    def to_extension(self) -> x509.UnrecognizedExtension:
        doc: dict[str, object] = {"ancestors": list(self.ancestors)}
        if self.minted_by:
            doc["minted_by"] = self.minted_by
        if self.capped_until is not None:
            doc["capped_until"] = int(self.capped_until.timestamp())
        text = json.dumps(doc, separators=(",", ":"), sort_keys=True)
        return x509.UnrecognizedExtension(LINEAGE_OID, _der_utf8(text))

    @classmethod
    def of(cls, cert: x509.Certificate) -> Lineage | None:
        """The certificate's lineage, or None without one. `InvalidInput` when malformed."""
        try:
            ext = cert.extensions.get_extension_for_oid(LINEAGE_OID)
        except x509.ExtensionNotFound:
            return None
        value = ext.value
        if not isinstance(value, x509.UnrecognizedExtension) or len(value.value) > (
            _MAX_LINEAGE_BYTES
        ):
            raise InvalidInput("lineage extension is malformed")
        try:
            doc = json.loads(_der_utf8_decode(value.value))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise InvalidInput("lineage extension is not valid JSON") from None
        if not isinstance(doc, dict):
            raise InvalidInput("lineage extension is malformed")
        ancestors = doc.get("ancestors", [])
        minted_by = doc.get("minted_by", "")
        capped = doc.get("capped_until")
        if not isinstance(ancestors, list) or (
            capped is not None and (isinstance(capped, bool) or not isinstance(capped, int))
        ):
            raise InvalidInput("lineage extension is malformed")
        try:
            cap = None if capped is None else dt.datetime.fromtimestamp(capped, dt.UTC)
        except (OverflowError, OSError, ValueError):
            raise InvalidInput("lineage extension has a bad cap") from None
        return cls(minted_by=minted_by, ancestors=tuple(ancestors), capped_until=cap)


def chain_pem(certs: Iterable[x509.Certificate]) -> bytes:
    """Concatenated PEM of `certs`, in the given order."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def chain_der(certs: Iterable[x509.Certificate]) -> bytes:
    """Concatenated DER of `certs`, in the given order."""
    return b"".join(c.public_bytes(serialization.Encoding.DER) for c in certs)


def spiffe_id_of(cert: x509.Certificate) -> SpiffeId:
    """The SPIFFE ID in `cert`'s URI SAN.

    Raises `InvalidInput` unless the certificate has exactly one URI SAN and it is a valid
    `spiffe://` ID (`InvalidSpiffeId` for a malformed one).
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise InvalidInput("certificate has no subjectAltName, so no SPIFFE ID") from None
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        raise InvalidInput("certificate extensions are malformed") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise InvalidInput(
            f"certificate has {len(uris)} URI SANs; an X509-SVID has exactly one (its SPIFFE ID)"
        )
    return SpiffeId.parse(uris[0])


SERVER_PATH: Final = ("broker", "server")
"""The path of the broker's serving identity, `spiffe://<td>/broker/server`."""


def server_name(trust_domain: TrustDomain | str) -> str:
    """The DNS name that stands for `spiffe://<td>/broker/server` in the broker's serving
    certificate, e.g. `server.broker.example.org.spiffe.invalid`.

    gRPC's TLS client checks a server by DNS/IP name only, never by URI SAN, so clients pin
    this name instead (`ssl_target_name_override`); it is as good as the SPIFFE ID because the
    CA puts it into the serving certificate only (`is_reserved_dns_name` refuses it to every
    workload). A trust domain that is not a valid host name (an underscore, too long) is
    replaced by the hex SHA-256 of its name, cut to one DNS label.
    """
    td = TrustDomain.of(trust_domain).name
    name = f"server.broker.{td}.{SERVER_NAME_DOMAIN}"
    try:
        _normalize_dns([name])
    except InvalidInput:
        digest = hashes.Hash(hashes.SHA256())
        digest.update(td.encode())
        name = f"server.broker.{digest.finalize().hex()[:48]}.{SERVER_NAME_DOMAIN}"
    return name


def _check_server_name(sid: SpiffeId, dns: Sequence[str]) -> None:
    """The reserved server name goes only with the broker's own ID, so a certificate holding
    it holds `spiffe://<td>/broker/server` too, whoever asked for it (`PolicyViolation`)."""
    for name in dns:
        if not is_reserved_dns_name(name):
            continue
        server_id = SpiffeId.from_segments(sid.trust_domain, *SERVER_PATH)
        if sid != server_id or name != server_name(sid.trust_domain):
            raise PolicyViolation(
                f"DNS name {name[:80]!r} is reserved for the broker's serving certificate "
                f"({server_id.id_string}); it is never issued to {sid.id_string[:200]}"
            )


def trust_domain_of_roots(roots: Iterable[x509.Certificate]) -> TrustDomain:
    """The one trust domain named by the roots' `spiffe://<td>` URI SANs (`build_root` writes
    it). Raises `InvalidInput` when no root names one, or when they name different ones."""
    found: set[str] = set()
    for cert in roots:
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except (x509.ExtensionNotFound, ValueError, x509.DuplicateExtension):
            continue
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
            try:
                found.add(SpiffeId.parse(uri).trust_domain)
            except InvalidInput:
                continue
    if len(found) != 1:
        what = "no trust domain" if not found else f"several ({', '.join(sorted(found))})"
        raise InvalidInput(
            f"the bundle's roots name {what}; a broker bundle's roots carry the URI SAN "
            "spiffe://<trust domain>"
        )
    return TrustDomain(found.pop())


def _hash_for(signer: ec.EllipticCurvePrivateKey) -> hashes.SHA256 | hashes.SHA384 | hashes.SHA512:
    try:
        return _HASH_FOR_CURVE[signer.curve.name]()
    except KeyError:
        raise CAStateError(
            f"signer curve {signer.curve.name} is not supported; use P-256 or P-384"
        ) from None


def _same_public_key(a: object, b: object) -> bool:
    def encode(key: object) -> bytes:
        if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            return b""
        return key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    encoded = encode(a)
    return bool(encoded) and encoded == encode(b)


def _check_ttl(ttl: dt.timedelta, what: str) -> None:
    if not isinstance(ttl, dt.timedelta):
        raise InvalidTTL(f"{what} TTL must be a timedelta")
    if ttl <= dt.timedelta(0):
        raise InvalidTTL(f"{what} TTL must be positive, got {format_duration(ttl)}")


def _check_backdate(backdate: dt.timedelta) -> None:
    if not dt.timedelta(0) <= backdate <= _MAX_BACKDATE:
        raise InvalidInput(
            f"backdate {format_duration(backdate)} is outside 0s..{format_duration(_MAX_BACKDATE)}"
        )


def _check_issuer(
    signer: ec.EllipticCurvePrivateKey, issuer_cert: x509.Certificate, now: dt.datetime | None
) -> None:
    if not _same_public_key(signer.public_key(), issuer_cert.public_key()):
        raise CAStateError(
            "issuer signer does not match the issuer certificate's public key; "
            "refusing to issue a certificate that would not verify"
        )
    try:
        constraints = issuer_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise CAStateError("issuer certificate is not a CA (BasicConstraints CA:true missing)")
    if now is not None:
        _check_validity(issuer_cert, now)


def _check_validity(issuer_cert: x509.Certificate, now: dt.datetime) -> None:
    if issuer_cert.not_valid_after_utc <= now:
        raise CAStateError(
            f"issuer certificate expired at {issuer_cert.not_valid_after_utc.isoformat()}; "
            "rotate the CA before issuing"
        )
    if issuer_cert.not_valid_before_utc > now:
        raise CAStateError(
            f"issuer certificate is not valid before {issuer_cert.not_valid_before_utc.isoformat()}"
        )


def _issuer_key_identifier(issuer_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        ski = x509.SubjectKeyIdentifier.from_public_key(issuer_cert.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _ca_name(trust_domain: TrustDomain, common_name: str) -> x509.Name:
    # RFC 5280 upper bounds: 64 characters for O and CN; trust domains may be up to 255 bytes.
    if not isinstance(common_name, str) or not 0 < len(common_name) <= _UB_NAME:
        raise InvalidInput(f"CA subject common name must be 1..{_UB_NAME} characters")
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain.name[:_UB_NAME]),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def build_root(
    signer: ec.EllipticCurvePrivateKey,
    trust_domain: TrustDomain | str,
    now: dt.datetime,
    ttl: dt.timedelta,
    *,
    subject_cn: str | None = None,
    path_length: int | None = 1,
    backdate: dt.timedelta = DEFAULT_BACKDATE,
) -> x509.Certificate:
    """A self-signed root CA for `trust_domain`, valid from `now - backdate` to `now + ttl`.

    CA:true (critical, `path_length` 1 by default: root -> issuing CA -> leaf); KeyUsage critical
    keyCertSign + cRLSign; SKI; AKI = own SKI; subject O=<trust domain>, CN=`subject_cn`; URI SAN
    `spiffe://<td>` (non-critical, the subject is not empty).
    """
    td = TrustDomain.of(trust_domain)
    _check_ttl(ttl, "root CA")
    _check_backdate(backdate)
    now = utc(now)
    name = _ca_name(td, subject_cn or "SPIFFE root CA")
    public_key = signer.public_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(public_key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - backdate)
        .not_valid_after(now + ttl)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(td.id_string)]),
            critical=False,
        )
    )
    return builder.sign(signer, _hash_for(signer))


def build_intermediate(
    root_signer: ec.EllipticCurvePrivateKey,
    root_cert: x509.Certificate,
    issuing_public_key: ec.EllipticCurvePublicKey,
    trust_domain: TrustDomain | str,
    now: dt.datetime,
    ttl: dt.timedelta,
    *,
    subject_cn: str | None = None,
    backdate: dt.timedelta = DEFAULT_BACKDATE,
) -> x509.Certificate:
    """An issuing CA signed by the root: CA:true pathlen 0, KeyUsage keyCertSign + cRLSign.

    notAfter is capped at the root's notAfter and notBefore never precedes the root's. Raises
    `CAStateError` if `root_signer` does not match `root_cert`, or the root is not currently
    valid; `InvalidTTL` for a non-positive `ttl`.
    """
    td = TrustDomain.of(trust_domain)
    _check_ttl(ttl, "issuing CA")
    _check_backdate(backdate)
    now = utc(now)
    _check_issuer(root_signer, root_cert, now)
    if not isinstance(issuing_public_key, ec.EllipticCurvePublicKey):
        raise InvalidInput("issuing CA key must be an EC public key (P-256 or P-384)")
    not_before = max(now - backdate, root_cert.not_valid_before_utc)
    not_after = min(now + ttl, root_cert.not_valid_after_utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(issuing_public_key)
    # A distinct name per issuing key keeps generations apart in logs and path building.
    name = _ca_name(td, subject_cn or f"SPIFFE issuing CA {ski.digest.hex()[:16]}")
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(root_cert.subject)
        .public_key(issuing_public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(ski, critical=False)
        .add_extension(_issuer_key_identifier(root_cert), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(td.id_string)]),
            critical=False,
        )
    )
    return builder.sign(root_signer, _hash_for(root_signer))


def _normalize_dns(dns_names: Iterable[str]) -> list[str]:
    result: list[str] = []
    for raw in dns_names:
        if not isinstance(raw, str):
            raise InvalidInput("DNS names must be strings")
        name = raw.lower()
        labels = name.split(".")
        if labels and labels[0] == "*":
            labels = labels[1:]
        ok = (
            0 < len(name) <= 253
            and len(labels) >= 1
            and all(
                0 < len(label) <= 63
                and label[0] != "-"
                and label[-1] != "-"
                and all(c in "abcdefghijklmnopqrstuvwxyz0123456789-" for c in label)
                for label in labels
            )
        )
        if not ok:
            raise InvalidInput(
                f"DNS name {raw[:80]!r} is not a valid hostname (ASCII letters, digits and '-', "
                "labels of 1..63 characters separated by '.', optional leading '*.')"
            )
        if name not in result:
            result.append(name)
    return result


def build_leaf(
    issuer_signer: ec.EllipticCurvePrivateKey,
    issuer_cert: x509.Certificate,
    public_key: SubjectPublicKey,
    spiffe_id: SpiffeId | str,
    now: dt.datetime,
    ttl: dt.timedelta,
    dns_names: Iterable[str] = (),
    subject: x509.Name | None = None,
    *,
    backdate: dt.timedelta = DEFAULT_BACKDATE,
    ip_addresses: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address] = (),
    lineage: Lineage | None = None,
) -> x509.Certificate:
    """An X509-SVID leaf for `spiffe_id`, signed by the issuing CA (see the module docstring).

    `ip_addresses` adds IP SANs, for serving certificates reached by address (the broker's
    own); the SPIFFE ID stays the only URI SAN.

    TTL policy is the caller's (`ca.policy`); this function still refuses a non-positive `ttl`
    (`InvalidTTL`) and one above `HARD_MAX_TTL` (`PolicyViolation`), refuses an ID without a path
    or outside the issuer's trust domain (`InvalidSpiffeId`), an unsupported subject key or bad
    DNS name (`InvalidInput`), and an issuer that is expired, not a CA or does not match its
    signer (`CAStateError`).
    """
    return LeafIssuer(issuer_signer, issuer_cert, now).issue(
        public_key,
        spiffe_id,
        now,
        ttl,
        dns_names,
        subject,
        backdate=backdate,
        ip_addresses=ip_addresses,
        lineage=lineage,
    )


class LeafIssuer:
    """An issuing CA ready to sign X509-SVIDs: the signer/certificate match, the CA flag, the
    issuer's trust domain and AKI are checked and computed once, at construction, instead of on
    every certificate (the request path issues thousands per second). Validity is still checked
    on every `issue()`. Raises `CAStateError` at construction for an unusable issuer.
    """

    __slots__ = ("_aki", "_cert", "_hash", "_signer", "_td")

    def __init__(
        self,
        issuer_signer: ec.EllipticCurvePrivateKey,
        issuer_cert: x509.Certificate,
        now: dt.datetime | None = None,
    ) -> None:
        _check_issuer(issuer_signer, issuer_cert, utc(now) if now is not None else None)
        self._signer = issuer_signer
        self._cert = issuer_cert
        self._hash = _hash_for(issuer_signer)
        self._aki = _issuer_key_identifier(issuer_cert)
        try:
            self._td: str | None = spiffe_id_of(issuer_cert).trust_domain
        except InvalidInput:
            self._td = None

    @property
    def certificate(self) -> x509.Certificate:
        return self._cert

    def issue(
        self,
        public_key: SubjectPublicKey,
        spiffe_id: SpiffeId | str,
        now: dt.datetime,
        ttl: dt.timedelta,
        dns_names: Iterable[str] = (),
        subject: x509.Name | None = None,
        *,
        backdate: dt.timedelta = DEFAULT_BACKDATE,
        ip_addresses: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address] = (),
        lineage: Lineage | None = None,
        extra_extensions: Iterable[x509.ExtensionType] = (),
    ) -> x509.Certificate:
        """Issue one X509-SVID leaf; see `build_leaf` for what is refused. `lineage`, when
        given, is added as a non-critical extension; its `capped_until` also bounds notAfter.
        `extra_extensions` are added as non-critical extensions (e.g. what a login attests
        about its holder)."""
        issuer_cert = self._cert
        sid = spiffe_id if isinstance(spiffe_id, SpiffeId) else SpiffeId.parse(spiffe_id)
        sid.require_workload()
        _check_ttl(ttl, "X509-SVID")
        if ttl > HARD_MAX_TTL:
            raise PolicyViolation(
                f"X509-SVID TTL {format_duration(ttl)} exceeds the hard ceiling of "
                f"{format_duration(HARD_MAX_TTL)}"
            )
        _check_backdate(backdate)
        now = utc(now)
        _check_validity(issuer_cert, now)
        if self._td is not None and not sid.member_of(self._td):
            raise InvalidSpiffeId(
                f"SPIFFE ID {sid.id_string!r} is not in the issuer's trust domain {self._td!r}"
            )
        key_type = key_type_of(public_key)
        dns = _normalize_dns(dns_names)
        _check_server_name(sid, dns)
        name = subject if subject is not None else x509.Name([])
        san_names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(sid.id_string)]
        san_names.extend(x509.DNSName(d) for d in dns)
        san_names.extend(x509.IPAddress(ip) for ip in ip_addresses)
        is_rsa = key_type.startswith("rsa-")
        key_usage = x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=is_rsa,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=False,
            crl_sign=False,
            encipher_only=False,
            decipher_only=False,
        )
        not_before = max(now - backdate, issuer_cert.not_valid_before_utc)
        # The 24 h ceiling bounds the validity window, so the backdate comes out of it.
        not_after = min(now + ttl, issuer_cert.not_valid_after_utc, not_before + HARD_MAX_TTL)
        if lineage is not None and lineage.capped_until is not None:
            if lineage.capped_until <= now:
                raise PolicyViolation(
                    "the certificate this SVID would be minted through has expired"
                )
            not_after = min(not_after, lineage.capped_until)
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer_cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(key_usage, critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(self._aki, critical=False)
            .add_extension(x509.SubjectAlternativeName(san_names), critical=len(name.rdns) == 0)
        )
        if lineage is not None:
            builder = builder.add_extension(lineage.to_extension(), critical=False)
        for extension in extra_extensions:
            builder = builder.add_extension(extension, critical=False)
        return builder.sign(self._signer, self._hash)


def _check_leaf_profile(leaf: x509.Certificate) -> SpiffeId:
    """SPIFFE leaf validation (X509-SVID section 5.2) on top of RFC 5280 path validation."""
    try:
        sid = spiffe_id_of(leaf).require_workload()
    except InvalidInput as exc:
        raise IntegrityError(f"certificate is not an X509-SVID: {exc}") from None
    extensions = leaf.extensions
    try:
        constraints = extensions.get_extension_for_class(x509.BasicConstraints).value
        usage = extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound as exc:
        raise IntegrityError(f"X509-SVID lacks a required extension: {exc}") from None
    if constraints.ca:
        raise IntegrityError("X509-SVID leaf has CA:true; a leaf must be CA:false")
    if not usage.digital_signature or usage.key_cert_sign or usage.crl_sign:
        raise IntegrityError(
            "X509-SVID leaf KeyUsage must have digitalSignature and neither keyCertSign nor cRLSign"
        )
    return sid


def verify_chain(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    now: dt.datetime,
    *,
    trust_domain: TrustDomain | str | None = None,
) -> None:
    """Verify `leaf` as an X509-SVID against `roots` at time `now`; raise `IntegrityError`.

    RFC 5280 path validation is done by cryptography's verifier (`build_client_verifier`,
    which accepts SPIFFE leaves: empty subject, URI-only SAN, EKU clientAuth required). On top
    of it: exactly one `spiffe://` URI SAN with a path, CA:false, KeyUsage digitalSignature
    without keyCertSign/cRLSign, and, if `trust_domain` is given, membership in it.
    """
    if not roots:
        raise IntegrityError("no trust anchors: the trust bundle holds no X.509 authorities")
    sid = _check_leaf_profile(leaf)
    if trust_domain is not None and not sid.member_of(trust_domain):
        raise IntegrityError(
            f"X509-SVID {sid.id_string!r} is not in trust domain "
            f"{TrustDomain.of(trust_domain).name!r}"
        )
    verifier = PolicyBuilder().store(Store(list(roots))).time(utc(now)).build_client_verifier()
    try:
        verifier.verify(leaf, list(intermediates))
    except VerificationError as exc:
        raise IntegrityError(f"X509-SVID {sid.id_string!r} does not verify: {exc}") from None
