"""Scenarios: what one request is, for the broker and for each peer it is compared with.

A scenario turns the pre-made workload material (the CSR pool) into pre-serialized request
payloads, so the timed loop only sends bytes and checks answers. Add a scenario by adding a
`Scenario` to `SCENARIOS`.

A scenario's name is also the name of its operation in the report. A composite scenario
(`mix`) interleaves the broker requests of the scenarios it names, so each keeps its own
latency figures and SLO; `rotate_every_s` makes the load test rotate the CA while the load
runs (the rotations are an operation of their own, `ca-rotate`). `slo_p95_ms` is the latency
SLO of the scenario's operation (the standard's 150 ms unless it says otherwise).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loadtests.csrs import CsrItem

__all__ = ["DEFAULT_SLO_P95_MS", "SCENARIOS", "Scenario", "broker_operations"]

DEFAULT_SLO_P95_MS = 150.0  # the standard's secret-fetch SLO, applied to every operation


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    broker_method: str = ""  # full gRPC method path
    broker_response: str = ""  # "module:Class" of the response message
    broker_require_field: str = ""
    broker_requests: Callable[[list[CsrItem]], list[bytes]] | None = None
    # Peers: name -> (HTTP path, request bodies, a byte string every good answer contains)
    openbao_path: str | None = None
    openbao_bodies: Callable[[list[CsrItem]], list[bytes]] | None = None
    openbao_expect: bytes = b""
    # Check one parsed broker response against the pool item it was made from (raise
    # ValueError when wrong); returns facts for the report.
    broker_check: Callable[[Any, CsrItem], dict[str, Any]] | None = None
    mix: tuple[str, ...] = ()  # names of scenarios whose broker requests are interleaved
    rotate_every_s: float | None = None  # rotate the CA this often during the load
    slo_p95_ms: float = DEFAULT_SLO_P95_MS


def _mint_csr_requests(pool: list[CsrItem]) -> list[bytes]:
    from broker.api._proto import ca_pb2

    return [
        ca_pb2.MintX509SVIDRequest(spiffe_id=item.spiffe_id, csr=item.csr_der).SerializeToString()
        for item in pool
    ]


def _check_x509(resp: Any, item: CsrItem) -> dict[str, Any]:
    from loadtests.csrs import check_certificate

    return {**check_certificate(resp.cert_chain[0], item), "chain_len": len(resp.cert_chain)}


JWT_AUDIENCE = "loadtests"


def _mint_jwt_requests(pool: list[CsrItem]) -> list[bytes]:
    from broker.api._proto import ca_pb2

    return [
        ca_pb2.MintJWTSVIDRequest(
            spiffe_id=item.spiffe_id, audience=[JWT_AUDIENCE]
        ).SerializeToString()
        for item in pool
    ]


def _check_jwt(resp: Any, item: CsrItem) -> dict[str, Any]:
    """The token's claims name the requested SPIFFE ID and audience (signature checked by the
    workload-facing tests; here only the shape of what was issued)."""
    parts = resp.token.split(".")
    if len(parts) != 3:
        raise ValueError("the JWT-SVID is not a compact JWS")
    header, claims = (
        json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4))) for p in parts[:2]
    )
    if claims.get("sub") != item.spiffe_id:
        raise ValueError(f"JWT-SVID sub is {claims.get('sub')!r}, expected {item.spiffe_id}")
    aud = claims.get("aud")
    if JWT_AUDIENCE not in (aud if isinstance(aud, list) else [aud]):
        raise ValueError(f"JWT-SVID aud is {aud!r}, expected {JWT_AUDIENCE}")
    return {
        "alg": header.get("alg"),
        "kid": header.get("kid"),
        "lifetime_s": int(claims["exp"]) - int(claims.get("iat", claims["exp"])),
        "token_bytes": len(resp.token),
    }


def _bao_sign_bodies(pool: list[CsrItem]) -> list[bytes]:
    return [json.dumps({"csr": item.csr_pem, "uri_sans": item.spiffe_id}).encode() for item in pool]


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario(
            name="svid-csr",
            description=(
                "X.509-SVID issuance from a workload CSR (EC P-256): broker MintX509SVID with "
                "csr set; OpenBao POST /v1/pki/sign/<role> with csr and uri_sans"
            ),
            broker_method="/broker.v1.CertificateAuthority/MintX509SVID",
            broker_response="broker.api._proto.ca_pb2:MintX509SVIDResponse",
            broker_require_field="cert_chain",
            broker_requests=_mint_csr_requests,
            openbao_path="/v1/pki/sign/spiffe",
            openbao_bodies=_bao_sign_bodies,
            openbao_expect=b'"certificate"',
            broker_check=_check_x509,
        ),
        Scenario(
            name="jwt-mint",
            description="JWT-SVID issuance (ES256): broker MintJWTSVID for one audience",
            broker_method="/broker.v1.CertificateAuthority/MintJWTSVID",
            broker_response="broker.api._proto.ca_pb2:MintJWTSVIDResponse",
            broker_require_field="token",
            broker_requests=_mint_jwt_requests,
            broker_check=_check_jwt,
        ),
        Scenario(
            name="mixed",
            description=(
                "a fleet starting up: many workloads asking at once for X.509-SVIDs (CSR) and "
                "JWT-SVIDs, requests interleaved; each operation keeps its own figures and SLO"
            ),
            mix=("svid-csr", "jwt-mint"),
        ),
        Scenario(
            name="rotation",
            description=(
                "the mixed load while the CA rotates (Rotate force=true every few seconds, "
                "a new issuing CA and JWT key each time); counts failed mints and rotations"
            ),
            mix=("svid-csr", "jwt-mint"),
            rotate_every_s=2.0,
        ),
    ]
}


def broker_operations(scenario: Scenario) -> list[Scenario]:
    """The simple scenarios whose broker requests make up `scenario`'s load (itself if it has
    no `mix`). Raises KeyError for a mix naming an unknown scenario."""
    if not scenario.mix:
        return [scenario]
    return [SCENARIOS[name] for name in scenario.mix]
