"""Wrapped static secrets: references, metadata, versions, rotation, revocation, retention.

A secret is named by a reference `secret://<service>/<environment>/<name>[/<more>]` within a
tenant. Each version is sealed by `broker.envelope.Envelope` under a fresh AES-256-GCM data key
wrapped by the tenant's KEK; the associated data binds (tenant, reference, version), so a blob
moved to another secret, version or tenant does not open. Storage holds ciphertext only.

Lifecycle (times from the injected clock):
- `put` stores version 1; `rotate` adds version n+1 and makes it current; the previous version
  stays readable by number until its rollback window ends (24 h by default), then it is revoked
  (at read time already, and for good by `maintain`). `rollback` makes it current again and
  revokes the version rolled back from.
- `revoke` refuses every version at once; `rotate` on a revoked secret issues a fresh value and
  re-enables distribution (the old versions stay revoked).
- `delete` is a soft delete; `maintain` destroys the sealed data of secrets deleted longer than
  the retention period (30 days by default) and tombstones their metadata.

Metadata integrity: every metadata row (owner, classification, state, current version, rotation
period and times, ...) carries an HMAC made in the key backend (`MetadataMac`), written with
every change and verified on every read and before every change. A row altered by someone with
database write access but no key access (`UPDATE secrets SET owner = ...`) is refused with
`SecretIntegrityError` (FAILED_PRECONDITION, "integrity") and nothing is served or changed.
Rows written before MACs existed get theirs once, at start (`SecretService.start`); after that
upgrade (recorded by a marker key in the key backend, which storage cannot forge) a row without
a MAC is a tampered row.

A secret missing any required metadata is refused for distribution with `FailedPrecondition`
naming what is missing. The service also implements `broker.envelope.SealedStore`, so KEK
rotation rewraps its blobs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import enum
import hashlib
import hmac
import logging
import re
import string
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from broker.config import DEFAULT_JUSTIFICATION_REQUIRED
from broker.devvault.pull import DEV_PULL_PURPOSE
from broker.envelope import Envelope, SealedBlob, aad, aad_field
from broker.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from broker.passwords import RandomBytes, generate_password, system_random
from broker.policy import Action, Authorize, Caller, decide_absent, opaque_refusals
from broker.storage.interface import LockRepository
from broker.storage.secrets import (
    SealedRow,
    SecretRecord,
    SecretRepository,
    SecretState,
    VersionRecord,
)
from ca.clock import Clock
from ca.errors import IntegrityError, KeyExists, KeyNotFound
from ca.keys import KeyBackend, KeyKind, mac_signer
from ca.layout import DEV_TENANT

__all__ = [
    "CLASSIFICATIONS",
    "DEFAULT_RETENTION",
    "DEFAULT_ROTATION_WINDOW",
    "METADATA_MAC_KEY",
    "METADATA_MAC_UPGRADED",
    "REQUIRED_METADATA",
    "MetadataMac",
    "NamedSecret",
    "SecretInfo",
    "SecretIntegrityError",
    "SecretJanitor",
    "SecretRef",
    "SecretService",
    "SecretValue",
    "VersionInfo",
    "VersionState",
    "is_person",
    "reference_hash",
    "unowned_attributes",
]

log = logging.getLogger(__name__)

# (tenant, reference, generated length or None for a value from outside)
ValueOrigin = Callable[[str, str, int | None], Awaitable[None]]

SCHEME: Final = "secret://"
CLASSIFICATIONS: Final = ("public", "internal", "confidential", "pii")
REQUIRED_METADATA: Final = (
    "owner",
    "service",
    "environment",
    "tenant",
    "data-classification",
    "rotation-period",
    "last-rotated",
)
DEFAULT_ROTATION_WINDOW: Final = dt.timedelta(hours=24)
DEFAULT_RETENTION: Final = dt.timedelta(days=30)
MAX_REFERENCE: Final = 512
MAX_SEGMENTS: Final = 16
MAX_VALUE_BYTES: Final = 64 * 1024
MIN_GENERATE, MAX_GENERATE, DEFAULT_GENERATE = 16, 4096, 32
MIN_ROTATION_PERIOD: Final = dt.timedelta(hours=1)
MAX_ROTATION_PERIOD: Final = dt.timedelta(days=3650)
_SEGMENT_RE: Final = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_NAME_RE: Final = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_TICKET_RE: Final = re.compile(r"^[A-Za-z0-9._:#/-]{1,64}$")
_ALPHABET: Final = string.ascii_letters + string.digits + "-_"


METADATA_MAC_KEY: Final = "secrets.metadata-mac"
# Created in the key backend once every row written before MACs existed has its MAC: from then
# on a row without one is a tampered row, never "legacy" (storage alone cannot bring it back).
METADATA_MAC_UPGRADED: Final = "secrets.metadata-mac.upgraded"
_MAC_CACHE_SIZE: Final = 65536


class SecretIntegrityError(FailedPrecondition):
    """A secret's metadata row does not verify against its MAC: altered outside the broker."""


def _integrity_refusal() -> SecretIntegrityError:
    return SecretIntegrityError(
        "integrity check failed: the secret's metadata (owner, classification, state, "
        "current version or a version's revocation) was changed outside the broker; refused, "
        "nothing was served or changed. Restore the row from a backup or rotate the secret "
        "after investigating"
    )


def metadata_bytes(record: SecretRecord) -> bytes:
    """The canonical, unambiguous bytes a metadata MAC covers: every field but the MAC."""
    return aad(
        "broker.secret-metadata.v1",
        *(
            aad_field(v)
            for v in (
                record.tenant,
                record.ref,
                record.service,
                record.environment,
                record.owner,
                record.classification,
                record.rotation_period_s,
                record.last_rotated,
                record.current_version,
                record.state,
                record.created_at,
                record.revoked_at,
                record.deleted_at,
            )
        ),
    )


