"""The CA as one service: what the API, the app and the operators' login wire up, over the
three parts of `broker.authority`: the authorities and their rotation (`manager`), issuing
(`issuing`) and CA policy versions (`policies`). Every method delegates; the contracts are on
the parts."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from cryptography import x509

from broker.authority.issuing import IPAddress, Issuing
from broker.authority.manager import AuthorityManager
from broker.authority.policies import PolicyVersions
from broker.authority.revocation import CrlPublisher
from broker.authority.views import BundleView, CAServiceConfig, CAStatus, IssuedJWT, IssuedX509
from broker.policy import Caller
from broker.storage.identity import DenyRecord
from broker.storage.interface import PolicyVersion, Storage
from ca import rotation
from ca.clock import Clock
from ca.keys import KeyBackend
from ca.spiffeid import SpiffeId
from ca.x509svid import Lineage

__all__ = ["CAService"]


class CAService:
    def __init__(
        self, config: CAServiceConfig, keys: KeyBackend, storage: Storage, clock: Clock
    ) -> None:
        self._keys = keys
        self._storage = storage
        self._clock = clock
        self._td = SpiffeId.parse(f"spiffe://{config.trust_domain}").trust_domain
        schedule = rotation.RotationSchedule(ca_ttl=config.issuing_ttl)
        self.policies = PolicyVersions(storage, clock, self._td, schedule)
        self.authorities = AuthorityManager(
            config,
            keys,
            storage,
            clock,
            trust_domain=self._td,
            schedule=schedule,
            policy=lambda: self.policies.current,
            policy_version=lambda: self.policies.version.version,
        )
        self.revocation = CrlPublisher(self.authorities.snapshot, keys, clock)
        self.issuing = Issuing(
            config,
            keys,
            clock,
            trust_domain=self._td,
            snapshot=self.authorities.snapshot,
            policy=lambda: self.policies.current,
        )

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def trust_domain(self) -> str:
        return self._td

    async def bootstrap(self) -> None:
        """Load the CA policy, create the root and the first issuing generation on first
        start (otherwise load them). Safe on every start and from several replicas."""
        await self.policies.load()
        await self.authorities.bootstrap()

    async def reload(self) -> None:
        await self.authorities.reload()

    async def rotate(self, force: bool = False) -> list[str]:
        return await self.authorities.rotate(force)

    async def rotate_root(
        self,
        *,
        compromised: bool = False,
        activate_after: dt.timedelta | None = None,
        agent_grace: dt.timedelta | None = None,
    ) -> list[str]:
        """`broker ca rotate --root [--compromised]` (see `ca.rootrotation`)."""
        return await self.authorities.rotate_root(
            compromised=compromised, activate_after=activate_after, agent_grace=agent_grace
        )

    def replaced_issuers(self) -> tuple[frozenset[bytes], bool]:
        """The key ids of issuing CAs replaced by a compromised-root rotation (certificates
        they issued are refused), and whether agents may still renew with one (the grace)."""
        replaced = self.authorities.snapshot().replaced
        if replaced is None:
            return frozenset(), False
        return replaced.issuer_key_ids, self._clock.now() < replaced.grace_until

    def client_roots_pem(self) -> bytes:
        """The roots TLS accepts client certificates from: the bundle's, plus, during a
        compromised-root grace, the replaced roots (the authenticator limits what such a
        certificate may do)."""
        snap = self.authorities.snapshot()
        pem = snap.bundle.pem.encode()
        if snap.replaced is not None and self._clock.now() < snap.replaced.grace_until:
            pem += snap.replaced.roots_pem
        return pem

    def chain_extra(self) -> list[x509.Certificate]:
        """Cross-certificates to append to the broker's serving chain (after the issuing CA):
        the active root certified by older roots, a replaced one included (workload SVIDs
        carry only those from roots still published)."""
        return [
            x509.load_der_x509_certificate(d) for d in self.authorities.snapshot().serving_extra
        ]

    def root_cross_certificates(self) -> tuple[bytes, ...]:
        """Every valid cross-certificate between roots (DER), for agents."""
        return self.authorities.snapshot().cross_der

    async def sync(self) -> None:
        """Pick up what another process or replica changed: a rotation (the CA journal's
        counter moved) or a new CA policy. Two small reads; called every few seconds."""
        await self.authorities.sync_journal()
        await self.policies.refresh()

    # -- issuance ---------------------------------------------------------------------------

    @staticmethod
    def lineage_for(sid: SpiffeId, caller: Caller, *, renewal: bool = False) -> Lineage | None:
        return Issuing.lineage_for(sid, caller, renewal=renewal)

    async def mint_x509(
        self,
        spiffe_id: str,
        *,
        ttl: dt.timedelta | None,
        csr: bytes | None,
        key_type: str | None,
        dns_names: Sequence[str],
        caller: Caller,
        renewal: bool = False,
    ) -> IssuedX509:
        return await self.issuing.mint_x509(
            spiffe_id,
            ttl=ttl,
            csr=csr,
            key_type=key_type,
            dns_names=dns_names,
            caller=caller,
            renewal=renewal,
        )

    def check_dns_names_issuable(self, dns_names: Sequence[str]) -> None:
        self.issuing.check_dns_names_issuable(dns_names)

    def check_entry_issuable(
        self,
        spiffe_id: str,
        x509_ttl: dt.timedelta | None,
        jwt_ttl: dt.timedelta | None,
        dns_names: Sequence[str],
    ) -> None:
        self.issuing.check_entry_issuable(spiffe_id, x509_ttl, jwt_ttl, dns_names)

    def issue_internal(
        self,
        spiffe_id: SpiffeId,
        public_key: Any,
        ttl: dt.timedelta,
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[IPAddress] = (),
    ) -> tuple[x509.Certificate, x509.Certificate]:
        return self.issuing.issue_internal(spiffe_id, public_key, ttl, dns_names, ip_addresses)

    def issue_operator_svid(
        self,
        spiffe_id: SpiffeId,
        csr: bytes,
        ttl: dt.timedelta,
        login_extension: x509.ExtensionType,
    ) -> IssuedX509:
        return self.issuing.issue_operator_svid(spiffe_id, csr, ttl, login_extension)

    async def mint_jwt(
        self,
        spiffe_id: str,
        audience: Sequence[str],
        *,
        ttl: dt.timedelta | None,
        caller: Caller,
    ) -> IssuedJWT:
        return await self.issuing.mint_jwt(spiffe_id, audience, ttl=ttl, caller=caller)

    # -- reading ----------------------------------------------------------------------------

    def bundle(self) -> BundleView:
        return self.authorities.snapshot().bundle

    def crls(self, denied: Sequence[DenyRecord]) -> tuple[bytes, ...]:
        """The denylist's serials as one DER CRL per published issuing CA (cached)."""
        return self.revocation.crls(denied)

    def trust_bundle_pem(self) -> bytes:
        return self.authorities.snapshot().bundle.pem.encode()

    async def status(self) -> CAStatus:
        return await self.authorities.status()

    # -- CA policy --------------------------------------------------------------------------

    def policy_document(self) -> PolicyVersion:
        return self.policies.version

    async def set_policy(self, document_json: str, caller: Caller) -> int:
        return await self.policies.set(document_json, caller)

    async def refresh_policy(self) -> None:
        await self.policies.refresh()
