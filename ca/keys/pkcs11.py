"""Pkcs11Backend: keys that live in a PKCS#11 token (an HSM; SoftHSM2 in tests and dev).

Keys are generated inside the token as token objects (CKA_TOKEN) that are CKA_PRIVATE,
CKA_SENSITIVE and not CKA_EXTRACTABLE; CKA_LABEL is the key label and CKA_ID its UTF-8 bytes.

- EC P-256/P-384: CKM_EC_KEY_PAIR_GEN. The signer hashes in Python and asks the token for
  CKM_ECDSA over the digest (raw ``r || s``), converted to DER for cryptography/X.509;
  `BackendSigner.sign_raw_digest()` gives the raw form for JWS.
- HMAC-SHA256: a 256-bit CKK_GENERIC_SECRET key, CKM_SHA256_HMAC.
- AES-256 key-encryption keys (CKA_ENCRYPT/DECRYPT and CKA_WRAP/UNWRAP, never extractable).
  `wrap()` makes one token call: CKM_AES_ECB under the KEK over two counter blocks after a fresh
  12-byte nonce derives a per-blob key (the KEK as a PRF), and the data key is RFC 3394-wrapped
  under that key here; the blob is ``0x02 || nonce || RFC 3394``. `unwrap()` derives the same
  key in one call and unwraps here (the RFC 3394 check gives `IntegrityError`). Why: CKM_AES_ECB
  without parameters crosses p11-kit's remoting (p11-kit 0.24 refuses CKM_AES_KEY_WRAP and
  CKM_AES_GCM with MechanismInvalid), and one call replaces three (create object, C_WrapKey,
  destroy). The KEK never leaves the token; the derived key lives as briefly as the data key.
  Blobs in the older format (plain RFC 3394 via C_WrapKey/C_UnwrapKey, length a multiple of 8)
  still open, and a KEK created before this format (no CKA_ENCRYPT) keeps wrapping that way.
  A wrapped blob that fails the RFC 3394 check raises `IntegrityError` (SoftHSM2 reports it
  as CKR_GENERAL_ERROR, other tokens as CKR_WRAPPED_KEY_INVALID / CKR_ENCRYPTED_DATA_INVALID).

Sessions: per token and process, one logged-in session held only for the login (PKCS#11
login state is per application and token: a second C_Login fails with
CKR_USER_ALREADY_LOGGED_IN, and a C_Logout from one session logs all others out) and a pool of
up to `sessions` (default 2 in process, 8 for a remoting module) read/write sessions that
calls run on, one thread per session at a time, shared by every `Pkcs11Backend` opened on
that token. Key handles and public keys are cached per session by label.
`Pkcs11Backend.executor` is a thread pool of the same size: the broker awaits token calls
there, never on its event loop.

Threads: python-pkcs11 0.10 initialises modules with ``C_Initialize(NULL)``, which by the
PKCS#11 spec promises the module that it is never called from two threads at once (SoftHSM2
then runs without internal locking: two threads signing on two sessions at once crash the
process), and offers no way to pass CK_C_INITIALIZE_ARGS. This module therefore initialises
the module itself with CKF_OS_LOCKING_OK (see `_ThreadedLib`); calls on distinct sessions then
run concurrently (python-pkcs11 releases the GIL in token calls). A module answering
CKR_CANT_LOCK, or already initialised by other code in this process, is served one call at a
time under one lock per module, as before (`module_thread_safe()` tells which).

Lost sessions: when a call fails because the session or a handle was lost (closed session,
device removed, module re-initialised, user logged out, ...), the session is reopened, the user
logged in again, the handle re-resolved and the call retried once. The PIN is therefore kept in
memory for the backend's lifetime.

The seam: the backend reaches the module only through the private protocols `_P11Module`,
`_P11Token`, `_P11Session` and `_P11Key` (python-pkcs11's shapes); `Pkcs11Backend(module=)`
takes a double for them, so the pool, retries and error mapping are unit-tested without a token
(tests/fixtures/fake_pkcs11.py) while the contract suite runs the same code on SoftHSM2.

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

import concurrent.futures
import contextlib
import ctypes
import dataclasses
import hmac
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, TypeVar

import pkcs11
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap
from pkcs11 import MGF, Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass, _pkcs11
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
from ca.keys.backend import (
    DEFAULT_PKCS11_MODULE,
    RSA_BITS,
    RSA_PSS_SALT_BYTES,
    RSA_PUBLIC_EXPONENT,
    KeyKind,
    check_data_key,
    check_random_length,
    check_rsa_digest,
    check_wrapped,
    validate_label,
)
from ca.keys.signer import BackendSigner, prehashed_for_digest

__all__ = [
    "DEFAULT_PKCS11_MODULE",
    "DEFAULT_REMOTE_SESSIONS",
    "DEFAULT_SESSIONS",
    "Pkcs11Backend",
    "Pkcs11Signer",
    "module_thread_safe",
    "refresh_module",
]

T = TypeVar("T")

log = logging.getLogger(__name__)

# -- the PKCS#11 seam ---------------------------------------------------------------------------
#
# Everything this backend asks of a PKCS#11 module, in the shape python-pkcs11 gives it (as
# smallstep's kms/pkcs11 puts crypto11 behind its `P11` interface). The backend's pool, retry,
# error mapping and wrap formats are written against these protocols only, so a test double
# (tests/fixtures/fake_pkcs11.py) can stand in for the module: `Pkcs11Backend(..., module=)`.
# Objects are told apart by `object_class` (never by python-pkcs11's classes), so the double
# needs no python-pkcs11 types. Errors are python-pkcs11's (`pkcs11.exceptions`), which a
# double raises as they are: the mapping to `ca.errors` below is the code under test.
# python-pkcs11's own classes fit these protocols at run time; its stubs type some parameters
# more narrowly, so real modules enter the seam as `Any` (in `_load_module`).


class _P11Object(Protocol):
    """A token object bound to the session that found or made it."""

    @property
    def object_class(self) -> Any: ...  # ObjectClass

    def __getitem__(self, attribute: Attribute) -> Any: ...

    def destroy(self) -> None: ...


class _P11Key(_P11Object, Protocol):
    """A private or secret key: sign/MAC, encrypt (the one-call wrap), C_WrapKey/C_UnwrapKey."""

    @property
    def key_type(self) -> Any: ...  # KeyType

    def sign(self, data: bytes, *, mechanism: Mechanism, mechanism_param: Any = None) -> bytes: ...

    def encrypt(self, data: bytes, *, mechanism: Mechanism) -> bytes: ...

    def wrap_key(self, key: _P11Object, *, mechanism: Mechanism) -> bytes: ...

    def unwrap_key(
        self, object_class: ObjectClass, key_type: KeyType, key_data: bytes, **kwargs: Any
    ) -> _P11Object: ...


class _P11Session(Protocol):
    """One PKCS#11 session: find, generate and create objects; close."""

    def get_objects(self, attrs: Mapping[Attribute, Any]) -> Iterable[Any]: ...

    def generate_keypair(
        self, key_type: KeyType, key_length: int | None = None, **kwargs: Any
    ) -> tuple[Any, Any]: ...

    def generate_key(self, key_type: KeyType, key_length: int, **kwargs: Any) -> Any: ...

    def create_object(self, attrs: Mapping[Attribute, Any]) -> _P11Object: ...

    def generate_random(self, nbits: int) -> bytes: ...

    def close(self) -> None: ...