def version_bytes(tenant: str, ref: str, version: VersionRecord) -> bytes:
    """The canonical bytes a version's MAC covers: where it belongs and its lifecycle."""
    return aad(
        "broker.secret-version.v1",
        tenant,
        ref,
        version.version,
        aad_field(version.created_at),
        aad_field(version.retire_at),
        aad_field(version.revoked_at),
    )


class MetadataMac:
    """HMAC-SHA256, under a key that never leaves the key backend, over a secret's metadata
    row and over each version's lifecycle (`broker.storage.secrets.MetadataSeal`). Verified
    pairs are remembered (bounded), so the read path asks the backend once per distinct row
    state, not once per read; only pairs that verified are remembered, so a forged row never
    hits the memory."""

    def __init__(self, keys: KeyBackend, label: str = METADATA_MAC_KEY) -> None:
        self._keys = mac_signer(keys)
        self._label = label
        # Verified row states (records compare without their MAC) -> their MAC.
        self._verified: dict[object, bytes] = {}

    def seal(self, record: SecretRecord) -> bytes:
        return self._keys.mac(self._label, metadata_bytes(record))

    def verify(self, record: SecretRecord) -> bool:
        return self._check(record, record.mac, lambda: metadata_bytes(record))

    def seal_version(self, tenant: str, ref: str, version: VersionRecord) -> bytes:
        return self._keys.mac(self._label, version_bytes(tenant, ref, version))

    def verify_version(self, tenant: str, ref: str, version: VersionRecord) -> bool:
        state = (tenant, ref, version.version, version.created_at, version.retire_at)
        if self._check(
            (*state, version.revoked_at),
            version.mac,
            lambda: version_bytes(tenant, ref, version),
        ):
            return True
        if version.revoked_at is not None and version.revoked_at == version.retire_at:
            # `retire_expired` revokes in bulk SQL: the MAC it left is the one from before.
            before = dataclasses.replace(version, revoked_at=None)
            return self._check(
                (*state, None), version.mac, lambda: version_bytes(tenant, ref, before)
            )
        return False

    def _check(self, key: object, mac: bytes | None, data: Callable[[], bytes]) -> bool:
        if mac is None:
            return False
        known = self._verified.get(key)
        if known is not None:
            return hmac.compare_digest(known, mac)
        try:
            expected = self._keys.mac(self._label, data())
        except KeyNotFound:
            log.error(
                "the secrets metadata MAC key %r is missing from the key backend", self._label
            )
            return False
        if not hmac.compare_digest(expected, mac):
            return False
        if len(self._verified) >= _MAC_CACHE_SIZE:
            self._verified.clear()
        self._verified[key] = expected
        return True

    def prepare(self) -> bool:
        """Create the MAC key if needed; True while rows written before MACs may still need
        theirs (the upgrade has not completed), False once it has."""
        if self._keys.has_key(self._upgraded_label):
            if not self._keys.has_key(self._label):
                # Never replace a lost key silently: every stored MAC would stop verifying and
                # a new key would invite re-sealing rows nobody vouches for.
                raise FailedPrecondition(
                    f"the secrets metadata MAC key {self._label!r} is missing from the key "
                    "backend while secrets were sealed with it; restore the token from backup"
                )
            return False
        with contextlib.suppress(KeyExists):  # another replica created it first
            self._keys.create_key(self._label, KeyKind.HMAC_SHA256)
        return True

    def upgraded(self) -> None:
        """Record in the key backend that every legacy row has its MAC."""
        with contextlib.suppress(KeyExists):
            self._keys.create_key(self._upgraded_label, KeyKind.HMAC_SHA256)

    @property
    def _upgraded_label(self) -> str:
        return f"{self._label}.upgraded"  # METADATA_MAC_UPGRADED for the default key


def reference_hash(reference: str) -> str:
    """The hex SHA-256 that names a reference in the audit ledger and logs."""
    return hashlib.sha256(reference.encode()).hexdigest()


@dataclass(frozen=True)
class SecretRef:
    """A validated reference: `secret://<service>/<environment>/<name>[/<more>]`."""

    service: str
    environment: str
    path: tuple[str, ...]

    @property
    def text(self) -> str:
        return SCHEME + "/".join((self.service, self.environment, *self.path))

    @property
    def sha256(self) -> str:
        return reference_hash(self.text)

    def __str__(self) -> str:
        return self.text

    @classmethod
    def parse(cls, text: str) -> SecretRef:
        """Raises `InvalidArgument` saying what is wrong."""
        if not isinstance(text, str) or not text:
            raise InvalidArgument("a secret reference is required, e.g. secret://payments/prod/api")
        if len(text) > MAX_REFERENCE:
            raise InvalidArgument(f"secret reference is longer than {MAX_REFERENCE} characters")
        if not text.startswith(SCHEME):
            raise InvalidArgument(
                "a secret reference starts with secret://, e.g. secret://payments/prod/stripe/api"
            )
        segments = text[len(SCHEME) :].split("/")
        if len(segments) < 3:
            raise InvalidArgument(
                "a secret reference is secret://<service>/<environment>/<name>[/<more>]"
            )
        if len(segments) > MAX_SEGMENTS:
            raise InvalidArgument(f"a secret reference has at most {MAX_SEGMENTS} segments")
        for position, segment in enumerate(segments, 1):
            if segment in ("", ".", ".."):
                raise InvalidArgument(
                    f"secret reference segment {position} is {segment!r}: empty, '.' and '..' "
                    "segments are not allowed"
                )
            if not _SEGMENT_RE.fullmatch(segment):
                raise InvalidArgument(
                    f"secret reference segment {position} has characters outside "
                    "A-Z a-z 0-9 . _ - (or is longer than 128)"
                )
        return cls(segments[0], segments[1], tuple(segments[2:]))


