"""KMS keys as named resources (issue 16): per-tenant keys owned by a service, each version a
key generated inside the key backend (never extractable), and the operations services use.

- Administration: `create`, `rotate`, `disable`/`enable`, `schedule_destroy`/`cancel_destroy`,
  `list_keys`, `show`. A rotation adds a version and makes it current; older versions stay
  usable for decrypt and verify until the key is destroyed.
- Envelope encryption: `generate_data_key`, `encrypt`, `decrypt`, `reencrypt` (see
  `broker.kms.ciphertext`); one key-backend call (wrap or unwrap) per operation.
- Signing: `sign`, `verify`, `public_key` (EC keys: ECDSA; RSA-3072 keys: RSA-PSS with
  SHA-256, MGF1-SHA-256 and a 32-byte salt, `ca.keys.rsa_pss()`); MACs: `mac`, `verify_mac`
  (HMAC keys).

Tenants, names and inputs are validated here and refused with `InvalidArgument`; absent keys
raise `NotFound`; a key that may not be used now (disabled, pending destruction, destroyed, or
of another purpose) raises `FailedPrecondition`; a ciphertext that does not verify (wrong
context, tampered, moved) raises `ca.errors.IntegrityError`. Authorization is the caller's
(the servicer's) job: `load` gives the attributes the policy decides on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hmac
import logging
import os
import re
import secrets as _random
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker.envelope import aad, aad_field
from broker.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from broker.kms.ciphertext import NONCE_BYTES, Ciphertext
from broker.policy import Authorize, Caller, decide_absent, opaque_refusals
from broker.storage.kms import (
    KeyRecord,
    KeyState,
    KeyVersionRecord,
    KeyVersionState,
    KmsRepository,
)
from ca.clock import Clock
from ca.errors import CapabilityMissing, IntegrityError, KeyExists, KeyNotFound
from ca.keys import (
    KeyBackend,
    KeyKind,
    RsaBackend,
    data_key_wrapper,
    key_destroyer,
    mac_signer,
    rsa_pss,
    rsa_signer,
)
from ca.keys.executor import token_call
from ca.layout import DEV_TENANT

__all__ = [
    "CLASSIFICATIONS",
    "KEY_TYPES",
    "MAX_PAYLOAD_BYTES",
    "MAX_ROTATION_PERIOD",
    "MIN_ROTATION_PERIOD",
    "PURPOSES",
    "DataKey",
    "KeyInfo",
    "KeyIntegrityError",
    "KeyMac",
    "KeyService",
    "Signature",
]

PURPOSES: Final = ("encrypt", "sign", "mac")
# key type -> (purpose, backend kind)
KEY_TYPES: Final[Mapping[str, tuple[str, KeyKind]]] = {
    "aes-256": ("encrypt", KeyKind.AES_256),
    "ec-p256": ("sign", KeyKind.EC_P256),
    "ec-p384": ("sign", KeyKind.EC_P384),
    "rsa-3072": ("sign", KeyKind.RSA_3072),
    "hmac-sha256": ("mac", KeyKind.HMAC_SHA256),
}
CLASSIFICATIONS: Final = ("public", "internal", "confidential", "pii")
#: The standard's DEK rotation: used when a key is created without a rotation period.
DEFAULT_ROTATION_PERIOD: Final = dt.timedelta(days=90)
MIN_ROTATION_PERIOD: Final = dt.timedelta(days=1)
MAX_ROTATION_PERIOD: Final = dt.timedelta(days=3650)
MIN_DESTROY_AFTER: Final = dt.timedelta(days=1)
MAX_DESTROY_AFTER: Final = dt.timedelta(days=365)
MAX_PAYLOAD_BYTES: Final = 4096
DATA_KEY_SIZES: Final = (16, 32)
_NAME_RE: Final = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_HASHES: Final[Mapping[str, type[hashes.HashAlgorithm]]] = {
    "ec-p256": hashes.SHA256,
    "ec-p384": hashes.SHA384,
    "rsa-3072": hashes.SHA256,
}


log = logging.getLogger(__name__)

METADATA_MAC_KEY: Final = "kms.metadata-mac"
_MAC_CACHE_SIZE: Final = 65536


def _digest(data: bytes, hash_type: hashes.HashAlgorithm | Prehashed) -> bytes:
    """`data` itself when it is a digest already, else its hash."""
    if isinstance(hash_type, Prehashed):
        return data
    h = hashes.Hash(hash_type)
    h.update(data)
    return h.finalize()


class KeyIntegrityError(FailedPrecondition):
    """A key's row does not verify against its MAC: altered outside the broker."""


