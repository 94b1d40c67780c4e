"""SoftwareBackend specifics: what lands on disk, PIN handling, tamper detection."""

from __future__ import annotations

import base64
import hmac
import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap

from ca.errors import BadPin, IntegrityError, InvalidInput, KeyBackendError, KeyExists
from ca.keys import KeyKind, SoftwareBackend

PIN = b"unit-test-pin"


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    return tmp_path / "keys"


def _material(backend: SoftwareBackend, label: str) -> list[bytes]:
    """The raw key material the backend holds for `label`, in the encodings one might leak."""
    key = backend._get(label)
    if key.ec_key is not None:
        scalar = key.ec_key.private_numbers().private_value
        raw = scalar.to_bytes((key.ec_key.curve.key_size + 7) // 8, "big")
        der = key.ec_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return [raw, der, base64.b64encode(der)[:40], raw.hex().encode()]
    if key.rsa_key is not None:
        numbers = key.rsa_key.private_numbers()
        d = numbers.d.to_bytes(384, "big")
        p = numbers.p.to_bytes(192, "big")
        der = key.rsa_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return [d, p, der, base64.b64encode(der)[:40], base64.b64encode(p)[:40], p.hex().encode()]
    return [key.secret, base64.b64encode(key.secret), key.secret.hex().encode()]


@pytest.mark.parametrize("kind", list(KeyKind))
def test_key_files_are_private_and_encrypted(key_dir: Path, kind: KeyKind) -> None:
    backend = SoftwareBackend(directory=key_dir, pin=PIN)
    try:
        backend.create_key("k", kind)
        path = key_dir / "k.key"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(key_dir.stat().st_mode) == 0o700
        content = path.read_bytes()
        for leak in _material(backend, "k"):
            assert leak not in content
        assert PIN not in content
        doc = json.loads(content)
        assert doc["kind"] == kind.value
        assert doc["kdf"]["name"] == "scrypt"
        if kind in (KeyKind.EC_P256, KeyKind.EC_P384, KeyKind.RSA_3072):
            assert doc["pkcs8"].startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")
            assert b"BEGIN PRIVATE KEY" not in content
            with pytest.raises(TypeError):  # an encrypted PEM needs a password
                serialization.load_pem_private_key(doc["pkcs8"].encode(), password=None)
        else:
            assert set(doc) >= {"nonce", "ciphertext"}
        assert [p.name for p in key_dir.iterdir() if p.name.endswith(".tmp")] == []
    finally:
        backend.close()


def test_wrong_pin_is_refused_at_open(key_dir: Path) -> None:
    SoftwareBackend(directory=key_dir, pin=PIN).close()
    with pytest.raises(BadPin) as excinfo:
        SoftwareBackend(directory=key_dir, pin=b"not-the-pin")
    assert str(key_dir) in str(excinfo.value)
    assert "not-the-pin" not in str(excinfo.value)
    assert PIN.decode() not in str(excinfo.value)


def test_persistent_store_needs_a_pin(key_dir: Path) -> None:
    with pytest.raises(InvalidInput, match="needs a PIN"):
        SoftwareBackend(directory=key_dir)
    with pytest.raises(InvalidInput, match="needs a PIN"):
        SoftwareBackend(directory=key_dir, pin=b"")


def test_directory_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidInput, match="not a directory"):
        SoftwareBackend(directory=tmp_path / "file", pin=PIN)


def test_tampered_key_file_raises_integrity_error(key_dir: Path) -> None:
    backend = SoftwareBackend(directory=key_dir, pin=PIN)
    backend.create_key("mac", KeyKind.HMAC_SHA256)
    backend.create_key("ec", KeyKind.EC_P256)
    backend.close()

    doc = json.loads((key_dir / "mac.key").read_bytes())
    ct = bytearray(base64.b64decode(doc["ciphertext"]))
    ct[0] ^= 1
    doc["ciphertext"] = base64.b64encode(bytes(ct)).decode()
    (key_dir / "mac.key").write_text(json.dumps(doc))
    (key_dir / "ec.key").write_text("{not json")

    reopened = SoftwareBackend(directory=key_dir, pin=PIN)
    try:
        with pytest.raises(IntegrityError, match="damaged"):
            reopened.mac("mac", b"x")
        with pytest.raises(IntegrityError, match="damaged"):
            reopened.signer("ec")
    finally:
        reopened.close()


def test_key_file_moved_to_another_label_does_not_load(key_dir: Path) -> None:
    backend = SoftwareBackend(directory=key_dir, pin=PIN)
    backend.create_key("kek-a", KeyKind.AES_256)
    backend.close()
    (key_dir / "kek-a.key").rename(key_dir / "kek-b.key")
    reopened = SoftwareBackend(directory=key_dir, pin=PIN)
    try:
        assert reopened.has_key("kek-b")
        with pytest.raises(IntegrityError):
            reopened.wrap("kek-b", b"d" * 16)
    finally:
        reopened.close()


def test_two_backends_on_one_directory_do_not_overwrite(key_dir: Path) -> None:
    first = SoftwareBackend(directory=key_dir, pin=PIN)
    second = SoftwareBackend(directory=key_dir, pin=PIN)
    try:
        first.create_key("shared", KeyKind.EC_P256)
        with pytest.raises(KeyExists):
            second.create_key("shared", KeyKind.EC_P256)
        assert second.public_key("shared") == first.public_key("shared")
        second.destroy_key("shared")
        assert not (key_dir / "shared.key").exists()
        assert not first.has_key("shared")
    finally:
        first.close()
        second.close()


def test_formats_match_the_standards() -> None:
    """mac is plain HMAC-SHA256 and wrap is RFC 3394, so blobs move between backends."""
    backend = SoftwareBackend()
    try:
        backend.create_key("mac", KeyKind.HMAC_SHA256)
        backend.create_key("kek", KeyKind.AES_256)
        mac_key = backend._get("mac").secret
        kek = backend._get("kek").secret
        assert len(mac_key) == 32
        assert len(kek) == 32
        assert backend.mac("mac", b"data") == hmac.digest(mac_key, b"data", "sha256")
        wrapped = backend.wrap("kek", b"d" * 32)
        assert aes_key_unwrap(kek, wrapped) == b"d" * 32
    finally:
        backend.close()


def test_in_memory_keys_are_independent_per_backend() -> None:
    a, b = SoftwareBackend(), SoftwareBackend()
    try:
        a.create_key("k", KeyKind.EC_P256)
        assert a.has_key("k")
        assert not b.has_key("k")
        assert a.description == "software (in memory)"
    finally:
        a.close()
        b.close()


def test_closed_backend_forgets_keys() -> None:
    backend = SoftwareBackend()
    backend.create_key("k", KeyKind.HMAC_SHA256)
    backend.close()
    assert backend._keys == {}
    with pytest.raises(KeyBackendError, match="closed"):
        backend.mac("k", b"x")
