"""Operator login and the operator registry.

`OperatorService.login` turns a verified ID token (see `broker.operators.oidc`) with MFA into
an operator X.509-SVID `spiffe://<td>/broker/operator/<subject>` for the key in the client's
CSR, carrying the person's roles (`broker.operators.roles`). Nothing is issued unless every
check passed: token (signature, iss, aud, exp, nbf, iat, nonce), single use of the token (by
nonce, or by its hash when it has none), MFA (`amr` or `acr`), a usable subject, at least one
role, and a TTL within the configured maximum. The lifetime never outlasts the ID token's
session (`auth_time + session_max`, or `exp` without `auth_time`).

The registry records every certificate issued (serial, subject, roles, amr, expiry), never the
token. Logout and revocation write the certificate's serial to the SVID denylist, which every
call checks, so a revoked certificate stops working on the next call.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography import x509

from broker.config import OperatorsConfig
from broker.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from broker.operators.oidc import Fetcher, IdTokenVerifier, ProviderKeys, http_fetch
from broker.operators.roles import (
    OperatorClaims,
    map_roles,
    roles_extension,
    subject_segment,
)
from broker.policy import Caller
from broker.storage.operators import OperatorRepository, OperatorSessionRecord
from ca.clock import Clock
from ca.spiffeid import SpiffeId

__all__ = ["LoginResult", "OperatorIssuer", "OperatorService"]


class OperatorIssuer(Protocol):
    """What login needs from the CA (`broker.authority.CAService`)."""

    def issue_operator_svid(
        self,
        spiffe_id: SpiffeId,
        csr: bytes,
        ttl: dt.timedelta,
        login_extension: x509.ExtensionType,
    ) -> Any: ...


@dataclass(frozen=True)
class LoginResult:
    session: OperatorSessionRecord
    chain_der: list[bytes]
    bundle_der: list[bytes]


def _canonical_serial(text: str) -> str:
    return text.strip().lower().removeprefix("0x").replace(":", "").lstrip("0") or "0"


class OperatorService:
    def __init__(
        self,
        config: OperatorsConfig,
        issuer: OperatorIssuer,
        repository: OperatorRepository,
        deny_serial: Callable[[str], Awaitable[Any]],
        clock: Clock,
        *,
        trust_domain: str,
        fetch: Fetcher = http_fetch,
    ) -> None:
        self.config = config
        self._issuer = issuer
        self._repo = repository
        self._deny_serial = deny_serial
        self._clock = clock
        self._td = trust_domain
        self._verifier: IdTokenVerifier | None = None
        if config.enabled:
            keys = ProviderKeys(config.issuer, clock, fetch=fetch)
            self._verifier = IdTokenVerifier(keys, config.audiences, tuple(config.algorithms))

    @property
    def verifier(self) -> IdTokenVerifier:
        if self._verifier is None:
            raise FailedPrecondition(
                "operator login is not configured on this broker ([operators] issuer)"
            )
        return self._verifier

    def operator_id(self, subject: str) -> SpiffeId:
        return SpiffeId.from_segments(self._td, "broker", "operator", subject_segment(subject))

    # -- login -------------------------------------------------------------------------------

    def _mfa(self, claims: Mapping[str, Any]) -> tuple[str, ...]:
        amr_raw = claims.get("amr")
        amr = tuple(str(a) for a in amr_raw) if isinstance(amr_raw, list) else ()
        acr = claims.get("acr")
        if set(amr) & set(self.config.mfa_amr):
            return amr
        if isinstance(acr, str) and acr in self.config.mfa_acr:
            return amr
        wanted = ", ".join(self.config.mfa_amr) or "-"
        raise PermissionDenied(
            f"login needs MFA: the provider reported amr [{', '.join(amr)[:100]}]"
            f"{f', acr {acr[:60]!r}' if isinstance(acr, str) else ''}; sign in again with a "
            f"second factor (one of: {wanted})"
        )

    def _lifetime(self, claims: Mapping[str, Any], ttl: dt.timedelta | None) -> dt.timedelta:
        cfg = self.config
        if ttl is not None and ttl > cfg.max_ttl:
            raise InvalidArgument(
                f"an operator login lasts at most {_span(cfg.max_ttl)}; asked for {_span(ttl)}"
            )
        wanted = ttl or cfg.default_ttl
        now = self._clock.now().timestamp()
        auth_time = claims.get("auth_time")
        if isinstance(auth_time, int | float) and not isinstance(auth_time, bool):
            session_end = float(auth_time) + cfg.session_max.total_seconds()
        else:
            session_end = float(claims["exp"])
        left = dt.timedelta(seconds=int(session_end - now))
        if left < dt.timedelta(minutes=1):
            raise Unauthenticated("the provider session of this ID token is over; log in again")
        return min(wanted, left)

    async def login(
        self,
        id_token: str,
        nonce: str,
        csr: bytes,
        ttl: dt.timedelta | None,
        notes: dict[str, Any] | None = None,
    ) -> LoginResult:
        """Verify, then issue. Raises Unauthenticated (token), PermissionDenied (no MFA, no
        role), InvalidArgument (TTL, subject, CSR); nothing is issued or recorded then.
        `notes` (the audit event's details) gets who the verified token names (subject, amr,
        acr, roles) as soon as it is known, so a refused login still says who tried; never
        the token."""
        notes = {} if notes is None else notes
        if ttl is not None and ttl <= dt.timedelta(0):
            raise InvalidArgument("the TTL must be positive")
        verifier = self.verifier
        if len(nonce) > 256 or not nonce.isprintable():
            raise InvalidArgument("the nonce must be printable and at most 256 characters")
        now = self._clock.now()
        claims = await verifier.verify(id_token, nonce, now)
        subject = claims.get(self.config.subject_claim)
        notes.update(
            subject=str(subject)[:256],
            amr=[str(a)[:32] for a in claims.get("amr") or ()][:16]
            if isinstance(claims.get("amr"), list)
            else [],
            acr=str(claims.get("acr", ""))[:256],
        )
        amr = self._mfa(claims)
        if self.config.subject_claim != "sub" and subject is None:
            raise Unauthenticated(
                f"the ID token has no {self.config.subject_claim!r} claim to name the operator"
            )
        spiffe_id = self.operator_id(subject)  # type: ignore[arg-type]
        roles = map_roles(claims, self.config.roles_claim, self.config.roles)
        notes["roles"] = sorted(roles)
        if not roles:
            raise PermissionDenied(
                f"{subject} has no broker role: none of the values of the "
                f"{self.config.roles_claim!r} claim is mapped in [operators.roles]"
            )
        lifetime = self._lifetime(claims, ttl)
        # Single use: by nonce when the token carries one, else by the token's hash.
        token_nonce = claims.get("nonce")
        key = (
            f"nonce:{verifier.issuer}:{token_nonce}"
            if isinstance(token_nonce, str)
            else "sha256:" + hashlib.sha256(id_token.encode()).hexdigest()
        )
        expires = dt.datetime.fromtimestamp(float(claims["exp"]) + 60, dt.UTC)
        # The CSR is checked before the token is spent, so a typo does not burn a login.
        from ca.csr import parse_csr

        parse_csr(csr)
        if not await self._repo.use_token(key, expires, now):
            raise Unauthenticated("this ID token (its nonce) was used for a login already")
        login = OperatorClaims(str(subject), roles, amr, verifier.issuer)
        issued = self._issuer.issue_operator_svid(spiffe_id, csr, lifetime, roles_extension(login))
        record = OperatorSessionRecord(
            serial=issued.serial,
            subject=str(subject),
            spiffe_id=spiffe_id.id_string,
            issuer=verifier.issuer,
            roles=tuple(sorted(roles)),
            amr=amr,
            issued_at=now,
            expires_at=issued.expires_at,
        )
        await self._repo.insert_session(record)
        return LoginResult(record, list(issued.chain_der), list(issued.bundle_der))

    # -- the registry ------------------------------------------------------------------------

    async def whoami(self, caller: Caller, serial: str | None) -> OperatorSessionRecord:
        """The caller's login (by its certificate serial); for an operator that did not log
        in (configured or dev mode), a record without a serial in the registry."""
        if serial:
            record = await self._repo.get_session(_canonical_serial(serial))
            if record is not None:
                return record
        if not caller.is_operator:
            raise PermissionDenied(f"{caller.spiffe_id} is not an operator")
        now = self._clock.now()
        return OperatorSessionRecord(
            serial or "",
            caller.subject or caller.spiffe_id,
            caller.spiffe_id,
            "",
            tuple(sorted(caller.roles)),
            (),
            now,
            now,
        )

    async def logout(self, caller: Caller, serial: str | None) -> OperatorSessionRecord:
        """Deny the caller's own certificate. Idempotent for the denylist."""
        if not serial:
            raise FailedPrecondition("no client certificate to log out")
        canonical = _canonical_serial(serial)
        record = await self._repo.get_session(canonical)
        if record is None or record.spiffe_id != caller.spiffe_id:
            raise FailedPrecondition(
                "this certificate was not issued by 'broker login'; nothing to log out"
            )
        await self._deny_serial(canonical)
        now = self._clock.now()
        await self._repo.revoke_session(canonical, now)
        return await self._repo.get_session(canonical) or record

    async def list_sessions(self, *, include_inactive: bool = False) -> list[OperatorSessionRecord]:
        return await self._repo.list_sessions(None if include_inactive else self._clock.now())

    async def revoke(self, target: str) -> list[OperatorSessionRecord]:
        """Revoke one certificate by serial (hex), or every active certificate of a subject.
        Raises NotFound when nothing matches."""
        text = target.strip()
        if not text or len(text) > 256:
            raise InvalidArgument("give an operator subject or a certificate serial")
        now = self._clock.now()
        serial = _canonical_serial(text)
        by_serial = await self._repo.get_session(serial) if _is_hex(serial) else None
        if by_serial is not None:
            targets = [by_serial]
        else:
            targets = [r for r in await self._repo.list_sessions(now) if r.subject == text]
            if not targets:
                raise NotFound(f"no active operator certificate for {text!r}")
        out = []
        for record in targets:
            await self._deny_serial(record.serial)
            await self._repo.revoke_session(record.serial, now)
            out.append(await self._repo.get_session(record.serial) or record)
        return out


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text) and len(text) <= 64


def _span(value: dt.timedelta) -> str:
    seconds = int(value.total_seconds())
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return "".join(f"{n}{u}" for n, u in ((h, "h"), (m, "m"), (s, "s")) if n) or "0s"
