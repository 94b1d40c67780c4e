"""The CA library's error tree. Every error names the operation and what went wrong.

    CAError
    +-- InvalidInput            the caller sent something malformed (bad ID, CSR, TTL, policy)
    |   +-- InvalidSpiffeId
    |   +-- InvalidCSR
    |   +-- InvalidTTL
    |   +-- InvalidPolicy
    +-- PolicyViolation         well-formed but not allowed by CA policy (names the limit)
    +-- KeyBackendError         the key backend failed (token gone, session lost, ...)
    |   +-- KeyNotFound
    |   +-- KeyExists
    |   +-- BadPin
    |   +-- CapabilityMissing   the backend lacks an optional power (wrap, MAC, destroy)
    +-- IntegrityError          a signature, MAC or ciphertext did not verify
    +-- CAStateError            the CA is not ready for this (no active authority, ...)

Messages never contain private material, PINs or secret values.
"""

from __future__ import annotations


class CAError(Exception):
    """Base of every error the CA library raises."""


class InvalidInput(CAError):
    """The input is malformed; the message says what is wrong and how to fix it."""


class InvalidSpiffeId(InvalidInput):
    pass


class InvalidCSR(InvalidInput):
    pass


class InvalidTTL(InvalidInput):
    pass


class InvalidPolicy(InvalidInput):
    pass


class PolicyViolation(CAError):
    """The request is well-formed but CA policy does not allow it."""


class KeyBackendError(CAError):
    """The key backend could not do what was asked (device unavailable, session lost, ...)."""


class KeyNotFound(KeyBackendError):
    pass


class KeyExists(KeyBackendError):
    pass


class BadPin(KeyBackendError):
    pass


class CapabilityMissing(KeyBackendError):
    """The key backend lacks an optional power the caller needs (`ca.keys.backend`)."""


class IntegrityError(CAError):
    """A signature, MAC or authenticated ciphertext failed to verify."""


class CAStateError(CAError):
    """The CA is not in a state to serve this request."""
