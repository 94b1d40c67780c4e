"""AccessControl with the shipped Rego policy: the authorization matrix of the standard, grants
on a fake clock, two-party approvals, break-glass, broken policies, the decision cache and its
invalidation across workers. Storage is a real SQLite file (migrations applied)."""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.access import AccessControl
from broker.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from broker.policy import Caller, Decision
from broker.rego import InvalidRegoPolicy, default_modules
from broker.storage import open_storage
from broker.storage.access import AccessRepository
from broker.storage.interface import Storage
from ca.clock import FakeClock

TD = "example.org"
ALICE = Caller(f"spiffe://{TD}/broker/operator/alice", True, {}, roles=frozenset({"admin"}))
BOB = Caller(f"spiffe://{TD}/broker/operator/bob", True, {}, roles=frozenset({"admin"}))
OPERATORS = (ALICE.spiffe_id, BOB.spiffe_id)
T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
REFERENCE = "secret://web/prod/stripe"


def workload(tenant: str, environment: str, service: str) -> Caller:
    return Caller(
        f"spiffe://{TD}/{tenant}/{environment}/{service}",
        False,
        {"tenant": tenant, "environment": environment, "service": service},
    )


def attrs(tenant: str, environment: str, owner: str, classification: str) -> dict[str, str]:
    return {
        "tenant": tenant,
        "environment": environment,
        "owner": owner,
        "classification": classification,
        "service": owner,
    }


@dataclass
class Env:
    storage: Storage
    clock: FakeClock
    access: AccessControl
    repo: AccessRepository

    def another_worker(self) -> AccessControl:
        return AccessControl(
            self.storage.access(),
            self.storage,
            self.clock,
            trust_domain=TD,
            operators=OPERATORS,
        )


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    storage = await open_storage(f"sqlite:///{tmp_path / 'broker.db'}")
    await storage.migrate()
    clock = FakeClock(T0)
    repo = storage.access()
    access = AccessControl(
        repo,
        storage,
        clock,
        trust_domain=TD,
        operators=OPERATORS,
    )
    await access.load()
    try:
        yield Env(storage, clock, access, repo)
    finally:
        await access.flush()
        await storage.close()


# -- the authorization matrix ------------------------------------------------------------------

TENANTS = ("acme", "globex")
ENVIRONMENTS = ("dev", "prod")
SERVICES = ("web", "db")
CLASSES = ("internal", "pii")
CALLERS = [workload(t, e, s) for t, e, s in itertools.product(TENANTS, ENVIRONMENTS, SERVICES)]
CALLERS.append(ALICE)
RESOURCES = list(itertools.product(TENANTS, ENVIRONMENTS, SERVICES, CLASSES))


def expected(caller: Caller, tenant: str, environment: str, owner: str, cls: str) -> str:
    """The standard, written independently of the Rego: the rule that decides, or "owner" /
    "operator" for an allow."""
    if caller.is_operator:
        return "two-person" if (environment, cls) == ("prod", "pii") else "operator"
    mine = caller.attributes
    if mine["tenant"] != tenant:
        return "tenant-isolation"
    if environment == "prod" and mine["environment"] != "prod":
        return "prod-only"
    if mine["environment"] != environment:
        return "environment"
    if mine["service"] != owner:
        return "cross-service"
    return "owner"


@pytest.mark.parametrize("action", ["secrets.get", "db.creds"])
async def test_every_cell_of_the_matrix(env: Env, action: str) -> None:
    cells = 0
    for caller in CALLERS:
        for tenant, environment, owner, cls in RESOURCES:
            want = expected(caller, tenant, environment, owner, cls)
            got = env.access.decide(
                caller, action, "h", attributes=attrs(tenant, environment, owner, cls)
            )
            cell = f"{caller.spiffe_id} -> {tenant}/{environment}/{owner}/{cls}"
            assert got.rule == want, f"{cell}: {got}"
            assert got.allowed == (want in ("owner", "operator")), f"{cell}: {got}"
            assert got.reason, cell
            cells += 1
    assert cells == len(CALLERS) * len(RESOURCES) == 9 * 16


@pytest.mark.parametrize(
    ("caller", "resource", "allowed", "rule"),
    [
        # control-plane secrets never go to data-plane identities, even the "owner" service
        (workload("acme", "prod", "web"), {"plane": "control"}, False, "control-plane"),
        (workload("platform", "prod", "web"), {"tenant": "platform"}, True, "owner"),
        (workload("acme", "prod", "web"), {"tenant": "platform"}, False, "tenant-isolation"),
    ],
)
async def test_control_plane_resources(
    env: Env, caller: Caller, resource: dict[str, str], allowed: bool, rule: str
) -> None:
    base = attrs(caller.attributes["tenant"], "prod", "web", "internal") | resource
    decision = env.access.decide(caller, "secrets.get", "h", attributes=base)
    assert (decision.allowed, decision.rule) == (allowed, rule)


