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
import contextlib
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
    rotate_every_s: float | None = None  # rotate the CA (and rotations) this often under load
    # What a rotation scenario rotates besides the CA, when this scenario is in its mix:
    # (operation name, method, response class, request bytes, required answer field).
    rotation: Callable[[], tuple[str, str, Any, bytes, str]] | None = None
    slo_p95_ms: float = DEFAULT_SLO_P95_MS
    # Also drive staged rollouts of a secret, one after another, while the load runs (the
    # `secret-rollout-rotate` operation: success is a completed rollout, latency start to end).
    rollouts: bool = False
    # Set-up outside the timed window (e.g. storing the secrets the load reads): gets a
    # `call(method, response_type, request_bytes) -> response` on the broker (operator identity).
    broker_setup: Callable[[Callable[[str, Any, bytes], Any]], None] | None = None
    openbao_method: str = "POST"
    openbao_setup: Callable[[Any], None] | None = None  # gets the started OpenBao
    # What a relying party verifies of each answer (`x509`: the chain, `jwt`: the token)
    # when the load verifies SVIDs (loadtests.relyingparty; rotation scenarios, --verify-svids).
    broker_verify: str = ""


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


# -- secret-get: one wrapped static secret read by reference ---------------------------------

BENCH_REF = "secret://bench/dev/api-key"
BAO_KV_PATH = "bench/api-key"
_SECRET_VALUE: dict[str, bytes] = {}


def _secret_setup(call: Callable[[str, Any, bytes], Any]) -> None:
    """Store the secret (a value generated now) unless a previous run stored it."""
    import secrets as random

    from broker.api._proto import secrets_pb2

    get = secrets_pb2.GetSecretRequest(reference=BENCH_REF).SerializeToString()
    try:
        found = call("/broker.v1.Secrets/Get", secrets_pb2.GetSecretResponse, get)
        _SECRET_VALUE["broker"] = found.value
        return
    except Exception:
        pass
    value = f"bench_{random.token_hex(24)}".encode()
    put = secrets_pb2.PutSecretRequest(
        reference=BENCH_REF,
        value=value,
        owner="bench",
        classification="confidential",
        rotation_period_seconds=90 * 86400,
    )
    call("/broker.v1.Secrets/Put", secrets_pb2.SecretInfo, put.SerializeToString())
    _SECRET_VALUE["broker"] = value


def _secret_get_requests(pool: list[CsrItem]) -> list[bytes]:
    from broker.api._proto import secrets_pb2

    request = secrets_pb2.GetSecretRequest(reference=BENCH_REF).SerializeToString()
    return [request for _ in pool]


def _check_secret(resp: Any, item: CsrItem) -> dict[str, Any]:
    if resp.value != _SECRET_VALUE.get("broker"):
        raise ValueError("the broker returned another value than the one stored")
    return {"version": resp.version, "value_bytes": len(resp.value)}


def _bao_kv_setup(bao: Any) -> None:
    """A KV v2 mount at secret/ holding one value (generated now)."""
    import secrets as random

    bao._cli("secrets", "enable", "-path=secret", "kv-v2")
    bao._cli("kv", "put", "-mount=secret", BAO_KV_PATH, f"value=bench_{random.token_hex(24)}")
    bao.setup_notes["kv"] = {"mount": "secret (kv-v2)", "path": BAO_KV_PATH}


def _secret_rotation() -> tuple[str, str, Any, bytes, str]:
    """A new generated value for the secret the load reads (rotation scenario)."""
    from broker.api._proto import secrets_pb2

    request = secrets_pb2.RotateSecretRequest(
        reference=BENCH_REF,
        environment="dev",
        generate_length=32,
        ticket="LOADTEST-1",
        justification="load test: rotate while the secret is read",
    )
    return (
        "secret-rotate",
        "/broker.v1.Secrets/Rotate",
        secrets_pb2.SecretInfo,
        request.SerializeToString(),
        "versions",
    )


def _bao_get_bodies(pool: list[CsrItem]) -> list[bytes]:
    return [b"" for _ in pool]


# -- kms-datakey / kms-decrypt: envelope encryption for services (issue 16) ------------------

BENCH_KEY = "bench-dek"
_KMS: dict[str, Any] = {}


