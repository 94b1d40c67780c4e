"""CA policy versions: which SPIFFE IDs may get which credentials, for how long (`ca.policy`),
stored as numbered versions; the current one is kept in memory for the request path.

Until an operator sets one, the built-in default is in force (version 0), and it never allows
SVIDs that the rotation schedule cannot honour; neither may a policy set later.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Protocol

from broker.policy import Caller
from broker.storage.interface import PolicyVersion
from ca import rotation
from ca.clock import Clock
from ca.errors import InvalidPolicy
from ca.policy import CAPolicy, RuleDefaults

__all__ = ["POLICY_NAME", "PolicyStore", "PolicyVersions"]

POLICY_NAME = "ca"


class PolicyStore(Protocol):
    """What `PolicyVersions` needs from storage (`broker.storage.interface.PolicyRepository`)."""

    async def current_policy(self, name: str) -> PolicyVersion | None: ...

    async def put_policy(
        self, name: str, document: str, author: str, at: dt.datetime
    ) -> PolicyVersion: ...


class PolicyVersions:
    """The CA policy in force and its stored versions."""

    def __init__(
        self,
        store: PolicyStore,
        clock: Clock,
        trust_domain: str,
        schedule: rotation.RotationSchedule,
    ) -> None:
        self._store = store
        self._clock = clock
        self._schedule = schedule
        self.current = CAPolicy.default(trust_domain, x509_max_ttl=schedule.max_safe_svid_ttl())
        self.version = PolicyVersion(0, "", "built-in default", clock.now())

    async def load(self) -> None:
        """The stored policy, or (none stored) the built-in default as version 0."""
        current = await self._store.current_policy(POLICY_NAME)
        if current is not None:
            self._use(current)
        else:
            doc = json.dumps(self.current.to_document(), sort_keys=True)
            self.version = PolicyVersion(0, doc, "built-in default", self._clock.now())

    def _use(self, version: PolicyVersion) -> None:
        self.current = CAPolicy.from_document(json.loads(version.document))
        self.version = version

    async def set(self, document_json: str, caller: Caller) -> int:
        """Validate the whole document, then store it as a new version. Nothing changes when
        it is refused (InvalidPolicy). Refused too when its maximum TTLs do not fit the
        rotation schedule."""
        try:
            doc = json.loads(document_json)
        except json.JSONDecodeError as exc:
            raise InvalidPolicy(
                f"CA policy is not valid JSON: {exc.msg} at line {exc.lineno}"
            ) from None
        if not isinstance(doc, dict):
            raise InvalidPolicy("CA policy must be a JSON object with a 'rules' list")
        # Keys a rule omits take the built-in default's values, its X.509 maximum included
        # (what the rotation schedule can honour); the stored document has them all.
        defaults = RuleDefaults.capped(self._schedule.max_safe_svid_ttl())
        policy = CAPolicy.from_document(doc, defaults)
        rotation.check_max_svid_ttl(self._schedule, policy.max_x509_ttl())
        canonical = json.dumps(policy.to_document(), sort_keys=True)
        stored = await self._store.put_policy(
            POLICY_NAME, canonical, caller.spiffe_id, self._clock.now()
        )
        self._use(stored)
        return stored.version

    async def refresh(self) -> None:
        """Pick up a policy set through another replica."""
        current = await self._store.current_policy(POLICY_NAME)
        if current is not None and current.version != self.version.version:
            self._use(current)
