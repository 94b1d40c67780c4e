"""Pkcs11Backend: keys that live in a PKCS#11 token (an HSM; SoftHSM2 in tests and dev).

Keys are generated inside the token as token objects (CKA_TOKEN) that are CKA_PRIVATE,
CKA_SENSITIVE and not CKA_EXTRACTABLE; CKA_LABEL is the key label and CKA_ID its UTF-8 bytes.

- EC P-256/P-384: CKM_EC_KEY_PAIR_GEN. The signer hashes in Python and asks the token for
  CKM_ECDSA over the digest (raw ``r || s``), converted to DER for cryptography/X.509;
  `BackendSigner.sign_raw_digest()` gives the raw form for JWS.
- HMAC-SHA256: a 256-bit CKK_GENERIC_SECRET key, CKM_SHA256_HMAC.
- AES-256 key-encryption keys, wrap/unwrap with CKM_AES_KEY_WRAP (RFC 3394), the token-side
  way: `wrap()` imports the data key as a short-lived *session* object (CKK_GENERIC_SECRET,
  extractable) and calls C_WrapKey with the KEK, then destroys the object; `unwrap()` calls
  C_UnwrapKey into a session object, reads its value and destroys it. (C_Encrypt with the
  key-wrap mechanism is not offered by SoftHSM2, so this is the portable route.) The output is
  byte-for-byte RFC 3394, the same format as the software backend's. A wrapped blob that fails
  the RFC 3394 integrity check raises `IntegrityError` (SoftHSM2 reports it as
  CKR_GENERAL_ERROR, other tokens as CKR_WRAPPED_KEY_INVALID / CKR_ENCRYPTED_DATA_INVALID).

Sessions: one logged-in read/write session per token per process, shared by every
`Pkcs11Backend` opened on that token (PKCS#11 login state is per application and token: a
second C_Login would fail with CKR_USER_ALREADY_LOGGED_IN, and a C_Logout from one session
would log all others out). Key handles and public keys are cached by label.

Threads: python-pkcs11 initialises modules with ``C_Initialize(NULL)``, which by the PKCS#11
spec promises the module that it is never called from two threads at once, and SoftHSM2 then
runs without internal locking (two threads signing on two sessions at once crash the process).
So every call into a module goes through one lock per module (python-pkcs11 releases the GIL in
token calls, which is why a lock and not the GIL is what protects us). Other code in the process
must not call the same module concurrently behind these backends' backs.

Lost sessions: when a call fails because the session or a handle was lost (closed session,
device removed, module re-initialised, user logged out, ...), the session is reopened, the user
logged in again, the handle re-resolved and the call retried once. The PIN is therefore kept in
memory for the backend's lifetime.

Module (re)initialisation: PKCS#11 modules read their configuration and enumerate tokens in
C_Initialize; python-pkcs11 loads and initialises a module once per process and caches it.
SoftHSM2 in particular reads ``SOFTHSM2_CONF`` and scans its token directory only then, so a
token created after the first load (``softhsm2-util --init-token``) is invisible until the
module is re-initialised. `Pkcs11Backend` handles this: if its token is not found it calls
`refresh_module()` once and looks again. `refresh_module()` takes the module lock, runs
C_Finalize + C_Initialize and lets each connection reconnect on its next call. Sessions that
other code in the process opened on the same module directly are invalidated by this too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pkcs11
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11e
from pkcs11.util.ec import encode_named_curve_parameters

from ca.errors import (
    BadPin,
    CAError,
    IntegrityError,
    InvalidInput,
    KeyBackendError,
    KeyExists,
    KeyNotFound,
)
from ca.keys.backend import KeyKind
from ca.keys.signer import BackendSigner, prehashed_for_digest
from ca.keys.software import check_data_key, check_wrapped
from ca.keys.uri import DEFAULT_PKCS11_MODULE, validate_label

__all__ = ["DEFAULT_PKCS11_MODULE", "Pkcs11Backend", "Pkcs11Signer", "refresh_module"]

T = TypeVar("T")

#: Errors after which the session (or a handle in it) is gone: reconnect and retry once.
_SESSION_LOST: tuple[type[Exception], ...] = (
    p11e.SessionClosed,
    p11e.SessionHandleInvalid,
    p11e.DeviceRemoved,
    p11e.DeviceError,
    p11e.TokenNotPresent,
    p11e.TokenNotRecognised,
    p11e.ObjectHandleInvalid,
    p11e.KeyHandleInvalid,
    p11e.UserNotLoggedIn,
)
#: How tokens report an AES key wrap integrity failure in C_UnwrapKey.
_UNWRAP_FAILED: tuple[type[Exception], ...] = (
    p11e.GeneralError,
    p11e.FunctionFailed,
    p11e.WrappedKeyInvalid,
    p11e.WrappedKeyLenRange,
    p11e.EncryptedDataInvalid,
    p11e.EncryptedDataLenRange,
    p11e.DataInvalid,
)

_CURVES: dict[KeyKind, tuple[ec.EllipticCurve, bytes]] = {
    KeyKind.EC_P256: (ec.SECP256R1(), encode_named_curve_parameters("secp256r1")),
    KeyKind.EC_P384: (ec.SECP384R1(), encode_named_curve_parameters("secp384r1")),
}
_PROTECTED_ATTRS = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
}
_PROPERTY_ATTRS = {
    "token": Attribute.TOKEN,
    "private": Attribute.PRIVATE,
    "sensitive": Attribute.SENSITIVE,
    "extractable": Attribute.EXTRACTABLE,
    "always_sensitive": Attribute.ALWAYS_SENSITIVE,
    "never_extractable": Attribute.NEVER_EXTRACTABLE,
    "local": Attribute.LOCAL,
}

_REGISTRY_LOCK = threading.RLock()
_CONNECTIONS: dict[tuple[str, str], _Connection] = {}
_MODULE_LOCKS: dict[str, threading.RLock] = {}


def _module_lock(module_path: str) -> threading.RLock:
    """The lock that serialises every call into one PKCS#11 module (see the module docstring)."""
    with _REGISTRY_LOCK:
        return _MODULE_LOCKS.setdefault(module_path, threading.RLock())


