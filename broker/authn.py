"""Caller identity: the SPIFFE ID in the verified client certificate of an mTLS connection.

TLS has already checked the chain against the trust bundle and the validity period; here the
leaf is read for its one SPIFFE ID, which must belong to our trust domain, and the ID is read
through the identity layout (tenant / environment / service) for policy.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import replace
from typing import Protocol

from cryptography import x509

from broker.errors import Denylisted, Unauthenticated
from broker.operators.roles import ADMIN, operator_claims_of
from broker.policy import Caller
from ca.errors import CAError
from ca.layout import IdentityLayout
from ca.spiffeid import SpiffeId
from ca.x509svid import Lineage, spiffe_id_of

__all__ = ["Authenticator", "DenylistView"]

_OPERATOR_PATH = "/broker/operator/"


class DenylistView(Protocol):
    def blocks(self, spiffe_id: str, serial: str | None) -> bool: ...


class Authenticator:
    """Turns a gRPC auth context into a `Caller`. Parsed certificates are cached (bounded)."""

    def __init__(
        self,
        trust_domain: str,
        operators: Collection[str],
        layout: IdentityLayout,
        cache_size: int = 4096,
    ) -> None:
        self._trust_domain = trust_domain
        self._operators = frozenset(operators)
        self._layout = layout
        self._cache: OrderedDict[bytes, Caller] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        # The SVID denylist (`broker svid deny`), checked on every call when set.
        self.denylist: DenylistView | None = None
        # After a compromised-root rotation: the replaced issuing CAs' key ids, and whether
        # the agents' grace is on (`CAService.replaced_issuers`), checked on every call.
        self.replaced_issuers: Callable[[], tuple[frozenset[bytes], bool]] = _nothing_replaced

    @property
    def trust_domain(self) -> str:
        return self._trust_domain

    @property
    def layout(self) -> IdentityLayout:
        return self._layout

    def caller(self, auth_context: Mapping[str, Sequence[bytes]], method: str = "") -> Caller:
        """Raises Unauthenticated when there is no client certificate or no usable SPIFFE ID,
        or when it was issued under a root replaced as compromised (only an agent's sync and
        renewal accept one, and only during the grace); Denylisted (a PermissionDenied) when
        the ID or the certificate is on the denylist."""
        certs = auth_context.get("x509_pem_cert") or ()
        if not certs:
            raise Unauthenticated("a client certificate (X.509-SVID) is required")
        pem = certs[0]
        replaced, grace = self.replaced_issuers()
        if replaced and _issuer_key_id(pem) in replaced and not (grace and method in GRACE_METHODS):
            raise Unauthenticated(
                "this certificate was issued under a root CA replaced as compromised; get a new "
                "SVID from your agent (agents renew their own through SyncAgent and RenewAgent "
                "during the grace only)"
            )
        with self._lock:
            hit = self._cache.get(pem)
            if hit is not None:
                self._cache.move_to_end(pem)
        if hit is None:
            hit = self._parse(pem)
            with self._lock:
                self._cache[pem] = hit
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        caller = hit
        if self.denylist is not None and self._denied(self.denylist, caller):
            raise Denylisted(
                f"{caller.spiffe_id} (or this certificate) is on the denylist",
                caller.spiffe_id,
                caller.serial,
            )
        return caller

    @staticmethod
    def _denied(denylist: DenylistView, caller: Caller) -> bool:
        """The ID, the certificate's serial, or any certificate it was minted through."""
        if denylist.blocks(caller.spiffe_id, caller.serial):
            return True
        ancestors = caller.lineage.ancestors if caller.lineage is not None else ()
        return any(denylist.blocks(caller.spiffe_id, serial) for serial in ancestors)

    def caller_for_id(self, spiffe_id: SpiffeId) -> Caller:
        attributes: dict[str, str] = {}
        try:
            if spiffe_id.path.startswith("/broker/"):
                # The broker's own identities (operators, break-glass) are not workloads.
                raise CAError("reserved")
            ident = self._layout.parse(spiffe_id)
            attributes = {
                "tenant": ident.tenant,
                "environment": ident.environment,
                "service": ident.service,
            }
        except CAError:
            pass  # IDs outside the layout (operators, the broker itself) carry no attributes
        sid = spiffe_id.id_string
        if sid in self._operators:
            # Configured (bootstrap / dev-mode) operators administer: the admin role.
            return Caller(sid, True, attributes, roles=frozenset({ADMIN}))
        return Caller(sid, False, attributes)

    def _parse(self, pem: bytes) -> Caller:
        try:
            cert = x509.load_pem_x509_certificate(pem)
            spiffe_id = spiffe_id_of(cert)
            lineage = Lineage.of(cert)
        except (ValueError, CAError) as exc:
            raise Unauthenticated(f"client certificate is not an X.509-SVID: {exc}") from exc
        if not spiffe_id.member_of(self._trust_domain):
            raise Unauthenticated(
                f"client identity {spiffe_id} is not in trust domain {self._trust_domain}"
            )
        caller = self.caller_for_id(spiffe_id)
        if spiffe_id.path.startswith(_OPERATOR_PATH):
            # A person who logged in: the roles are in the certificate, written only by the
            # login path and signed by the CA (TLS verified the chain).
            login = operator_claims_of(cert)
            if login is not None and login.roles:
                caller = Caller(
                    spiffe_id.id_string, True, {}, roles=login.roles, subject=login.subject
                )
        minted_by = lineage.minted_by if lineage is not None else ""
        return replace(
            caller,
            # An SVID an operator minted for another ID is never an operator itself, and
            # carries none of an operator's roles.
            is_operator=caller.is_operator and not minted_by,
            roles=frozenset() if minted_by else caller.roles,
            subject="" if minted_by else caller.subject,
            minted_by=minted_by,
            serial=format(cert.serial_number, "x"),
            not_after=cert.not_valid_after_utc,
            lineage=lineage,
        )


#: What an agent holding an SVID issued under a replaced root may still call during the grace.
GRACE_METHODS = frozenset(
    {"/broker.v1.WorkloadIdentity/SyncAgent", "/broker.v1.WorkloadIdentity/RenewAgent"}
)


def _nothing_replaced() -> tuple[frozenset[bytes], bool]:
    return frozenset(), False


@functools.lru_cache(maxsize=1024)
def _issuer_key_id(pem: bytes) -> bytes | None:
    """The certificate's authority key identifier (which issuing CA signed it)."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except (ValueError, x509.ExtensionNotFound):
        return None
    return aki.key_identifier
