"""Pkcs11Backend on a module double (tests/fixtures/fake_pkcs11.py): the session pool, lost
sessions, token errors mapped to `ca.errors`, PIN handling and the wrap formats, without
SoftHSM2. The same paths run on the real token in test_pkcs11.py and the contract suite."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import Attribute, KeyType, MechanismFlag
from pkcs11 import exceptions as p11e

from ca.errors import BadPin, IntegrityError, InvalidInput, KeyBackendError, KeyNotFound
from ca.keys import KeyKind, Pkcs11Backend
from ca.keys import pkcs11 as p11
from tests.fixtures.fake_pkcs11 import FakeModule, FakeToken

PIN = "fake-pin-1234"


@pytest.fixture
def module() -> FakeModule:
    return FakeModule()


@pytest.fixture
def token(module: FakeModule) -> FakeToken:
    return module.add_token("fake", PIN)


@pytest.fixture
def path() -> str:
    return f"fake-pkcs11-{secrets.token_hex(4)}"  # one registry entry per test


def _open(module: FakeModule, path: str, pin: str = PIN, **kwargs: object) -> Pkcs11Backend:
    return Pkcs11Backend("fake", pin.encode(), module_path=path, module=module, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def backend(module: FakeModule, token: FakeToken, path: str) -> Iterator[Pkcs11Backend]:
    opened = _open(module, path, sessions=2)
    try:
        yield opened
    finally:
        opened.close()


def _sign(backend: Pkcs11Backend, label: str) -> None:
    signer = backend.signer(label)
    signature = signer.sign(b"data", ec.ECDSA(hashes.SHA256()))
    signer.public_key().verify(signature, b"data", ec.ECDSA(hashes.SHA256()))


# -- the seam itself ---------------------------------------------------------------------------


def test_backend_runs_on_the_double_and_describes_it(backend: Pkcs11Backend) -> None:
    assert backend.description == "pkcs11 token=fake (Fake fake-p11)"
    assert backend.thread_safe
    for kind in KeyKind:
        backend.create_key(kind.value, kind)
        assert backend.has_key(kind.value)
    _sign(backend, "ec-p256")
    assert backend.mac("hmac-sha256", b"m") == backend.mac("hmac-sha256", b"m")
    wrapped = backend.wrap("aes-256", b"k" * 32)
    assert wrapped[0] == 2 and len(wrapped) == 53  # the one-call format
    assert backend.unwrap("aes-256", wrapped) == b"k" * 32


def test_a_module_path_serves_one_module_only(
    module: FakeModule, backend: Pkcs11Backend, path: str
) -> None:
    with pytest.raises(InvalidInput, match="already loaded"):
        Pkcs11Backend("fake", PIN.encode(), module_path=path, module=FakeModule())  # type: ignore[arg-type]
    second = _open(module, path)  # the same module again is fine: it shares the connection
    second.close()


def test_closing_the_last_backend_releases_the_module(
    module: FakeModule, token: FakeToken, path: str
) -> None:
    _open(module, path).close()
    assert path not in p11._LIBS
    assert token.sessions == []  # login session and pool closed
    assert not token.logged_in


# -- PINs and tokens -----------------------------------------------------------------------


def test_wrong_pin_is_bad_pin_naming_the_token_never_the_pin(
    module: FakeModule, token: FakeToken, path: str
) -> None:
    with pytest.raises(BadPin, match="'fake'") as excinfo:
        _open(module, path, pin="wrong-pin-999")
    assert "wrong-pin-999" not in str(excinfo.value) and PIN not in str(excinfo.value)
    assert not token.logged_in and token.sessions == []


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (p11e.PinLocked(), "locked"),
        (p11e.PinExpired(), "expired"),
        (p11e.UserPinNotInitialized(), "no user PIN"),
    ],
)
def test_pin_states_are_bad_pin_with_the_reason(
    module: FakeModule, token: FakeToken, path: str, error: Exception, message: str
) -> None:
    module.fail("open", error)
    with pytest.raises(BadPin, match=message):
        _open(module, path)


def test_session_open_failure_is_a_token_error(
    module: FakeModule, token: FakeToken, path: str
) -> None:
    module.fail("open", p11e.DeviceMemory())
    with pytest.raises(KeyBackendError, match=r"cannot open a session.*DeviceMemory"):
        _open(module, path)


def test_unknown_token_reinitialises_once_then_names_the_label(
    module: FakeModule, path: str
) -> None:
    with pytest.raises(KeyBackendError, match="'fake' not found"):
        _open(module, path)
    assert module.reinitialized == 1


def test_token_created_after_load_is_found_after_one_reinitialisation(
    module: FakeModule, path: str
) -> None:
    module.add_token("fake", PIN, visible=False)
    backend = _open(module, path)
    try:
        backend.create_key("ca", KeyKind.EC_P256)
        _sign(backend, "ca")
    finally:
        backend.close()
    assert module.reinitialized == 1


# -- errors mapped to token errors -------------------------------------------------------------


@pytest.mark.parametrize("error", [p11e.FunctionFailed(), p11e.DeviceMemory(), p11e.GeneralError()])
def test_token_failure_is_a_backend_error_naming_the_operation(
    backend: Pkcs11Backend, module: FakeModule, error: Exception
) -> None:
    backend.create_key("ca", KeyKind.EC_P256)
    signer = backend.signer("ca")
    module.fail("sign", error)
    with pytest.raises(KeyBackendError) as excinfo:
        signer.sign(b"x", ec.ECDSA(hashes.SHA256()))
    assert str(excinfo.value) == (
        f"pkcs11 token=fake (Fake fake-p11): sign with key 'ca' failed ({type(error).__name__})"
    )
    assert excinfo.value.__cause__ is None and excinfo.value.__suppress_context__
    assert backend.reconnects == 0  # not a lost session: no reconnect
    _sign(backend, "ca")  # and the session stays usable


def test_unwrap_failure_in_the_token_is_an_integrity_error(
    backend: Pkcs11Backend, token: FakeToken
) -> None:
    # A KEK without CKA_ENCRYPT wraps the older way (RFC 3394 through C_WrapKey); C_UnwrapKey
    # checks it, and SoftHSM2 answers CKR_GENERAL_ERROR for a bad blob: that is tampering,
    # not a token fault.
    session = token.open(rw=True)
    session.generate_key(
        KeyType.AES,
        256,
        label="old-kek",
        id=b"old-kek",
        store=True,
        capabilities=MechanismFlag.WRAP | MechanismFlag.UNWRAP,
        template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False},
    )
    session.close()
    blob = backend.wrap("old-kek", b"d" * 24)
    assert len(blob) == 32  # RFC 3394
    with pytest.raises(IntegrityError, match="old-kek"):
        backend.unwrap("old-kek", blob[:-1] + bytes([blob[-1] ^ 1]))
    assert backend.reconnects == 0
    assert backend.unwrap("old-kek", blob) == b"d" * 24


def test_derived_blob_under_another_kek_is_an_integrity_error(backend: Pkcs11Backend) -> None:
    backend.create_key("kek-a", KeyKind.AES_256)
    backend.create_key("kek-b", KeyKind.AES_256)
    blob = backend.wrap("kek-a", b"d" * 16)
    with pytest.raises(IntegrityError, match="kek-b"):
        backend.unwrap("kek-b", blob)
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(IntegrityError):
        backend.unwrap("kek-a", tampered)
    assert backend.unwrap("kek-a", blob) == b"d" * 16  # nothing changed


def test_wrong_kind_and_unknown_label_are_refused(backend: Pkcs11Backend) -> None:
    backend.create_key("mac", KeyKind.HMAC_SHA256)
    with pytest.raises(InvalidInput, match="wrap needs a aes-256 key"):
        backend.wrap("mac", b"k" * 16)
    with pytest.raises(KeyNotFound, match="no key 'absent'"):
        backend.mac("absent", b"m")


# -- lost sessions ---------------------------------------------------------------------------


def test_lost_session_reconnects_and_retries_once(
    backend: Pkcs11Backend, module: FakeModule
) -> None:
    backend.create_key("ca", KeyKind.EC_P256)
    signer = backend.signer("ca")
    module.fail("sign", p11e.SessionHandleInvalid())
    signer.sign(b"x", ec.ECDSA(hashes.SHA256()))
    assert backend.reconnects == 1


def test_session_lost_twice_gives_up_with_a_token_error(
    backend: Pkcs11Backend, module: FakeModule
) -> None:
    backend.create_key("ca", KeyKind.EC_P256)
    signer = backend.signer("ca")
    module.fail("sign", p11e.DeviceRemoved(), p11e.DeviceRemoved())
    with pytest.raises(KeyBackendError, match="sign with key 'ca' failed even after reconnecting"):
        signer.sign(b"x", ec.ECDSA(hashes.SHA256()))
    _sign(backend, "ca")  # the token is back: the next call works


def test_logout_behind_the_backends_back_is_survived(
    backend: Pkcs11Backend, token: FakeToken
) -> None:
    backend.create_key("mac", KeyKind.HMAC_SHA256)
    tag = backend.mac("mac", b"m")
    assert backend._conn._login is not None
    backend._conn._login.close()  # logs every session out
    assert not token.logged_in
    assert backend.mac("mac", b"m") == tag
    assert backend.reconnects == 1 and token.logged_in


def test_module_reinitialisation_is_survived(backend: Pkcs11Backend, module: FakeModule) -> None:
    backend.create_key("ca", KeyKind.EC_P384)
    p11.refresh_module(backend.module_path)
    assert module.reinitialized == 1
    _sign(backend, "ca")
    assert backend.reconnects == 1


def test_key_destroyed_elsewhere_is_not_found_after_one_retry(
    backend: Pkcs11Backend, token: FakeToken
) -> None:
    backend.create_key("ca", KeyKind.EC_P256)
    signer = backend.signer("ca")  # handle cached in a pooled session
    token.objects.clear()  # another process deleted it
    with pytest.raises(KeyNotFound):
        signer.sign(b"x", ec.ECDSA(hashes.SHA256()))


# -- the session pool ------------------------------------------------------------------------


def test_sessions_and_handles_are_reused(backend: Pkcs11Backend, module: FakeModule) -> None:
    backend.create_key("mac", KeyKind.HMAC_SHA256)
    opened, finds = module.sessions_opened, module.finds
    for i in range(20):
        backend.mac("mac", b"%d" % i)
    assert module.sessions_opened == opened  # the pooled session is reused
    assert module.finds == finds  # the handle was cached by create_key in that session


def test_a_refused_call_keeps_its_session(backend: Pkcs11Backend, module: FakeModule) -> None:
    backend.create_key("ca", KeyKind.EC_P256)
    opened = module.sessions_opened
    for _ in range(3):
        with pytest.raises(KeyNotFound):
            backend.mac("absent", b"m")
        with pytest.raises(InvalidInput):
            backend.mac("ca", b"m")
    assert module.sessions_opened == opened


def test_destroy_retires_sessions_holding_stale_handles(
    backend: Pkcs11Backend, module: FakeModule, token: FakeToken
) -> None:
    backend.create_key("ca", KeyKind.EC_P256)
    pooled_before, opened = len(token.sessions), module.sessions_opened
    backend.destroy_key("ca")
    assert not backend.has_key("ca")
    assert module.sessions_opened == opened + 1  # the session that held the handle retired
    assert len(token.sessions) == pooled_before
    backend.destroy_key("ca")  # idempotent


def test_the_pool_bounds_calls_in_flight(module: FakeModule, token: FakeToken, path: str) -> None:
    backend = _open(module, path, sessions=2)
    try:
        backend.create_key("ca", KeyKind.EC_P256)
        signer = backend.signer("ca")
        module.gate.clear()  # every sign waits in the token until released
        failures: list[BaseException] = []

        def work() -> None:
            try:
                signer.sign(b"x", ec.ECDSA(hashes.SHA256()))
            except BaseException as exc:  # pragma: no cover - reported below
                failures.append(exc)

        threads = [threading.Thread(target=work) for _ in range(6)]
        for t in threads:
            t.start()
        assert module.entered.acquire(timeout=60) and module.entered.acquire(timeout=60)
        # Two calls wait inside the token: both sessions are taken, the others queue.
        assert not backend._conn._slots.acquire(blocking=False)
        module.gate.set()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads)
        assert failures == []
        assert module.busy_peak <= 2
        assert len(token.sessions) <= 1 + 2  # the login session and at most two pooled
    finally:
        backend.close()


def test_closed_backend_refuses_without_touching_the_token(
    backend: Pkcs11Backend, module: FakeModule
) -> None:
    backend.close()
    opened = module.sessions_opened
    with pytest.raises(KeyBackendError, match="closed"):
        backend.has_key("x")
    assert module.sessions_opened == opened
    backend.close()  # idempotent
