"""Issuing: X.509-SVIDs and JWT-SVIDs for workloads under CA policy, and the broker's own
identities (serving certificate, operators, break-glass) outside it.

Short-lived SVIDs are never stored: their serial, ID and expiry go into the audit event of the
request that minted them. Signatures are the key backend's work, run on its executor, off the
event loop. Issues from the manager's current snapshot (`broker.authority.manager`).
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
from collections.abc import Callable, Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from broker.authority.manager import Snapshot
from broker.authority.views import CAServiceConfig, IssuedJWT, IssuedX509
from broker.errors import InvalidArgument
from broker.policy import Caller
from ca import jwtsvid
from ca.clock import Clock
from ca.csr import parse_csr
from ca.errors import CAError, PolicyViolation
from ca.keys import KeyBackend
from ca.keys.executor import token_call
from ca.policy import CAPolicy, is_reserved_dns_name
from ca.spiffeid import SpiffeId
from ca.x509svid import Lineage

#: The key type of the CSRs the node agent sends (broker.agent generates P-256 keys).
AGENT_KEY_TYPE = "ec-p256"

__all__ = ["RESERVED_PREFIX", "IPAddress", "Issuing"]

RESERVED_PREFIX = "/broker"  # the broker's own identities (server, operators)
_CURVES: dict[str, ec.EllipticCurve] = {"ec-p256": ec.SECP256R1(), "ec-p384": ec.SECP384R1()}
_MAX_AUDIENCES = 16
_MAX_AUDIENCE_LEN = 1024
_MAX_DNS = 32
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Issuing:
    """Mints from `snapshot()` (the current issuing generation) under `policy()` (the CA
    policy in force)."""

    def __init__(
        self,
        config: CAServiceConfig,
        keys: KeyBackend,
        clock: Clock,
        *,
        trust_domain: str,
        snapshot: Callable[[], Snapshot],
        policy: Callable[[], CAPolicy],
    ) -> None:
        self._cfg = config
        self._keys = keys
        self._clock = clock
        self._td = trust_domain
        self._snap = snapshot
        self._current_policy = policy

    def _check_id(self, spiffe_id: str) -> SpiffeId:
        try:
            sid = SpiffeId.parse(spiffe_id).require_member_of(self._td).require_workload()
        except CAError as exc:
            raise InvalidArgument(str(exc)) from exc
        if sid.path == RESERVED_PREFIX or sid.path.startswith(RESERVED_PREFIX + "/"):
            raise PolicyViolation(
                f"spiffe://{self._td}{RESERVED_PREFIX}/... is reserved for the broker's own "
                "identities and cannot be minted"
            )
        return sid

    @staticmethod
    def lineage_for(sid: SpiffeId, caller: Caller, *, renewal: bool = False) -> Lineage | None:
        """The lineage of an SVID for `sid` minted through the caller's certificate.

        - An operator minting another ID: marked `minted_by` the operator, so that requests made
          with it count as the operator's own (two-person rule).
        - A caller minting its own ID (self-mint): the caller's serial is recorded, so denying
          it denies the child, and the child never outlives the caller's certificate (nor the
          cap the caller itself inherited).
        - Renewal (`renewal=True`, an agent's own ID): recorded like a self-mint, without a new
          cap, but an inherited cap still holds (renewal cannot extend a self-minted chain).
        - Anything else (attestation, an agent minting for the entries it serves): None.
        """
        if not caller.serial:
            return None
        parent = caller.lineage if caller.lineage is not None else Lineage()
        if caller.is_operator and sid.id_string != caller.spiffe_id:
            return Lineage(minted_by=caller.spiffe_id, ancestors=(caller.serial,))
        if sid.id_string != caller.spiffe_id:
            return None
        return parent.child(caller.serial, capped_until=None if renewal else caller.not_after)

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
        """Issue an X.509-SVID from a CSR, or with a broker-generated key returned once.

        The SVID carries the lineage `lineage_for` gives (self-minted SVIDs end no later than
        the caller's certificate; `renewal` is an agent renewing its own SVID).
        Raises InvalidArgument / InvalidCSR / InvalidTTL for malformed input and
        PolicyViolation when CA policy does not allow the ID, TTL or key type."""
        sid = self._check_id(spiffe_id)
        if len(dns_names) > _MAX_DNS:
            raise InvalidArgument(f"at most {_MAX_DNS} DNS names may be requested")
        private_der: bytes | None = None
        if csr is not None:
            if key_type:
                raise InvalidArgument("key_type applies only to broker-generated keys, not CSRs")
            info = parse_csr(csr, max_bytes=self._cfg.max_csr_bytes)
            public_key: Any = info.public_key
            kt = info.key_type
        else:
            kt = key_type or "ec-p256"
            if kt not in _CURVES:
                raise InvalidArgument(
                    f"key type {kt!r} cannot be generated; use ec-p256 or ec-p384"
                )
            public_key = None
        lifetime = self._current_policy().resolve_x509(sid, ttl, kt)
        self._current_policy().check_dns_names(sid, dns_names, reserved=self._cfg.server_names)
        if public_key is None:
            key = ec.generate_private_key(_CURVES[kt])
            public_key = key.public_key()
            private_der = key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        snap = self._snap()
        # The signature is the token's work: on the key backend's executor, off the loop.
        cert = await token_call(
            self._keys,
            functools.partial(
                snap.issuer.issue,
                public_key,
                sid,
                self._clock.now(),
                lifetime,
                dns_names=dns_names,
                backdate=self._cfg.backdate,
                lineage=self.lineage_for(sid, caller, renewal=renewal),
            ),
        )
        leaf_der = cert.public_bytes(serialization.Encoding.DER)
        return IssuedX509(
            spiffe_id=sid.id_string,
            chain_der=[leaf_der, snap.issuing_der, *snap.chain_extra],
            private_key_der=private_der,
            bundle_der=list(snap.root_der),
            expires_at=cert.not_valid_after_utc,
            serial=format(cert.serial_number, "x"),
        )

    def check_entry_issuable(
        self,
        spiffe_id: str,
        x509_ttl: dt.timedelta | None,
        jwt_ttl: dt.timedelta | None,
        dns_names: Sequence[str],
    ) -> None:
        """What minting for a registration entry would refuse under the current CA policy,
        checked when the entry is created so that one that can never be minted is not stored:
        a rule for the ID, the TTLs within its maximums, the agent's key type (ec-p256), the DNS
        names within its patterns and none of the broker's own. Raises PolicyViolation or
        InvalidTTL with the policy's message."""
        self.check_dns_names_issuable(dns_names)
        sid = self._check_id(spiffe_id)
        policy = self._current_policy()
        policy.resolve_x509(sid, x509_ttl, AGENT_KEY_TYPE)
        policy.resolve_jwt(sid, jwt_ttl)
        policy.check_dns_names(sid, dns_names, reserved=self._cfg.server_names)

    def check_dns_names_issuable(self, dns_names: Sequence[str]) -> None:
        """PolicyViolation if a DNS name is one of the broker's own server names (checked when
        an entry is created, so a refused entry is never stored)."""
        for name in dns_names:
            if isinstance(name, str) and is_reserved_dns_name(name, self._cfg.server_names):
                raise PolicyViolation(
                    f"DNS name {name[:80]!r} is one of the broker's own server names; it is "
                    "never issued to anything but the broker"
                )

    def issue_internal(
        self,
        spiffe_id: SpiffeId,
        public_key: Any,
        ttl: dt.timedelta,
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[IPAddress] = (),
    ) -> tuple[x509.Certificate, x509.Certificate]:
        """Issue the broker's own identities (serving certificate, operator identity), which
        live under the reserved path and bypass CA policy. Returns (leaf, issuing CA cert)."""
        snap = self._snap()
        cert = snap.issuer.issue(
            public_key,
            spiffe_id,
            self._clock.now(),
            ttl,
            dns_names=dns_names,
            backdate=self._cfg.backdate,
            ip_addresses=ip_addresses,
        )
        return cert, snap.issuing_cert

    def issue_operator_svid(
        self,
        spiffe_id: SpiffeId,
        csr: bytes,
        ttl: dt.timedelta,
        login_extension: x509.ExtensionType,
    ) -> IssuedX509:
        """The one path that issues operator identities (spiffe://<td>/broker/operator/...):
        called by `broker.operators` after a verified login, never reached by the mint RPCs
        or registration entries. The CSR's proof of possession is checked; `login_extension`
        (who logged in, with which roles) is written into the certificate. Raises InvalidCSR
        for a bad CSR, InvalidArgument for an ID outside the operator prefix."""
        prefix = f"spiffe://{self._cfg.trust_domain}/broker/operator/"
        if not spiffe_id.id_string.startswith(prefix) or spiffe_id.path.count("/") != 3:
            raise InvalidArgument(f"{spiffe_id} is not an operator identity")
        info = parse_csr(csr, max_bytes=self._cfg.max_csr_bytes)
        snap = self._snap()
        cert = snap.issuer.issue(
            info.public_key,
            spiffe_id,
            self._clock.now(),
            ttl,
            backdate=self._cfg.backdate,
            extra_extensions=(login_extension,),
        )
        return IssuedX509(
            spiffe_id=spiffe_id.id_string,
            chain_der=[
                cert.public_bytes(serialization.Encoding.DER),
                snap.issuing_der,
                *snap.chain_extra,
            ],
            private_key_der=None,
            bundle_der=list(snap.root_der),
            expires_at=cert.not_valid_after_utc,
            serial=format(cert.serial_number, "x"),
        )

    async def mint_jwt(
        self,
        spiffe_id: str,
        audience: Sequence[str],
        *,
        ttl: dt.timedelta | None,
        caller: Caller,
    ) -> IssuedJWT:
        sid = self._check_id(spiffe_id)
        if not audience:
            raise InvalidArgument("at least one audience is required for a JWT-SVID")
        if len(audience) > _MAX_AUDIENCES:
            raise InvalidArgument(f"at most {_MAX_AUDIENCES} audiences may be requested")
        for aud in audience:
            if not aud or len(aud) > _MAX_AUDIENCE_LEN or not aud.isprintable():
                raise InvalidArgument(
                    f"audience values must be 1 to {_MAX_AUDIENCE_LEN} printable characters"
                )
        lifetime = self._current_policy().resolve_jwt(sid, ttl)
        snap = self._snap()
        now = self._clock.now()
        lineage = self.lineage_for(sid, caller)
        if lineage is not None and lineage.capped_until is not None:
            # A self-minted JWT-SVID ends no later than the certificate it was minted through.
            remaining = lineage.capped_until - now
            if remaining < dt.timedelta(seconds=1):
                raise PolicyViolation("the caller's certificate expires too soon to mint through")
            lifetime = min(lifetime, remaining)
        svid = await token_call(
            self._keys,
            functools.partial(
                jwtsvid.mint_jwt_svid,
                snap.jwt_signer,
                sid,
                list(audience),
                now,
                lifetime,
                kid=snap.jwt_kid,
            ),
        )
        return IssuedJWT(sid.id_string, svid.token, svid.expires_at, snap.jwt_kid)
