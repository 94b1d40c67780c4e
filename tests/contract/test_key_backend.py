"""One contract, every key backend: software in memory, software in a directory, PKCS#11 on
SoftHSM2 (in process and through p11-kit where installed) and PKCS#11 on the module double of
tests/fixtures/fake_pkcs11.py (so the double is held to what the real token does).

The CA cannot tell the backends apart; these tests make sure it never has to.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import pickle
import secrets
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from cryptography.x509.oid import NameOID
from opentelemetry.sdk.trace import TracerProvider

from ca.errors import IntegrityError, InvalidInput, KeyBackendError, KeyExists, KeyNotFound
from ca.keys import (
    BackendSigner,
    DataKeyWrapper,
    KeyBackend,
    KeyDestroyer,
    KeyKind,
    MacSigner,
    Pkcs11Backend,
    RsaSigner,
    SoftwareBackend,
    jws_signature,
    random_source,
    rsa_pss,
    rsa_signer,
)
from tests.fixtures.fake_pkcs11 import FakeModule

CURVES = {KeyKind.EC_P256: ec.SECP256R1, KeyKind.EC_P384: ec.SECP384R1}
EC_KINDS = [KeyKind.EC_P256, KeyKind.EC_P384]


@dataclasses.dataclass
class Store:
    """Where a backend keeps its keys; `open()` gives a new backend over the same store."""

    name: str
    open: Callable[[], KeyBackend]
    persistent: bool


@pytest.fixture(
    params=[
        "software-memory",
        "software-dir",
        "pkcs11",
        "pkcs11-remote",
        "pkcs11-fake",
        "traced-software-dir",
        "traced-pkcs11-fake",
    ]
)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param.startswith("traced-"):
        # The key backend behind broker.tracing's wrapper (as `broker serve` wires it when an
        # OTLP endpoint is configured): the same contract, every call inside a recording span.
        from broker.tracing.keys import traced_keys

        inner = _plain_store(request.param.removeprefix("traced-"), request, tmp_path)
        tracer = TracerProvider().get_tracer("contract")
        return Store(
            request.param, lambda: traced_keys(inner.open(), tracer), persistent=inner.persistent
        )
    return _plain_store(request.param, request, tmp_path)


def _plain_store(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if name == "pkcs11-fake":
        module = FakeModule()
        module.add_token("fake", "fake-pin-1234")
        path = f"fake-pkcs11-{secrets.token_hex(4)}"
        return Store(
            "pkcs11-fake",
            lambda: Pkcs11Backend("fake", b"fake-pin-1234", module_path=path, module=module),
            persistent=True,
        )
    if name == "software-memory":
        return Store("software-memory", SoftwareBackend, persistent=False)
    if name == "software-dir":
        directory = tmp_path / "keys"
        return Store(
            "software-dir",
            lambda: SoftwareBackend(directory=directory, pin=b"contract-pin"),
            persistent=True,
        )
    if name == "pkcs11-remote":
        # SoftHSM2 behind `p11-kit server`, reached through p11-kit-client.so.
        remote = request.getfixturevalue("p11kit_token")
        return Store(
            "pkcs11-remote",
            lambda: Pkcs11Backend(remote.token_label, remote.pin, module_path=remote.module_path),
            persistent=True,
        )
    token = request.getfixturevalue("softhsm_token")
    return Store(
        "pkcs11",
        lambda: Pkcs11Backend(token.token_label, token.pin, module_path=token.module_path),
        persistent=True,
    )


@pytest.fixture
def backend(store: Store) -> Iterator[KeyBackend]:
    opened = store.open()
    try:
        if store.name.startswith("traced-"):
            tracer = TracerProvider().get_tracer("contract")
            with tracer.start_as_current_span("contract-test"):  # the wrapper's traced path
                yield opened
        else:
            yield opened
    finally:
        opened.close()


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _self_signed(
    signer: ec.EllipticCurvePrivateKey, algorithm: hashes.HashAlgorithm
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name("contract CA"))
        .issuer_name(_name("contract CA"))
        .public_key(signer.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(signer, algorithm)
    )


def test_backend_satisfies_protocol(backend: KeyBackend) -> None:
    assert isinstance(backend, KeyBackend)
    # Every backend here has the optional powers too.
    assert isinstance(backend, DataKeyWrapper)
    assert isinstance(backend, MacSigner)
    assert isinstance(backend, KeyDestroyer)
    assert isinstance(backend, RsaSigner)
    assert backend.description
    assert "pin" not in backend.description.lower()


def test_create_has_destroy_is_idempotent(backend: KeyBackend) -> None:
    assert not backend.has_key("k1")
    backend.create_key("k1", KeyKind.EC_P256)
    assert backend.has_key("k1")
    backend.destroy_key("k1")
    assert not backend.has_key("k1")
    backend.destroy_key("k1")  # already gone: still fine
    assert not backend.has_key("k1")
    backend.create_key("k1", KeyKind.HMAC_SHA256)  # the label is free again
    assert backend.has_key("k1")


@pytest.mark.parametrize("kind", list(KeyKind))
def test_create_twice_raises_key_exists(backend: KeyBackend, kind: KeyKind) -> None:
    backend.create_key("dup", kind)
    with pytest.raises(KeyExists, match="dup"):
        backend.create_key("dup", kind)
    other = KeyKind.AES_256 if kind is not KeyKind.AES_256 else KeyKind.EC_P256
    with pytest.raises(KeyExists):
        backend.create_key("dup", other)


@pytest.mark.parametrize(
    "operation",
    [
        lambda b: b.signer("missing"),
        lambda b: b.public_key("missing"),
        lambda b: b.mac("missing", b"x"),
        lambda b: b.wrap("missing", b"k" * 32),
        lambda b: b.unwrap("missing", b"w" * 40),
        lambda b: rsa_signer(b).rsa_sign_digest("missing", b"d" * 32),
        lambda b: rsa_signer(b).rsa_public_key("missing"),
    ],
    ids=["signer", "public_key", "mac", "wrap", "unwrap", "rsa_sign", "rsa_public_key"],
)
def test_unknown_label_raises_key_not_found(
    backend: KeyBackend, operation: Callable[[KeyBackend], object]
) -> None:
    with pytest.raises(KeyNotFound, match="missing"):
        operation(backend)


def test_invalid_label_is_refused(backend: KeyBackend) -> None:
    for bad in ["", "../etc/passwd", "a/b", "with space", "-leading-dash", "x" * 129]:
        with pytest.raises(InvalidInput):
            backend.create_key(bad, KeyKind.EC_P256)


def test_wrong_kind_is_refused(backend: KeyBackend) -> None:
    backend.create_key("ec", KeyKind.EC_P256)
    backend.create_key("aes", KeyKind.AES_256)
    backend.create_key("hmac", KeyKind.HMAC_SHA256)
    with pytest.raises(InvalidInput, match="hmac-sha256"):
        backend.mac("ec", b"x")
    with pytest.raises(InvalidInput, match="aes-256"):
        backend.wrap("hmac", b"k" * 16)
    with pytest.raises(InvalidInput):
        backend.signer("aes")
    with pytest.raises(InvalidInput):
        backend.public_key("hmac")


@pytest.mark.parametrize("kind", EC_KINDS)
def test_signer_signs_certificates_and_csrs(backend: KeyBackend, kind: KeyKind) -> None:
    backend.create_key("ca", kind)
    signer = backend.signer("ca")
    assert isinstance(signer, ec.EllipticCurvePrivateKey)
    assert isinstance(signer.curve, CURVES[kind])
    public = backend.public_key("ca")
    assert public == signer.public_key()

    cert = _self_signed(signer, hashes.SHA256())
    cert.verify_directly_issued_by(cert)
    assert cert.public_key() == public

    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_name("workload"))
        .sign(signer, hashes.SHA384())
    )
    assert csr.is_signature_valid
    assert csr.public_key() == public


@pytest.mark.parametrize("kind", EC_KINDS)
def test_signatures_verify_with_public_key(backend: KeyBackend, kind: KeyKind) -> None:
    backend.create_key("sig", kind)
    signer = backend.signer("sig")
    public = backend.public_key("sig")
    algorithm = hashes.SHA256() if kind is KeyKind.EC_P256 else hashes.SHA384()
    data = b"the data to sign"

    der = signer.sign(data, ec.ECDSA(algorithm))
    public.verify(der, data, ec.ECDSA(algorithm))

    digest = hashes.Hash(algorithm)
    digest.update(data)
    prehashed = signer.sign(digest.finalize(), ec.ECDSA(Prehashed(algorithm)))
    public.verify(prehashed, data, ec.ECDSA(algorithm))

    with pytest.raises(InvalidSignature):
        public.verify(der, b"other data", ec.ECDSA(algorithm))


@pytest.mark.parametrize("kind", EC_KINDS)
def test_raw_jws_signatures_verify(backend: KeyBackend, kind: KeyKind) -> None:
    backend.create_key("jws", kind)
    signer = backend.signer("jws")
    assert isinstance(signer, BackendSigner)
    size = 32 if kind is KeyKind.EC_P256 else 48
    algorithm = hashes.SHA256() if kind is KeyKind.EC_P256 else hashes.SHA384()
    signing_input = b"eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJzcGlmZmU6Ly9leGFtcGxlIn0"

    raw = jws_signature(signer, signing_input)
    assert len(raw) == 2 * size
    der = encode_dss_signature(int.from_bytes(raw[:size], "big"), int.from_bytes(raw[size:], "big"))
    backend.public_key("jws").verify(der, signing_input, ec.ECDSA(algorithm))

    h = hashes.Hash(algorithm)
    h.update(signing_input)
    raw2 = signer.sign_raw_digest(h.finalize())
    assert len(raw2) == 2 * size
    der2 = encode_dss_signature(
        int.from_bytes(raw2[:size], "big"), int.from_bytes(raw2[size:], "big")
    )
    signer.public_key().verify(der2, signing_input, ec.ECDSA(algorithm))


def _sha256(data: bytes) -> bytes:
    h = hashes.Hash(hashes.SHA256())
    h.update(data)
    return h.finalize()


def test_rsa_3072_pss_signatures_verify_outside_the_backend(backend: KeyBackend) -> None:
    rsa_keys = rsa_signer(backend)
    backend.create_key("rsa", KeyKind.RSA_3072)
    public = rsa_keys.rsa_public_key("rsa")
    assert isinstance(public, rsa.RSAPublicKey)
    assert public.key_size == 3072
    assert public.public_numbers().e == 65537
    data = b"the data to sign"

    signature = rsa_keys.rsa_sign_digest("rsa", _sha256(data))
    assert len(signature) == 384
    # A verifier that knows only the scheme: RSA-PSS, SHA-256, MGF1-SHA-256, 32-byte salt.
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    public.verify(signature, data, pss, hashes.SHA256())
    public.verify(signature, data, rsa_pss(), hashes.SHA256())
    # Probabilistic: a second signature differs and verifies too.
    again = rsa_keys.rsa_sign_digest("rsa", _sha256(data))
    assert again != signature
    public.verify(again, data, pss, hashes.SHA256())
    with pytest.raises(InvalidSignature):
        public.verify(signature, b"other data", pss, hashes.SHA256())
    with pytest.raises(InvalidSignature):  # not PKCS#1 v1.5
        public.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())


def test_rsa_keys_are_not_ca_signers_and_kinds_do_not_mix(backend: KeyBackend) -> None:
    rsa_keys = rsa_signer(backend)
    backend.create_key("rsa", KeyKind.RSA_3072)
    backend.create_key("ec", KeyKind.EC_P256)
    backend.create_key("hmac", KeyKind.HMAC_SHA256)
    with pytest.raises(InvalidInput):
        backend.signer("rsa")
    with pytest.raises(InvalidInput):
        backend.public_key("rsa")
    with pytest.raises(InvalidInput, match="hmac-sha256"):
        backend.mac("rsa", b"x")
    for other in ("ec", "hmac"):
        with pytest.raises(InvalidInput, match="rsa-3072"):
            rsa_keys.rsa_sign_digest(other, b"d" * 32)
        with pytest.raises(InvalidInput, match="rsa-3072"):
            rsa_keys.rsa_public_key(other)
    for bad in (b"", b"d" * 31, b"d" * 48):
        with pytest.raises(InvalidInput, match="32 bytes"):
            rsa_keys.rsa_sign_digest("rsa", bad)


def test_private_material_is_refused(backend: KeyBackend) -> None:
    backend.create_key("secret-ca", KeyKind.EC_P256)
    signer = backend.signer("secret-ca")
    with pytest.raises(KeyBackendError, match="never leaves"):
        signer.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    with pytest.raises(KeyBackendError, match="never leaves"):
        signer.private_numbers()
    with pytest.raises(KeyBackendError):
        pickle.dumps(signer)
    with pytest.raises(KeyBackendError):
        signer.exchange(ec.ECDH(), ec.generate_private_key(ec.SECP256R1()).public_key())
    assert "secret-ca" in repr(signer)


def test_mac_is_deterministic_and_keyed(backend: KeyBackend) -> None:
    backend.create_key("mac-a", KeyKind.HMAC_SHA256)
    backend.create_key("mac-b", KeyKind.HMAC_SHA256)
    tag = backend.mac("mac-a", b"message")
    assert len(tag) == 32
    assert backend.mac("mac-a", b"message") == tag
    assert backend.mac("mac-a", b"message!") != tag
    assert backend.mac("mac-b", b"message") != tag
    assert len(backend.mac("mac-a", b"")) == 32


@pytest.mark.parametrize("size", [16, 24, 32, 64])
def test_wrap_unwrap_round_trip(backend: KeyBackend, size: int) -> None:
    backend.create_key("kek", KeyKind.AES_256)
    data_key = bytes(range(size))
    wrapped = backend.wrap("kek", data_key)
    # RFC 3394 (size + 8), or PKCS#11's one-call format (a marker and a nonce in front of it).
    assert len(wrapped) in (size + 8, size + 8 + 13)
    assert data_key not in wrapped
    assert backend.unwrap("kek", wrapped) == data_key


def test_unwrap_of_tampered_input_raises_integrity_error(backend: KeyBackend) -> None:
    backend.create_key("kek", KeyKind.AES_256)
    backend.create_key("kek-2", KeyKind.AES_256)
    wrapped = backend.wrap("kek", b"\x11" * 32)
    for position in (0, 7, 8, len(wrapped) - 1):
        tampered = bytearray(wrapped)
        tampered[position] ^= 0x01
        with pytest.raises(IntegrityError):
            backend.unwrap("kek", bytes(tampered))
    with pytest.raises(IntegrityError):
        backend.unwrap("kek", wrapped[:-8])
    with pytest.raises(IntegrityError):
        backend.unwrap("kek", wrapped + b"\x00")
    with pytest.raises(IntegrityError):
        backend.unwrap("kek-2", wrapped)
    assert backend.unwrap("kek", wrapped) == b"\x11" * 32  # the backend still works


@pytest.mark.parametrize("size", [0, 8, 15, 17, 72])
def test_wrap_refuses_bad_data_key_lengths(backend: KeyBackend, size: int) -> None:
    backend.create_key("kek", KeyKind.AES_256)
    with pytest.raises(InvalidInput, match="multiple of 8"):
        backend.wrap("kek", b"k" * size)


def test_keys_persist_across_reopen(store: Store) -> None:
    first = store.open()
    try:
        first.create_key("persist-ec", KeyKind.EC_P384)
        first.create_key("persist-mac", KeyKind.HMAC_SHA256)
        first.create_key("persist-kek", KeyKind.AES_256)
        first.create_key("persist-rsa", KeyKind.RSA_3072)
        rsa_public = rsa_signer(first).rsa_public_key("persist-rsa")
        public = first.public_key("persist-ec")
        tag = first.mac("persist-mac", b"m")
        wrapped = first.wrap("persist-kek", b"d" * 32)
    finally:
        first.close()

    second = store.open()
    try:
        if not store.persistent:
            assert not second.has_key("persist-ec")
            return
        assert second.has_key("persist-ec")
        assert second.public_key("persist-ec") == public
        signature = second.signer("persist-ec").sign(b"x", ec.ECDSA(hashes.SHA384()))
        public.verify(signature, b"x", ec.ECDSA(hashes.SHA384()))
        assert second.mac("persist-mac", b"m") == tag
        assert second.unwrap("persist-kek", wrapped) == b"d" * 32
        assert rsa_signer(second).rsa_public_key("persist-rsa") == rsa_public
        rsa_signature = rsa_signer(second).rsa_sign_digest("persist-rsa", _sha256(b"x"))
        rsa_public.verify(rsa_signature, b"x", rsa_pss(), hashes.SHA256())
        with pytest.raises(KeyExists):
            second.create_key("persist-ec", KeyKind.EC_P256)
    finally:
        second.close()


def test_closed_backend_refuses_and_close_is_idempotent(store: Store) -> None:
    backend = store.open()
    backend.create_key("k", KeyKind.EC_P256)
    signer = backend.signer("k")
    backend.close()
    backend.close()
    with pytest.raises(KeyBackendError, match="closed"):
        backend.has_key("k")
    with pytest.raises(KeyBackendError, match="closed"):
        signer.sign(b"x", ec.ECDSA(hashes.SHA256()))


def test_signer_of_destroyed_key_stops_working(backend: KeyBackend) -> None:
    backend.create_key("gone", KeyKind.EC_P256)
    signer = backend.signer("gone")
    signer.sign(b"x", ec.ECDSA(hashes.SHA256()))
    backend.destroy_key("gone")
    with pytest.raises(KeyNotFound):
        signer.sign(b"x", ec.ECDSA(hashes.SHA256()))


def test_concurrent_signing_from_eight_threads(backend: KeyBackend) -> None:
    backend.create_key("busy", KeyKind.EC_P256)
    backend.create_key("busy-mac", KeyKind.HMAC_SHA256)
    signer = backend.signer("busy")
    public = backend.public_key("busy")
    expected_tag = backend.mac("busy-mac", b"tag")
    failures: list[BaseException] = []
    start = threading.Barrier(8)

    def work(n: int) -> None:
        try:
            start.wait()
            for i in range(40):
                data = f"thread {n} message {i}".encode()
                public.verify(
                    signer.sign(data, ec.ECDSA(hashes.SHA256())), data, ec.ECDSA(hashes.SHA256())
                )
                if i % 10 == 0:
                    assert backend.mac("busy-mac", b"tag") == expected_tag
        except BaseException as exc:  # collected and reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert failures == []


def test_random_gives_the_bytes_asked_for_and_refuses_bad_lengths(backend: KeyBackend) -> None:
    source = random_source(backend)
    values = {source.random(32) for _ in range(16)}
    assert len(values) == 16  # no repeats
    assert all(len(v) == 32 for v in values)
    assert len(source.random(1)) == 1
    assert len(source.random(4096)) == 4096
    for bad in (0, -1, 4097):
        with pytest.raises(InvalidInput):
            source.random(bad)
