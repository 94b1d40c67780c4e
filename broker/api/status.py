"""The one place where domain errors become gRPC status codes.

Messages of known errors go to the client as they are (they are written to be acted on and
never carry secrets); anything unexpected becomes INTERNAL with the correlation id only, and
its traceback goes to the server log, never to the client. Storage errors are known but their
text is the driver's (tables, columns, paths): it is logged, and the client gets a generic
message with the correlation id.
"""

from __future__ import annotations

import logging

import grpc

from broker import errors
from ca import errors as ca_errors

__all__ = ["KEY_BACKEND_ERROR_PREFIX", "to_status"]

#: Starts the message of an UNAVAILABLE that came from the key backend (the HSM), so clients
#: tell a token failure from a broker they cannot reach.
KEY_BACKEND_ERROR_PREFIX = "key backend error: "

log = logging.getLogger(__name__)

_MAP: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    # Not transient: the ledger's state needs an operator before any retry can succeed.
    (errors.AuditIntegrityError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (ca_errors.InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (ca_errors.PolicyViolation, grpc.StatusCode.PERMISSION_DENIED),
    (ca_errors.IntegrityError, grpc.StatusCode.INVALID_ARGUMENT),
    (ca_errors.KeyBackendError, grpc.StatusCode.UNAVAILABLE),
    (ca_errors.CAStateError, grpc.StatusCode.UNAVAILABLE),
)


def to_status(exc: BaseException, correlation_id: str) -> tuple[grpc.StatusCode, str]:
    """Map an exception raised while serving a request to (code, client-facing message)."""
    if isinstance(exc, errors.StorageConflict):
        log.info("storage conflict [%s]: %s", correlation_id, exc)
        return grpc.StatusCode.ALREADY_EXISTS, (
            f"a record with the same name or key already exists; correlation id {correlation_id}"
        )
    if isinstance(exc, errors.StorageUnavailable):
        log.warning("storage unavailable [%s]: %s", correlation_id, exc)
        return grpc.StatusCode.UNAVAILABLE, (
            "the broker's storage has no writable database right now (failover?); retry after "
            f"{max(1, round(exc.retry_after))} s (correlation id {correlation_id})"
        )
    if isinstance(exc, errors.StorageError):
        log.warning("storage unavailable [%s]: %s", correlation_id, exc)
        return grpc.StatusCode.UNAVAILABLE, (
            f"the broker's storage is unavailable; retry later (correlation id {correlation_id})"
        )
    for kind, code in _MAP:
        if isinstance(exc, kind):
            message = str(exc) or kind.__name__
            if isinstance(exc, ca_errors.KeyBackendError):
                message = KEY_BACKEND_ERROR_PREFIX + message
            if code is grpc.StatusCode.UNAVAILABLE:
                log.warning("unavailable [%s]: %s", correlation_id, message)
            return code, message
    log.error("internal error [%s]", correlation_id, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error; correlation id {correlation_id}"
