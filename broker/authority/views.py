"""What the CA service is configured with and what it hands out: configuration, issued SVIDs,
the bundle and status views. Plain frozen data, shared by the parts of `broker.authority`."""

from __future__ import annotations

import dataclasses
import datetime as dt

from cryptography import x509

__all__ = [
    "AuthorityView",
    "BundleView",
    "CAServiceConfig",
    "CAStatus",
    "IssuedJWT",
    "IssuedX509",
]


@dataclasses.dataclass(frozen=True)
class CAServiceConfig:
    trust_domain: str
    backend_uri: str
    key_type: str = "ec-p256"
    root_ttl: dt.timedelta = dt.timedelta(days=3650)
    issuing_ttl: dt.timedelta = dt.timedelta(days=7)
    backdate: dt.timedelta = dt.timedelta(seconds=30)
    bundle_refresh_hint: dt.timedelta = dt.timedelta(minutes=5)
    max_csr_bytes: int = 16384
    # The broker's own server names (DNS SANs of its serving certificate): never issued to a
    # workload, whatever CA policy says, so no workload SVID can pose as the broker.
    server_names: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class IssuedX509:
    spiffe_id: str
    chain_der: list[bytes]
    private_key_der: bytes | None
    bundle_der: list[bytes]
    expires_at: dt.datetime
    serial: str


@dataclasses.dataclass(frozen=True)
class IssuedJWT:
    spiffe_id: str
    token: str
    expires_at: dt.datetime
    kid: str


@dataclasses.dataclass(frozen=True)
class BundleView:
    trust_domain: str
    jwks: bytes
    pem: str
    sequence: int
    x509_authorities: tuple[x509.Certificate, ...]


@dataclasses.dataclass(frozen=True)
class AuthorityView:
    id: str
    kind: str
    generation: int
    state: str
    not_before: dt.datetime
    not_after: dt.datetime
    activated_at: dt.datetime | None
    retired_at: dt.datetime | None
    key_uri: str
    jwt_kid: str | None
    subject: str
    fingerprint_sha256: str
    serial: str


@dataclasses.dataclass(frozen=True)
class CAStatus:
    trust_domain: str
    authorities: list[AuthorityView]
    key_backend: str
    bundle_sequence: int
    policy_version: int
    storage: str
    # The root rotation (ca.rootrotation): steady, publishing or overlap, and when the phase
    # is expected to end.
    root_phase: str = "steady"
    root_phase_until: dt.datetime | None = None