def _kms_setup(call: Callable[[str, Any, bytes], Any]) -> None:
    """The AES-256 key the load uses (created unless a previous run did), and one data key
    whose ciphertext the decrypt load opens."""
    from broker.api._proto import kms_pb2

    create = kms_pb2.CreateKeyRequest(
        name=BENCH_KEY,
        purpose="encrypt",
        key_type="aes-256",
        owner="bench",
        environment="dev",
        classification="confidential",
        rotation_period_seconds=90 * 86400,
    )
    with contextlib.suppress(Exception):  # made by an earlier run against the same broker
        call("/broker.v1.Kms/CreateKey", kms_pb2.KeyInfo, create.SerializeToString())
    made = call(
        "/broker.v1.Kms/GenerateDataKey",
        kms_pb2.GenerateDataKeyResponse,
        kms_pb2.GenerateDataKeyRequest(key=BENCH_KEY).SerializeToString(),
    )
    _KMS["ciphertext"] = made.ciphertext
    _KMS["plaintext"] = made.plaintext


def _kms_datakey_requests(pool: list[CsrItem]) -> list[bytes]:
    from broker.api._proto import kms_pb2

    request = kms_pb2.GenerateDataKeyRequest(key=BENCH_KEY).SerializeToString()
    return [request for _ in pool]


def _check_datakey(resp: Any, item: CsrItem) -> dict[str, Any]:
    if len(resp.plaintext) != 32 or not resp.ciphertext:
        raise ValueError("the broker returned no 32-byte data key")
    return {"key_version": resp.key_version, "ciphertext_bytes": len(resp.ciphertext)}


def _kms_decrypt_requests(pool: list[CsrItem]) -> list[bytes]:
    from broker.api._proto import kms_pb2

    request = kms_pb2.DecryptRequest(ciphertext=_KMS["ciphertext"]).SerializeToString()
    return [request for _ in pool]


def _check_decrypt(resp: Any, item: CsrItem) -> dict[str, Any]:
    if resp.plaintext != _KMS.get("plaintext"):
        raise ValueError("the broker decrypted to another data key than the one made")
    return {"key_version": resp.key_version}


def _bao_transit_setup(bao: Any) -> None:
    """A transit mount with one aes256-gcm96 key, and one data key to decrypt."""
    bao._cli("secrets", "enable", "transit")
    bao._cli("write", "-f", f"transit/keys/{BENCH_KEY}")
    made = json.loads(
        bao._cli("write", "-format=json", "-f", f"transit/datakey/wrapped/{BENCH_KEY}")
    )
    _KMS["bao_ciphertext"] = made["data"]["ciphertext"]
    bao.setup_notes["transit"] = {"mount": "transit", "key": f"{BENCH_KEY} (aes256-gcm96)"}


def _bao_datakey_bodies(pool: list[CsrItem]) -> list[bytes]:
    return [b"{}" for _ in pool]


def _bao_decrypt_bodies(pool: list[CsrItem]) -> list[bytes]:
    body = json.dumps({"ciphertext": _KMS["bao_ciphertext"]}).encode()
    return [body for _ in pool]


# -- db-creds: one dynamic database login per request (a throwaway PostgreSQL / MariaDB) --------


def _db_creds_requests(pool: list[CsrItem]) -> list[bytes]:
    from broker.api._proto import database_pb2
    from loadtests.targets.database import ROLE

    request = database_pb2.IssueCredentialsRequest(role=ROLE).SerializeToString()
    return [request for _ in pool]


def _check_db_creds(resp: Any, item: CsrItem) -> dict[str, Any]:
    if not resp.username or not resp.password or not resp.lease.id:
        raise ValueError("the broker answered without username, password or lease")
    return {"lease_duration_s": resp.lease.lease_duration_seconds, "username": resp.username}


