"""Scenarios: what one request is, for the broker and for each peer it is compared with.

A scenario turns the pre-made workload material (the CSR pool) into pre-serialized request
payloads, so the timed loop only sends bytes and checks answers. Add a scenario by adding a
`Scenario` to `SCENARIOS`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from loadtests.csrs import CsrItem

__all__ = ["SCENARIOS", "Scenario"]


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    broker_method: str  # full gRPC method path
    broker_response: str  # "module:Class" of the response message
    broker_require_field: str
    broker_requests: Callable[[list[CsrItem]], list[bytes]]
    # Peers: name -> (HTTP path, request bodies, a byte string every good answer contains)
    openbao_path: str | None = None
    openbao_bodies: Callable[[list[CsrItem]], list[bytes]] | None = None
    openbao_expect: bytes = b""


def _mint_csr_requests(pool: list[CsrItem]) -> list[bytes]:
    from broker.api._proto import ca_pb2

    return [
        ca_pb2.MintX509SVIDRequest(spiffe_id=item.spiffe_id, csr=item.csr_der).SerializeToString()
        for item in pool
    ]


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
        ),
    ]
}