class _P11Token(Protocol):
    """A token (slot) of the module; `open` starts a session, logging in when given a PIN."""

    @property
    def manufacturer_id(self) -> str: ...

    @property
    def model(self) -> str: ...

    def open(self, rw: bool = False, user_pin: str | None = None) -> _P11Session: ...


class _P11Module(Protocol):
    """A loaded and initialised module. `thread_safe` (optional attribute): calls on distinct
    sessions may run concurrently; `reinitialize` re-reads configuration and tokens."""

    def get_token(self, **kwargs: Any) -> _P11Token: ...  # token_label=

    def reinitialize(self) -> None: ...


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
#: CK_RSA_PKCS_PSS_PARAMS for `rsa_pss()`: SHA-256, MGF1-SHA-256, salt = digest length.
_PSS_SHA256 = (Mechanism.SHA256, MGF.SHA256, RSA_PSS_SALT_BYTES)
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
_LIBS: dict[str, _P11Module] = {}
#: Module paths served by a module passed to `Pkcs11Backend(module=)` (a test double).
_GIVEN: set[str] = set()
#: Modules whose every C_GetFunctionList is an independent instance (p11-kit-client.so: its
#: own connection to the server, its own login). Each pooled session then gets an instance of
#: its own, so calls still run concurrently (one thread per instance at a time) and a network
#: round trip is hidden by the others in flight.
_PER_CALL_INSTANCES: set[str] = set()

#: Sessions (and token threads) per token and process, when not configured: a module in this
#: process gets 2 (SoftHSM2 signs no faster with more threads on two cores, and its locks cost
#: CPU; docs/keys.md), a remoting module (one instance per session, calls that wait on a
#: network) gets 8, enough to hide a few milliseconds of round trip.
DEFAULT_SESSIONS = 2
DEFAULT_REMOTE_SESSIONS = 8

# -- PKCS#11 initialisation with CKF_OS_LOCKING_OK ----------------------------------------------
#
# python-pkcs11 0.10 calls C_Initialize(NULL), which tells the module that the application will
# never call it from two threads at once; SoftHSM2 then runs without internal locking. There is
# no option upstream to pass CK_C_INITIALIZE_ARGS, so `_ThreadedLib` overrides the binding's
# `initialize` (a cpdef method, which Cython dispatches to a Python override) and calls the
# module's own C_Initialize through ctypes with CKF_OS_LOCKING_OK. A module that cannot lock
# (CKR_CANT_LOCK) or was already initialised by other code in this process is used as before:
# one call at a time under the module lock.

