from collections.abc import Mapping

import pytest

from broker.errors import NotFound, PermissionDenied
from broker.policy import (
    Action,
    Authorize,
    Caller,
    Decision,
    DefaultPolicy,
    decide_absent,
    opaque_refusals,
)

OPERATOR = "spiffe://td/broker/operator/alice"
WORKLOAD = "spiffe://td/acme/prod/web"


def _decide(caller_id: str, action: str, resource: str = "") -> bool:
    policy = DefaultPolicy([OPERATOR])
    operator = policy.is_operator(caller_id)
    caller = Caller(caller_id, operator, roles=frozenset({"admin"} if operator else ()))
    return policy.decide(caller, action, resource).allowed


def test_operators_administer() -> None:
    for action in (Action.CA_ROTATE, Action.CA_POLICY_SET, Action.AUDIT_READ, Action.SVID_MINT):
        assert _decide(OPERATOR, action, WORKLOAD)


def test_workload_mints_only_its_own_id() -> None:
    assert _decide(WORKLOAD, Action.SVID_MINT, WORKLOAD)
    assert _decide(WORKLOAD, Action.JWT_MINT, WORKLOAD)
    assert not _decide(WORKLOAD, Action.SVID_MINT, "spiffe://td/acme/prod/db")
    assert not _decide(WORKLOAD, Action.JWT_MINT, OPERATOR)


def test_workload_cannot_administer_but_reads_bundle() -> None:
    for action in (
        Action.CA_ROTATE,
        Action.CA_POLICY_SET,
        Action.CA_POLICY_GET,
        Action.AUDIT_VERIFY,
        Action.AUDIT_READ,
        Action.CA_STATUS,
    ):
        assert not _decide(WORKLOAD, action)
    assert _decide(WORKLOAD, Action.BUNDLE_GET)


def test_denial_says_why() -> None:
    policy = DefaultPolicy([OPERATOR])
    decision = policy.decide(Caller(WORKLOAD, False), Action.SVID_MINT, "spiffe://td/x/y/z")
    assert not decision.allowed
    assert "only its own SPIFFE ID" in decision.reason
    assert decision.rule == "self-mint"


def _port(caller: Caller, action: str, seen: list[Decision]) -> Authorize:
    """An Authorize as the pipeline hands it to the domain: decide, keep, raise if refused."""
    policy = DefaultPolicy(["spiffe://example.org/ops"])

    def authorize(resource: str, attributes: Mapping[str, str] | None = None, /) -> Decision:
        decision = policy.decide(caller, action, resource, attributes=attributes)
        seen.append(decision)
        if not decision.allowed:
            raise PermissionDenied(decision.reason)
        return decision

    return authorize


def test_an_absent_resource_is_decided_as_nobodys_then_refused_or_not_found() -> None:
    web = Caller(
        "spiffe://example.org/acme/prod/web",
        False,
        {"tenant": "acme", "environment": "prod", "service": "web"},
    )
    seen: list[Decision] = []
    with pytest.raises(PermissionDenied):
        decide_absent(
            _port(web, Action.DB_CREDS, seen),
            "nope",
            {"tenant": "", "environment": "", "owner": ""},
            NotFound("no role named 'nope'"),
        )
    assert [d.allowed for d in seen] == [False]
    admin = Caller("spiffe://example.org/ops", True, roles=frozenset({"admin"}))
    with pytest.raises(NotFound, match="no role named 'nope'"):
        decide_absent(
            _port(admin, Action.DB_CREDS, []),
            "nope",
            {"owner": ""},
            NotFound("no role named 'nope'"),
        )


def test_opaque_refusals_hide_the_reason_from_workloads_only() -> None:
    web = Caller(
        "spiffe://example.org/acme/prod/web",
        False,
        {"tenant": "acme", "environment": "prod", "service": "web"},
    )
    seen: list[Decision] = []
    opaque = opaque_refusals(_port(web, Action.DB_CREDS, seen), web, "refused, whatever it is")
    with pytest.raises(PermissionDenied, match=r"^refused, whatever it is$"):
        opaque("app", {"tenant": "acme", "environment": "prod", "owner": "db"})
    assert "owning service 'db'" in seen[0].reason  # the decision (audited) keeps the reason
    auditor = Caller("spiffe://example.org/ops", True, roles=frozenset({"auditor"}))
    shown = opaque_refusals(_port(auditor, Action.DB_CREDS, []), auditor, "hidden")
    with pytest.raises(PermissionDenied, match="needs a role that allows it"):
        shown("app", {"owner": "db"})