async def test_built_in_rules_still_apply(env: Env) -> None:
    web = workload("acme", "prod", "web")
    cases = [
        (web, "svid.mint", web.spiffe_id, True, "self-mint"),
        (web, "svid.mint", f"spiffe://{TD}/acme/prod/db", False, "self-mint"),
        (web, "ca.bundle.get", "", True, "authenticated"),
        (web, "ca.rotate", "", False, "operator-only"),
        (web, "policy.set", "rego", False, "operator-only"),
        (web, "grant.create", "", False, "operator-only"),
        (web, "approval.approve", "x", False, "operator-only"),
        (ALICE, "ca.rotate", "", True, "operator"),
        (ALICE, "policy.set", "rego", True, "operator"),
    ]
    for caller, action, resource, allowed, rule in cases:
        got = env.access.decide(caller, action, resource)
        assert (got.allowed, got.rule) == (allowed, rule), (caller.spiffe_id, action, got)
    lease = env.access.decide(web, "lease.renew", "l1", attributes={"holder": web.spiffe_id})
    assert lease.allowed and lease.rule == "holder"
    other = env.access.decide(web, "lease.renew", "l1", attributes={"holder": "spiffe://x/y"})
    assert not other.allowed


async def test_denials_say_why(env: Env) -> None:
    web = workload("acme", "dev", "web")
    decision = env.access.decide(
        web, "secrets.get", "h", attributes=attrs("acme", "prod", "web", "internal")
    )
    assert not decision.allowed
    assert decision.rule == "prod-only"
    assert "prod resources go only to prod identities" in decision.reason
    assert "'dev'" in decision.reason or '"dev"' in decision.reason


# -- grants ------------------------------------------------------------------------------------


async def test_a_grant_lifts_cross_service_until_it_expires(env: Env) -> None:
    db = workload("acme", "prod", "db")
    resource = attrs("acme", "prod", "web", "internal")
    before = env.access.decide(db, "secrets.get", "h-web", attributes=resource)
    assert (before.allowed, before.rule) == (False, "cross-service")

    grant = await env.access.create_grant(
        ALICE, db.spiffe_id, "secrets.get", "h-web", dt.timedelta(hours=1), "INC-1 migration"
    )
    during = env.access.decide(db, "secrets.get", "h-web", attributes=resource)
    assert during.allowed and during.rule == "grant"
    assert during.flags == {"grant": grant.id}
    # the grant covers only its action and resource
    assert not env.access.decide(db, "secrets.get", "h-other", attributes=resource).allowed
    assert not env.access.decide(db, "secrets.rotate", "h-web", attributes=resource).allowed

    env.clock.advance(minutes=59)
    assert env.access.decide(db, "secrets.get", "h-web", attributes=resource).allowed
    env.clock.advance(minutes=1)  # exactly at expiry: no longer in force (no sync needed)
    after = env.access.decide(db, "secrets.get", "h-web", attributes=resource)
    assert (after.allowed, after.rule) == (False, "cross-service")
    assert [g.id for g in await env.access.list_grants()] == []
    assert [g.id for g in await env.access.list_grants(include_inactive=True)] == [grant.id]


async def test_a_cached_allow_lapses_with_its_grant_within_the_minute(env: Env) -> None:
    db = workload("acme", "prod", "db")
    resource = attrs("acme", "prod", "web", "internal")
    await env.access.create_grant(
        ALICE, db.spiffe_id, "secrets.get", "h", dt.timedelta(seconds=90), "j"
    )
    env.clock.advance(61)  # 12:01:01, same minute as the expiry at 12:01:30
    assert env.access.decide(db, "secrets.get", "h", attributes=resource).allowed
    assert env.access.decide(db, "secrets.get", "h", attributes=resource).allowed  # cached
    env.clock.advance(29)  # 12:01:30
    after = env.access.decide(db, "secrets.get", "h", attributes=resource)
    assert (after.allowed, after.rule) == (False, "cross-service")