_CKF_OS_LOCKING_OK = 0x00000002
_CKR_OK = 0x000
_CKR_CANT_LOCK = 0x00A
_CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x191
_CK_RV_FN = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_void_p)


class _CkVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte)]


class _CkInitializeArgs(ctypes.Structure):
    _fields_ = [
        ("CreateMutex", ctypes.c_void_p),
        ("DestroyMutex", ctypes.c_void_p),
        ("LockMutex", ctypes.c_void_p),
        ("UnlockMutex", ctypes.c_void_p),
        ("flags", ctypes.c_ulong),
        ("pReserved", ctypes.c_void_p),
    ]


class _CkFunctionList(ctypes.Structure):
    # Only the head of CK_FUNCTION_LIST: the version, then C_Initialize and C_Finalize.
    _fields_ = [("version", _CkVersion), ("C_Initialize", _CK_RV_FN), ("C_Finalize", _CK_RV_FN)]


def _function_list(module_path: str) -> Any:
    # dlopen of the same path returns the module python-pkcs11 loads: one instance per process.
    library = ctypes.CDLL(module_path)
    get_list = library.C_GetFunctionList
    get_list.restype = ctypes.c_ulong
    get_list.argtypes = [ctypes.POINTER(ctypes.POINTER(_CkFunctionList))]
    functions = ctypes.POINTER(_CkFunctionList)()
    rv = get_list(ctypes.byref(functions))
    if rv != _CKR_OK or not functions:
        raise p11e.PKCS11Error(f"C_GetFunctionList failed (0x{rv:x})")
    return functions.contents


class _ThreadedLib(_pkcs11.lib):  # type: ignore[misc,name-defined]
    """python-pkcs11's `lib`, initialised with CKF_OS_LOCKING_OK when the module allows it.

    `thread_safe` says whether calls on distinct sessions may run concurrently."""

    thread_safe: bool = False
    _up: bool = False

    def initialize(self) -> None:
        if self._up:
            return
        functions = _function_list(self.so)
        args = _CkInitializeArgs(None, None, None, None, _CKF_OS_LOCKING_OK, None)
        rv = functions.C_Initialize(ctypes.addressof(args))
        if rv == _CKR_CANT_LOCK:
            rv = functions.C_Initialize(None)
            self.thread_safe = False
        elif rv == _CKR_CRYPTOKI_ALREADY_INITIALIZED:
            rv = _CKR_OK  # other code initialised it, we cannot know how: serialise
            self.thread_safe = False
        else:
            self.thread_safe = rv == _CKR_OK
        if rv != _CKR_OK:
            raise p11e.PKCS11Error(f"C_Initialize failed (0x{rv:x})")
        self._up = True

    def finalize(self) -> None:
        if self._up:
            _function_list(self.so).C_Finalize(None)
            self._up = False

    def reinitialize(self) -> None:
        self.finalize()
        self.initialize()


def _threaded_or_plain(module_path: str) -> Any:
    """`_ThreadedLib`, or python-pkcs11's own `lib` for a module whose C_GetFunctionList hands
    out a fresh instance per call (p11-kit-client.so does: each list is its own RPC client), so
    initialising ours does not initialise the binding's (C_GetInfo answers "not
    initialized"). That one is initialised with NULL and served one call at a time."""
    try:
        return _ThreadedLib(module_path)
    except p11e.PKCS11Error as exc:
        if "not initialized" not in str(exc):
            raise
    with contextlib.suppress(Exception):
        _function_list(module_path).C_Finalize(None)
    _PER_CALL_INSTANCES.add(module_path)
    return _pkcs11.lib(module_path)


def _module_lock(module_path: str) -> threading.RLock:
    """The lock that serialises every call into a module that is not thread-safe, and session
    set-up and re-initialisation in every module (see the module docstring)."""
    with _REGISTRY_LOCK:
        return _MODULE_LOCKS.setdefault(module_path, threading.RLock())


def _load_module(module_path: str) -> _P11Module:
    with _REGISTRY_LOCK:
        lib = _LIBS.get(module_path)
        if lib is not None:
            return lib
        try:
            loaded = pkcs11._loaded.get(module_path)
            fresh: _P11Module = loaded if loaded is not None else _threaded_or_plain(module_path)
        except (p11e.PKCS11Error, OSError) as exc:
            raise KeyBackendError(
                f"cannot load PKCS#11 module {module_path}: {exc or type(exc).__name__}"
            ) from None
        # Other code calling pkcs11.lib(path) gets this instance (a second one would call
        # C_Initialize again and fail).
        pkcs11._loaded[module_path] = fresh
        _LIBS[module_path] = fresh
        return fresh


def _give_module(module_path: str, module: _P11Module) -> None:
    """Serve `module_path` with `module` (see `Pkcs11Backend`). Holds the registry lock."""
    current = _LIBS.get(module_path)
    if current is module:
        return
    if current is not None:
        raise InvalidInput(f"PKCS#11 module {module_path} is already loaded in this process")
    _LIBS[module_path] = module
    _GIVEN.add(module_path)


