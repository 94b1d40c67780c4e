"""Pkcs11Backend specifics on SoftHSM2: key attributes, PINs, lost sessions, module reloads."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pkcs11
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import Attribute, KeyType, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11e

from broker.softhsm import SOFTHSM_MODULE
from ca.errors import BadPin, IntegrityError, InvalidInput, KeyBackendError, KeyNotFound
from ca.keys import KeyKind, Pkcs11Backend, open_backend
from ca.keys.pkcs11 import refresh_module
from tests.fixtures import softhsm as softhsm_fixtures
from tests.fixtures.softhsm import SoftHsmEnv, SoftHsmToken


def _open(token: SoftHsmToken, pin: bytes | None = None) -> Pkcs11Backend:
    return Pkcs11Backend(token.token_label, pin or token.pin, module_path=token.module_path)


@pytest.fixture
def raw_session(pkcs11_backend: Pkcs11Backend, softhsm_token: SoftHsmToken) -> Iterator[Any]:
    """A plain python-pkcs11 session on the backend's token, independent of the backend.

    The backend has logged the application in, so this session sees private objects too.
    """
    lib = pkcs11.lib(softhsm_token.module_path)
    session = lib.get_token(token_label=softhsm_token.token_label).open()
    try:
        yield session
    finally:
        session.close()


def _verify(backend: Pkcs11Backend, label: str) -> None:
    data = b"check"
    signature = backend.signer(label).sign(data, ec.ECDSA(hashes.SHA256()))
    backend.public_key(label).verify(signature, data, ec.ECDSA(hashes.SHA256()))


@pytest.mark.parametrize("kind", list(KeyKind))
def test_keys_are_sensitive_and_never_extractable(
    pkcs11_backend: Pkcs11Backend, raw_session: Any, kind: KeyKind
) -> None:
    pkcs11_backend.create_key("guarded", kind)
    asymmetric = kind.value.startswith(("ec", "rsa"))
    cls = ObjectClass.PRIVATE_KEY if asymmetric else ObjectClass.SECRET_KEY
    [key] = list(raw_session.get_objects({Attribute.LABEL: "guarded", Attribute.CLASS: cls}))
    assert key[Attribute.SENSITIVE] is True
    assert key[Attribute.EXTRACTABLE] is False
    assert key[Attribute.TOKEN] is True
    assert key[Attribute.PRIVATE] is True
    assert key[Attribute.NEVER_EXTRACTABLE] is True
    assert key[Attribute.ID] == b"guarded"
    # The secret part: CKA_VALUE, or CKA_PRIVATE_EXPONENT for RSA (which has no CKA_VALUE).
    material = Attribute.PRIVATE_EXPONENT if kind is KeyKind.RSA_3072 else Attribute.VALUE
    with pytest.raises(p11e.AttributeSensitive):
        key[material]
    props = pkcs11_backend.key_properties("guarded")
    assert props["sensitive"] is True
    assert props["extractable"] is False
    assert props["always_sensitive"] is True


def test_rsa_key_pair_is_3072_bits_exponent_65537_and_signs_pss_in_the_token(
    pkcs11_backend: Pkcs11Backend, raw_session: Any
) -> None:
    pkcs11_backend.create_key("rsa", KeyKind.RSA_3072)
    [public] = list(
        raw_session.get_objects({Attribute.LABEL: "rsa", Attribute.CLASS: ObjectClass.PUBLIC_KEY})
    )
    [private] = list(
        raw_session.get_objects({Attribute.LABEL: "rsa", Attribute.CLASS: ObjectClass.PRIVATE_KEY})
    )
    assert public.key_type == KeyType.RSA
    assert public[Attribute.MODULUS_BITS] == 3072
    assert int.from_bytes(public[Attribute.PUBLIC_EXPONENT], "big") == 65537
    assert private[Attribute.SIGN] is True
    assert private[Attribute.LOCAL] is True  # generated in the token, never imported
    with pytest.raises(p11e.AttributeSensitive):
        private[Attribute.PRIVATE_EXPONENT]
    props = pkcs11_backend.key_properties("rsa")
    assert props["sensitive"] is True
    assert props["extractable"] is False
    rsa_public = pkcs11_backend.rsa_public_key("rsa")
    assert rsa_public.key_size == 3072
    assert rsa_public.public_numbers().e == 65537


def test_rsa_private_key_cannot_be_wrapped_out(
    pkcs11_backend: Pkcs11Backend, raw_session: Any
) -> None:
    pkcs11_backend.create_key("rsa", KeyKind.RSA_3072)
    pkcs11_backend.create_key("kek", KeyKind.AES_256)
    [rsa_key] = list(
        raw_session.get_objects({Attribute.LABEL: "rsa", Attribute.CLASS: ObjectClass.PRIVATE_KEY})
    )
    [kek] = list(
        raw_session.get_objects({Attribute.LABEL: "kek", Attribute.CLASS: ObjectClass.SECRET_KEY})
    )
    with pytest.raises(p11e.PKCS11Error):
        kek.wrap_key(rsa_key, mechanism=pkcs11.Mechanism.AES_KEY_WRAP_PAD)


def test_ec_private_key_cannot_be_wrapped_out(
    pkcs11_backend: Pkcs11Backend, raw_session: Any
) -> None:
    pkcs11_backend.create_key("ca", KeyKind.EC_P256)
    pkcs11_backend.create_key("kek", KeyKind.AES_256)
    [ca_key] = list(
        raw_session.get_objects({Attribute.LABEL: "ca", Attribute.CLASS: ObjectClass.PRIVATE_KEY})
    )
    [kek] = list(
        raw_session.get_objects({Attribute.LABEL: "kek", Attribute.CLASS: ObjectClass.SECRET_KEY})
    )
    with pytest.raises(p11e.PKCS11Error):
        kek.wrap_key(ca_key, mechanism=pkcs11.Mechanism.AES_KEY_WRAP_PAD)


def test_wrong_pin_raises_bad_pin_naming_the_token(softhsm_token: SoftHsmToken) -> None:
    with pytest.raises(BadPin) as excinfo:
        _open(softhsm_token, b"wrong-pin-123")
    message = str(excinfo.value)
    assert softhsm_token.token_label in message
    assert "wrong-pin-123" not in message
    assert softhsm_token.pin.decode() not in message
    backend = _open(softhsm_token)  # the right PIN still works afterwards
    backend.close()


def test_wrong_pin_is_refused_while_the_token_is_open(
    pkcs11_backend: Pkcs11Backend, softhsm_token: SoftHsmToken
) -> None:
    with pytest.raises(BadPin, match=softhsm_token.token_label):
        _open(softhsm_token, b"wrong-pin-456")
    assert not pkcs11_backend.has_key("anything")  # the open backend is unaffected


def test_unknown_token_names_the_label(softhsm_env: SoftHsmEnv) -> None:
    with pytest.raises(KeyBackendError, match="no-such-token-42") as excinfo:
        Pkcs11Backend("no-such-token-42", b"1234", module_path=softhsm_env.module_path)
    assert "1234" not in str(excinfo.value)


def test_bad_module_path_is_a_backend_error(tmp_path: Path) -> None:
    with pytest.raises(KeyBackendError, match="cannot load PKCS#11 module"):
        Pkcs11Backend("broker", b"1234", module_path=str(tmp_path / "missing.so"))


def test_lost_session_reconnects(pkcs11_backend: Pkcs11Backend) -> None:
    pkcs11_backend.create_key("ca", KeyKind.EC_P256)
    pkcs11_backend.create_key("mac", KeyKind.HMAC_SHA256)
    signer = pkcs11_backend.signer("ca")
    tag = pkcs11_backend.mac("mac", b"m")
    _verify(pkcs11_backend, "ca")
    assert pkcs11_backend.reconnects == 0

    pkcs11_backend._conn._login.close()  # behind the backend's back (logs out too)

    signature = signer.sign(b"after", ec.ECDSA(hashes.SHA256()))
    signer.public_key().verify(signature, b"after", ec.ECDSA(hashes.SHA256()))
    assert pkcs11_backend.reconnects == 1
    assert pkcs11_backend.mac("mac", b"m") == tag
    assert pkcs11_backend.reconnects == 1  # one reconnect served both


def test_module_reinitialisation_is_survived(pkcs11_backend: Pkcs11Backend) -> None:
    pkcs11_backend.create_key("ca", KeyKind.EC_P384)
    public = pkcs11_backend.public_key("ca")
    refresh_module(pkcs11_backend.module_path)
    signature = pkcs11_backend.signer("ca").sign(b"x", ec.ECDSA(hashes.SHA384()))
    public.verify(signature, b"x", ec.ECDSA(hashes.SHA384()))
    assert pkcs11_backend.reconnects == 1


def test_token_created_after_module_load_is_found(
    pkcs11_backend: Pkcs11Backend, softhsm_env: SoftHsmEnv
) -> None:
    pkcs11_backend.create_key("ca", KeyKind.EC_P256)  # the module is loaded and in use
    late = softhsm_env.new_token()
    late_backend = _open(late)
    try:
        late_backend.create_key("late-ca", KeyKind.EC_P256)
        _verify(late_backend, "late-ca")
        assert not late_backend.has_key("ca")
    finally:
        late_backend.close()
    _verify(pkcs11_backend, "ca")  # the first backend reconnected after the reload


def test_two_backends_on_one_token_share_the_login(
    pkcs11_backend: Pkcs11Backend, softhsm_token: SoftHsmToken
) -> None:
    second = _open(softhsm_token)
    try:
        second.create_key("from-second", KeyKind.EC_P256)
        assert pkcs11_backend.has_key("from-second")
        _verify(pkcs11_backend, "from-second")
    finally:
        second.close()
    _verify(pkcs11_backend, "from-second")  # closing one did not log the other out
    with pytest.raises(KeyBackendError, match="closed"):
        second.has_key("from-second")


def test_key_destroyed_elsewhere_is_not_found(
    pkcs11_backend: Pkcs11Backend, raw_session: Any, softhsm_token: SoftHsmToken
) -> None:
    pkcs11_backend.create_key("ca", KeyKind.EC_P256)
    signer = pkcs11_backend.signer("ca")
    rw = pkcs11.lib(softhsm_token.module_path).get_token(token_label=softhsm_token.token_label)
    session = rw.open(rw=True)
    try:
        for obj in list(session.get_objects({Attribute.LABEL: "ca"})):
            obj.destroy()
    finally:
        session.close()
    with pytest.raises(KeyNotFound):
        signer.sign(b"x", ec.ECDSA(hashes.SHA256()))


def test_open_backend_with_pkcs11_uri(softhsm_token: SoftHsmToken) -> None:
    backend = open_backend(softhsm_token.uri)
    try:
        assert isinstance(backend, Pkcs11Backend)
        assert backend.description.startswith(f"pkcs11 token={softhsm_token.token_label} (")
        assert "SoftHSM" in backend.description
        assert softhsm_token.pin.decode() not in backend.description
        backend.create_key("via-uri", KeyKind.HMAC_SHA256)
        assert backend.has_key("via-uri")
    finally:
        backend.close()


def test_signer_rejects_non_ecdsa_and_odd_digests(pkcs11_backend: Pkcs11Backend) -> None:
    pkcs11_backend.create_key("ca", KeyKind.EC_P256)
    signer = pkcs11_backend.signer("ca")
    with pytest.raises(InvalidInput, match="ECDSA"):
        signer.sign(b"x", object())  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="13 bytes"):
        signer.sign_raw_digest(b"d" * 13)  # type: ignore[attr-defined]


def test_concurrent_use_of_two_tokens_is_serialised(
    pkcs11_backend: Pkcs11Backend, softhsm_env: SoftHsmEnv
) -> None:
    """SoftHSM2 runs unlocked under python-pkcs11's C_Initialize(NULL): two threads in the
    module at once can crash the process. The per-module lock must cover every token."""
    other = _open(softhsm_env.new_token())
    try:
        backends = [pkcs11_backend, other]
        for b in backends:
            b.create_key("ca", KeyKind.EC_P256)
            b.create_key("kek", KeyKind.AES_256)
        failures: list[BaseException] = []

        def work(b: Pkcs11Backend) -> None:
            try:
                signer = b.signer("ca")
                for i in range(100):
                    data = b"%d" % i
                    signer.public_key().verify(
                        signer.sign(data, ec.ECDSA(hashes.SHA256())),
                        data,
                        ec.ECDSA(hashes.SHA256()),
                    )
                    assert b.unwrap("kek", b.wrap("kek", b"k" * 16)) == b"k" * 16
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=work, args=(backends[i % 2],)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads)
        assert failures == []
    finally:
        other.close()


# -- SoftHSM2 fixtures (provisioning: tests/unit/broker/test_softhsm.py) -----------------------


def test_fixtures_skip_locally_and_fail_in_ci_without_softhsm(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        softhsm_fixtures, "softhsm_missing", lambda module: ["softhsm2-util (Debian package)"]
    )
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="softhsm2-util"):
        softhsm_fixtures._require_softhsm()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must install softhsm2"):
        softhsm_fixtures._require_softhsm()


def test_softhsm_token_fixture_fields(softhsm_token: SoftHsmToken) -> None:
    assert softhsm_token.conf_path.is_file()
    assert os.environ["SOFTHSM2_CONF"] == str(softhsm_token.conf_path)
    assert softhsm_token.module_path == SOFTHSM_MODULE
    assert softhsm_token.pin_file.read_bytes() == softhsm_token.pin + b"\n"
    assert stat.S_IMODE(softhsm_token.pin_file.stat().st_mode) == 0o600
    assert f"token={softhsm_token.token_label}" in softhsm_token.uri


class _FlakyToken:
    """Answers open() with the given exceptions first, then a session."""

    def __init__(self, *failures: Exception) -> None:
        self.failures = list(failures)
        self.calls = 0

    def open(self, rw: bool, user_pin: object) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return "session"


def test_session_open_retries_general_error_from_a_concurrent_process() -> None:
    import pkcs11.exceptions as p11e

    from ca.keys.pkcs11 import _open_with_retry

    token = _FlakyToken(p11e.GeneralError(), p11e.GeneralError())
    assert _open_with_retry(token, b"pin") == "session"
    assert token.calls == 3
    stubborn = _FlakyToken(*(p11e.GeneralError() for _ in range(10)))
    with pytest.raises(p11e.GeneralError):
        _open_with_retry(stubborn, b"pin", attempts=3)
    assert stubborn.calls == 3


def test_session_open_never_retries_a_wrong_pin() -> None:
    import pkcs11.exceptions as p11e

    from ca.keys.pkcs11 import _open_with_retry

    token = _FlakyToken(p11e.PinIncorrect(), p11e.PinIncorrect())
    with pytest.raises(p11e.PinIncorrect):
        _open_with_retry(token, b"pin")
    assert token.calls == 1


def test_softhsm_is_initialised_for_concurrent_sessions(pkcs11_backend: Pkcs11Backend) -> None:
    from ca.keys.pkcs11 import module_thread_safe

    # CKF_OS_LOCKING_OK was accepted: calls on distinct sessions run at once (the contract's
    # eight-thread signing test exercises it); python-pkcs11 itself would have passed NULL.
    assert module_thread_safe(pkcs11_backend.module_path)
    assert pkcs11_backend.thread_safe
    assert pkcs11_backend.executor is not None


def test_data_keys_wrapped_the_old_way_still_open(
    pkcs11_backend: Pkcs11Backend, softhsm_token: SoftHsmToken
) -> None:
    # A KEK made before the one-call format (WRAP/UNWRAP only, no CKA_ENCRYPT) keeps wrapping
    # with C_WrapKey (plain RFC 3394), and its blobs open.
    lib = pkcs11.lib(softhsm_token.module_path)
    with lib.get_token(token_label=softhsm_token.token_label).open(rw=True) as session:
        session.generate_key(
            KeyType.AES,
            256,
            label="old-kek",
            id=b"old-kek",
            store=True,
            capabilities=MechanismFlag.WRAP | MechanismFlag.UNWRAP,
            template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False},
        )
    data_key = bytes(range(32))
    old = pkcs11_backend.wrap("old-kek", data_key)
    assert len(old) == 40  # RFC 3394
    assert pkcs11_backend.unwrap("old-kek", old) == data_key
    # A current KEK opens RFC 3394 blobs wrapped under it by C_WrapKey too.
    pkcs11_backend.create_key("new-kek", KeyKind.AES_256)
    new = pkcs11_backend.wrap("new-kek", data_key)
    assert len(new) == 53 and new[0] == 2
    legacy = pkcs11_backend._run(
        "wrap",
        lambda s: pkcs11_backend._wrap_rfc3394(
            s, pkcs11_backend._conn.resolve(s, "new-kek"), data_key
        ),
    )
    assert len(legacy) == 40
    assert (
        pkcs11_backend.unwrap("new-kek", legacy)
        == data_key
        == pkcs11_backend.unwrap("new-kek", new)
    )
    with pytest.raises(IntegrityError):
        pkcs11_backend.unwrap("old-kek", new)  # the one-call format needs CKA_ENCRYPT
