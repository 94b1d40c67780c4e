"""Wiring of the domain objects for one broker process, and its background jobs.

No grpc here: `broker.api.server` serves what this builds.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import ipaddress
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from broker.access import AccessControl
from broker.anomaly import AnomalyDetector
from broker.audit import AuditLedger, CheckpointJob
from broker.authn import Authenticator
from broker.authority import CAService, CAServiceConfig
from broker.config import Config
from broker.database.credentials import CredentialService, DatabaseSettings
from broker.database.engine import EngineFactory, open_engine
from broker.database.reaper import LeaseReaper
from broker.database.scheduler import StaticRotationJob
from broker.envelope import DataKeyCache, Envelope, KekRotator, SealedStore
from broker.files import write_private_file
from broker.forwarding import AuditForwarder, open_sink
from broker.kms import KeyService
from broker.kms.lifecycle import KeyLifecycleJob
from broker.kms.report import ComplianceReporter
from broker.notifications import Notifier
from broker.operators.service import OperatorService
from broker.policy import DefaultPolicy, Policy
from broker.ratelimit import RateLimiter
from broker.revocation import SubjectRevocation
from broker.rollout.checks import ProcessHealthChecker
from broker.rollout.job import RolloutJob
from broker.rollout.service import RolloutService
from broker.rollout.static_role import StaticRolloutService, static_reference
from broker.rotation.datakeys import DatabaseDataKeys, DataKeyRotationJob, SecretDataKeys
from broker.rotation.origins import ValueOrigins
from broker.rotation.schedule import SecretRotationJob
from broker.secrets import MetadataMac, SecretJanitor, SecretService
from broker.storage import Storage
from broker.workloads import IdentityService
from ca.clock import Clock
from ca.keys import KeyBackend, random_source
from ca.layout import DEV_TENANT, IdentityLayout
from ca.spiffeid import SpiffeId
from ca.x509svid import SERVER_PATH, chain_pem, server_name

if TYPE_CHECKING:
    from broker.tracing.provider import Tracing

__all__ = ["Application", "TLSMaterial"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TLSMaterial:
    key_pem: bytes
    chain_pem: bytes  # leaf first
    client_roots_pem: bytes  # the trust bundle: client certificates must chain to it
    not_after: dt.datetime


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class Application:
    """One broker process: storage, keys, the CA, the ledger, policy, limits."""

    def __init__(
        self,
        config: Config,
        keys: KeyBackend,
        storage: Storage,
        clock: Clock,
        tracing: Tracing | None = None,
    ) -> None:
        # OpenTelemetry (broker.tracing), when an endpoint is configured: `keys` and `storage`
        # come already wrapped (broker.tracing.instrument); the pipeline and the database
        # engines take their spans from here.
        self.tracing = tracing
        self.config = config
        self.keys = keys
        self.storage = storage
        self.clock = clock
        self.layout = IdentityLayout(config.identity.template, config.identity.default_tenant)
        self.ca = CAService(
            CAServiceConfig(
                trust_domain=config.trust_domain,
                backend_uri=config.keys.uri,
                key_type=config.ca.key_type,
                root_ttl=config.ca.root_ttl,
                issuing_ttl=config.ca.issuing_ttl,
                backdate=config.ca.backdate,
                bundle_refresh_hint=config.ca.bundle_refresh_hint,
                server_names=tuple(config.server.server_names),
            ),
            keys,
            storage,
            clock,
        )
        # Integrity failures are logged CRITICAL and counted by the ledger itself; more hooks
        # (pager, webhook) attach with `ledger.add_integrity_hook`.
        self.ledger = AuditLedger(storage, keys, clock=clock)
        self.checkpoints = CheckpointJob(
            self.ledger,
            storage,
            clock,
            config.audit.checkpoint_interval,
            f"checkpoint-{uuid.uuid4().hex}",
        )
        # The audit stream to the configured sinks (docs/observability.md): a leader-held job that
        # reads committed entries; the request path never waits on it.
        self.forwarder = AuditForwarder(
            storage,
            [open_sink(sink) for sink in config.audit.sinks],
            clock,
            f"forwarder-{uuid.uuid4().hex}",
            batch=config.audit.forward_batch,
            interval=config.audit.forward_interval.total_seconds(),
        )
        # Signed webhook notifications (docs/observability.md), raised from what the ledger
        # commits and from its integrity failures; delivered off the request path.
        self.notifier = Notifier(
            config.notifications.channels,
            keys,
            clock,
            self.ledger.record,
            retries=config.notifications.retries,
        )
        if self.notifier.enabled:
            self.ledger.add_commit_hook(self.notifier.observe)
            self.ledger.add_integrity_hook(self.notifier.integrity_failure)
        # Data keys unwrapped for secret reads stay in memory for a while (see DataKeyCache).
        self.envelope = Envelope(keys, storage, DataKeyCache(clock))
        # Every store of sealed blobs registers here, so KEK rotation reaches all of them.
        self.sealed_stores: list[SealedStore] = []
        # Wrapped static secrets (a SealedStore) and KEK rotation over every sealed store.
        # Secret metadata rows are MACed under a key in the key backend (verified on read).
        self.secret_mac = MetadataMac(keys)
        self.secrets = SecretService(
            storage.secrets(self.secret_mac),
            self.envelope,
            clock,
            default_tenant=config.identity.default_tenant or DEV_TENANT,
            justification_required=config.secrets.justification_required,
            random=random_source(keys).random,
        )
        self.sealed_stores.append(self.secrets)
        # Dynamic database credentials (a SealedStore: the admin passwords) and their reaper.
        self.database = CredentialService(
            storage.database(),
            self.envelope,
            clock,
            settings=DatabaseSettings(
                reaper_interval=config.database.reaper_interval.total_seconds(),
                creation_timeout=config.database.creation_timeout,
            ),
            audit=self.ledger.record,
            engines=_engines(
                functools.partial(open_engine, scram_iterations=config.database.scram_iterations),
                tracing,
            ),
            random=random_source(keys).random,
        )
        self.sealed_stores.append(self.database)
        self.lease_reaper = LeaseReaper(self.database, storage, clock)
        self.static_rotation = StaticRotationJob(self.database.static, storage, clock)
        self.kek_rotator = KekRotator(self.envelope, self.sealed_stores, self.secrets.repository)
        self.secret_janitor = SecretJanitor(self.secrets, storage, clock, uuid.uuid4().hex)
        # The policy: Rego (shipped default or set by operators) over the built-in rules, with
        # just-in-time grants, two-party approvals and break-glass credentials.
        self.access = AccessControl(
            storage.access(),
            storage,
            clock,
            trust_domain=config.trust_domain,
            operators=config.server.operators,
            builtin=DefaultPolicy(config.server.operators),
            people_log_in=config.operators.enabled,
        )
        self.policy: Policy = self.access
        # Revocation by person: leases, grants and static-role passwords of an identity.
        self.revocation = SubjectRevocation(self.database, self.access, clock, self.ledger.record)
        self.anomalies = AnomalyDetector(clock)
        # Each worker process keeps its own buckets: share the configured rate between them.
        workers = config.server.workers
        self.limiter = RateLimiter(
            clock, config.server.rate_limit_rps / workers, config.server.rate_limit_burst / workers
        )
        self.authenticator = Authenticator(
            config.trust_domain, config.server.operators, self.layout
        )
        self.server_id = SpiffeId.from_segments(config.trust_domain, *SERVER_PATH)
        # Workload identity: attestation, registration entries, agents.
        self.workloads = IdentityService(self.ca, storage.identity(), clock)
        self.authenticator.denylist = self.workloads.denylist
        self.authenticator.replaced_issuers = self.ca.replaced_issuers
        # Operators: login with an OpenID provider, roles, the registry of operator SVIDs.
        self.operators = OperatorService(
            config.operators,
            self.ca,
            storage.operators(),
            self.workloads.deny,
            clock,
            trust_domain=config.trust_domain,
        )
        self._operator_expiry: dt.datetime | None = None
        # KMS keys for services' own data (issue 16): every version lives in the key backend.
        self.kms = KeyService(
            storage.kms(),
            keys,
            clock,
            default_tenant=config.identity.default_tenant or DEV_TENANT,
        )
        # Leader-held: KMS keys rotated at their period, KEKs yearly, scheduled destructions.
        self.kms_lifecycle = KeyLifecycleJob(
            self.kms,
            self.kek_rotator,
            self.secrets.repository,
            storage,
            storage,
            clock,
            f"kms-{uuid.uuid4().hex}",
            kek_period=config.rotation.kek_period,
        )
        # Scheduled rotation (issue 12): secrets the broker generated are remade at their
        # rotation period, those from a third party reported as due; data keys renewed.
        self.value_origins = ValueOrigins(storage)
        self.secrets.value_origin = self.value_origins.remember
        self.secret_rotation = SecretRotationJob(
            self.secrets,
            self.value_origins,
            storage,
            storage,
            clock,
            audit=self.ledger.record,
            interval=config.rotation.check_interval,
        )
        self.data_key_rotation = DataKeyRotationJob(
            self.envelope,
            [SecretDataKeys(self.secrets.repository), DatabaseDataKeys(self.database.store)],
            self.secrets.repository,
            storage,
            storage,
            clock,
            period=config.rotation.data_key_period,
            interval=config.rotation.check_interval,
            audit=self.ledger.record,
        )
        # Staged rollouts of new secret versions (issue 12): reads during a rollout are routed
        # to each consumer's stage; the leader-held job runs the bake timers and health checks.
        self.rollouts = RolloutService(
            storage.rollouts(),
            self.secrets,
            clock,
            ProcessHealthChecker(),
            audit=self.ledger.record,
        )
        self.secrets.route_reads(self.rollouts)
        self.rollout_job = RolloutJob(self.rollouts, storage, clock)
        # Staged rollouts of static database roles' new passwords (`db:ROLE`), on a second
        # login user per role; the same job runs their bake timers.
        self.static_rollouts = StaticRolloutService(
            storage.rollouts(),
            storage.static_rollouts(),
            self.database.static,
            self.database.connections,
            self.envelope,
            clock,
            ProcessHealthChecker(),
            audit=self.ledger.record,
            random=random_source(keys).random,
        )
        self.database.static.rollout_running = lambda role: self.static_rollouts.busy(
            role.tenant, static_reference(role.name)
        )
        self.rollout_job.services.append(self.static_rollouts)
        self.compliance = ComplianceReporter(
            self.secrets.repository,
            self.kms,
            self.database.store,
            storage.access(),
            storage.operators(),
            config.server.operators,
            self.ledger,
            clock,
        )

    async def start(self, *, new_ledger_epoch: str | None = None) -> None:
        """Migrate storage, check the audit ledger and its keys (raises LedgerStartRefused when
        a key is missing or changed, or the ledger's tail does not match its head, unless
        `new_ledger_epoch` gives the operator's reason to start a new epoch), make sure the CA
        exists, start the ledger."""
        await self.storage.migrate()
        await self.access.load()
        await self.ledger.open(new_epoch_reason=new_ledger_epoch, actor="operator (serve)")
        await self.secrets.start(self.secret_mac)
        self.kms.prepare()
        self.notifier.ensure_key()
        await self.ca.bootstrap()
        await self.workloads.refresh_denylist()
        self.ledger.start()

    async def close(self) -> None:
        await self.database.close()
        await self.ledger.stop()
        await self.storage.close()
        self.keys.close()

    # -- the broker's own identities -------------------------------------------------------

    def serving_material(self) -> TLSMaterial:
        """A fresh serving key and certificate (kept in memory only, never on disk)."""
        key = ec.generate_private_key(ec.SECP256R1())
        names = self.config.server.server_names
        # The first DNS name is the one clients check (ca.x509svid.server_name: it stands for
        # spiffe://<td>/broker/server, which gRPC cannot check itself); the configured names
        # serve other TLS clients (health probes, grpcurl).
        dns = [server_name(self.config.trust_domain)] + [n for n in names if not _is_ip(n)]
        ips = [ipaddress.ip_address(n) for n in names if _is_ip(n)]
        leaf, issuer = self.ca.issue_internal(
            self.server_id,
            key.public_key(),
            self.config.server.server_cert_ttl,
            dns_names=dns,
            ip_addresses=ips,
        )
        # During a root rotation the chain also carries the active root certified by the older
        # one, so a client that still trusts only the older root can verify the broker.
        chain = chain_pem((leaf, issuer, *self.ca.chain_extra()))
        return TLSMaterial(
            _pem_key(key), chain, self.ca.client_roots_pem(), leaf.not_valid_after_utc
        )

    def write_operator_identity(self) -> None:
        """Issue the bootstrap operator identity for the CLI into the data dir (key 0600)."""
        operator = SpiffeId.parse(self.config.server.operators[0])
        key = ec.generate_private_key(ec.SECP256R1())
        leaf, issuer = self.ca.issue_internal(
            operator, key.public_key(), self.config.server.server_cert_ttl
        )
        out = self.config.operator_dir
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private_file(out / "key.pem", _pem_key(key))
        write_private_file(
            out / "svid.pem",
            chain_pem((leaf, issuer)),
            0o644,
        )
        write_private_file(self.config.bundle_path, self.ca.trust_bundle_pem(), 0o644)
        self._operator_expiry = leaf.not_valid_after_utc

    # -- background jobs --------------------------------------------------------------------

    async def run_background(
        self,
        serving: TLSMaterial,
        on_serving: Callable[[TLSMaterial], None],
        *,
        write_operator: bool = True,
        sync_interval: float = 2.0,
    ) -> None:
        """Every `sync_interval` seconds pick up rotations and policy changes made by other
        processes; every rotation interval run the rotation schedule and renew the serving (and,
        with `write_operator`, the operator) certificate at half its life. Runs until
        cancelled."""
        interval = self.config.ca.rotation_check_interval.total_seconds()
        ttl = self.config.server.server_cert_ttl
        last_bundle = self.ca.bundle().sequence
        loop = asyncio.get_running_loop()
        next_rotation = loop.time() + interval
        while True:
            await asyncio.sleep(min(sync_interval, interval))
            try:
                await self.ca.sync()
                await self.workloads.refresh_denylist()
                # Another replica's entry, denylist or rotation wakes the sync streams here.
                self.workloads.feed.observe(await self.workloads.sync_fingerprint())
                await self.access.sync()
                await self.envelope.sync()
                if loop.time() >= next_rotation:
                    next_rotation = loop.time() + interval
                    await self.ca.rotate(force=False)
                await self.secret_janitor.tick()
                await self.kms_lifecycle.tick()
                await self.secret_rotation.tick()
                await self.data_key_rotation.tick()
                await self._checkpoint()
                now = self.clock.now()
                bundle_changed = self.ca.bundle().sequence != last_bundle
                if bundle_changed or serving.not_after - now < ttl / 2:
                    serving = self.serving_material()
                    on_serving(serving)
                    last_bundle = self.ca.bundle().sequence
                    log.info("serving certificate renewed until %s", serving.not_after)
                if write_operator and (
                    bundle_changed
                    or self._operator_expiry is None
                    or self._operator_expiry - now < ttl / 2
                ):
                    self.write_operator_identity()
            except Exception:
                log.exception("background job failed; retrying")

    async def _checkpoint(self) -> None:
        # A broken ledger (already alarmed by the ledger itself) must not stop the other jobs.
        try:
            await self.checkpoints.tick()
        except Exception as exc:
            log.warning("audit checkpoint not made: %s", exc)


def _engines(factory: EngineFactory, tracing: Tracing | None) -> EngineFactory:
    """The database engine factory, behind spans when tracing is on."""
    if tracing is None:
        return factory
    from broker.tracing.engines import traced_engines

    return traced_engines(factory, tracing.tracer)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