def module_thread_safe(module_path: str) -> bool:
    """True when this process initialised the module with CKF_OS_LOCKING_OK (concurrent calls
    on distinct sessions); False when every call is serialised."""
    return bool(getattr(_load_module(module_path), "thread_safe", False))


def refresh_module(module_path: str = DEFAULT_PKCS11_MODULE) -> None:
    """Re-initialise a PKCS#11 module (C_Finalize + C_Initialize) so it re-reads its
    configuration and sees tokens created since it was loaded.

    Every `Pkcs11Backend` on the module reconnects on its next call; calls in flight on other
    threads may fail once with a token error. Sessions opened by other code on the same module
    are invalidated.
    """
    with _REGISTRY_LOCK, _module_lock(module_path):
        lib: Any = _load_module(module_path)
        try:
            if isinstance(lib, _ThreadedLib) or not isinstance(lib, _pkcs11.lib):
                lib.reinitialize()  # ours, or a module given to the backend
            else:
                # A fresh instance: a module handing out one instance per C_GetFunctionList
                # (p11-kit-client.so) reads its configuration, e.g. the server address, then.
                with contextlib.suppress(p11e.PKCS11Error):
                    lib.finalize()
                fresh: Any = _pkcs11.lib(module_path)  # python-pkcs11 fits the seam loosely
                _LIBS[module_path] = pkcs11._loaded[module_path] = fresh
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


def _open_with_retry(token: _P11Token, pin: str, attempts: int = 8) -> _P11Session:
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
    key: _P11Key  # a private or secret key bound to one session
    public: ec.EllipticCurvePublicKey | None = None
    rsa_public: rsa.RSAPublicKey | None = None
    encrypts: bool = False  # an AES key with CKA_ENCRYPT: wraps with the one-call format


class _Session:
    """One PKCS#11 session of the pool and the key handles resolved in it (python-pkcs11's key
    objects are bound to the session that found them). Used by one thread at a time."""

    __slots__ = ("epoch", "handles", "instance", "session")

    def __init__(self, session: _P11Session, epoch: int, instance: Any = None) -> None:
        self.session = session
        self.epoch = epoch
        self.handles: dict[str, _Handle] = {}
        self.instance = instance  # the module instance it lives in, when it has its own