def _integrity_refusal(name: str) -> KeyIntegrityError:
    return KeyIntegrityError(
        f"integrity check failed: key {name!r} was changed outside the broker (owner, state, "
        "versions, ...); refused, nothing was used or changed. Restore the row from a backup"
    )


def key_bytes(r: KeyRecord) -> bytes:
    """The canonical bytes a key row's MAC covers: every column but the MAC."""
    return aad(
        "broker.kms-key.v1",
        *(
            aad_field(v)
            for v in (
                r.tenant,
                r.name,
                r.purpose,
                r.key_type,
                r.owner,
                r.environment,
                r.classification,
                r.rotation_period_s,
                r.state,
                r.current_version,
                r.created_at,
                r.last_rotated,
                r.destroy_after,
            )
        ),
    )


class KeyMac:
    """HMAC-SHA256 over key rows under a key that never leaves the key backend, so someone
    with database write access but no key access cannot make a key theirs (`UPDATE kms_keys
    SET owner = ...`), re-enable it or roll its version back. Verified row states are
    remembered (bounded), so the request path asks the backend once per distinct state."""

    def __init__(self, keys: KeyBackend, label: str = METADATA_MAC_KEY) -> None:
        self._keys = mac_signer(keys)  # CapabilityMissing now, not on the first request
        self._label = label
        self._verified: dict[KeyRecord, bytes] = {}

    def prepare(self) -> None:
        """Create the MAC key if it does not exist yet (idempotent, safe across replicas)."""
        with contextlib.suppress(KeyExists):
            if not self._keys.has_key(self._label):
                self._keys.create_key(self._label, KeyKind.HMAC_SHA256)

    def seal(self, record: KeyRecord) -> KeyRecord:
        """`record` with its MAC."""
        return dataclasses.replace(record, mac=self._keys.mac(self._label, key_bytes(record)))

    def verify(self, record: KeyRecord) -> bool:
        if record.mac is None:
            return False
        known = self._verified.get(record)
        if known is not None:
            return hmac.compare_digest(known, record.mac)
        try:
            expected = self._keys.mac(self._label, key_bytes(record))
        except KeyNotFound:
            log.error("the KMS metadata MAC key %r is missing from the key backend", self._label)
            return False
        if not hmac.compare_digest(expected, record.mac):
            return False
        if len(self._verified) >= _MAC_CACHE_SIZE:
            self._verified.clear()
        self._verified[record] = expected
        return True


def check_name(value: str, what: str) -> str:
    if not _NAME_RE.fullmatch(value or ""):
        raise InvalidArgument(
            f"{what} {value!r} is invalid: use 1-63 lowercase letters, digits, '.', '_' or '-'"
        )
    return value


def check_tenant(tenant: str) -> str:
    if tenant.startswith("_"):
        raise InvalidArgument(f"tenant {tenant!r} is reserved for the broker itself")
    return check_name(tenant, "tenant")


def check_payload(data: bytes, what: str = "plaintext") -> bytes:
    if len(data) > MAX_PAYLOAD_BYTES:
        raise InvalidArgument(
            f"the {what} is {len(data)} bytes; at most {MAX_PAYLOAD_BYTES} are accepted "
            "(encrypt larger data locally under a data key: GenerateDataKey)"
        )
    return data