def _db_creds(plugin: str) -> Scenario:
    from functools import partial

    from loadtests.targets import database

    return Scenario(
        name=f"db-creds-{plugin}",
        description=(
            f"a fresh {plugin} login under a 1 h lease (CREATE + GRANT): "
            "broker Database/IssueCredentials; OpenBao GET /v1/database/creds/<role>. "
            "Revocation throughput: python -m loadtests.dbcreds"
        ),
        broker_method="/broker.v1.Database/IssueCredentials",
        broker_response="broker.api._proto.database_pb2:DatabaseCredentials",
        broker_require_field="password",
        broker_requests=_db_creds_requests,
        broker_check=_check_db_creds,
        broker_setup=partial(database.broker_setup, plugin),
        openbao_path=f"/v1/database/creds/{database.ROLE}",
        openbao_method="GET",
        openbao_bodies=_bao_get_bodies,
        openbao_expect=b'"password"',
        openbao_setup=partial(database.bao_setup, plugin),
    )


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
            broker_verify="x509",
        ),
        Scenario(
            name="jwt-mint",
            description="JWT-SVID issuance (ES256): broker MintJWTSVID for one audience",
            broker_method="/broker.v1.CertificateAuthority/MintJWTSVID",
            broker_response="broker.api._proto.ca_pb2:MintJWTSVIDResponse",
            broker_require_field="token",
            broker_requests=_mint_jwt_requests,
            broker_check=_check_jwt,
            broker_verify="jwt",
        ),
        Scenario(
            name="mixed",
            description=(
                "a fleet starting up: many workloads asking at once for X.509-SVIDs (CSR), "
                "JWT-SVIDs and secrets, requests interleaved; each operation keeps its own "
                "figures and SLO"
            ),
            mix=("svid-csr", "jwt-mint", "secret-get"),
        ),
        Scenario(
            name="rotation",
            description=(
                "the mixed load while the CA and the secret rotate every 2 s (CA Rotate "
                "force=true: a new issuing CA and JWT key; Secrets/Rotate: a new version) and "
                "staged rollouts of another secret run one after another (Rollouts/Start, "
                "stages 50%,100%, 1 s bake, followed to completion: secret-rollout-rotate); counts "
                "failed requests and rotations; a relying party verifies every SVID received "
                "against the bundle it holds (svid_verification_failures)"
            ),
            mix=("svid-csr", "jwt-mint", "secret-get"),
            rotate_every_s=2.0,
            rollouts=True,
        ),
        Scenario(
            name="secret-get",
            description=(
                "read one wrapped static secret by reference: broker Secrets/Get (policy on "
                "its metadata, one indexed read, one KEK unwrap in the key backend, AES-GCM, "
                "audited); OpenBao GET /v1/secret/data/<path> (KV v2)"
            ),
            broker_method="/broker.v1.Secrets/Get",
            broker_response="broker.api._proto.secrets_pb2:GetSecretResponse",
            broker_require_field="value",
            broker_requests=_secret_get_requests,
            broker_check=_check_secret,
            broker_setup=_secret_setup,
            openbao_path=f"/v1/secret/data/{BAO_KV_PATH}",
            openbao_method="GET",
            openbao_bodies=_bao_get_bodies,
            openbao_expect=b'"value"',
            openbao_setup=_bao_kv_setup,
            rotation=_secret_rotation,
        ),
        _db_creds("postgresql"),
        _db_creds("mysql"),
        Scenario(
            name="kms-datakey",
            description=(
                "a fresh 32-byte data key for envelope encryption: broker Kms/GenerateDataKey "
                "(policy on the key's metadata, one wrap in SoftHSM2, AES-GCM, audited); "
                "OpenBao POST /v1/transit/datakey/plaintext/<key>"
            ),
            broker_method="/broker.v1.Kms/GenerateDataKey",
            broker_response="broker.api._proto.kms_pb2:GenerateDataKeyResponse",
            broker_require_field="plaintext",
            broker_requests=_kms_datakey_requests,
            broker_check=_check_datakey,
            broker_setup=_kms_setup,
            openbao_path=f"/v1/transit/datakey/plaintext/{BENCH_KEY}",
            openbao_bodies=_bao_datakey_bodies,
            openbao_expect=b'"plaintext"',
            openbao_setup=_bao_transit_setup,
        ),
        Scenario(
            name="kms-decrypt",
            description=(
                "unwrap one data key: broker Kms/Decrypt (one unwrap in SoftHSM2, AES-GCM, "
                "audited); OpenBao POST /v1/transit/decrypt/<key>"
            ),
            broker_method="/broker.v1.Kms/Decrypt",
            broker_response="broker.api._proto.kms_pb2:DecryptResponse",
            broker_require_field="plaintext",
            broker_requests=_kms_decrypt_requests,
            broker_check=_check_decrypt,
            broker_setup=_kms_setup,
            openbao_path=f"/v1/transit/decrypt/{BENCH_KEY}",
            openbao_bodies=_bao_decrypt_bodies,
            openbao_expect=b'"plaintext"',
            openbao_setup=_bao_transit_setup,
        ),
    ]
}


def broker_operations(scenario: Scenario) -> list[Scenario]:
    """The simple scenarios whose broker requests make up `scenario`'s load (itself if it has
    no `mix`). Raises KeyError for a mix naming an unknown scenario."""
    if not scenario.mix:
        return [scenario]
    return [SCENARIOS[name] for name in scenario.mix]