class _Connection:
    """The sessions of this process on one token, shared by the backends on that token.

    One session is logged in and kept only to hold the login (PKCS#11 login state is per
    application and token; closing a logged-in session through python-pkcs11 logs every session
    out). Calls run on a pool of up to `size` further sessions, one thread per session at a
    time; when the module is not thread-safe every call also holds the module lock."""

    def __init__(self, module_path: str, token_label: str, pin: str, size: int) -> None:
        self.module_path = module_path
        self.token_label = token_label
        self.lock = _module_lock(module_path)
        self.refcount = 0
        self.reconnects = 0
        self.description = f"pkcs11 token={token_label}"
        self.size = size
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=size, thread_name_prefix=f"pkcs11-{token_label}"
        )
        self._pin = pin
        self._token: _P11Token | None = None
        self._login: _P11Session | None = None
        self._idle: list[_Session] = []
        self._slots = threading.BoundedSemaphore(size)
        self._epoch = 0
        self._state = threading.Lock()  # guards _idle, _epoch, _login, _token
        self._closed = False
        self._opened_before = False
        self.thread_safe = module_thread_safe(module_path)
        self.instances = module_path in _PER_CALL_INSTANCES

    def pin_matches(self, pin: str) -> bool:
        return hmac.compare_digest(self._pin.encode(), pin.encode())

    # -- session lifecycle --------------------------------------------------------------------

    def _find_token(self, allow_refresh: bool) -> _P11Token:
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
        """Find the token and log in (the login session). Holds the module lock."""
        with self.lock:
            self._open(allow_refresh)

    def _open(self, allow_refresh: bool) -> None:
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
            # application): sessions opened now share that login.
            session = None
        except p11e.PKCS11Error as exc:
            raise KeyBackendError(
                f"cannot open a session on {name}: {type(exc).__name__}"
            ) from None
        if self._opened_before:
            self.reconnects += 1
        self._opened_before = True
        with self._state:
            self._token = token
            self._login = session
        manufacturer = str(token.manufacturer_id).strip()
        model = str(token.model).strip()
        self.description = f"pkcs11 token={self.token_label} ({manufacturer} {model})"

    def _checkout(self) -> _Session:
        with self._state:
            if self._idle:
                return self._idle.pop()
            token, epoch = self._token, self._epoch
        if token is None:
            with self.lock:
                if self._token is None:
                    self._open(allow_refresh=False)
            with self._state:
                token, epoch = self._token, self._epoch
        if self.instances:
            return self._instance_session(epoch)
        if token is None:  # invalidated again by another thread since: a lost session
            raise p11e.SessionHandleInvalid()
        try:
            session = token.open(rw=True)
        except p11e.PKCS11Error as exc:
            if isinstance(exc, _SESSION_LOST):
                raise
            raise KeyBackendError(
                f"cannot open a session on PKCS#11 token {self.token_label!r}: {type(exc).__name__}"
            ) from None
        return _Session(session, epoch)

    def _instance_session(self, epoch: int) -> _Session:
        """A session in a module instance of its own, logged in there (see
        `_PER_CALL_INSTANCES`)."""
        name = f"PKCS#11 token {self.token_label!r}"
        try:
            instance, session = self._new_instance()
        except (p11e.PinIncorrect, p11e.PinInvalid, p11e.PinLenRange, p11e.PinLocked):
            raise BadPin(f"{name} refused the PIN") from None
        except p11e.PKCS11Error as exc:
            if isinstance(exc, _SESSION_LOST):
                raise
            raise KeyBackendError(
                f"cannot open a session on {name}: {type(exc).__name__}"
            ) from None
        return _Session(session, epoch, instance)

    def _new_instance(self, attempts: int = 8) -> tuple[Any, Any]:
        """A new module instance and a logged-in session in it. Behind p11-kit each instance
        is a new connection and a new SoftHSM2 process on the server side, which may briefly
        not list the token, answer CKR_GENERAL_ERROR or see no user PIN while another one
        writes the same token files: retry that a few times with a short growing pause (the
        login session of `_open` already proved the token and PIN good)."""
        delay = 0.02
        for attempt in range(attempts):
            try:
                instance = _pkcs11.lib(self.module_path)
                token = instance.get_token(token_label=self.token_label)
                try:
                    return instance, token.open(rw=True, user_pin=self._pin)
                except p11e.UserAlreadyLoggedIn:
                    return instance, token.open(rw=True)
            except (p11e.NoSuchToken, p11e.GeneralError, p11e.UserPinNotInitialized):
                if attempt == attempts - 1:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
        raise AssertionError("unreachable")

    def _checkin(self, session: _Session) -> None:
        with self._state:
            if session.epoch == self._epoch and not self._closed:
                self._idle.append(session)
                return
        with contextlib.suppress(p11e.PKCS11Error):
            session.session.close()

    def invalidate(self) -> None:
        """Forget every session without calling the token (it is gone already)."""
        with self._state:
            self._epoch += 1
            self._idle.clear()
            self._token = None
            self._login = None

    def drop(self) -> None:
        """Close the sessions if possible and forget them; the next call logs in again."""
        with self._state:
            self._epoch += 1
            idle, self._idle = self._idle, []
            login, self._login = self._login, None
            self._token = None
        for pooled in idle:
            with contextlib.suppress(p11e.PKCS11Error):
                pooled.session.close()
        if login is not None:
            with contextlib.suppress(p11e.PKCS11Error):
                login.close()

    def close(self) -> None:
        with self.lock:
            self._closed = True
            self.drop()
            self._pin = ""
        self.executor.shutdown(wait=False, cancel_futures=True)

    # -- calls --------------------------------------------------------------------------------

    def run(self, what: str, op: Callable[[_Session], T]) -> T:
        """Run `op(session)` on a pooled session; reconnect and retry once if the session was
        lost. Blocks while every session is busy."""
        if self._closed:
            raise KeyBackendError(f"key backend {self.description} is closed")
        with self._slots:
            if self.thread_safe or self.instances:
                return self._call(what, op)
            with self.lock:
                return self._call(what, op)

    def _call(self, what: str, op: Callable[[_Session], T]) -> T:
        for attempt in (1, 2):
            if self._closed:
                raise KeyBackendError(f"key backend {self.description} is closed")
            try:
                session = self._checkout()
            except _SESSION_LOST as exc:
                self.drop()
                if attempt == 2:
                    raise KeyBackendError(
                        f"{self.description}: {what} failed even after reconnecting "
                        f"({type(exc).__name__})"
                    ) from None
                continue
            try:
                result = op(session)
            except CAError:
                self._checkin(session)
                raise
            except _SESSION_LOST as exc:
                with self._state:
                    current = session.epoch == self._epoch
                if current:
                    self.drop()
                with contextlib.suppress(p11e.PKCS11Error):
                    session.session.close()
                if attempt == 2:
                    raise KeyBackendError(
                        f"{self.description}: {what} failed even after reconnecting "
                        f"({type(exc).__name__})"
                    ) from None
            except p11e.PKCS11Error as exc:
                self._checkin(session)
                raise KeyBackendError(
                    f"{self.description}: {what} failed ({type(exc).__name__})"
                ) from None
            except BaseException:
                self._checkin(session)  # not the session's fault: keep it in the pool
                raise
            else:
                self._checkin(session)
                return result
        raise AssertionError("unreachable")  # pragma: no cover

    def resolve(self, session: _Session, label: str) -> _Handle:
        """The handle for `label` in `session`, found on the token if not cached there."""
        handle = session.handles.get(label)
        if handle is not None:
            return handle
        objects = list(session.session.get_objects({Attribute.LABEL: label}))
        private = [o for o in objects if o.object_class == ObjectClass.PRIVATE_KEY]
        public = [o for o in objects if o.object_class == ObjectClass.PUBLIC_KEY]
        secret = [o for o in objects if o.object_class == ObjectClass.SECRET_KEY]
        if not objects:
            raise KeyNotFound(f"no key {label!r} on {self.description}")
        if len(private) + len(secret) != 1:
            raise KeyBackendError(
                f"label {label!r} on {self.description} does not name exactly one key "
                f"({len(private)} private, {len(secret)} secret)"
            )
        if private and private[0].key_type == KeyType.RSA:
            if len(public) != 1:
                raise KeyBackendError(
                    f"RSA key {label!r} on {self.description} has {len(public)} public-key "
                    "objects; expected one"
                )
            handle = _Handle(KeyKind.RSA_3072, private[0], rsa_public=_rsa_public(public[0]))
        elif private:
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
                handle = _Handle(KeyKind.AES_256, secret_key, encrypts=_can_encrypt(secret_key))
            elif secret_key.key_type in (KeyType.GENERIC_SECRET, KeyType.SHA256_HMAC):
                handle = _Handle(KeyKind.HMAC_SHA256, secret_key)
            else:
                raise KeyBackendError(
                    f"secret key {label!r} on {self.description} has unsupported type "
                    f"{secret_key.key_type!r}"
                )
        session.handles[label] = handle
        return handle

    def forget(self, label: str) -> None:
        """Drop `label` from every session's handle cache (the key was destroyed)."""
        with self._state:
            self._epoch += 1  # sessions in use elsewhere hold stale handles: retire them
            idle, self._idle = self._idle, []
        for pooled in idle:
            with contextlib.suppress(p11e.PKCS11Error):
                pooled.session.close()