@dataclass(frozen=True)
class KeyInfo:
    record: KeyRecord
    versions: tuple[KeyVersionRecord, ...] = ()
    # The version the request path loaded with the key (one read), if any.
    selected: KeyVersionRecord | None = None

    @property
    def rotation_due(self) -> dt.datetime:
        r = self.record
        return r.last_rotated + dt.timedelta(seconds=r.rotation_period_s)

    def attributes(self) -> dict[str, str]:
        """What the policy decides on: the owner's service may use the key, in its tenant and
        environment; prod + pii keys need a second operator for administrative changes."""
        r = self.record
        return {
            "tenant": r.tenant,
            "environment": r.environment,
            "owner": r.owner,
            "service": r.owner,
            "classification": r.classification,
            "purpose": r.purpose,
        }


@dataclass(frozen=True)
class DataKey:
    plaintext: bytes
    ciphertext: bytes
    version: int


@dataclass(frozen=True)
class Signature:
    signature: bytes
    version: int


def unowned(tenant: str, name: str) -> dict[str, str]:
    """The attributes of a key nobody owns (decided when it is absent)."""
    return {"tenant": tenant, "environment": "", "owner": "", "service": "", "name": name}


def refusal(action: str) -> str:
    """What a refused workload is told, whether the key exists or not."""
    return f"{action} refused: there is no such key for this caller, or it may not use it"


