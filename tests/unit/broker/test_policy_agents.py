"""The default policy's rules for attestation and agents."""

from __future__ import annotations

from broker.api.server.pipeline import bootstrap_caller
from broker.policy import Action, Caller, DefaultPolicy

AGENT = "spiffe://example.org/agents/node1"
OTHER = "spiffe://example.org/agents/node2"
POLICY = DefaultPolicy(["spiffe://example.org/broker/operator/ops"])


def test_anyone_may_attempt_attestation() -> None:
    caller = bootstrap_caller("ipv4:10.1.2.3:55001")
    assert caller.spiffe_id == "bootstrap:10.1.2.3" and not caller.is_operator
    assert POLICY.decide(caller, Action.ATTEST, "join-token:sha256:x").allowed
    assert bootstrap_caller("ipv6:[::1]:4000").spiffe_id == "bootstrap:[::1]"


def test_an_agent_renews_only_itself() -> None:
    agent = Caller(AGENT, False)
    assert POLICY.decide(agent, Action.AGENT_RENEW, AGENT).allowed
    assert not POLICY.decide(agent, Action.AGENT_RENEW, OTHER).allowed


def test_an_agent_mints_only_for_entries_it_parents() -> None:
    agent = Caller(AGENT, False)
    assert POLICY.decide(agent, Action.AGENT_SYNC, "e1", attributes={"parent": AGENT}).allowed
    denied = POLICY.decide(agent, Action.AGENT_SYNC, "e1", attributes={"parent": OTHER})
    assert not denied.allowed and denied.rule == "agent-parent"
    assert not POLICY.decide(agent, Action.AGENT_SYNC, "e1", attributes={}).allowed


def test_agents_do_not_administer() -> None:
    agent = Caller(AGENT, False)
    for action in (
        Action.TOKEN_CREATE,
        Action.ENTRY_ADMIN,
        Action.ATTESTOR_ADMIN,
        Action.SVID_DENY,
    ):
        assert not POLICY.decide(agent, action, "").allowed