def _rsa_public(public: _P11Object) -> rsa.RSAPublicKey:
    """The RSA public key of a CKO_PUBLIC_KEY object (CKA_MODULUS, CKA_PUBLIC_EXPONENT)."""
    modulus = int.from_bytes(bytes(public[Attribute.MODULUS]), "big")
    exponent = int.from_bytes(bytes(public[Attribute.PUBLIC_EXPONENT]), "big")
    return rsa.RSAPublicNumbers(exponent, modulus).public_key()


def _can_encrypt(key: _P11Key) -> bool:
    try:
        return bool(key[Attribute.ENCRYPT])
    except p11e.PKCS11Error:
        return False


#: The one-call wrap format: this byte, a 12-byte random nonce, then RFC 3394 of the data key
#: under the per-blob key AES-256-ECB_KEK(nonce || 1) || AES-256-ECB_KEK(nonce || 2) (32-bit
#: big-endian counters: the KEK used as a PRF, NIST SP 800-108 counter-mode key derivation).
#: Its length (13 + a multiple of 8) never equals an RFC 3394 blob's (a multiple of 8).
_DERIVED_FORMAT = b"\x02"
_NONCE_BYTES = 12


def _kdf_input(nonce: bytes) -> bytes:
    return nonce + b"\x00\x00\x00\x01" + nonce + b"\x00\x00\x00\x02"