class KeyService:
    def __init__(
        self,
        repository: KmsRepository,
        keys: KeyBackend,
        clock: Clock,
        mac: KeyMac | None = None,
        *,
        default_tenant: str = DEV_TENANT,
    ) -> None:
        self._repo = repository
        self._keys = keys
        # The optional powers KMS keys need, asked for once: CapabilityMissing at start-up.
        self._wrapper = data_key_wrapper(keys)
        self._macs = mac_signer(keys)
        self._destroyer = key_destroyer(keys)
        # RSA is optional: without it only creating an rsa-3072 key is refused.
        self._rsa: RsaBackend | None = None
        with contextlib.suppress(CapabilityMissing):
            self._rsa = rsa_signer(keys)
        self._clock = clock
        self._mac = mac if mac is not None else KeyMac(keys)
        self.default_tenant = default_tenant

    def prepare(self) -> None:
        """At start: the metadata MAC key exists."""
        self._mac.prepare()

    def _verified(self, record: KeyRecord) -> KeyRecord:
        if not self._mac.verify(record):
            raise _integrity_refusal(record.name)
        return record

    async def _all_verified(self, tenant: str | None) -> list[KeyRecord]:
        """The rows that verify; the others are logged and left out (never used)."""
        out = []
        for r in await self._repo.list_keys(tenant):
            if self._mac.verify(r):
                out.append(r)
            else:
                log.error(
                    "KMS key %s/%s does not verify against its MAC: skipped", r.tenant, r.name
                )
        return out

    @property
    def repository(self) -> KmsRepository:
        return self._repo

    def now(self) -> dt.datetime:
        return self._clock.now()

    # -- authorization ----------------------------------------------------------------------

    def tenant_for(self, caller: Caller, requested: str) -> str:
        """The tenant a request is for: as asked, else the workload's own, else the default.
        The policy refuses a workload asking for another tenant's key."""
        if requested:
            return requested
        if not caller.is_operator and caller.attributes.get("tenant"):
            return caller.attributes["tenant"]
        return self.default_tenant

    async def authorized(
        self,
        tenant: str,
        name: str,
        caller: Caller,
        authorize: Authorize,
        action: str,
        *,
        version: int | None = None,
        details: MutableMapping[str, object] | None = None,
    ) -> KeyInfo:
        """The key (with `version`, else its current one, in the same read) once `authorize`
        allowed `caller` to `action` it, decided on its attributes. An absent key, or one whose
        row does not verify against its MAC, is decided as one nobody owns (`unowned`): a
        refused workload is told the same in every case, so key names cannot be probed; an
        operator learns NotFound or the integrity refusal."""
        authorize = opaque_refusals(authorize, caller, refusal(action))
        try:
            info = await self.load(tenant, name, version)
        except KeyIntegrityError:
            if details is not None:
                details["integrity"] = "metadata MAC mismatch"
            # A tampered owner grants nothing.
            authorize(name, unowned(tenant, name))
            raise
        if info is None:
            absent = NotFound(f"no key {name!r} in tenant {tenant!r}")
            decide_absent(authorize, name, unowned(tenant, name), absent)
        authorize(name, info.attributes() | {"name": name})
        return info

    # -- administration ---------------------------------------------------------------------

    async def load(self, tenant: str, name: str, version: int | None = None) -> KeyInfo | None:
        """The key (None when absent) with `version` (the current one when None) loaded in
        the same read, for `encrypt`, `decrypt`, `sign`, ..."""
        loaded = await self._repo.get_key_version(
            check_tenant(tenant), check_name(name, "key name"), version
        )
        if loaded is None:
            return None
        return KeyInfo(self._verified(loaded[0]), selected=loaded[1])

    async def show(self, tenant: str, name: str) -> KeyInfo:
        info = await self.load(tenant, name)
        if info is None:
            raise NotFound(f"no key {name!r} in tenant {tenant!r}")
        versions = await self._repo.list_versions(tenant, name)
        return KeyInfo(info.record, tuple(versions))

    async def list_keys(self, tenant: str | None) -> list[KeyInfo]:
        """The keys whose rows verify (see `KeyMac`)."""
        records = await self._all_verified(None if tenant is None else check_tenant(tenant))
        return [KeyInfo(r) for r in records]

    def _label(self, tenant: str, name: str, version: int) -> str:
        # A random suffix: a key left behind by a create or rotation that failed half-way
        # never collides with the next attempt.
        return f"kms.{tenant}.{name}.{version}.{_random.token_hex(4)}"

    async def _generate(self, label: str, kind: KeyKind) -> None:
        try:
            await token_call(self._keys, self._keys.create_key, label, kind)
        except KeyExists:  # pragma: no cover - random suffix
            raise FailedPrecondition("key label collision; retry") from None

    async def create(
        self,
        tenant: str,
        name: str,
        *,
        purpose: str,
        key_type: str,
        owner: str,
        environment: str,
        classification: str,
        rotation_period: dt.timedelta | None = None,
    ) -> KeyInfo:
        """Generate version 1 inside the key backend and record the key (rotation period
        `DEFAULT_ROTATION_PERIOD` when None). Raises `AlreadyExists` when the name is taken in
        the tenant (whatever its state)."""
        if rotation_period is None:
            rotation_period = DEFAULT_ROTATION_PERIOD
        check_tenant(tenant)
        check_name(name, "key name")
        check_name(owner, "owner service")
        check_name(environment, "environment")
        if classification not in CLASSIFICATIONS:
            raise InvalidArgument(
                f"classification {classification!r} is not one of {', '.join(CLASSIFICATIONS)}"
            )
        if key_type == "rsa-3072" and self._rsa is None:
            raise InvalidArgument(f"key type {key_type!r} is not supported by the key backend")
        if key_type not in KEY_TYPES:
            raise InvalidArgument(f"key type {key_type!r} is not one of {', '.join(KEY_TYPES)}")
        if purpose not in PURPOSES:
            raise InvalidArgument(f"purpose {purpose!r} is not one of {', '.join(PURPOSES)}")
        if KEY_TYPES[key_type][0] != purpose:
            raise InvalidArgument(
                f"a {key_type} key cannot {purpose}: it is for {KEY_TYPES[key_type][0]}"
            )
        if not MIN_ROTATION_PERIOD <= rotation_period <= MAX_ROTATION_PERIOD:
            raise InvalidArgument("the rotation period must be between 1 day and 10 years")
        if await self._repo.get_key(tenant, name) is not None:
            raise AlreadyExists(f"key {name!r} already exists in tenant {tenant!r}")
        now = self._clock.now()
        label = self._label(tenant, name, 1)
        await self._generate(label, KEY_TYPES[key_type][1])
        record = KeyRecord(
            tenant,
            name,
            purpose,
            key_type,
            owner,
            environment,
            classification,
            int(rotation_period.total_seconds()),
            KeyState.ENABLED,
            1,
            now,
            now,
        )
        record = self._mac.seal(record)
        first = KeyVersionRecord(1, label, KeyVersionState.ENABLED, now)
        try:
            await self._repo.insert_key(record, first)
        except BaseException:
            self._destroyer.destroy_key(label)
            raise
        return KeyInfo(record, (first,))

    async def rotate(self, tenant: str, name: str) -> tuple[KeyInfo, int, int]:
        """A new version generated in the key backend, made current. Raises
        `FailedPrecondition` unless the key is enabled (or another rotation won the race)."""
        info = await self.show(tenant, name)
        r = info.record
        if r.state != KeyState.ENABLED:
            raise FailedPrecondition(f"key {name!r} is {r.state}; only an enabled key rotates")
        version = r.current_version + 1
        label = self._label(tenant, name, version)
        await self._generate(label, KEY_TYPES[r.key_type][1])
        new = KeyVersionRecord(version, label, KeyVersionState.ENABLED, self._clock.now())
        sealed = self._mac.seal(
            dataclasses.replace(r, current_version=version, last_rotated=new.created_at)
        )
        assert sealed.mac is not None
        if not await self._repo.add_version(tenant, name, r.current_version, new, sealed.mac):
            self._destroyer.destroy_key(label)
            raise FailedPrecondition(
                f"key {name!r} changed while rotating (another rotation or a disable); retry"
            )
        return await self.show(tenant, name), r.current_version, version

    async def _transition(
        self, tenant: str, name: str, expected: str, state: str, after: dt.datetime | None = None
    ) -> KeyInfo:
        info = await self.show(tenant, name)
        sealed = self._mac.seal(dataclasses.replace(info.record, state=state, destroy_after=after))
        assert sealed.mac is not None
        if info.record.state != expected or not await self._repo.set_state(
            tenant, name, expected=expected, state=state, mac=sealed.mac, destroy_after=after
        ):
            raise FailedPrecondition(
                f"key {name!r} is {info.record.state}, not {expected}: nothing changed"
            )
        return await self.show(tenant, name)

    async def disable(self, tenant: str, name: str) -> KeyInfo:
        """Refuse every use of the key until `enable`. Raises `FailedPrecondition` unless
        enabled."""
        return await self._transition(tenant, name, KeyState.ENABLED, KeyState.DISABLED)

    async def enable(self, tenant: str, name: str) -> KeyInfo:
        return await self._transition(tenant, name, KeyState.DISABLED, KeyState.ENABLED)

    async def schedule_destroy(self, tenant: str, name: str, after: dt.timedelta) -> KeyInfo:
        """Refuse every use now and destroy every version (in the key backend) once `after`
        has passed (the lifecycle job); `cancel_destroy` until then. The key must be disabled
        first, so nobody loses data by one command."""
        if not MIN_DESTROY_AFTER <= after <= MAX_DESTROY_AFTER:
            raise InvalidArgument("destruction must be scheduled between 1 and 365 days ahead")
        return await self._transition(
            tenant, name, KeyState.DISABLED, KeyState.PENDING_DESTROY, self._clock.now() + after
        )

    async def cancel_destroy(self, tenant: str, name: str) -> KeyInfo:
        """Back to disabled (enable it to use it again)."""
        return await self._transition(tenant, name, KeyState.PENDING_DESTROY, KeyState.DISABLED)

    async def destroy_due(self) -> list[tuple[str, str]]:
        """Destroy, in the key backend, every version of each key whose scheduled destruction
        date has passed; returns the (tenant, name) destroyed."""
        now = self._clock.now()
        destroyed = []
        for r in await self._all_verified(None):
            if (
                r.state != KeyState.PENDING_DESTROY
                or r.destroy_after is None
                or r.destroy_after > now
            ):
                continue
            for v in await self._repo.list_versions(r.tenant, r.name):
                if v.state != KeyVersionState.DESTROYED:
                    await token_call(self._keys, self._destroyer.destroy_key, v.label)
            sealed = self._mac.seal(dataclasses.replace(r, state=KeyState.DESTROYED))
            assert sealed.mac is not None
            await self._repo.destroy_versions(r.tenant, r.name, now, sealed.mac)
            destroyed.append((r.tenant, r.name))
        return destroyed

    async def due(self) -> list[KeyInfo]:
        """Enabled keys whose rotation period has run out."""
        now = self._clock.now()
        return [
            KeyInfo(r)
            for r in await self._all_verified(None)
            if r.state == KeyState.ENABLED and KeyInfo(r).rotation_due <= now
        ]

    # -- use --------------------------------------------------------------------------------

    async def _version(
        self, info: KeyInfo, purpose: str, version: int | None = None
    ) -> KeyVersionRecord:
        """The version to use (current when None), refusing what may not be used."""
        r = info.record
        if r.purpose != purpose:
            raise FailedPrecondition(
                f"key {r.name!r} is a {r.purpose} key ({r.key_type}); it cannot be used to "
                f"{purpose}"
            )
        if r.state != KeyState.ENABLED:
            raise FailedPrecondition(f"key {r.name!r} is {r.state}: every use is refused")
        wanted = r.current_version if version is None else version
        if not 1 <= wanted <= r.current_version:
            raise NotFound(f"key {r.name!r} has no version {wanted}")
        v = info.selected
        if v is None or v.version != wanted:
            v = await self._repo.get_version(r.tenant, r.name, wanted)
        if v is None:
            raise NotFound(f"key {r.name!r} has no version {wanted}")
        if v.state != KeyVersionState.ENABLED:
            raise FailedPrecondition(f"version {wanted} of key {r.name!r} is {v.state}")
        return v

    async def _seal(
        self, info: KeyInfo, plaintext: bytes, context: Mapping[str, str]
    ) -> tuple[bytes, int]:
        v = await self._version(info, "encrypt")
        one_time = AESGCM.generate_key(bit_length=256)
        wrapped = await token_call(self._keys, self._wrapper.wrap, v.label, one_time)
        header = Ciphertext(info.record.tenant, info.record.name, v.version, wrapped, b"", b"")
        nonce = os.urandom(NONCE_BYTES)
        sealed = AESGCM(one_time).encrypt(nonce, plaintext, header.associated(context))
        blob = Ciphertext(header.tenant, header.key, v.version, wrapped, nonce, sealed)
        return blob.to_bytes(), v.version

    async def encrypt(
        self, info: KeyInfo, plaintext: bytes, context: Mapping[str, str]
    ) -> tuple[bytes, int]:
        """The ciphertext of a small payload under the key's current version, and the version."""
        return await self._seal(info, check_payload(plaintext), context)

    async def generate_data_key(
        self, info: KeyInfo, context: Mapping[str, str], size: int = 32
    ) -> DataKey:
        """A fresh random data key: plaintext (shown once) and wrapped under the current
        version."""
        if size not in DATA_KEY_SIZES:
            raise InvalidArgument(f"a data key is {' or '.join(map(str, DATA_KEY_SIZES))} bytes")
        plaintext = os.urandom(size)
        ciphertext, version = await self._seal(info, plaintext, context)
        return DataKey(plaintext, ciphertext, version)

    def parse(self, ciphertext: bytes, tenant: str, name: str = "") -> Ciphertext:
        """The ciphertext's header, refusing one from another tenant or key."""
        blob = Ciphertext.from_bytes(ciphertext)
        if blob.tenant != tenant:
            raise InvalidArgument("the ciphertext belongs to another tenant")
        if name and blob.key != name:
            raise InvalidArgument(f"the ciphertext was made under another key, not {name!r}")
        return blob

    async def decrypt(
        self, info: KeyInfo, blob: Ciphertext, context: Mapping[str, str]
    ) -> tuple[bytes, int]:
        """The plaintext and the version it was encrypted under. Raises `IntegrityError` when
        the context differs or the ciphertext was altered."""
        v = await self._version(info, "encrypt", blob.version)
        try:
            one_time = await token_call(self._keys, self._wrapper.unwrap, v.label, blob.wrapped_key)
            plaintext = AESGCM(one_time).decrypt(blob.nonce, blob.sealed, blob.associated(context))
        except (InvalidTag, IntegrityError, ValueError):
            raise IntegrityError(
                "the ciphertext did not verify: wrong encryption context, or altered"
            ) from None
        return plaintext, v.version

    async def sign(self, info: KeyInfo, message: bytes | None, digest: bytes | None) -> Signature:
        """A signature by the current version over `message`, or over a `digest` made with the
        key's hash (SHA-256 for P-256 and RSA-3072, SHA-384 for P-384): DER ECDSA for EC keys,
        RSA-PSS (`ca.keys.rsa_pss()`) for RSA keys."""
        v = await self._version(info, "sign")
        hash_type = self._hash(info, message, digest)
        data = message if message is not None else digest
        assert data is not None
        if info.record.key_type == "rsa-3072":
            rsa_keys = self._rsa_keys()
            signature = await token_call(
                self._keys, rsa_keys.rsa_sign_digest, v.label, _digest(data, hash_type)
            )
            return Signature(signature, v.version)
        signer = self._keys.signer(v.label)
        signature = await token_call(self._keys, signer.sign, data, ec.ECDSA(hash_type))
        return Signature(signature, v.version)

    def _rsa_keys(self) -> RsaBackend:
        if self._rsa is None:  # an rsa-3072 key recorded, then the backend changed
            raise FailedPrecondition("the key backend has no RSA keys")
        return self._rsa

    def _hash(
        self, info: KeyInfo, message: bytes | None, digest: bytes | None
    ) -> hashes.HashAlgorithm | Prehashed:
        """The key's hash for a message, or `Prehashed` of it for a digest of its length."""
        hash_type = _HASHES[info.record.key_type]()
        if (message is None) == (digest is None):
            raise InvalidArgument("give either a message or a digest")
        if message is not None:
            check_payload(message, "message")
            return hash_type
        assert digest is not None
        if len(digest) != hash_type.digest_size:
            raise InvalidArgument(
                f"a {info.record.key_type} digest is {hash_type.digest_size} bytes "
                f"({hash_type.name}), not {len(digest)}"
            )
        return Prehashed(hash_type)

    async def _public(
        self, info: KeyInfo, label: str
    ) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
        if info.record.key_type == "rsa-3072":
            return await token_call(self._keys, self._rsa_keys().rsa_public_key, label)
        return await token_call(self._keys, self._keys.public_key, label)

    async def public_key(self, info: KeyInfo, version: int | None = None) -> tuple[bytes, int]:
        """The PEM public key of a version (current when None)."""
        v = await self._version(info, "sign", version)
        public = await self._public(info, v.label)
        pem = public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return pem, v.version

    async def verify(
        self,
        info: KeyInfo,
        version: int | None,
        message: bytes | None,
        digest: bytes | None,
        signature: bytes,
    ) -> tuple[bool, int]:
        hash_type = self._hash(info, message, digest)
        v = await self._version(info, "sign", version)
        public = await self._public(info, v.label)
        data = message if message is not None else digest
        assert data is not None
        try:
            if isinstance(public, rsa.RSAPublicKey):
                public.verify(signature, data, rsa_pss(), hash_type)
            else:
                public.verify(signature, data, ec.ECDSA(hash_type))
        except (InvalidSignature, ValueError):
            return False, v.version
        return True, v.version

    async def mac(self, info: KeyInfo, message: bytes) -> tuple[bytes, int]:
        """HMAC-SHA256 of a message under the current version."""
        v = await self._version(info, "mac")
        tag = await token_call(
            self._keys, self._macs.mac, v.label, check_payload(message, "message")
        )
        return tag, v.version

    async def verify_mac(
        self, info: KeyInfo, version: int | None, message: bytes, tag: bytes
    ) -> tuple[bool, int]:
        v = await self._version(info, "mac", version)
        expected = await token_call(
            self._keys, self._macs.mac, v.label, check_payload(message, "message")
        )
        return hmac.compare_digest(expected, tag), v.version
