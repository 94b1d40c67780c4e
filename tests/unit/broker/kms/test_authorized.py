"""`KeyService.authorized`: load-then-decide through the Authorize port. A workload that may not
use a key is told the same for a key that exists and one that does not (key names cannot be
probed), nothing changes either way; an operator learns that an absent key is absent."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import pytest

from broker.errors import NotFound, PermissionDenied
from broker.kms import KeyService
from broker.policy import Action, Authorize, Caller, Decision, DefaultPolicy
from broker.storage import open_storage
from ca.clock import FakeClock
from ca.keys.software import SoftwareBackend

OPS = "spiffe://example.org/ops"
WEB = Caller(
    "spiffe://example.org/default/prod/web",
    False,
    {"tenant": "default", "environment": "prod", "service": "web"},
)
ORDERS = Caller(
    "spiffe://example.org/default/prod/orders",
    False,
    {"tenant": "default", "environment": "prod", "service": "orders"},
)
ADMIN = Caller(OPS, True, roles=frozenset({"admin"}))


def _port(caller: Caller, action: str, seen: list[Decision]) -> Authorize:
    """An Authorize as the pipeline hands it to the domain: decide, keep, raise if refused."""
    policy = DefaultPolicy([OPS])

    def authorize(resource: str, attributes: Mapping[str, str] | None = None, /) -> Decision:
        decision = policy.decide(caller, action, resource, attributes=attributes)
        seen.append(decision)
        if not decision.allowed:
            raise PermissionDenied(decision.reason)
        return decision

    return authorize


@pytest.fixture
async def keys(tmp_path: Path) -> AsyncIterator[KeyService]:
    storage = await open_storage(f"sqlite://{tmp_path / 'broker.db'}")
    await storage.migrate()
    service = KeyService(storage.kms(), SoftwareBackend(), FakeClock())
    service.prepare()
    await service.create(
        "default",
        "orders-dek",
        purpose="encrypt",
        key_type="aes-256",
        owner="orders",
        environment="prod",
        classification="confidential",
    )
    try:
        yield service
    finally:
        await storage.close()


@pytest.mark.parametrize("action", [Action.KMS_ENCRYPT, Action.KMS_DATA_KEY, Action.KMS_DECRYPT])
async def test_an_unknown_key_and_a_refused_key_answer_the_same_to_a_workload(
    keys: KeyService, action: str
) -> None:
    before = await keys.list_keys(None)
    answers = []
    for name in ("orders-dek", "no-such-key"):
        seen: list[Decision] = []
        with pytest.raises(PermissionDenied) as refused:
            await keys.authorized("default", name, WEB, _port(WEB, action, seen), action)
        answers.append((type(refused.value), str(refused.value)))
        # The decision (what the audit event records) is a refusal, with its real reason.
        assert [d.allowed for d in seen] == [False]
        assert seen[0].reason
    assert answers[0] == answers[1]
    assert "orders" not in answers[0][1] and "no-such-key" not in answers[0][1]
    assert await keys.list_keys(None) == before  # nothing created, nothing changed


async def test_the_owner_gets_its_key_and_an_operator_learns_an_absent_one_is_absent(
    keys: KeyService,
) -> None:
    info = await keys.authorized(
        "default", "orders-dek", ORDERS, _port(ORDERS, Action.KMS_ENCRYPT, []), Action.KMS_ENCRYPT
    )
    assert info.record.owner == "orders" and info.selected is not None
    with pytest.raises(NotFound, match="no key 'no-such-key'"):
        await keys.authorized(
            "default",
            "no-such-key",
            ADMIN,
            _port(ADMIN, Action.KMS_KEY_ROTATE, []),
            Action.KMS_KEY_ROTATE,
        )
    # The owner asking for a key it does not have is refused like anyone else, not told.
    with pytest.raises(PermissionDenied):
        await keys.authorized(
            "default",
            "no-such-key",
            ORDERS,
            _port(ORDERS, Action.KMS_ENCRYPT, []),
            Action.KMS_ENCRYPT,
        )


def test_the_tenant_is_as_asked_else_the_workloads_own_else_the_default(keys: KeyService) -> None:
    beta = Caller("spiffe://example.org/beta/prod/web", False, {"tenant": "beta"})
    assert keys.tenant_for(beta, "acme") == "acme"  # the policy refuses it, not this
    assert keys.tenant_for(beta, "") == "beta"
    assert keys.tenant_for(ADMIN, "") == keys.default_tenant == "default"
