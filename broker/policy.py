"""Authorization: one decision function over (caller, action, resource).

The built-in rule set: operators administer everything; any authenticated identity may read
the trust bundle and check health; a workload may mint SVIDs only for its own SPIFFE ID.
A Rego engine (a later issue) implements the same `Policy` interface.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["Action", "Caller", "Decision", "DefaultPolicy", "Policy"]


class Action:
    """Action names used by policy and written to the audit ledger."""

    SVID_MINT = "svid.mint"
    JWT_MINT = "jwt.mint"
    BUNDLE_GET = "ca.bundle.get"
    CA_STATUS = "ca.status"
    CA_ROTATE = "ca.rotate"
    CA_POLICY_GET = "ca.policy.get"
    CA_POLICY_SET = "ca.policy.set"
    AUDIT_VERIFY = "audit.verify"
    AUDIT_READ = "audit.read"
    HEALTH = "health.check"
    REFLECTION = "reflection"


@dataclass(frozen=True)
class Caller:
    """An authenticated caller. `attributes` holds the parsed identity layout (tenant,
    environment, service) when the SPIFFE ID fits it."""

    spiffe_id: str
    is_operator: bool
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    rule: str


class Policy(Protocol):
    def decide(self, caller: Caller, action: str, resource: str) -> Decision: ...


_ANY_CALLER = frozenset({Action.BUNDLE_GET, Action.HEALTH, Action.REFLECTION})
_SELF_MINT = frozenset({Action.SVID_MINT, Action.JWT_MINT})


class DefaultPolicy:
    def __init__(self, operators: Iterable[str]) -> None:
        self._operators = frozenset(operators)

    def is_operator(self, spiffe_id: str) -> bool:
        return spiffe_id in self._operators

    def decide(self, caller: Caller, action: str, resource: str) -> Decision:
        if caller.is_operator:
            return Decision(True, "operators administer the broker", "operator")
        if action in _ANY_CALLER:
            return Decision(True, f"any authenticated identity may {action}", "authenticated")
        if action in _SELF_MINT:
            if resource == caller.spiffe_id:
                return Decision(True, "a workload may mint its own identity", "self-mint")
            return Decision(
                False,
                f"{caller.spiffe_id} may mint only its own SPIFFE ID, not {resource}",
                "self-mint",
            )
        return Decision(False, f"{action} is reserved for operators", "operator-only")