def _check_name(value: str, what: str) -> str:
    if not _NAME_RE.fullmatch(value or ""):
        raise InvalidArgument(
            f"{what} {value!r} is invalid: use 1-63 lowercase letters, digits, '.', '_' or '-'"
        )
    return value


def check_tenant(tenant: str) -> str:
    if tenant.startswith("_"):
        raise InvalidArgument(f"tenant {tenant!r} is reserved for the broker itself")
    return _check_name(tenant, "tenant")


class VersionState(enum.StrEnum):
    """What a secret's version is to readers (derived, not stored): the values are what JSON
    output shows."""

    CURRENT = "current"
    PREVIOUS = "previous"  # readable during the rollback window
    REVOKED = "revoked"
    DESTROYED = "destroyed"


@dataclass(frozen=True)
class VersionInfo:
    version: int
    state: VersionState
    created_at: dt.datetime
    retire_at: dt.datetime | None
    revoked_at: dt.datetime | None
    kek: str


@dataclass(frozen=True)
class SecretInfo:
    """Metadata (never the value) and, for `show`, the versions."""

    record: SecretRecord
    missing: tuple[str, ...]
    versions: tuple[VersionInfo, ...] = ()

    @property
    def sha256(self) -> str:
        return reference_hash(self.record.ref)

    @property
    def rotation_due(self) -> dt.datetime | None:
        r = self.record
        if r.last_rotated is None or r.rotation_period_s is None:
            return None
        return r.last_rotated + dt.timedelta(seconds=r.rotation_period_s)

    def attributes(self) -> dict[str, str]:
        """What the policy decides on (`Policy.decide(attributes=...)`)."""
        r = self.record
        return {
            "tenant": r.tenant,
            "environment": r.environment or "",
            "owner": r.owner or "",
            "classification": r.classification or "",
            "service": r.service or "",
            # The real name: grant and approval wildcards match it (never the SHA-256).
            "reference": r.ref,
        }


@dataclass(frozen=True)
class SecretValue:
    value: bytes
    version: int
    created_at: dt.datetime
    info: SecretInfo


def missing_metadata(record: SecretRecord) -> tuple[str, ...]:
    present = {
        "owner": record.owner,
        "service": record.service,
        "environment": record.environment,
        "tenant": record.tenant,
        "data-classification": record.classification,
        "rotation-period": record.rotation_period_s,
        "last-rotated": record.last_rotated,
    }
    return tuple(name for name in REQUIRED_METADATA if present[name] in (None, ""))


def _info(record: SecretRecord) -> SecretInfo:
    return SecretInfo(record, missing_metadata(record))


def _value(
    value: bytes | None, generate_length: int | None, random: RandomBytes = system_random
) -> bytes:
    if value is not None and generate_length is not None:
        raise InvalidArgument("give either a value or a length to generate, not both")
    if generate_length is not None:
        if not MIN_GENERATE <= generate_length <= MAX_GENERATE:
            raise InvalidArgument(
                f"generated length must be {MIN_GENERATE}..{MAX_GENERATE} characters"
            )
        return generate_password(random, generate_length, _ALPHABET).encode()
    if value is None or not value:
        raise InvalidArgument("a secret value is required (or ask for a generated one)")
    if len(value) > MAX_VALUE_BYTES:
        raise InvalidArgument(f"a secret value is at most {MAX_VALUE_BYTES} bytes")
    return bytes(value)


def unowned_attributes(tenant: str, reference: str) -> dict[str, str]:
    """The attributes of a secret nobody owns at `reference`: what an absent secret (or one
    whose metadata does not verify) is decided on (`broker.policy.decide_absent`)."""
    ref = SecretRef.parse(reference)
    return {
        "tenant": tenant,
        "environment": ref.environment,
        "owner": "",
        "service": ref.service,
        "reference": ref.text,
    }


def is_person(caller: Caller) -> bool:
    """Operators and break-glass holders, as opposed to workloads."""
    path = caller.spiffe_id.split("/", 3)[-1] if caller.spiffe_id.count("/") >= 3 else ""
    return caller.is_operator or path.startswith(("broker/operator/", "broker/breakglass/"))


def _refusal(action: str) -> str:
    """What a refused workload is told, for a secret that exists and one that does not, naming
    neither owner nor rule (the audit event keeps the real reason)."""
    return (
        f"{action} refused: there is no such secret for this caller, or it may not use it "
        "(an operator can grant access with 'broker grant create')"
    )


class ReadRouter(Protocol):
    """Where a staged rollout (`broker.rollout`) steers reads: the version a consumer identity
    gets while a rollout of the secret runs, and the record of what it was served."""

    async def route(self, tenant: str, ref: str, identity: str) -> Route | None:
        """None when no rollout of the secret is pending or running."""
        ...

    async def served(self, route: Route, identity: str) -> None: ...

    async def busy(self, tenant: str, ref: str) -> bool:
        """Whether a rollout of the secret is pending or running."""
        ...


@dataclass(frozen=True)
class Route:
    rollout_id: str
    stage: int  # the consumer's stage
    version: int  # the version it gets now


# Audit details the domain adds for the request (the pipeline's `CallContext.details`).
Details = MutableMapping[str, Any]


@dataclass(frozen=True)
class NamedSecret:
    """A secret an administrative call names, who names it, and how to decide: what
    `SecretService.show_for/rollback_for/revoke_for/delete_for` take (one domain call each:
    load, decide through `authorize`, act). `details` receives what the audit event records."""

    tenant: str
    reference: str
    caller: Caller
    authorize: Authorize
    details: Details | None = None