def _load_module(module_path: str) -> Any:
    try:
        return pkcs11.lib(module_path)
    except (p11e.PKCS11Error, OSError) as exc:
        raise KeyBackendError(
            f"cannot load PKCS#11 module {module_path}: {exc or type(exc).__name__}"
        ) from None


def refresh_module(module_path: str = DEFAULT_PKCS11_MODULE) -> None:
    """Re-initialise a PKCS#11 module (C_Finalize + C_Initialize) so it re-reads its
    configuration and sees tokens created since it was loaded.

    Every `Pkcs11Backend` on the module waits for the duration (module lock) and reconnects on
    its next call; sessions opened by other code on the same module are invalidated.
    """
    with _REGISTRY_LOCK, _module_lock(module_path):
        lib = _load_module(module_path)
        try:
            lib.reinitialize()
        except p11e.PKCS11Error as exc:
            raise KeyBackendError(
                f"cannot re-initialise PKCS#11 module {module_path}: {type(exc).__name__}"
            ) from None
        for conn in _CONNECTIONS.values():
            if conn.module_path == module_path:
                conn.invalidate()


def _decode_ec_point(data: bytes, curve: ec.EllipticCurve) -> ec.EllipticCurvePublicKey:
    """CKA_EC_POINT is a DER OCTET STRING around the X9.62 point (some tokens give it raw)."""
    size = 1 + 2 * ((curve.key_size + 7) // 8)
    point = data
    if len(data) != size and len(data) > 2 and data[0] == 0x04:
        if data[1] < 0x80:
            length, offset = data[1], 2
        else:
            count = data[1] & 0x7F
            length, offset = int.from_bytes(data[2 : 2 + count], "big"), 2 + count
        point = data[offset : offset + length]
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(curve, bytes(point))
    except ValueError:
        raise KeyBackendError(f"token returned an unreadable {curve.name} public key") from None


def _open_with_retry(token: Any, pin: str | bytes, attempts: int = 8) -> Any:
    """Open a logged-in R/W session. SoftHSM2 answers CKR_GENERAL_ERROR when another process
    opens or logs in to the same token at the same instant (its file-backed object store is
    being locked or re-read): seen when several broker workers start together. Retry that, and
    only that, a few times with a short growing pause; PIN errors are never retried."""
    delay = 0.02
    for attempt in range(attempts):
        try:
            return token.open(rw=True, user_pin=pin)
        except p11e.GeneralError:
            if attempt == attempts - 1:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
    raise AssertionError("unreachable")


@dataclasses.dataclass
class _Handle:
    kind: KeyKind
    key: Any  # a python-pkcs11 PrivateKey or SecretKey bound to the current session
    public: ec.EllipticCurvePublicKey | None = None


class _Connection:
    """One logged-in session on one token, shared by the backends on that token."""

    def __init__(self, module_path: str, token_label: str, pin: str) -> None:
        self.module_path = module_path
        self.token_label = token_label
        self.lock = _module_lock(module_path)
        self.refcount = 0
        self.reconnects = 0
        self.description = f"pkcs11 token={token_label}"
        self._pin = pin
        self._session: Any = None
        self._handles: dict[str, _Handle] = {}
        self._closed = False
        self._opened_before = False

    def pin_matches(self, pin: str) -> bool:
        return hmac.compare_digest(self._pin.encode(), pin.encode())

    # -- session lifecycle (callers hold self.lock) --------------------------------------------

    def _find_token(self, allow_refresh: bool) -> Any:
        lib = _load_module(self.module_path)
        try:
            return lib.get_token(token_label=self.token_label)
        except p11e.NoSuchToken:
            if not allow_refresh:
                raise KeyBackendError(
                    f"PKCS#11 token {self.token_label!r} not found in module {self.module_path}"
                ) from None
        except p11e.MultipleTokensReturned:
            raise KeyBackendError(
                f"more than one PKCS#11 token is labelled {self.token_label!r} in module "
                f"{self.module_path}"
            ) from None
        except p11e.PKCS11Error as exc:
            raise KeyBackendError(
                f"cannot list tokens of PKCS#11 module {self.module_path}: {type(exc).__name__}"
            ) from None
        # The token may have been created after the module was loaded: re-initialise once.
        refresh_module(self.module_path)
        return self._find_token(allow_refresh=False)

    def open(self, allow_refresh: bool = False) -> None:
        token = self._find_token(allow_refresh)
        name = f"PKCS#11 token {self.token_label!r}"
        try:
            session = _open_with_retry(token, self._pin)
        except (p11e.PinIncorrect, p11e.PinInvalid, p11e.PinLenRange):
            raise BadPin(f"wrong PIN for {name}") from None
        except p11e.PinLocked:
            raise BadPin(
                f"the user PIN of {name} is locked after too many wrong attempts; "
                "the security officer must reset it"
            ) from None
        except p11e.PinExpired:
            raise BadPin(f"the user PIN of {name} has expired; set a new one") from None
        except p11e.UserPinNotInitialized:
            raise BadPin(f"{name} has no user PIN set (initialise the token first)") from None
        except p11e.UserAlreadyLoggedIn:
            # Other code in this process logged in to the token already (login state is per
            # application): a session opened now shares that login.
            try:
                session = token.open(rw=True)
            except p11e.PKCS11Error as exc:
                raise KeyBackendError(
                    f"cannot open a session on {name}: {type(exc).__name__}"
                ) from None
        except p11e.PKCS11Error as exc:
            raise KeyBackendError(
                f"cannot open a session on {name}: {type(exc).__name__}"
            ) from None
        if self._opened_before:
            self.reconnects += 1
        self._opened_before = True
        self._session = session
        self._handles.clear()
        manufacturer = str(token.manufacturer_id).strip()
        model = str(token.model).strip()
        self.description = f"pkcs11 token={self.token_label} ({manufacturer} {model})"

    def invalidate(self) -> None:
        """Forget the session and handles without calling the token (it is gone already)."""
        self._session = None
        self._handles.clear()

    def drop(self) -> None:
        """Close the session if possible and forget it."""
        session, self._session = self._session, None
        self._handles.clear()
        if session is not None:
            with contextlib.suppress(p11e.PKCS11Error):
                session.close()

    def close(self) -> None:
        with self.lock:
            self._closed = True
            self.drop()
            self._pin = ""

    # -- calls --------------------------------------------------------------------------------

    def run(self, what: str, op: Callable[[Any], T]) -> T:
        """Run `op(session)` under the lock; reconnect and retry once if the session was lost."""
        with self.lock:
            if self._closed:
                raise KeyBackendError(f"key backend {self.description} is closed")
            for attempt in (1, 2):
                try:
                    if self._session is None:
                        self.open()
                    return op(self._session)
                except CAError:
                    raise
                except _SESSION_LOST as exc:
                    self.drop()
                    if attempt == 2:
                        raise KeyBackendError(
                            f"{self.description}: {what} failed even after reconnecting "
                            f"({type(exc).__name__})"
                        ) from None
                except p11e.PKCS11Error as exc:
                    raise KeyBackendError(
                        f"{self.description}: {what} failed ({type(exc).__name__})"
                    ) from None
            raise AssertionError("unreachable")  # pragma: no cover

    def resolve(self, session: Any, label: str) -> _Handle:
        """The cached handle for `label`, found on the token if not cached. Lock held."""
        handle = self._handles.get(label)
        if handle is not None:
            return handle
        objects = list(session.get_objects({Attribute.LABEL: label}))
        private = [o for o in objects if isinstance(o, pkcs11.PrivateKey)]
        public = [o for o in objects if isinstance(o, pkcs11.PublicKey)]
        secret = [o for o in objects if isinstance(o, pkcs11.SecretKey)]
        if not objects:
            raise KeyNotFound(f"no key {label!r} on {self.description}")
        if len(private) + len(secret) != 1:
            raise KeyBackendError(
                f"label {label!r} on {self.description} does not name exactly one key "
                f"({len(private)} private, {len(secret)} secret)"
            )
        if private:
            key = private[0]
            if key.key_type != KeyType.EC:
                raise KeyBackendError(f"key {label!r} on {self.description} is not an EC key")
            if len(public) != 1:
                raise KeyBackendError(
                    f"EC key {label!r} on {self.description} has {len(public)} public-key "
                    "objects; expected one"
                )
            params = bytes(public[0][Attribute.EC_PARAMS])
            kind = next((k for k, (_, p) in _CURVES.items() if p == params), None)
            if kind is None:
                raise KeyBackendError(
                    f"EC key {label!r} on {self.description} is on an unsupported curve"
                )
            curve = _CURVES[kind][0]
            pub = _decode_ec_point(bytes(public[0][Attribute.EC_POINT]), curve)
            handle = _Handle(kind, key, pub)
        else:
            secret_key = secret[0]
            if secret_key.key_type == KeyType.AES:
                kind = KeyKind.AES_256
            elif secret_key.key_type in (KeyType.GENERIC_SECRET, KeyType.SHA256_HMAC):
                kind = KeyKind.HMAC_SHA256
            else:
                raise KeyBackendError(
                    f"secret key {label!r} on {self.description} has unsupported type "
                    f"{secret_key.key_type!r}"
                )
            handle = _Handle(kind, secret_key)
        self._handles[label] = handle
        return handle

    def forget(self, label: str) -> None:
        self._handles.pop(label, None)

    def remember(self, label: str, handle: _Handle) -> None:
        self._handles[label] = handle


class Pkcs11Signer(BackendSigner):
    """A signer whose ECDSA runs in the token (CKM_ECDSA over a digest computed here)."""

    def __init__(
        self, backend: Pkcs11Backend, label: str, public_key: ec.EllipticCurvePublicKey
    ) -> None:
        super().__init__(label, public_key)
        self._backend = backend

    def sign_raw_digest(self, digest: bytes) -> bytes:
        prehashed_for_digest(digest)  # reject digests of no known hash length
        raw = self._backend._sign_digest(self.label, bytes(digest))
        size = (self.curve.key_size + 7) // 8
        if len(raw) != 2 * size:
            raise KeyBackendError(
                f"token returned a {len(raw)}-byte ECDSA signature for {self.curve.name}"
            )
        return raw


class Pkcs11Backend:
    """Key custody in a PKCS#11 token. Thread-safe; see the module docstring."""

    def __init__(
        self, token_label: str, pin: bytes, module_path: str = DEFAULT_PKCS11_MODULE
    ) -> None:
        if not token_label:
            raise InvalidInput("a PKCS#11 token label is required")
        if not pin:
            raise InvalidInput(f"a PIN is required for PKCS#11 token {token_label!r}")
        try:
            pin_text = bytes(pin).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(
                f"the PIN for PKCS#11 token {token_label!r} is not valid UTF-8"
            ) from None
        self._token_label = token_label
        self._module_path = module_path
        self._closed = False
        key = (module_path, token_label)
        with _REGISTRY_LOCK:
            conn = _CONNECTIONS.get(key)
            if conn is not None:
                if not conn.pin_matches(pin_text):
                    raise BadPin(f"wrong PIN for PKCS#11 token {token_label!r}")
            else:
                conn = _Connection(module_path, token_label, pin_text)
                with conn.lock:
                    conn.open(allow_refresh=True)
                _CONNECTIONS[key] = conn
            conn.refcount += 1
        self._conn = conn

    # -- KeyBackend ---------------------------------------------------------------------------

    @property
    def description(self) -> str:
        return self._conn.description

    @property
    def token_label(self) -> str:
        return self._token_label

    @property
    def module_path(self) -> str:
        return self._module_path

    @property
    def reconnects(self) -> int:
        """How many times the token session was lost and reopened (for status and tests)."""
        return self._conn.reconnects

    def create_key(self, label: str, kind: KeyKind) -> None:
        validate_label(label)
        if not isinstance(kind, KeyKind):
            raise InvalidInput(f"unknown key kind {kind!r}")

        def op(session: Any) -> None:
            if list(session.get_objects({Attribute.LABEL: label})):
                raise KeyExists(f"key {label!r} already exists on {self.description}")
            key_id = label.encode("utf-8")
            if kind in _CURVES:
                curve, params = _CURVES[kind]
                pub, priv = session.generate_keypair(
                    KeyType.EC,
                    label=label,
                    id=key_id,
                    store=True,
                    capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                    mechanism=Mechanism.EC_KEY_PAIR_GEN,
                    public_template={
                        Attribute.EC_PARAMS: params,
                        Attribute.TOKEN: True,
                        Attribute.PRIVATE: False,
                    },
                    private_template=dict(_PROTECTED_ATTRS),
                )
                public = _decode_ec_point(bytes(pub[Attribute.EC_POINT]), curve)
                self._conn.remember(label, _Handle(kind, priv, public))
            elif kind is KeyKind.HMAC_SHA256:
                secret = session.generate_key(
                    KeyType.GENERIC_SECRET,
                    256,
                    label=label,
                    id=key_id,
                    store=True,
                    capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                    mechanism=Mechanism.GENERIC_SECRET_KEY_GEN,
                    template=dict(_PROTECTED_ATTRS),
                )
                self._conn.remember(label, _Handle(kind, secret))
            else:
                secret = session.generate_key(
                    KeyType.AES,
                    256,
                    label=label,
                    id=key_id,
                    store=True,
                    capabilities=MechanismFlag.WRAP | MechanismFlag.UNWRAP,
                    mechanism=Mechanism.AES_KEY_GEN,
                    template=dict(_PROTECTED_ATTRS),
                )
                self._conn.remember(label, _Handle(kind, secret))

        self._run(f"create key {label!r}", op)

    def has_key(self, label: str) -> bool:
        validate_label(label)
        return self._run(
            f"look up key {label!r}",
            lambda session: bool(list(session.get_objects({Attribute.LABEL: label}))),
        )

    def signer(self, label: str) -> ec.EllipticCurvePrivateKey:
        return Pkcs11Signer(self, label, self.public_key(label))

    def public_key(self, label: str) -> ec.EllipticCurvePublicKey:
        validate_label(label)

        def op(session: Any) -> ec.EllipticCurvePublicKey:
            handle = self._conn.resolve(session, label)
            if handle.public is None:
                raise InvalidInput(
                    f"key {label!r} is a {handle.kind.value} key; it has no public key"
                )
            return handle.public

        return self._run(f"read public key {label!r}", op)

    def mac(self, label: str, data: bytes) -> bytes:
        validate_label(label)
        payload = bytes(data)

        def op(session: Any) -> bytes:
            handle = self._typed(session, label, KeyKind.HMAC_SHA256, "mac")
            return bytes(handle.key.sign(payload, mechanism=Mechanism.SHA256_HMAC))

        return self._run(f"mac with key {label!r}", op)

    def wrap(self, label: str, key_material: bytes) -> bytes:
        validate_label(label)
        material = check_data_key(key_material)

        def op(session: Any) -> bytes:
            kek = self._typed(session, label, KeyKind.AES_256, "wrap").key
            data_key = session.create_object(
                {
                    Attribute.CLASS: ObjectClass.SECRET_KEY,
                    Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
                    Attribute.VALUE: material,
                    Attribute.TOKEN: False,
                    Attribute.PRIVATE: True,
                    Attribute.SENSITIVE: False,
                    Attribute.EXTRACTABLE: True,
                }
            )
            try:
                return bytes(kek.wrap_key(data_key, mechanism=Mechanism.AES_KEY_WRAP))
            finally:
                with contextlib.suppress(p11e.PKCS11Error):
                    data_key.destroy()

        return self._run(f"wrap with key {label!r}", op)

    def unwrap(self, label: str, wrapped: bytes) -> bytes:
        validate_label(label)
        blob = check_wrapped(wrapped)

        def op(session: Any) -> bytes:
            kek = self._typed(session, label, KeyKind.AES_256, "unwrap").key
            try:
                data_key = kek.unwrap_key(
                    ObjectClass.SECRET_KEY,
                    KeyType.GENERIC_SECRET,
                    blob,
                    mechanism=Mechanism.AES_KEY_WRAP,
                    store=False,
                    capabilities=0,
                    template={
                        Attribute.TOKEN: False,
                        Attribute.PRIVATE: True,
                        Attribute.SENSITIVE: False,
                        Attribute.EXTRACTABLE: True,
                    },
                )
            except _UNWRAP_FAILED:
                raise IntegrityError(
                    f"wrapped data key did not verify under key {label!r}: damaged, forged or "
                    "wrapped under another key"
                ) from None
            try:
                return bytes(data_key[Attribute.VALUE])
            finally:
                with contextlib.suppress(p11e.PKCS11Error):
                    data_key.destroy()

        return self._run(f"unwrap with key {label!r}", op)

    def destroy_key(self, label: str) -> None:
        validate_label(label)

        def op(session: Any) -> None:
            self._conn.forget(label)
            for obj in list(session.get_objects({Attribute.LABEL: label})):
                obj.destroy()

        self._run(f"destroy key {label!r}", op)

    def close(self) -> None:
        with _REGISTRY_LOCK:
            if self._closed:
                return
            self._closed = True
            self._conn.refcount -= 1
            if self._conn.refcount > 0:
                return
            key = (self._module_path, self._token_label)
            if _CONNECTIONS.get(key) is self._conn:
                del _CONNECTIONS[key]
            self._conn.close()

    def __repr__(self) -> str:
        return f"<Pkcs11Backend {self.description}>"

    # -- extras -------------------------------------------------------------------------------

    def key_properties(self, label: str) -> dict[str, bool]:
        """Custody attributes of the key's private/secret object, read back from the token
        (token, private, sensitive, extractable, always_sensitive, never_extractable, local)."""
        validate_label(label)

        def op(session: Any) -> dict[str, bool]:
            key = self._conn.resolve(session, label).key
            return {name: bool(key[attr]) for name, attr in _PROPERTY_ATTRS.items()}

        return self._run(f"read attributes of key {label!r}", op)

    # -- internals ----------------------------------------------------------------------------

    def _run(self, what: str, op: Callable[[Any], T]) -> T:
        if self._closed:
            raise KeyBackendError(f"key backend {self.description} is closed")
        return self._conn.run(what, op)

    def _typed(self, session: Any, label: str, kind: KeyKind, operation: str) -> _Handle:
        handle = self._conn.resolve(session, label)
        if handle.kind is not kind:
            raise InvalidInput(
                f"key {label!r} is a {handle.kind.value} key; {operation} needs a {kind.value} key"
            )
        return handle

    def _sign_digest(self, label: str, digest: bytes) -> bytes:
        def op(session: Any) -> bytes:
            handle = self._conn.resolve(session, label)
            if handle.public is None:
                raise InvalidInput(
                    f"key {label!r} is a {handle.kind.value} key; signing needs an EC key"
                )
            return bytes(handle.key.sign(digest, mechanism=Mechanism.ECDSA))

        return self._run(f"sign with key {label!r}", op)
