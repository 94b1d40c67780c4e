"""The broker's error tree. `broker.api.status` is the one place that maps these (and
`ca.errors`) to gRPC status codes; messages are written for the person who has to act on them.

    BrokerError
    +-- InvalidArgument      -> INVALID_ARGUMENT
    +-- Unauthenticated      -> UNAUTHENTICATED
    +-- PermissionDenied     -> PERMISSION_DENIED
    |   +-- Denylisted       (the caller's ID or certificate is on the SVID denylist)
    +-- NotFound             -> NOT_FOUND
    +-- AlreadyExists        -> ALREADY_EXISTS
    |   +-- StorageConflict  (a uniqueness constraint; its text stays on the server)
    +-- FailedPrecondition   -> FAILED_PRECONDITION
    |   +-- SchemaTooNew
    |   +-- LedgerStartRefused
    +-- ResourceExhausted    -> RESOURCE_EXHAUSTED (rate limits)
    |   +-- RateLimited      (the caller's token bucket is empty)
    +-- Unavailable          -> UNAVAILABLE (a backend is down)
        +-- StorageError
        |   +-- StorageUnavailable  (no writable database within the wait, or lost before
        |   |                        COMMIT: nothing committed; has retry_after)
        |   +-- StorageCommitUnknown (lost during COMMIT: outcome unknown)
        +-- AuditWriteFailed
            +-- AuditIntegrityError
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


class Denylisted(PermissionDenied):
    """The caller's SPIFFE ID or certificate serial is on the denylist; carries both so the
    refusal is audited under the caller's name."""

    def __init__(self, message: str, spiffe_id: str, serial: str) -> None:
        super().__init__(message)
        self.spiffe_id = spiffe_id
        self.serial = serial


class NotFound(BrokerError):
    pass


class AlreadyExists(BrokerError):
    pass


class StorageConflict(AlreadyExists):
    """The storage refused a write that breaks a uniqueness constraint. Its message is the
    driver's (table and column names): logged, never sent to a client."""


class FailedPrecondition(BrokerError):
    pass


class SchemaTooNew(FailedPrecondition):
    """The database schema is newer than this code knows; refuse to start."""


class LedgerStartRefused(FailedPrecondition):
    """The audit ledger or its keys are not what they were (a missing or changed MAC key, a
    tail that does not match its head): the broker must not start until an operator acts."""


class ResourceExhausted(BrokerError):
    pass


class RateLimited(ResourceExhausted):
    """Refused by the per-caller rate limiter (counted, and sampled into the audit ledger)."""


class Unavailable(BrokerError):
    pass


class StorageError(Unavailable):
    """The storage backend failed or is unreachable."""


class StorageUnavailable(StorageError):
    """No usable database (e.g. no writable primary during a failover) within the wait the
    storage allows a request, or the server was lost before the transaction's COMMIT was sent:
    in both cases nothing of the transaction was committed, so running it again is safe.
    `retry_after` (seconds) is when trying again makes sense."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StorageCommitUnknown(StorageError):
    """The server was lost while the transaction's COMMIT was in flight: it may or may not
    have committed. Never retried blindly."""


class AuditWriteFailed(Unavailable):
    """The audit ledger could not be written; the request must fail (fail closed)."""


class AuditIntegrityError(AuditWriteFailed):
    """The ledger's newest entry does not match its MACed head: the writer refuses to chain
    onto it (fail closed) until an operator investigates."""