class SecretService:
    """The secrets domain. `tenant` arguments are validated here. The request path picks the
    tenant with `tenant_for` and goes through the authorized calls (`authorized`, `get`,
    `rotate_for`), which load the secret and then decide through the `Authorize` port; the
    other methods are the operations themselves, for callers that decided already.

    `default_tenant`: the tenant of requests that name none (from operators, or workloads
    whose identity has none). `justification_required`: environments and classifications
    whose secrets a person reads only with a justification."""

    def __init__(
        self,
        repository: SecretRepository,
        envelope: Envelope,
        clock: Clock,
        *,
        rotation_window: dt.timedelta = DEFAULT_ROTATION_WINDOW,
        retention: dt.timedelta = DEFAULT_RETENTION,
        default_tenant: str = DEV_TENANT,
        justification_required: Collection[str] = DEFAULT_JUSTIFICATION_REQUIRED,
        random: RandomBytes = system_random,
    ) -> None:
        self.random = random  # generated values: the key backend's generator
        self._repo = repository
        self._envelope = envelope
        self._clock = clock
        self.rotation_window = rotation_window
        self.retention = retention
        self.default_tenant = default_tenant
        self._justify = frozenset(justification_required)
        # Told how each new value was made (the length when the broker generated it, None
        # when it came from outside), so the scheduled rotation knows which it may remake.
        self.value_origin: ValueOrigin | None = None
        self._router: ReadRouter | None = None

    def route_reads(self, router: ReadRouter) -> None:
        """Let staged rollouts pick the version of reads that name none (`broker.rollout`)."""
        self._router = router

    async def rollout_running(self, tenant: str, reference: str) -> bool:
        """Whether a staged rollout of the secret runs (a scheduled rotation waits for it)."""
        ref = SecretRef.parse(reference)
        return self._router is not None and await self._router.busy(tenant, ref.text)

    # -- the request path: tenant and authorization --------------------------------------

    def tenant_for(self, caller: Caller, requested: str) -> str:
        """The tenant a request is for: as asked, else the workload's own, else the default.
        The policy refuses a workload asking for another tenant's secret."""
        if requested:
            return requested
        if not caller.is_operator and caller.attributes.get("tenant"):
            return caller.attributes["tenant"]
        return self.default_tenant

    async def authorized(
        self,
        tenant: str,
        reference: str,
        caller: Caller,
        authorize: Authorize,
        action: str,
        *,
        version: int | None = None,
        details: Details | None = None,
        before_decision: Callable[[SecretInfo], Mapping[str, str]] | None = None,
    ) -> tuple[SecretInfo, VersionRecord | None]:
        """The secret's metadata and version row, once `authorize` allowed `caller` to
        `action` it (decided on `info.attributes()`, plus what `before_decision` returns; it
        may also refuse, before the decision, so a refusal spends no approval). The resource
        is named by the SHA-256 of the reference. An absent secret, or one whose metadata does
        not verify, is decided as one nobody owns: a refused workload is told the same as for
        one it may not use; an operator gets NotFound or the integrity refusal."""
        authorize = opaque_refusals(authorize, caller, _refusal(action))
        resource = reference_hash(reference)
        try:
            loaded = await self.load(tenant, reference, version)
        except SecretIntegrityError:
            if details is not None:
                details["integrity"] = "metadata MAC mismatch"
            authorize(resource, unowned_attributes(tenant, reference))
            raise
        if loaded is None:
            absent = NotFound(f"no such secret in tenant {tenant!r}")
            decide_absent(authorize, resource, unowned_attributes(tenant, reference), absent)
        info, row = loaded
        extra = {} if before_decision is None else before_decision(info)
        authorize(resource, info.attributes() | dict(extra))
        return info, row

    async def get(
        self,
        tenant: str,
        reference: str,
        caller: Caller,
        authorize: Authorize,
        *,
        version: int | None = None,
        justification: str = "",
        purpose: str = "",
        details: Details | None = None,
    ) -> SecretValue:
        """The value of a secret (its current version, or `version`) for `caller`, if
        `authorize` allows (see `authorized`). A person (operator, break-glass holder) gives a
        `justification` to read a secret whose environment or classification is in
        `justification_required` (InvalidArgument, checked before the decision). A read
        declared as a dev pull (`purpose` `DEV_PULL_PURPOSE`, `broker dev pull`) of a secret
        whose environment is in `justification_required` (production, as the policy marks it)
        is decided, then refused (PermissionDenied): production never reaches a dev vault.
        Raises as `authorized` and `reveal`."""
        production_pull = False

        def justified(info: SecretInfo) -> Mapping[str, str]:
            nonlocal production_pull
            if purpose == DEV_PULL_PURPOSE and (info.record.environment or "") in self._justify:
                production_pull = True  # refused once decided, justification or not
                return {}
            self._require_justification(info, caller, justification)
            return {}

        route = None
        if version is None and self._router is not None:
            route = await self._router.route(
                tenant, SecretRef.parse(reference).text, caller.spiffe_id
            )
            if route is not None:
                version = route.version
                if details is not None:
                    details["rollout"] = {"id": route.rollout_id, "stage": route.stage}
        info, row = await self.authorized(
            tenant,
            reference,
            caller,
            authorize,
            Action.SECRETS_GET,
            version=version,
            details=details,
            before_decision=justified,
        )
        if production_pull:
            raise PermissionDenied(
                f"dev pull refused: environment {info.record.environment!r} is production "
                "(secrets.justification_required); it is never copied to a dev vault"
            )
        if route is None or self._router is None:
            return await self.reveal(info, row)
        return await self._reveal_routed(tenant, reference, caller, info, row, route)

    async def _reveal_routed(
        self,
        tenant: str,
        reference: str,
        caller: Caller,
        info: SecretInfo,
        row: VersionRecord | None,
        route: Route,
    ) -> SecretValue:
        """Reveal the version a rollout routed the caller to. A rollout that moved on between
        routing and revealing (the routed version was just revoked by a rollback or a
        completion) is asked again, so a consumer is never refused in mid-step."""
        assert self._router is not None
        ref = SecretRef.parse(reference).text
        for attempt in range(3):
            try:
                value = await self.reveal(info, row)
            except FailedPrecondition:
                again = await self._router.route(tenant, ref, caller.spiffe_id)
                moved = again is None or again.version != route.version
                if attempt == 2 or not moved:
                    raise
                loaded = await self.load(
                    tenant, reference, None if again is None else again.version
                )
                if loaded is None:
                    raise
                info, row = loaded
                if again is None:
                    return await self.reveal(info, row)
                route = again
                continue
            await self._router.served(route, caller.spiffe_id)
            return value
        raise FailedPrecondition("the secret changed while reading it; try again")

    def _require_justification(self, info: SecretInfo, caller: Caller, justification: str) -> None:
        if not is_person(caller) or justification.strip():
            return
        record = info.record
        needs = [v for v in (record.environment, record.classification) if v in self._justify]
        if needs:
            raise InvalidArgument(
                f"a justification is required to read a {'/'.join(needs)} secret as a person: "
                "pass --justification TEXT (e.g. the ticket and why)"
            )

    async def put_for(
        self,
        tenant: str,
        reference: str,
        caller: Caller,
        authorize: Authorize,
        *,
        owner: str,
        classification: str,
        rotation_period: dt.timedelta,
        value: bytes | None = None,
        generate_length: int | None = None,
    ) -> SecretInfo:
        """`put` for `caller`, if `authorize` allows storing a secret with this owner
        (default: the reference's service) and classification at `reference`; decided before
        anything is read, as for a secret nobody owns yet."""
        owner = owner or SecretRef.parse(reference).service
        authorize = opaque_refusals(authorize, caller, _refusal(Action.SECRETS_PUT))
        authorize(
            reference_hash(reference),
            unowned_attributes(tenant, reference)
            | {"owner": owner, "classification": classification},
        )
        return await self.put(
            tenant,
            reference,
            owner=owner,
            classification=classification,
            rotation_period=rotation_period,
            value=value,
            generate_length=generate_length,
        )

    async def rotate_for(
        self,
        tenant: str,
        reference: str,
        caller: Caller,
        authorize: Authorize,
        *,
        environment: str,
        ticket: str,
        justification: str,
        value: bytes | None = None,
        generate_length: int | None = None,
        details: Details | None = None,
        staged: bool = False,
    ) -> tuple[SecretInfo, int, int]:
        """`rotate` for `caller`, if `authorize` allows (see `authorized`). Decided with
        "on_schedule": whether the secret is due (or has no schedule), since rotating a prod or
        pii secret off schedule may need a second operator's approval; `details` records it."""

        def schedule(info: SecretInfo) -> Mapping[str, str]:
            due = info.rotation_due
            on_schedule = due is None or due <= self._clock.now()
            if details is not None:
                details["on_schedule"] = on_schedule
            return {"on_schedule": "true" if on_schedule else "false"}

        await self.authorized(
            tenant,
            reference,
            caller,
            authorize,
            Action.SECRETS_ROTATE,
            details=details,
            before_decision=schedule,
        )
        return await self.rotate(
            tenant,
            reference,
            environment=environment,
            ticket=ticket,
            justification=justification,
            value=value,
            generate_length=generate_length,
            staged=staged,
        )

    async def _decided(self, named: NamedSecret, action: str) -> None:
        await self.authorized(
            named.tenant,
            named.reference,
            named.caller,
            named.authorize,
            action,
            details=named.details,
        )

    async def show_for(self, named: NamedSecret) -> SecretInfo:
        """`show`, if `named.authorize` allows (see `authorized`)."""
        await self._decided(named, Action.SECRETS_SHOW)
        return await self.show(named.tenant, named.reference)

    async def rollback_for(self, named: NamedSecret) -> tuple[SecretInfo, int, int]:
        """`rollback`, if `named.authorize` allows (see `authorized`)."""
        await self._decided(named, Action.SECRETS_ROLLBACK)
        return await self.rollback(named.tenant, named.reference)

    async def revoke_for(self, named: NamedSecret, justification: str) -> SecretInfo:
        """`revoke`, if `named.authorize` allows (see `authorized`)."""
        await self._decided(named, Action.SECRETS_REVOKE)
        return await self.revoke(named.tenant, named.reference, justification)

    async def delete_for(self, named: NamedSecret) -> SecretInfo:
        """`delete`, if `named.authorize` allows (see `authorized`)."""
        await self._decided(named, Action.SECRETS_DELETE)
        return await self.delete(named.tenant, named.reference)

    @property
    def repository(self) -> SecretRepository:
        return self._repo

    async def start(self, mac: MetadataMac) -> int:
        """Before serving: make sure the metadata MAC key exists and, once (until the upgrade
        is recorded in the key backend), give rows written before MACs existed their MAC.
        Returns how many rows (metadata and version rows) were sealed. Safe to run on several
        replicas at once."""
        if not mac.prepare():
            return 0
        sealed = 0
        for record in await self._repo.unsealed():
            if await self._repo.seal_unsealed(record):
                sealed += 1
        for tenant, ref, version in await self._repo.unsealed_versions():
            if await self._repo.seal_unsealed_version(tenant, ref, version):
                sealed += 1
        mac.upgraded()
        if sealed:
            log.info("secrets: computed the metadata MAC of %d secret(s) stored before", sealed)
        return sealed

    def _verified(self, record: SecretRecord) -> SecretRecord:
        """`record` if its metadata MAC verifies; else log, and raise SecretIntegrityError."""
        if not self._repo.seal.verify(record):
            log.warning(
                "secret %s of tenant %r: metadata did not verify against its MAC (tampered "
                "with outside the broker); refused",
                reference_hash(record.ref)[:16],
                record.tenant,
            )
            raise _integrity_refusal()
        return record

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Map the repository's in-transaction MAC check to the domain's refusal."""
        try:
            yield
        except IntegrityError:
            raise _integrity_refusal() from None

    # -- writes --------------------------------------------------------------------------

    def now(self) -> dt.datetime:
        """The service's clock (the injected one)."""
        return self._clock.now()

    async def put(
        self,
        tenant: str,
        reference: str,
        *,
        owner: str,
        classification: str,
        rotation_period: dt.timedelta,
        value: bytes | None = None,
        generate_length: int | None = None,
    ) -> SecretInfo:
        """Store version 1. Raises `AlreadyExists` when the reference exists in the tenant (in
        any state: rotate it instead, or pick another name after a delete)."""
        ref = SecretRef.parse(reference)
        check_tenant(tenant)
        _check_name(owner, "owner")
        if owner != ref.service:
            # Each service owns its namespace (the standard: no cross-service sharing); reading
            # across services is a time-bound, audited grant, never a mismatched owner.
            raise InvalidArgument(
                f"owner {owner!r} does not match the secret's namespace {ref.service!r}: a "
                f"secret under secret://{ref.service}/ is owned by service {ref.service!r}; to "
                "let another service read it, an operator creates a grant "
                "(broker grant create --to SPIFFE_ID --action secrets.get --resource REF)"
            )
        if classification not in CLASSIFICATIONS:
            raise InvalidArgument(
                f"classification {classification!r} is not one of {', '.join(CLASSIFICATIONS)}"
            )
        if not MIN_ROTATION_PERIOD <= rotation_period <= MAX_ROTATION_PERIOD:
            raise InvalidArgument("rotation period must be between 1h and 3650d")
        plaintext = _value(value, generate_length, self.random)
        now = self._clock.now()
        sealed = await self._envelope.seal(tenant, plaintext, aad(tenant, ref.text, 1))
        record = SecretRecord(
            tenant=tenant,
            ref=ref.text,
            service=ref.service,
            environment=ref.environment,
            owner=owner,
            classification=classification,
            rotation_period_s=int(rotation_period.total_seconds()),
            last_rotated=now,
            current_version=1,
            state=SecretState.ACTIVE,
            created_at=now,
        )
        try:
            await self._repo.insert_secret(
                record, VersionRecord(1, sealed.kek_label, sealed.to_bytes(), now)
            )
        except AlreadyExists:
            raise AlreadyExists(
                f"the secret already exists in tenant {tenant!r}; use 'broker secrets rotate' to "
                "change its value"
            ) from None
        await self._settle(tenant, ref.text, 1, sealed, plaintext)
        await self._origin(tenant, ref.text, generate_length)
        return _info(record)

    async def rotate(
        self,
        tenant: str,
        reference: str,
        *,
        environment: str,
        ticket: str,
        justification: str,
        value: bytes | None = None,
        generate_length: int | None = None,
        staged: bool = False,
    ) -> tuple[SecretInfo, int, int]:
        """A new current version; returns (info, previous version, new version). The previous
        version stays readable by number until now + rotation window. Refused while a staged
        rollout of the secret runs, unless `staged` (the rollout's own rotation)."""
        ref = SecretRef.parse(reference)
        check_tenant(tenant)
        if not staged and self._router is not None and await self._router.busy(tenant, ref.text):
            raise FailedPrecondition(
                "a staged rollout of this secret is running; wait for it to finish, or end it "
                "with 'broker rollout promote|abort REF'"
            )
        if environment != ref.environment:
            raise InvalidArgument(
                f"--env {environment!r} does not match the secret's environment "
                f"({ref.environment!r}); refusing to rotate"
            )
        if not _TICKET_RE.fullmatch(ticket or ""):
            raise InvalidArgument(
                "a ticket id is required (1-64 of A-Z a-z 0-9 . _ : # / -), e.g. SEC-1234"
            )
        if not justification.strip():
            raise InvalidArgument("a justification is required to rotate a secret")
        plaintext = _value(value, generate_length, self.random)
        loaded = await self._repo.load(tenant, ref.text)
        if loaded is None:
            raise NotFound(f"no such secret in tenant {tenant!r}")
        record = self._verified(loaded[0])
        if record.state not in ("active", "revoked"):
            raise FailedPrecondition("the secret was deleted; it cannot be rotated")
        # After a rollback the newest version is not the current one: never reuse a number.
        existing = await self._repo.versions(tenant, ref.text)
        new_version = max((v.version for v in existing), default=0) + 1
        now = self._clock.now()
        sealed = await self._envelope.seal(tenant, plaintext, aad(tenant, ref.text, new_version))
        try:
            with self._writing():
                won = await self._repo.add_version(
                    tenant,
                    ref.text,
                    expected_current=record.current_version,
                    new=VersionRecord(new_version, sealed.kek_label, sealed.to_bytes(), now),
                    retire_previous_at=now + self.rotation_window,
                )
        except AlreadyExists:  # a concurrent rotation took the number
            won = False
        if not won:
            raise FailedPrecondition("the secret changed while rotating it; try again")
        await self._envelope.forget_data_keys()
        await self._settle(tenant, ref.text, new_version, sealed, plaintext)
        await self._origin(tenant, ref.text, generate_length)
        return await self.show(tenant, reference), record.current_version, new_version

    async def _origin(self, tenant: str, ref: str, generate_length: int | None) -> None:
        if self.value_origin is not None:
            await self.value_origin(tenant, ref, generate_length)

    async def _settle(
        self, tenant: str, ref: str, version: int, blob: SealedBlob, plaintext: bytes
    ) -> None:
        """Close the race with a concurrent `broker kek rotate` (see
        `Envelope.reseal_if_stale`): a blob stored under a KEK that stopped being current is
        sealed again under the current one."""
        fresh = await self._envelope.reseal_if_stale(
            tenant, blob, plaintext, aad(tenant, ref, version)
        )
        if fresh is not None:
            await self._repo.replace_sealed(
                SealedRow(tenant, ref, version, blob.kek_label, b""),
                fresh.kek_label,
                fresh.to_bytes(),
            )

    async def rollback(
        self, tenant: str, reference: str, *, staged: bool = False
    ) -> tuple[SecretInfo, int, int]:
        """Make the newest earlier version still in its rollback window current again and
        revoke the current one; returns (info, from version, to version). Refused while a
        staged rollout runs, unless `staged` (the rollout's own rollback)."""
        ref = SecretRef.parse(reference)
        check_tenant(tenant)
        if not staged and self._router is not None and await self._router.busy(tenant, ref.text):
            raise FailedPrecondition(
                "a staged rollout of this secret is running; end it with 'broker rollout "
                "abort REF' (every consumer goes back to the old version)"
            )
        info = await self.show(tenant, reference)
        if info.record.state != "active":
            raise FailedPrecondition(f"the secret is {info.record.state}; nothing to roll back to")
        now = self._clock.now()
        candidates = [
            v
            for v in info.versions
            if v.version < info.record.current_version
            and v.state == "previous"
            and v.retire_at is not None
            and v.retire_at > now
        ]
        if not candidates:
            raise FailedPrecondition(
                f"the secret has no earlier version within its {_hours(self.rotation_window)} "
                "rollback window"
            )
        target = candidates[-1].version
        current = info.record.current_version
        with self._writing():
            won = await self._repo.rollback(
                tenant, ref.text, from_version=current, to_version=target, at=now
            )
        if not won:
            raise FailedPrecondition("the secret changed while rolling back; try again")
        await self._envelope.forget_data_keys()
        return await self.show(tenant, reference), current, target

    async def revoke_version(self, tenant: str, reference: str, version: int) -> bool:
        """Revoke one earlier version now (a staged rollout's old version once every stage
        baked); False when it is current, absent or revoked already."""
        ref = SecretRef.parse(reference)
        check_tenant(tenant)
        with self._writing():
            done = await self._repo.revoke_version(tenant, ref.text, version, self._clock.now())
        if done:
            await self._envelope.forget_data_keys()
        return done

    async def revoke(self, tenant: str, reference: str, justification: str) -> SecretInfo:
        """Refuse every version from now on. Raises `FailedPrecondition` if already revoked or
        deleted, `NotFound` if there is no such secret."""
        ref = SecretRef.parse(reference)
        check_tenant(tenant)
        if not justification.strip():
            raise InvalidArgument("a justification is required to revoke a secret")
        with self._writing():
            done = await self._repo.revoke(tenant, ref.text, self._clock.now())
        if not done:
            info = await self.show(tenant, reference)  # NotFound when absent
            raise FailedPrecondition(f"the secret is already {info.record.state}")
        await self._envelope.forget_data_keys()
        return await self.show(tenant, reference)

    async def delete(self, tenant: str, reference: str) -> SecretInfo:
        """Soft delete; the sealed data is destroyed after the retention period."""
        ref = SecretRef.parse(reference)
        check_tenant(tenant)
        with self._writing():
            done = await self._repo.mark_deleted(tenant, ref.text, self._clock.now())
        if not done:
            info = await self.show(tenant, reference)
            raise FailedPrecondition(f"the secret is already {info.record.state}")
        await self._envelope.forget_data_keys()
        return await self.show(tenant, reference)

    # -- reads ---------------------------------------------------------------------------

    async def load(
        self, tenant: str, reference: str, version: int | None = None
    ) -> tuple[SecretInfo, VersionRecord | None] | None:
        """Metadata and the requested version's row in one read (None: no such secret). Call
        the policy with `info.attributes()`, then `reveal`."""
        ref = SecretRef.parse(reference)
        check_tenant(tenant)
        if version is not None and version < 1:
            raise InvalidArgument("a version number is 1 or more")
        loaded = await self._repo.load(tenant, ref.text, version)
        if loaded is None:
            return None
        record, row = loaded
        return _info(self._verified(record)), row

    async def reveal(self, info: SecretInfo, row: VersionRecord | None) -> SecretValue:
        """The plaintext, if this version may be distributed now. Raises `FailedPrecondition`
        (missing metadata, revoked, past the rollback window, deleted), `NotFound` (no such
        version) or `IntegrityError` (a tampered or misplaced blob)."""
        record = info.record
        ref = record.ref
        if info.missing:
            raise FailedPrecondition(
                f"the secret is missing required metadata: {', '.join(info.missing)}; distribution "
                "is refused until it is set"
            )
        if record.state in ("deleted", "destroyed"):
            raise FailedPrecondition("the secret was deleted; distribution is refused")
        if record.state == "revoked":
            raise FailedPrecondition(
                f"the secret was revoked at {_iso(record.revoked_at)}; every version is refused"
            )
        if row is None:
            raise NotFound("the secret has no such version")
        if not self._repo.seal.verify_version(record.tenant, ref, row):
            log.warning(
                "secret %s version %d: its lifecycle did not verify against its MAC (tampered "
                "with outside the broker); refused",
                info.sha256[:16],
                row.version,
            )
            raise _integrity_refusal()
        if row.revoked_at is not None:
            raise FailedPrecondition(
                f"version {row.version} of the secret was revoked at {_iso(row.revoked_at)}"
            )
        if row.retire_at is not None and row.retire_at <= self._clock.now():
            raise FailedPrecondition(
                f"version {row.version} of the secret left its rollback window at "
                f"{_iso(row.retire_at)}"
            )
        if row.sealed is None:
            raise FailedPrecondition(f"version {row.version} of the secret was destroyed")
        try:
            blob = SealedBlob.from_bytes(row.sealed)
            if not blob.kek_label.startswith(f"kek.{record.tenant}."):
                raise IntegrityError("wrapped under another tenant's key")
            plaintext = await self._envelope.unseal(blob, aad(record.tenant, ref, row.version))
        except (IntegrityError, KeyNotFound) as exc:
            # Someone with write access to storage moved or altered ciphertext: refuse, and
            # leave a trace for the operators (the reference only by its hash).
            log.warning("secret %s version %d did not open: %s", info.sha256[:16], row.version, exc)
            raise FailedPrecondition(
                f"the stored value of version {row.version} did not verify (tampered with, "
                "moved from another secret, version or tenant, or its key is gone); refused"
            ) from None
        return SecretValue(plaintext, row.version, row.created_at, info)

    async def show(self, tenant: str, reference: str) -> SecretInfo:
        """Metadata and versions, never values; `NotFound` when absent."""
        ref = SecretRef.parse(reference)
        check_tenant(tenant)
        loaded = await self._repo.load(tenant, ref.text)
        if loaded is None:
            raise NotFound(f"no such secret in tenant {tenant!r}")
        record = self._verified(loaded[0])
        now = self._clock.now()
        versions = tuple(
            self._version_info(record, v, now) for v in await self._repo.versions(tenant, ref.text)
        )
        return SecretInfo(record, missing_metadata(record), versions)

    @staticmethod
    def _version_info(record: SecretRecord, v: VersionRecord, now: dt.datetime) -> VersionInfo:
        if v.sealed is None:
            state = VersionState.DESTROYED
        elif v.revoked_at is not None or (v.retire_at is not None and v.retire_at <= now):
            state = VersionState.REVOKED
        elif v.version == record.current_version and record.state == SecretState.ACTIVE:
            state = VersionState.CURRENT
        elif record.state == SecretState.ACTIVE:
            state = VersionState.PREVIOUS
        else:
            state = VersionState.REVOKED
        return VersionInfo(
            v.version, state, v.created_at, v.retire_at, v.revoked_at, v.kek_label or ""
        )

    async def list_secrets(self, tenant: str, prefix: str = "") -> list[SecretInfo]:
        check_tenant(tenant)
        if len(prefix) > MAX_REFERENCE:
            raise InvalidArgument(f"prefix is longer than {MAX_REFERENCE} characters")
        return [_info(r) for r in await self._repo.list_secrets(tenant, prefix)]

    async def due(self, tenant: str | None = None) -> list[SecretInfo]:
        """Active secrets past their rotation period (or missing what says when), most overdue
        first."""
        if tenant is not None:
            check_tenant(tenant)
        now = self._clock.now()
        out = []
        for record in await self._repo.list_secrets(tenant):
            if record.state != "active":
                continue
            info = _info(record)
            due = info.rotation_due
            if due is None or due <= now:
                out.append(info)
        return sorted(out, key=lambda i: i.rotation_due or dt.datetime.min.replace(tzinfo=dt.UTC))

    # -- background ----------------------------------------------------------------------

    async def maintain(self) -> tuple[int, list[tuple[str, str]]]:
        """Revoke versions past their rollback window; destroy the sealed data of secrets
        deleted longer than the retention period. Returns (versions revoked, destroyed
        (tenant, ref)s). Idempotent; run by one replica at a time (a leader lease)."""
        now = self._clock.now()
        retired = await self._repo.retire_expired(now)
        destroyed = await self._repo.destroy_deleted(now - self.retention)
        return retired, destroyed

    # -- SealedStore ---------------------------------------------------------------------

    async def rewrap(self, envelope: Envelope, tenant: str, new_label: str) -> int:
        count = 0
        for row in await self._repo.sealed_not_under(tenant, new_label):
            blob = envelope.rewrap(SealedBlob.from_bytes(row.sealed), new_label)
            if await self._repo.replace_sealed(row, new_label, blob.to_bytes()):
                count += 1
        return count

    async def kek_in_use(self, label: str) -> bool:
        return await self._repo.kek_in_use(label)


