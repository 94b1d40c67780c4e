"""`SecretService.get` declared as a dev pull (`broker dev pull`, purpose `dev-pull`): a
secret of an environment the policy marks as production (`justification_required`) is
decided, then refused, and nothing is revealed; other environments read as before."""

from __future__ import annotations

import datetime as dt
import secrets as random
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from broker.devvault import DEV_PULL_PURPOSE
from broker.envelope import DataKeyCache, Envelope
from broker.errors import InvalidArgument, PermissionDenied
from broker.policy import Caller, Decision
from broker.secrets import MetadataMac, SecretService
from broker.storage import open_storage
from ca.clock import FakeClock
from ca.keys import SoftwareBackend

T0 = dt.datetime(2026, 6, 1, 9, 0, tzinfo=dt.UTC)
PROD = "secret://payments/prod/stripe/api-key"
DEV = "secret://payments/dev/stripe/api-key"
OPERATOR = Caller("spiffe://td/broker/operator/alice", True)
WORKLOAD = Caller("spiffe://td/acme/dev/web", False, {"tenant": "acme", "environment": "dev"})


@dataclass
class Port:
    """An Authorize port that allows or refuses, and remembers what it was asked."""

    allow: bool = True
    asked: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    def __call__(self, resource: str, attributes: Mapping[str, str] | None = None, /) -> Decision:
        self.asked.append((resource, dict(attributes or {})))
        if not self.allow:
            raise PermissionDenied("not granted (rule test)")
        return Decision(True, "allowed", "test")


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[tuple[SecretService, dict[str, bytes]]]:
    storage = await open_storage(f"sqlite://{tmp_path / 'broker.db'}")
    await storage.migrate()
    keys, clock = SoftwareBackend(), FakeClock(T0)
    mac = MetadataMac(keys)
    svc = SecretService(storage.secrets(mac), Envelope(keys, storage, DataKeyCache(clock)), clock)
    await svc.start(mac)
    values = {}
    for ref in (PROD, DEV):
        values[ref] = f"sk_test_{random.token_hex(16)}".encode()
        await svc.put(
            "acme",
            ref,
            owner="payments",
            classification="confidential",
            rotation_period=dt.timedelta(days=90),
            value=values[ref],
        )
    try:
        yield svc, values
    finally:
        await storage.close()


async def test_a_dev_pull_of_production_is_decided_then_refused(
    service: tuple[SecretService, dict[str, bytes]],
) -> None:
    svc, _ = service
    for caller, justification in ((OPERATOR, ""), (OPERATOR, "INC-1"), (WORKLOAD, "")):
        port = Port()
        with pytest.raises(PermissionDenied) as refused:
            await svc.get(
                "acme", PROD, caller, port, justification=justification, purpose=DEV_PULL_PURPOSE
            )
        assert "dev pull refused" in str(refused.value) and "'prod'" in str(refused.value)
        assert len(port.asked) == 1  # decided (audited), then refused
        assert port.asked[0][1]["environment"] == "prod"
    # Nothing changed: the secret is still there, readable as an ordinary justified read.
    read = await svc.get("acme", PROD, OPERATOR, Port(), justification="INC-2")
    assert read.version == 1


async def test_a_caller_the_policy_refuses_gets_the_policys_refusal(
    service: tuple[SecretService, dict[str, bytes]],
) -> None:
    svc, _ = service
    with pytest.raises(PermissionDenied) as refused:
        await svc.get("acme", PROD, WORKLOAD, Port(allow=False), purpose=DEV_PULL_PURPOSE)
    assert "dev pull" not in str(refused.value)  # the same answer as for any refused read


async def test_a_dev_pull_of_dev_reads_and_other_purposes_keep_the_justification_rule(
    service: tuple[SecretService, dict[str, bytes]],
) -> None:
    svc, values = service
    read = await svc.get("acme", DEV, OPERATOR, Port(), purpose=DEV_PULL_PURPOSE)
    assert read.value == values[DEV]
    with pytest.raises(InvalidArgument, match="justification is required"):
        await svc.get("acme", PROD, OPERATOR, Port(), purpose="checkout")