async def test_a_grant_does_not_lift_the_guardrails(env: Env) -> None:
    dev = workload("acme", "dev", "web")
    await env.access.create_grant(
        ALICE, dev.spiffe_id, "secrets.get", "*", dt.timedelta(hours=1), "x"
    )
    decision = env.access.decide(
        dev, "secrets.get", "h", attributes=attrs("acme", "prod", "web", "internal")
    )
    assert (decision.allowed, decision.rule) == (False, "prod-only")
    other_tenant = env.access.decide(
        dev, "secrets.get", "h", attributes=attrs("globex", "dev", "web", "internal")
    )
    assert (other_tenant.allowed, other_tenant.rule) == (False, "tenant-isolation")


@pytest.mark.parametrize(
    ("ttl", "message"),
    [
        (dt.timedelta(hours=8, seconds=1), "at most 8h"),
        (dt.timedelta(0), "positive"),
    ],
)
async def test_grants_are_bounded(env: Env, ttl: dt.timedelta, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        await env.access.create_grant(ALICE, f"spiffe://{TD}/a/b/c", "secrets.get", "x", ttl, "j")
    assert await env.access.list_grants(include_inactive=True) == []


async def test_grant_input_is_checked(env: Env) -> None:
    with pytest.raises(InvalidArgument, match="justification"):
        await env.access.create_grant(
            ALICE, f"spiffe://{TD}/a/b/c", "secrets.get", "x", dt.timedelta(hours=1), "  "
        )
    with pytest.raises(InvalidArgument, match="trust domain"):
        await env.access.create_grant(
            ALICE, "spiffe://other.org/a/b/c", "secrets.get", "x", dt.timedelta(hours=1), "j"
        )
    assert await env.access.list_grants(include_inactive=True) == []


async def test_revoking_a_grant_takes_effect_at_once(env: Env) -> None:
    db = workload("acme", "prod", "db")
    resource = attrs("acme", "prod", "web", "internal")
    grant = await env.access.create_grant(
        ALICE, db.spiffe_id, "secrets.get", "h", dt.timedelta(hours=1), "j"
    )
    assert env.access.decide(db, "secrets.get", "h", attributes=resource).allowed
    revoked = await env.access.revoke_grant(grant.id, BOB)
    assert revoked.revoked_by == BOB.spiffe_id
    assert not env.access.decide(db, "secrets.get", "h", attributes=resource).allowed
    with pytest.raises(FailedPrecondition):
        await env.access.revoke_grant(grant.id, BOB)
    with pytest.raises(NotFound):
        await env.access.revoke_grant("grant-nope", BOB)


# -- two-party approval --------------------------------------------------------------------------

PROD_PII = attrs("acme", "prod", "web", "pii")


async def test_prod_pii_needs_a_second_operator_and_the_approval_is_single_use(env: Env) -> None:
    denied = env.access.decide(ALICE, "secrets.get", REFERENCE, attributes=PROD_PII)
    assert (denied.allowed, denied.rule) == (False, "two-person")

    request = await env.access.request_approval(ALICE, "secrets.get", REFERENCE, "INC-7 restore")
    assert request.state(env.clock.now()) == "pending"
    still = env.access.decide(ALICE, "secrets.get", REFERENCE, attributes=PROD_PII)
    assert not still.allowed  # pending is not approved

    approved = await env.access.approve(request.id, BOB)
    assert approved.approved_by == BOB.spiffe_id
    # BOB's approval is for ALICE only
    assert not env.access.decide(BOB, "secrets.get", REFERENCE, attributes=PROD_PII).allowed
    # ... and for this action and resource only
    assert not env.access.decide(ALICE, "secrets.rotate", REFERENCE, attributes=PROD_PII).allowed

    first = env.access.decide(ALICE, "secrets.get", REFERENCE, attributes=PROD_PII)
    assert first.allowed and first.flags.get("approval") == request.id
    second = env.access.decide(ALICE, "secrets.get", REFERENCE, attributes=PROD_PII)
    assert (second.allowed, second.rule) == (False, "two-person")

    await env.access.flush()
    stored = await env.repo.get_approval(request.id)
    assert stored is not None and stored.used_at is not None
    # another worker, loading from storage, does not get a second use either
    other = env.another_worker()
    await other.load()
    assert not other.decide(ALICE, "secrets.get", REFERENCE, attributes=PROD_PII).allowed


async def test_two_workers_racing_for_one_approval_settle_once(env: Env) -> None:
    other = env.another_worker()
    request = await env.access.request_approval(ALICE, "secrets.get", REFERENCE, "INC-7b")
    await env.access.approve(request.id, BOB)
    await other.load()  # both workers now hold the approval in force
    here = env.access.decide(ALICE, "secrets.get", REFERENCE, attributes=PROD_PII)
    there = other.decide(ALICE, "secrets.get", REFERENCE, attributes=PROD_PII)
    assert here.allowed and there.allowed  # neither knows of the other's use yet
    # Both writes are done (one lost the compare-and-set) and both workers reload (the counter
    # moved) before their requests settle: still exactly one use.
    await env.access.flush()
    await other.flush()
    await env.access.sync()
    await other.sync()
    settled = [await env.access.settle(here), await other.settle(there)]
    assert sorted(settled) == [False, True]


async def test_the_approval_also_matches_the_hashed_reference(env: Env) -> None:
    import hashlib

    hashed = hashlib.sha256(REFERENCE.encode()).hexdigest()
    request = await env.access.request_approval(ALICE, "secrets.get", REFERENCE, "INC-8")
    await env.access.approve(request.id, BOB)
    decision = env.access.decide(ALICE, "secrets.get", hashed, attributes=PROD_PII)
    assert decision.allowed and decision.flags["approval"] == request.id


async def test_the_owner_needs_no_approval(env: Env) -> None:
    owner = workload("acme", "prod", "web")
    decision = env.access.decide(owner, "secrets.get", REFERENCE, attributes=PROD_PII)
    assert decision.allowed and decision.rule == "owner"


async def test_self_approval_is_refused_and_changes_nothing(env: Env) -> None:
    request = await env.access.request_approval(ALICE, "secrets.get", REFERENCE, "INC-9")
    with pytest.raises(PermissionDenied, match="cannot approve it"):
        await env.access.approve(request.id, ALICE)
    stored = await env.repo.get_approval(request.id)
    assert stored is not None and stored.approved_by is None
    assert not env.access.decide(ALICE, "secrets.get", REFERENCE, attributes=PROD_PII).allowed
    # and the database refuses it too, should the check above ever be bypassed
    assert not await env.repo.approve(request.id, ALICE.spiffe_id, env.clock.now())


async def test_workloads_cannot_approve_and_approvals_expire(env: Env) -> None:
    request = await env.access.request_approval(ALICE, "secrets.get", REFERENCE, "INC-10")
    with pytest.raises(PermissionDenied):
        await env.access.approve(request.id, workload("acme", "prod", "web"))
    env.clock.advance(hours=1)
    with pytest.raises(FailedPrecondition, match="expired"):
        await env.access.approve(request.id, BOB)

    fresh = await env.access.request_approval(ALICE, "secrets.get", REFERENCE, "INC-11")
    await env.access.approve(fresh.id, BOB)
    env.clock.advance(hours=1)  # approved but never used: expires all the same
    assert not env.access.decide(ALICE, "secrets.get", REFERENCE, attributes=PROD_PII).allowed
    with pytest.raises(FailedPrecondition):
        await env.access.approve(fresh.id, BOB)


async def test_the_invariant_holds_whatever_the_rego_policy_says(env: Env) -> None:
    allow_all = (
        "package broker.authz\nimport rego.v1\n"
        'allow contains {"rule": "anything", "reason": "yes"} if true\n'
        "deny := set()\n"
    )
    await env.access.set_policy({"open.rego": allow_all}, ALICE)
    web = workload("acme", "prod", "db")
    assert env.access.decide(web, "ca.rotate", "").allowed  # the open policy is in force
    decision = env.access.decide(ALICE, "secrets.get", REFERENCE, attributes=PROD_PII)
    assert (decision.allowed, decision.rule) == (False, "two-person")
    assert not env.access.decide(web, "secrets.get", REFERENCE, attributes=PROD_PII).allowed


async def test_minting_a_prod_identity_needs_two_whatever_the_rego_policy_says(env: Env) -> None:
    """Issue 20 finding 4: minting a prod identity is the same power as reading its data."""
    allow_all = (
        "package broker.authz\nimport rego.v1\n"
        'allow contains {"rule": "anything", "reason": "yes"} if true\n'
        "deny := set()\n"
    )
    await env.access.set_policy({"open.rego": allow_all}, ALICE)
    web_id = f"spiffe://{TD}/acme/prod/web"
    prod_web = {"tenant": "acme", "environment": "prod", "service": "web"}
    dev = workload("acme", "dev", "db")
    for who in (ALICE, dev):
        for action in ("svid.mint", "jwt.mint", "token.create"):
            decision = env.access.decide(who, action, web_id, attributes=prod_web)
            assert (decision.allowed, decision.rule) == (False, "two-person"), (who, action)
    # The identity itself, and non-prod identities, need nobody.
    web = workload("acme", "prod", "web")
    assert env.access.decide(web, "svid.mint", web_id, attributes=prod_web).allowed
    dev_web = {"tenant": "acme", "environment": "dev", "service": "web"}
    assert env.access.decide(ALICE, "svid.mint", f"spiffe://{TD}/acme/dev/web", attributes=dev_web)


async def test_a_prod_identity_by_proxy_needs_two_and_each_approval_serves_once(env: Env) -> None:
    """Issue 20 finding 4, by proxy: a registration entry for a prod ID (its parent agent gets
    the identity) or an attestor whose template can yield one (whoever holds its keys gets it)
    needs a second operator's approval, whatever the Rego policy says; single use."""
    allow_all = (
        "package broker.authz\nimport rego.v1\n"
        'allow contains {"rule": "anything", "reason": "yes"} if true\n'
        "deny := set()\n"
    )
    await env.access.set_policy({"open.rego": allow_all}, ALICE)
    web_id = f"spiffe://{TD}/acme/prod/web"
    prod_web = {"tenant": "acme", "environment": "prod", "service": "web"}
    attestor = "attestor:k8s@sha256:" + "ab" * 32
    template = "spiffe://{td}/ns/{kubernetes.io.namespace}/sa/{sa}"
    prod_capable = {"environment": "prod", "template": template}
    cases = (("entry.admin", web_id, prod_web), ("attestor.admin", attestor, prod_capable))
    for action, resource, attributes in cases:
        denied = env.access.decide(ALICE, action, resource, attributes=attributes)
        assert (denied.allowed, denied.rule) == (False, "two-person"), action
        command = f"broker approval request --action {action} --resource {resource}"
        assert command in denied.reason
        assert "second operator" in denied.reason
        # Without the prod attributes (a dev ID, a template that cannot yield prod, listing,
        # removing) the operator acts alone.
        assert env.access.decide(ALICE, action, resource).allowed
    entry = env.access.decide(ALICE, "entry.admin", web_id, attributes=prod_web)
    assert "parent agent" in entry.reason
    added = env.access.decide(ALICE, "attestor.admin", attestor, attributes=prod_capable)
    assert template in added.reason

    for action, resource, attributes in cases:
        request = await env.access.request_approval(ALICE, action, resource, "INC-12 new node")
        # An approval of another action does not stand in for this one.
        assert not env.access.decide(ALICE, "svid.mint", resource, attributes=attributes).allowed
        await env.access.approve(request.id, BOB)
        assert not env.access.decide(BOB, action, resource, attributes=attributes).allowed
        first = env.access.decide(ALICE, action, resource, attributes=attributes)
        assert first.allowed and first.flags.get("approval") == request.id
        second = env.access.decide(ALICE, action, resource, attributes=attributes)
        assert (second.allowed, second.rule) == (False, "two-person")
        assert await env.access.settle(first)
    # An attestor approval names one definition: another one (other keys) is not covered.
    other = "attestor:k8s@sha256:" + "cd" * 32
    request = await env.access.request_approval(ALICE, "attestor.admin", attestor, "INC-13")
    await env.access.approve(request.id, BOB)
    assert not env.access.decide(ALICE, "attestor.admin", other, attributes=prod_capable).allowed


async def test_an_operator_minted_caller_is_never_the_owner(env: Env) -> None:
    web = workload("acme", "prod", "web")
    minted = Caller(web.spiffe_id, False, dict(web.attributes), minted_by=ALICE.spiffe_id)
    data = attrs("acme", "prod", "web", "pii")
    assert env.access.decide(web, "secrets.get", REFERENCE, attributes=data).allowed
    decision = env.access.decide(minted, "secrets.get", REFERENCE, attributes=data)
    assert (decision.allowed, decision.rule) == (False, "two-person")
    assert env.access.policy_input(minted, "secrets.get", REFERENCE, data)["caller"][
        "minted_by"
    ] == (ALICE.spiffe_id)


# -- break-glass ---------------------------------------------------------------------------------


def breakglass_caller(spiffe_id: str) -> Caller:
    # The identity layout parses broker/breakglass/<id> like any path; the policy ignores that.
    return Caller(spiffe_id, False, {"tenant": "broker", "environment": "breakglass"})


async def test_breakglass_is_approved_single_use_and_flagged(env: Env) -> None:
    request = await env.access.request_approval(ALICE, "secrets.get", REFERENCE, "INC-12 outage")
    with pytest.raises(FailedPrecondition, match="pending"):
        await env.access.issue_breakglass(ALICE, request.id, dt.timedelta(hours=1))
    await env.access.approve(request.id, BOB)
    with pytest.raises(PermissionDenied, match="someone else"):
        await env.access.issue_breakglass(BOB, request.id, dt.timedelta(hours=1))
    with pytest.raises(InvalidArgument, match="at most 8h"):
        await env.access.issue_breakglass(ALICE, request.id, dt.timedelta(hours=9))

    record = await env.access.issue_breakglass(ALICE, request.id, dt.timedelta(hours=1))
    assert record.spiffe_id == f"spiffe://{TD}/broker/breakglass/{record.id}"
    assert record.expires_at == T0 + dt.timedelta(hours=1)
    # the approval was spent on the credential
    with pytest.raises(FailedPrecondition):
        await env.access.issue_breakglass(ALICE, request.id, dt.timedelta(hours=1))

    bg = breakglass_caller(record.spiffe_id)
    # every decision for it names the credential and whose it is
    flagged = {"breakglass": record.id, "breakglass_operator": ALICE.spiffe_id}
    outside = env.access.decide(bg, "secrets.get", "secret://other", attributes=PROD_PII)
    assert (outside.allowed, outside.rule) == (False, "breakglass-scope")
    assert outside.flags == flagged
    mint = env.access.decide(bg, "svid.mint", record.spiffe_id)
    assert not mint.allowed and mint.flags == flagged

    bundle = env.access.decide(bg, "ca.bundle.get", "")
    assert bundle.allowed and bundle.flags == flagged  # flagged, not spent
    used = env.access.decide(bg, "secrets.get", REFERENCE, attributes=PROD_PII)
    assert used.allowed and used.rule == "break-glass"
    assert used.flags == flagged
    again = env.access.decide(bg, "secrets.get", REFERENCE, attributes=PROD_PII)
    assert (again.allowed, again.rule) == (False, "breakglass-spent")
    assert again.flags == flagged

    await env.access.flush()
    stored = await env.repo.get_breakglass(record.id)
    assert stored is not None and stored.used_at is not None
    assert await env.access.list_breakglass() == []


async def test_breakglass_expires_and_can_be_revoked(env: Env) -> None:
    records = []
    for _ in range(2):
        request = await env.access.request_approval(ALICE, "secrets.get", REFERENCE, "INC-13")
        await env.access.approve(request.id, BOB)
        records.append(await env.access.issue_breakglass(ALICE, request.id, dt.timedelta(hours=2)))
    revoked = await env.access.revoke_breakglass(records[0].id)
    assert revoked.revoked_at is not None
    first = env.access.decide(breakglass_caller(records[0].spiffe_id), "secrets.get", REFERENCE)
    assert (first.allowed, first.rule) == (False, "breakglass-spent")
    env.clock.advance(hours=2)
    second = env.access.decide(breakglass_caller(records[1].spiffe_id), "secrets.get", REFERENCE)
    assert (second.allowed, second.rule) == (False, "breakglass-spent")


async def test_an_unknown_breakglass_identity_gets_nothing(env: Env) -> None:
    forged = breakglass_caller(f"spiffe://{TD}/broker/breakglass/bg-0000")
    decision = env.access.decide(forged, "secrets.get", REFERENCE, attributes=PROD_PII)
    assert not decision.allowed


# -- the policy itself ---------------------------------------------------------------------------

BROKEN = {
    "syntax.rego": "package broker.authz\nimport rego.v1\nallow contains x if {\n",
    "conflict.rego": (
        "package broker.authz\nimport rego.v1\n"
        "allow := {1} if input.action\nallow := {2} if input.action\ndeny := set()\n"
    ),
    "nodeny.rego": 'package broker.authz\nimport rego.v1\nallow contains {"rule": "x"} if true\n',
    "package.rego": "package other\nimport rego.v1\nallow := set()\ndeny := set()\n",
}


@pytest.mark.parametrize("name", sorted(BROKEN))
async def test_a_broken_policy_is_refused_and_the_old_one_stays(env: Env, name: str) -> None:
    web = workload("acme", "prod", "web")
    before = env.access.decide(web, "svid.mint", web.spiffe_id)
    view = env.access.policy()
    with pytest.raises(InvalidRegoPolicy):
        await env.access.set_policy({name: BROKEN[name]}, ALICE)
    assert env.access.policy() == view
    assert env.access.decide(web, "svid.mint", web.spiffe_id) == before
    assert await env.storage.current_policy("rego") is None


async def test_syntax_errors_name_the_file_and_line(env: Env) -> None:
    with pytest.raises(InvalidRegoPolicy, match=r"syntax\.rego:3:\d+"):
        await env.access.set_policy({"syntax.rego": BROKEN["syntax.rego"]}, ALICE)


DENY_MINT = (
    "package broker.authz\nimport rego.v1\n"
    'allow contains {"rule": "operator", "reason": "ops"} if input.caller.operator\n'
    'deny contains {"rule": "no-mint", "reason": "minting is paused"} '
    'if input.action == "svid.mint"\n'
)


async def test_a_new_policy_takes_effect_here_and_in_other_workers(env: Env) -> None:
    web = workload("acme", "prod", "web")
    other = env.another_worker()
    await other.load()
    assert env.access.decide(web, "svid.mint", web.spiffe_id).allowed
    assert other.decide(web, "svid.mint", web.spiffe_id).allowed  # cached there now

    version = await env.access.set_policy({"pause.rego": DENY_MINT}, ALICE)
    assert version == 1
    assert env.access.decide(web, "svid.mint", web.spiffe_id) == Decision(
        False, "minting is paused", "no-mint"
    )
    await other.sync()
    assert other.policy().version == 1
    assert other.decide(web, "svid.mint", web.spiffe_id).rule == "no-mint"
    stored = await env.storage.current_policy("rego")
    assert stored is not None and stored.author == ALICE.spiffe_id


async def test_grants_made_elsewhere_reach_every_worker(env: Env) -> None:
    db = workload("acme", "prod", "db")
    resource = attrs("acme", "prod", "web", "internal")
    other = env.another_worker()
    await other.load()
    assert not other.decide(db, "secrets.get", "h", attributes=resource).allowed
    await env.access.create_grant(
        ALICE, db.spiffe_id, "secrets.get", "h", dt.timedelta(hours=1), "j"
    )
    await other.sync()
    assert other.decide(db, "secrets.get", "h", attributes=resource).allowed


async def test_decisions_are_cached_by_their_full_input(env: Env) -> None:
    web = workload("acme", "prod", "web")
    resource = attrs("acme", "prod", "web", "internal")
    env.access.decide(web, "secrets.get", "h", attributes=resource)
    misses = env.access.cache_misses
    for _ in range(5):
        env.access.decide(web, "secrets.get", "h", attributes=resource)
    assert env.access.cache_misses == misses
    assert env.access.cache_hits >= 5
    env.access.decide(web, "secrets.get", "h", attributes=resource | {"owner": "db"})
    assert env.access.cache_misses == misses + 1


async def test_policy_test_evaluates_candidates_without_storing_them(env: Env) -> None:
    web = workload("acme", "prod", "web")
    _, document = env.access.test_request(web, "svid.mint", web.spiffe_id, {})
    assert env.access.test(document).allowed
    candidate = env.access.test(document, {"pause.rego": DENY_MINT})
    assert (candidate.allowed, candidate.rule) == (False, "no-mint")
    assert env.access.policy().version == 0
    assert env.access.policy().modules == default_modules()


# -- wildcards, grant actions (issue 20, finding 14) -----------------------------------------------


def _secret(reference: str, owner: str = "api", environment: str = "dev") -> dict[str, str]:
    import hashlib

    name = hashlib.sha256(reference.encode()).hexdigest()
    return attrs("acme", environment, owner, "internal") | {"reference": reference, "name": name}


def _decide(env: Env, caller: Caller, action: str, reference: str, **kw: str) -> Decision:
    resource = _secret(reference, **kw)
    name = resource.pop("name")
    return env.access.decide(caller, action, name, attributes=resource)


async def test_a_wildcard_grant_matches_the_reference_not_its_digest(env: Env) -> None:
    web = workload("acme", "dev", "web")
    key = "secret://api/dev/key"
    import hashlib

    digest = hashlib.sha256(key.encode()).hexdigest()
    # Before the fix a digest prefix granted the secret: the attack.
    await env.access.create_grant(
        ALICE, web.spiffe_id, "secrets.get", digest[:2] + "*", dt.timedelta(hours=1), "x"
    )
    refused = _decide(env, web, "secrets.get", key)
    assert (refused.allowed, refused.rule) == (False, "cross-service")
    # The documented form covers every secret under secret://api/ and nothing else.
    grant = await env.access.create_grant(
        ALICE, web.spiffe_id, "secrets.get", "secret://api/*", dt.timedelta(hours=1), "y"
    )
    allowed = _decide(env, web, "secrets.get", key)
    assert allowed.allowed and allowed.flags == {"grant": grant.id}
    other = _decide(env, web, "secrets.get", "secret://billing/dev/key", owner="billing")
    assert (other.allowed, other.rule) == (False, "cross-service")


async def test_a_wildcard_approval_matches_the_reference_not_its_digest(env: Env) -> None:
    import hashlib

    key = "secret://web/prod/stripe"
    digest = hashlib.sha256(key.encode()).hexdigest()
    pii = attrs("acme", "prod", "web", "pii") | {"reference": key}
    bad = await env.access.request_approval(ALICE, "secrets.get", digest[:3] + "*", "INC-9")
    await env.access.approve(bad.id, BOB)
    refused = env.access.decide(ALICE, "secrets.get", digest, attributes=pii)
    assert (refused.allowed, refused.rule) == (False, "two-person")
    good = await env.access.request_approval(ALICE, "secrets.get", "secret://web/prod/*", "INC-9")
    await env.access.approve(good.id, BOB)
    allowed = env.access.decide(ALICE, "secrets.get", digest, attributes=pii)
    assert allowed.allowed and allowed.flags["approval"] == good.id


@pytest.mark.parametrize("action", ["*", "secrets.*", "secrets.gett", ""])
async def test_a_grant_must_name_one_known_action(env: Env, action: str) -> None:
    with pytest.raises(InvalidArgument, match="--action"):
        await env.access.create_grant(
            ALICE,
            f"spiffe://{TD}/acme/dev/web",
            action,
            "secret://api/*",
            dt.timedelta(hours=1),
            "j",
        )
    assert await env.access.list_grants(include_inactive=True) == []


class _Minter:
    """The CA's part in break-glass issuance, in memory (software keys, a throwaway root)."""

    def __init__(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test root")])
        self.root = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(1)
            .not_valid_before(T0)
            .not_valid_after(T0 + dt.timedelta(days=1))
            .sign(self._key, hashes.SHA256())
        )
        self.issued: list[tuple[str, dt.timedelta]] = []

    def issue_internal(self, spiffe_id: object, public_key: object, ttl: dt.timedelta) -> object:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes

        self.issued.append((str(spiffe_id), ttl))
        leaf = (
            x509.CertificateBuilder()
            .subject_name(self.root.subject)
            .issuer_name(self.root.subject)
            .public_key(public_key)  # type: ignore[arg-type]
            .serial_number(2)
            .not_valid_before(T0)
            .not_valid_after(T0 + ttl)
            .sign(self._key, hashes.SHA256())
        )
        return leaf, self.root

    def trust_bundle_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self.root.public_bytes(serialization.Encoding.PEM)


def _authorize(env: Env, caller: Caller, decided: list[Decision]) -> object:
    def authorize(resource: str, attributes: object = None, /) -> Decision:
        decision = env.access.decide(caller, "breakglass.issue", resource, attributes=attributes)  # type: ignore[arg-type]
        decided.append(decision)
        if not decision.allowed:
            raise PermissionDenied(decision.reason)
        return decision

    return authorize


async def test_breakglass_credential_is_decided_after_the_approval_is_loaded(env: Env) -> None:
    """Issue 17: break-glass issuance is one domain call that loads the approval, decides
    through the Authorize port (an absent approval as one nobody asked for), then mints."""
    minter = _Minter()
    request = await env.access.request_approval(ALICE, "secrets.get", REFERENCE, "INC-13")
    await env.access.approve(request.id, BOB)
    web = workload("acme", "prod", "web")
    decided: list[Decision] = []
    for approval_id in (request.id, "ap-nope"):
        with pytest.raises(PermissionDenied) as refused:
            await env.access.issue_breakglass_credential(
                web,
                approval_id,
                dt.timedelta(hours=1),
                _authorize(env, web, decided),
                minter,  # type: ignore[arg-type]
            )
        assert str(refused.value) == decided[-1].reason
    assert decided[0].reason == decided[1].reason and minter.issued == []
    with pytest.raises(NotFound):
        await env.access.issue_breakglass_credential(
            ALICE,
            "ap-nope",
            dt.timedelta(hours=1),
            _authorize(env, ALICE, []),
            minter,  # type: ignore[arg-type]
        )
    issued = await env.access.issue_breakglass_credential(
        ALICE,
        request.id,
        dt.timedelta(hours=1),
        _authorize(env, ALICE, []),
        minter,  # type: ignore[arg-type]
    )
    assert minter.issued == [(issued.record.spiffe_id, dt.timedelta(hours=1))]
    assert len(issued.cert_chain_der) == 2 and len(issued.bundle_der) == 1
    assert (issued.record.operator, issued.record.approval_id) == (ALICE.spiffe_id, request.id)
    assert [b.id for b in await env.access.list_breakglass()] == [issued.record.id]
