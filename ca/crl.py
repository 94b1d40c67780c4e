"""Certificate revocation lists (RFC 5280 section 5) signed by an issuing CA.

`build_crl` makes one DER CRL: issuer = the issuing CA's subject, AuthorityKeyIdentifier from
its public key, a CRLNumber, thisUpdate/nextUpdate, and one revoked entry per serial (with the
date it was denied). The signer is any EC private-key object, in practice the key backend's
signer, so the issuing key never leaves the backend.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ca.errors import InvalidInput

__all__ = ["build_crl", "revoked_serials"]


def _hash_for(signer: ec.EllipticCurvePrivateKey) -> hashes.SHA256 | hashes.SHA384:
    return hashes.SHA384() if signer.curve.key_size >= 384 else hashes.SHA256()


def build_crl(
    issuer: x509.Certificate,
    signer: ec.EllipticCurvePrivateKey,
    revoked: Iterable[tuple[int, dt.datetime]],
    *,
    this_update: dt.datetime,
    next_update: dt.datetime,
    number: int,
) -> bytes:
    """The DER CRL of `issuer` listing `revoked` (serial, revocation date)."""
    if next_update <= this_update:
        raise InvalidInput("a CRL's nextUpdate must be after its thisUpdate")
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(this_update)
        .next_update(next_update)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(
                issuer.public_key()  # type: ignore[arg-type]
            ),
            critical=False,
        )
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    for serial, when in sorted(revoked):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(min(when, this_update))
            .build()
        )
    crl = builder.sign(signer, _hash_for(signer))
    return crl.public_bytes(serialization.Encoding.DER)


def revoked_serials(crl_der: bytes) -> set[int]:
    """The serials a DER CRL lists (what a relying party checks)."""
    return {r.serial_number for r in x509.load_der_x509_crl(crl_der)}