def _iso(value: dt.datetime | None) -> str:
    return "?" if value is None else value.isoformat(timespec="seconds")


def _hours(delta: dt.timedelta) -> str:
    return f"{int(delta.total_seconds() // 3600)} h"


class SecretJanitor:
    """The background job: every `interval` (by the injected clock) the replica holding the
    "secrets.maintenance" leader lease runs `SecretService.maintain`."""

    LEASE = "secrets.maintenance"

    def __init__(
        self,
        service: SecretService,
        locks: LockRepository,
        clock: Clock,
        owner: str,
        interval: dt.timedelta = dt.timedelta(minutes=1),
    ) -> None:
        self._service = service
        self._locks = locks
        self._clock = clock
        self._owner = owner
        self._interval = interval
        self._next: dt.datetime | None = None

    async def tick(self) -> tuple[int, list[tuple[str, str]]] | None:
        """Run once if due and leader; the result of `maintain`, or None when skipped."""
        now = self._clock.now()
        if self._next is not None and now < self._next:
            return None
        self._next = now + self._interval
        ttl = self._interval.total_seconds() * 2
        if not await self._locks.try_lease(self.LEASE, self._owner, ttl, now):
            return None
        retired, destroyed = await self._service.maintain()
        if retired or destroyed:
            log.info(
                "secrets maintenance: %d version(s) past their rollback window revoked, "
                "%d deleted secret(s) destroyed",
                retired,
                len(destroyed),
            )
        return retired, destroyed
