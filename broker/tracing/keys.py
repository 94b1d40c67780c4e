"""Spans for the key backend (the HSM): a wrapper with exactly the powers of the backend it
wraps, so `data_key_wrapper()`, `mac_signer()` and the other capability checks answer as they
would for the backend itself.

Traced inside a request: signatures made by a backend signer (`hsm.sign`, CA certificates,
SVIDs, JWTs), `hsm.mac`, `hsm.wrap`, `hsm.unwrap`, `hsm.random`, `hsm.rsa_sign`,
`hsm.create_key`, `hsm.destroy_key`. Attributes: the key's label (a name the broker chose, e.g.
`issuing-3`, never material) and the backend's kind. Token calls that run on the backend's own
threads (`ca.keys.executor.token_call`) carry the request's context there, so their spans sit
under the request's.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.utils import Buffer
from opentelemetry import trace

from broker.tracing.spans import child_span, in_request
from ca.keys import KeyBackend, KeyKind
from ca.keys.backend import (
    DataKeyWrapper,
    KeyDestroyer,
    MacSigner,
    RandomSource,
    RsaSigner,
)
from ca.keys.signer import BackendSigner

__all__ = ["traced_keys"]


class _ContextExecutor(concurrent.futures.Executor):
    """The backend's executor, running each call in the submitter's context (so a span made
    on the token thread has the request's span as parent)."""

    def __init__(self, inner: concurrent.futures.Executor) -> None:
        self._inner = inner

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        context = contextvars.copy_context()
        return self._inner.submit(context.run, fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._inner.shutdown(wait=wait, cancel_futures=cancel_futures)


class _TracedSigner(BackendSigner):
    def __init__(self, inner: BackendSigner, owner: _TracedKeys) -> None:
        super().__init__(inner.label, inner.public_key())
        self._inner = inner
        self._owner = owner

    def sign_raw_digest(self, digest: bytes) -> bytes:
        with self._owner.span("hsm.sign", self.label):
            return self._inner.sign_raw_digest(digest)

    def sign(self, data: Buffer, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        with self._owner.span("hsm.sign", self.label):
            return self._inner.sign(data, signature_algorithm)


class _TracedKeys:
    """The core `KeyBackend`; the optional powers are the mixins below."""

    def __init__(self, inner: KeyBackend, tracer: trace.Tracer) -> None:
        self._inner = inner
        self._tracer = tracer
        self._kind = type(inner).__name__
        executor = getattr(inner, "executor", None)
        self.executor = (
            _ContextExecutor(executor)
            if isinstance(executor, concurrent.futures.Executor)
            else None
        )

    def span(self, name: str, label: str) -> Any:
        if not in_request():
            return _NOTHING
        return child_span(
            self._tracer, name, {"broker.key.label": label, "broker.key.backend": self._kind}
        )

    @property
    def inner(self) -> KeyBackend:
        return self._inner

    @property
    def description(self) -> str:
        return self._inner.description

    def create_key(self, label: str, kind: KeyKind) -> None:
        with self.span("hsm.create_key", label):
            self._inner.create_key(label, kind)

    def has_key(self, label: str) -> bool:
        return self._inner.has_key(label)

    def signer(self, label: str) -> ec.EllipticCurvePrivateKey:
        signer = self._inner.signer(label)
        if isinstance(signer, BackendSigner):
            return _TracedSigner(signer, self)
        return signer

    def public_key(self, label: str) -> ec.EllipticCurvePublicKey:
        return self._inner.public_key(label)

    def close(self) -> None:
        self._inner.close()

    def __repr__(self) -> str:
        return repr(self._inner)

    def __getattr__(self, name: str) -> Any:
        # Backend-specific attributes (persistent, token details) read by the broker.
        return getattr(self._inner, name)


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NOTHING = _Nothing()


class _Wrap(_TracedKeys):
    def wrap(self, label: str, key_material: bytes) -> bytes:
        with self.span("hsm.wrap", label):
            return self._inner.wrap(label, key_material)  # type: ignore[attr-defined,no-any-return]

    def unwrap(self, label: str, wrapped: bytes) -> bytes:
        with self.span("hsm.unwrap", label):
            return self._inner.unwrap(label, wrapped)  # type: ignore[attr-defined,no-any-return]


class _Mac(_TracedKeys):
    def mac(self, label: str, data: bytes) -> bytes:
        with self.span("hsm.mac", label):
            return self._inner.mac(label, data)  # type: ignore[attr-defined,no-any-return]


class _Random(_TracedKeys):
    def random(self, n: int) -> bytes:
        with self.span("hsm.random", ""):
            return self._inner.random(n)  # type: ignore[attr-defined,no-any-return]


class _Destroy(_TracedKeys):
    def destroy_key(self, label: str) -> None:
        with self.span("hsm.destroy_key", label):
            self._inner.destroy_key(label)  # type: ignore[attr-defined]


class _Rsa(_TracedKeys):
    def rsa_sign_digest(self, label: str, digest: bytes) -> bytes:
        with self.span("hsm.rsa_sign", label):
            return self._inner.rsa_sign_digest(label, digest)  # type: ignore[attr-defined,no-any-return]

    def rsa_public_key(self, label: str) -> Any:
        return self._inner.rsa_public_key(label)  # type: ignore[attr-defined]


_POWERS: tuple[tuple[type, type[_TracedKeys]], ...] = (
    (DataKeyWrapper, _Wrap),
    (MacSigner, _Mac),
    (RandomSource, _Random),
    (KeyDestroyer, _Destroy),
    (RsaSigner, _Rsa),
)
_CLASSES: dict[tuple[type, ...], type[_TracedKeys]] = {}


def traced_keys(inner: KeyBackend, tracer: trace.Tracer) -> KeyBackend:
    """`inner` behind spans, offering the same optional powers as `inner` (no more)."""
    bases = tuple(mixin for power, mixin in _POWERS if isinstance(inner, power))
    cls = _CLASSES.get(bases)
    if cls is None:
        cls = type("TracedKeyBackend", (*bases, _TracedKeys) if bases else (_TracedKeys,), {})
        _CLASSES[bases] = cls
    traced: KeyBackend = cls(inner, tracer)
    return traced
