"""The pool of workload keys and CSRs, made before any timing starts."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = ["CsrItem", "make_pool", "spiffe_id_for"]


@dataclass(frozen=True)
class CsrItem:
    spiffe_id: str
    csr_der: bytes
    csr_pem: str
    public_key_der: bytes  # SubjectPublicKeyInfo, to check the issued certificate


def spiffe_id_for(trust_domain: str, n: int) -> str:
    return f"spiffe://{trust_domain}/default/dev/bench-{n}"


def make_pool(trust_domain: str, count: int) -> list[CsrItem]:
    """`count` EC P-256 keys, each with a PKCS#10 request carrying its SPIFFE ID as URI SAN
    (as a SPIFFE workload's CSR does) and an empty subject."""
    pool = []
    for n in range(count):
        key = ec.generate_private_key(ec.SECP256R1())
        sid = spiffe_id_for(trust_domain, n)
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(sid)]), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        pool.append(
            CsrItem(
                spiffe_id=sid,
                csr_der=csr.public_bytes(serialization.Encoding.DER),
                csr_pem=csr.public_bytes(serialization.Encoding.PEM).decode("ascii"),
                public_key_der=key.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                ),
            )
        )
    return pool


def check_certificate(cert_der: bytes, item: CsrItem) -> dict[str, object]:
    """Check an issued leaf against its request; return facts about it for the report.

    Raises ValueError when the certificate does not carry the requested SPIFFE ID and key.
    """
    cert = x509.load_der_x509_certificate(cert_der)
    uris = cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.UniformResourceIdentifier)
    if item.spiffe_id not in uris:
        raise ValueError(f"issued certificate has URI SANs {uris}, expected {item.spiffe_id}")
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if spki != item.public_key_der:
        raise ValueError("issued certificate does not carry the CSR's public key")
    sig = cert.signature_hash_algorithm
    return {
        "uri_sans": uris,
        "signature_algorithm": cert.signature_algorithm_oid._name,
        "signature_hash": sig.name if sig is not None else None,
        "lifetime_s": int((cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds()),
        "issuer": cert.issuer.rfc4514_string(),
        "der_bytes": len(cert_der),
    }
