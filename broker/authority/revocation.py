"""The denylist as CRLs: one per issuing CA whose certificates may still be in use (active and
retired generations), each signed with that CA's key through the key backend.

A CRL lists the denied serials (a denied SPIFFE ID has no serial to list: the broker and the
agents refuse it, and its SVIDs end with their short TTL). CRLs are cached and rebuilt only
when the denylist or the set of issuing CAs changes, or when half their validity has passed, so
a signing call to the HSM happens per change, not per request.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence

from cryptography import x509

from broker.authority.manager import Snapshot
from broker.storage.identity import DenyRecord
from ca.clock import Clock
from ca.crl import build_crl
from ca.keys import KeyBackend

__all__ = ["CRL_VALIDITY", "CrlPublisher"]

CRL_VALIDITY = dt.timedelta(hours=1)
_PUBLISHED_STATES = ("active", "retired")


class CrlPublisher:
    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        keys: KeyBackend,
        clock: Clock,
        validity: dt.timedelta = CRL_VALIDITY,
    ) -> None:
        self._snapshot = snapshot
        self._keys = keys
        self._clock = clock
        self._validity = validity
        self._cached: tuple[object, dt.datetime, tuple[bytes, ...]] | None = None
        self._number = 0

    def crls(self, denied: Sequence[DenyRecord]) -> tuple[bytes, ...]:
        """DER CRLs, one per published issuing CA, listing every denied serial."""
        records = [
            r
            for r in self._snapshot().records
            if r.kind == "issuing" and str(r.state) in _PUBLISHED_STATES
        ]
        revoked = tuple(
            sorted((int(d.value, 16), d.created_at) for d in denied if d.kind == "serial")
        )
        key = (revoked, tuple(r.id for r in records))
        now = self._clock.now()
        if self._cached is not None and self._cached[0] == key and now < self._cached[1]:
            return self._cached[2]
        # CRLNumber must grow: seconds since the epoch, and at least one more than the last.
        self._number = max(self._number + 1, int(now.timestamp()))
        built = tuple(
            build_crl(
                x509.load_der_x509_certificate(r.cert_der),
                self._keys.signer(r.key_label),
                revoked,
                this_update=now,
                next_update=now + self._validity,
                number=self._number,
            )
            for r in sorted(records, key=lambda r: r.generation)
        )
        self._cached = (key, now + self._validity / 2, built)
        return built
