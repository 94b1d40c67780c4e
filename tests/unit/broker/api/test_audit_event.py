"""The request pipeline's audit-event builder is pure: the same outcome gives the same event,
and each way a call can end is recorded as the ledger expects (who, decision, reason, error,
sampling, cancellation)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from broker.api.server.pipeline import CallContext, CallOutcome, audit_event
from broker.audit import AuditEvent
from broker.errors import InvalidArgument, PermissionDenied, RateLimited, Unauthenticated
from broker.policy import Caller, Decision

WHEN = dt.datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=dt.UTC)
WEB = "spiffe://example.org/acme/prod/web"
METHOD = "/broker.v1.Secrets/Get"


def build(outcome: CallOutcome, **kwargs: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "when": WHEN,
        "where": "ipv4:10.0.0.1:5555",
        "latency_ms": 1.5,
        "status": "OK",
        "message": "",
    }
    args.update(kwargs)
    return audit_event(outcome, **args).to_dict()


def outcome(**kwargs: Any) -> CallOutcome:
    return CallOutcome(METHOD, "secrets.get", "cid-1", "ticket 42", **kwargs)


def admitted(verdict: Decision | None, policy: Any = None) -> CallOutcome:
    call = CallContext(
        Caller(WEB, False, {}), "cid-1", "ticket 42", action="secrets.get", resource="r1"
    )
    call.policy = policy
    return outcome(call=call, verdict=verdict)


def test_an_allowed_call_names_its_caller_and_the_rule() -> None:
    o = admitted(Decision(True, "owner", "owner-rule", {"grant": "g1"}))
    assert o.call is not None
    o.call.details["version"] = 3
    event = build(o)
    assert event == {
        "when": "2026-03-01T12:00:00.123456+00:00",
        "who": WEB,
        "what": "secrets.get",
        "method": METHOD,
        "resource": "r1",
        "where": "ipv4:10.0.0.1:5555",
        "why": "ticket 42",
        "correlation_id": "cid-1",
        "decision": "allow",
        "reason": "owner",
        "rule": "owner-rule",
        "outcome": "OK",
        "latency_ms": 1.5,
        "details": {"version": 3},
        "flags": {"grant": "g1"},
    }
    assert build(o) == event  # pure: nothing in the outcome was consumed


def test_a_refusal_before_the_servicer_is_recorded_with_what_admission_learnt() -> None:
    o = outcome()
    o.seen.update(who=WEB, resource="r1", rule="deny-all", flags={"x": "y"}, serial="0a")
    o.failed(PermissionDenied("nobody may read r1"))
    event = build(o, status="PERMISSION_DENIED", message="nobody may read r1")
    assert (event["who"], event["resource"], event["decision"]) == (WEB, "r1", "deny")
    assert (event["reason"], event["rule"], event["flags"]) == (
        "nobody may read r1",
        "deny-all",
        {"x": "y"},
    )
    assert event["error"] == "nobody may read r1"
    assert event["serial"] == "0a"
    assert event["why"] == "ticket 42"
    assert "details" not in event and "effect" not in event


def test_an_unauthenticated_call_is_sampled() -> None:
    o = outcome()
    o.failed(Unauthenticated("no client certificate"))
    sampled = {"interval_seconds": 10.0, "previous_interval_refusals": 7}
    event = build(o, status="UNAUTHENTICATED", message="no client certificate", sampled=sampled)
    assert event["who"] == "unauthenticated"
    assert event["reason"] == "no client certificate"
    assert event["sampled"] == sampled


def test_a_rate_limited_call_gives_the_limit_as_its_reason() -> None:
    o = outcome()
    o.seen["who"] = WEB
    o.failed(RateLimited("rate limit exceeded"))
    event = build(o, status="RESOURCE_EXHAUSTED", message="rate limit exceeded")
    assert (event["who"], event["decision"], event["reason"]) == (
        WEB,
        "deny",
        "rate limit exceeded",
    )


def test_a_deferred_call_records_the_servicers_decision_or_a_denial_without_one() -> None:
    undecided = admitted(None, policy=object())
    undecided.failed(PermissionDenied(f"{METHOD} was not authorized; refused"))
    event = build(undecided, status="PERMISSION_DENIED", message="refused")
    assert (event["decision"], event["reason"]) == ("deny", f"{METHOD} was not authorized; refused")

    decided = admitted(None, policy=object())
    assert decided.call is not None
    decided.call.resource = "sha256:abc"
    decided.call.decision = Decision(False, "not the owner", "owner-rule")
    decided.failed(PermissionDenied("not the owner"))
    event = build(decided, status="PERMISSION_DENIED", message="not the owner")
    assert (event["resource"], event["decision"], event["rule"]) == (
        "sha256:abc",
        "deny",
        "owner-rule",
    )


def test_a_cancelled_call_says_whether_its_change_took_effect() -> None:
    applied = admitted(Decision(True, "", "r"))
    event = build(applied, cancelled="CANCELLED")
    assert (event["outcome"], event["effect"]) == ("CANCELLED", "applied")

    refused = admitted(Decision(True, "", "r"))
    refused.failed(InvalidArgument("bad"))
    event = build(refused, status="INVALID_ARGUMENT", message="bad", cancelled="DEADLINE_EXCEEDED")
    assert (event["outcome"], event["effect"]) == ("DEADLINE_EXCEEDED", "none")

    crashed = admitted(Decision(True, "", "r"))
    crashed.failed(RuntimeError("boom"))
    event = build(crashed, status="INTERNAL", message="internal error", cancelled="CANCELLED")
    assert event["effect"] == "unknown"


def test_the_event_leaves_out_unset_optional_fields() -> None:
    event = AuditEvent(WHEN, "broker", "lease.expire", "l1", "allow", "revoked").to_dict()
    assert set(event) == {
        "when",
        "who",
        "what",
        "method",
        "resource",
        "where",
        "why",
        "correlation_id",
        "decision",
        "reason",
        "rule",
        "outcome",
    }