def _split_derived(wrapped: bytes) -> tuple[bytes, bytes] | None:
    """(nonce, RFC 3394 blob) of a one-call-format blob, None for a plain RFC 3394 blob."""
    if not isinstance(wrapped, bytes | bytearray | memoryview):
        raise InvalidInput("a wrapped data key must be bytes")
    data = bytes(wrapped)
    head = len(_DERIVED_FORMAT) + _NONCE_BYTES
    if len(data) % 8 == 0:
        return None
    if data[:1] != _DERIVED_FORMAT or len(data) < head:
        raise IntegrityError(
            f"wrapped data key has an impossible length ({len(data)} bytes): damaged or forged"
        )
    return data[1:head], check_wrapped(data[head:])


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
        self,
        token_label: str,
        pin: bytes,
        module_path: str = DEFAULT_PKCS11_MODULE,
        *,
        sessions: int | None = None,
        module: _P11Module | None = None,
    ) -> None:
        """Open (or share) this process's connection to the token.

        `module`: an already initialised module to use for `module_path` instead of loading
        the shared library (a test double; see the PKCS#11 seam above). Refused when
        `module_path` is served by another module already.
        """
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
        if sessions is not None and not 1 <= sessions <= 256:
            raise InvalidInput("a PKCS#11 backend needs 1 to 256 sessions")
        self._token_label = token_label
        self._module_path = module_path
        self._closed = False
        key = (module_path, token_label)
        with _REGISTRY_LOCK:
            if module is not None:
                _give_module(module_path, module)
            conn = _CONNECTIONS.get(key)
            if conn is not None:
                if not conn.pin_matches(pin_text):
                    raise BadPin(f"wrong PIN for PKCS#11 token {token_label!r}")
            else:
                if sessions is None:
                    _load_module(module_path)
                    remote = module_path in _PER_CALL_INSTANCES
                    sessions = DEFAULT_REMOTE_SESSIONS if remote else DEFAULT_SESSIONS
                conn = _Connection(module_path, token_label, pin_text, sessions)
                try:
                    conn.open(allow_refresh=True)
                except BaseException:
                    conn.executor.shutdown(wait=False)
                    raise
                _CONNECTIONS[key] = conn
                log.info(
                    "PKCS#11 module %s, token labelled %r: %d session(s), %s; data keys "
                    "wrapped in one call (CKM_AES_ECB-derived key + RFC 3394) under KEKs that "
                    "allow it",
                    module_path,
                    token_label,
                    sessions,
                    "one module instance per session (remoting module)"
                    if conn.instances
                    else "concurrent (CKF_OS_LOCKING_OK)"
                    if conn.thread_safe
                    else "one call at a time (the module cannot lock)",
                )
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
    def executor(self) -> concurrent.futures.Executor:
        """Where token calls run off the event loop: one thread per pooled session."""
        return self._conn.executor

    @property
    def thread_safe(self) -> bool:
        """True when calls on distinct sessions run concurrently (CKF_OS_LOCKING_OK)."""
        return self._conn.thread_safe

    @property
    def reconnects(self) -> int:
        """How many times the token session was lost and reopened (for status and tests)."""
        return self._conn.reconnects

    def create_key(self, label: str, kind: KeyKind) -> None:
        validate_label(label)
        if not isinstance(kind, KeyKind):
            raise InvalidInput(f"unknown key kind {kind!r}")

        def op(pooled: _Session) -> None:
            session = pooled.session
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
                pooled.handles[label] = _Handle(kind, priv, public)
            elif kind is KeyKind.RSA_3072:
                pub, priv = session.generate_keypair(
                    KeyType.RSA,
                    RSA_BITS,
                    label=label,
                    id=key_id,
                    store=True,
                    capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                    mechanism=Mechanism.RSA_PKCS_KEY_PAIR_GEN,
                    public_template={
                        Attribute.PUBLIC_EXPONENT: RSA_PUBLIC_EXPONENT.to_bytes(3, "big"),
                        Attribute.TOKEN: True,
                        Attribute.PRIVATE: False,
                    },
                    private_template=dict(_PROTECTED_ATTRS),
                )
                pooled.handles[label] = _Handle(kind, priv, rsa_public=_rsa_public(pub))
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
                pooled.handles[label] = _Handle(kind, secret)
            else:
                secret = session.generate_key(
                    KeyType.AES,
                    256,
                    label=label,
                    id=key_id,
                    store=True,
                    # ENCRYPT/DECRYPT for the one-call wrap (CKM_AES_ECB over a nonce, which
                    # crosses p11-kit's remoting); WRAP/UNWRAP kept for tokens that use it.
                    capabilities=MechanismFlag.WRAP
                    | MechanismFlag.UNWRAP
                    | MechanismFlag.ENCRYPT
                    | MechanismFlag.DECRYPT,
                    mechanism=Mechanism.AES_KEY_GEN,
                    template=dict(_PROTECTED_ATTRS),
                )
                pooled.handles[label] = _Handle(kind, secret, encrypts=True)

        self._run(f"create key {label!r}", op)

    def has_key(self, label: str) -> bool:
        validate_label(label)
        return self._run(
            f"look up key {label!r}",
            lambda pooled: bool(list(pooled.session.get_objects({Attribute.LABEL: label}))),
        )

    def signer(self, label: str) -> ec.EllipticCurvePrivateKey:
        return Pkcs11Signer(self, label, self.public_key(label))

    def public_key(self, label: str) -> ec.EllipticCurvePublicKey:
        validate_label(label)

        def op(session: _Session) -> ec.EllipticCurvePublicKey:
            handle = self._conn.resolve(session, label)
            if handle.public is None:
                raise InvalidInput(
                    f"key {label!r} is a {handle.kind.value} key; it has no public key"
                )
            return handle.public

        return self._run(f"read public key {label!r}", op)

    def random(self, n: int) -> bytes:
        """`n` bytes from the token's generator (C_GenerateRandom)."""
        size = check_random_length(n)

        def op(pooled: _Session) -> bytes:
            value = bytes(pooled.session.generate_random(size * 8))
            if len(value) != size:
                raise KeyBackendError(f"C_GenerateRandom returned {len(value)} of {size} bytes")
            return value

        return self._run("generate random bytes", op)

    def rsa_sign_digest(self, label: str, digest: bytes) -> bytes:
        """RSA-PSS in the token: CKM_RSA_PKCS_PSS over the SHA-256 digest computed by the caller
        (hash SHA-256, MGF1-SHA-256, 32-byte salt)."""
        validate_label(label)
        data = check_rsa_digest(digest)

        def op(session: _Session) -> bytes:
            handle = self._typed(session, label, KeyKind.RSA_3072, "RSA signing")
            return bytes(
                handle.key.sign(data, mechanism=Mechanism.RSA_PKCS_PSS, mechanism_param=_PSS_SHA256)
            )

        return self._run(f"sign with key {label!r}", op)

    def rsa_public_key(self, label: str) -> rsa.RSAPublicKey:
        validate_label(label)

        def op(session: _Session) -> rsa.RSAPublicKey:
            handle = self._typed(session, label, KeyKind.RSA_3072, "an RSA public key")
            assert handle.rsa_public is not None
            return handle.rsa_public

        return self._run(f"read public key {label!r}", op)

    def mac(self, label: str, data: bytes) -> bytes:
        validate_label(label)
        payload = bytes(data)

        def op(session: _Session) -> bytes:
            handle = self._typed(session, label, KeyKind.HMAC_SHA256, "mac")
            return bytes(handle.key.sign(payload, mechanism=Mechanism.SHA256_HMAC))

        return self._run(f"mac with key {label!r}", op)

    def wrap(self, label: str, key_material: bytes) -> bytes:
        """See the module docstring: the one-call format under a KEK with CKA_ENCRYPT, RFC 3394
        through C_WrapKey under an older KEK without it."""
        validate_label(label)
        material = check_data_key(key_material)

        def op(session: _Session) -> bytes:
            handle = self._typed(session, label, KeyKind.AES_256, "wrap")
            if handle.encrypts:
                nonce = os.urandom(_NONCE_BYTES)
                blob_key = bytes(handle.key.encrypt(_kdf_input(nonce), mechanism=Mechanism.AES_ECB))
                return _DERIVED_FORMAT + nonce + aes_key_wrap(blob_key, material)
            return self._wrap_rfc3394(session, handle, material)

        return self._run(f"wrap with key {label!r}", op)

    def unwrap(self, label: str, wrapped: bytes) -> bytes:
        validate_label(label)
        derived = _split_derived(wrapped)
        blob = check_wrapped(wrapped) if derived is None else b""

        def op(session: _Session) -> bytes:
            handle = self._typed(session, label, KeyKind.AES_256, "unwrap")
            if derived is None:
                return self._unwrap_rfc3394(session, handle, label, blob)
            nonce, inner = derived
            if not handle.encrypts:
                raise IntegrityError(
                    f"wrapped data key did not verify under key {label!r}: damaged, forged or "
                    "wrapped under another key"
                )
            blob_key = bytes(handle.key.encrypt(_kdf_input(nonce), mechanism=Mechanism.AES_ECB))
            try:
                return aes_key_unwrap(blob_key, inner)
            except InvalidUnwrap:
                raise IntegrityError(
                    f"wrapped data key did not verify under key {label!r}: damaged, forged or "
                    "wrapped under another key"
                ) from None

        return self._run(f"unwrap with key {label!r}", op)

    @staticmethod
    def _wrap_rfc3394(session: _Session, handle: _Handle, material: bytes) -> bytes:
        data_key = session.session.create_object(
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
            return bytes(handle.key.wrap_key(data_key, mechanism=Mechanism.AES_KEY_WRAP))
        finally:
            with contextlib.suppress(p11e.PKCS11Error):
                data_key.destroy()

    @staticmethod
    def _unwrap_rfc3394(session: _Session, handle: _Handle, label: str, blob: bytes) -> bytes:
        try:
            data_key = handle.key.unwrap_key(
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

    def destroy_key(self, label: str) -> None:
        validate_label(label)

        def op(session: _Session) -> None:
            self._conn.forget(label)
            for obj in list(session.session.get_objects({Attribute.LABEL: label})):
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
            if self._module_path in _GIVEN and not any(
                path == self._module_path for path, _ in _CONNECTIONS
            ):
                _GIVEN.discard(self._module_path)
                _LIBS.pop(self._module_path, None)

    def __repr__(self) -> str:
        return f"<Pkcs11Backend {self.description}>"

    # -- extras -------------------------------------------------------------------------------

    def key_properties(self, label: str) -> dict[str, bool]:
        """Custody attributes of the key's private/secret object, read back from the token
        (token, private, sensitive, extractable, always_sensitive, never_extractable, local)."""
        validate_label(label)

        def op(session: _Session) -> dict[str, bool]:
            key = self._conn.resolve(session, label).key
            return {name: bool(key[attr]) for name, attr in _PROPERTY_ATTRS.items()}

        return self._run(f"read attributes of key {label!r}", op)

    # -- internals ----------------------------------------------------------------------------

    def _run(self, what: str, op: Callable[[_Session], T]) -> T:
        if self._closed:
            raise KeyBackendError(f"key backend {self.description} is closed")
        return self._conn.run(what, op)

    def _typed(self, session: _Session, label: str, kind: KeyKind, operation: str) -> _Handle:
        handle = self._conn.resolve(session, label)
        if handle.kind is not kind:
            raise InvalidInput(
                f"key {label!r} is a {handle.kind.value} key; {operation} needs a {kind.value} key"
            )
        return handle

    def _sign_digest(self, label: str, digest: bytes) -> bytes:
        def op(session: _Session) -> bytes:
            handle = self._conn.resolve(session, label)
            if handle.public is None:
                raise InvalidInput(
                    f"key {label!r} is a {handle.kind.value} key; signing needs an EC key"
                )
            return bytes(handle.key.sign(digest, mechanism=Mechanism.ECDSA))

        return self._run(f"sign with key {label!r}", op)
