"""The broker's error tree. `broker.api.status` is the one place that maps these (and
`ca.errors`) to gRPC status codes; messages are written for the person who has to act on them.

    BrokerError
    +-- InvalidArgument      -> INVALID_ARGUMENT
    +-- Unauthenticated      -> UNAUTHENTICATED
    +-- PermissionDenied     -> PERMISSION_DENIED
    +-- NotFound             -> NOT_FOUND
    +-- AlreadyExists        -> ALREADY_EXISTS
    +-- FailedPrecondition   -> FAILED_PRECONDITION
    |   +-- SchemaTooNew
    +-- ResourceExhausted    -> RESOURCE_EXHAUSTED (rate limits)
    +-- Unavailable          -> UNAVAILABLE (a backend is down)
        +-- StorageError
        +-- AuditWriteFailed
"""

from __future__ import annotations


class BrokerError(Exception):
    """Base of every error the broker's domain code raises."""


class InvalidArgument(BrokerError):
    pass


class Unauthenticated(BrokerError):
    pass


class PermissionDenied(BrokerError):
    pass


class NotFound(BrokerError):
    pass


class AlreadyExists(BrokerError):
    pass


class FailedPrecondition(BrokerError):
    pass


class SchemaTooNew(FailedPrecondition):
    """The database schema is newer than this code knows; refuse to start."""


class ResourceExhausted(BrokerError):
    pass


class Unavailable(BrokerError):
    pass


class StorageError(Unavailable):
    """The storage backend failed or is unreachable."""


class AuditWriteFailed(Unavailable):
    """The audit ledger could not be written; the request must fail (fail closed)."""
