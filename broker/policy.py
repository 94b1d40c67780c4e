"""Authorization: one decision function over (caller, action, resource).

The built-in rule set: operators administer everything; any authenticated identity may read
the trust bundle and check health; a workload may mint SVIDs only for its own SPIFFE ID, read
a secret or database credential only as the owning service in the same tenant and environment,
and renew or revoke only leases issued to it.
`broker.rego` evaluates operator-written Rego policy behind the same `Policy` interface
(`broker.access` puts it, grants, approvals and break-glass in front of this rule set).

Decisions that need a loaded resource (its owner, tenant, holder) are made by the domain
through an `Authorize` callable the request pipeline hands in: the domain loads the resource,
then asks. An absent resource is decided as one nobody owns (`decide_absent`), so a caller who
may not use it is refused exactly as for one that exists; a caller who may administer it learns
that it is absent.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NoReturn, Protocol

from broker.errors import BrokerError, PermissionDenied
from ca.x509svid import Lineage

__all__ = [
    "Action",
    "Authorize",
    "Caller",
    "Decision",
    "DefaultPolicy",
    "Policy",
    "decide_absent",
    "opaque_refusals",
    "owner_decision",
]


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
    AUDIT_CHECKPOINT = "audit.checkpoint"
    HEALTH = "health.check"
    REFLECTION = "reflection"
    # Workload identity (attestation, registration entries, agents)
    ATTEST = "agent.attest"  # join token / JWT attestation (no client certificate yet)
    AGENT_RENEW = "agent.renew"  # an agent renews its own SVID over mTLS
    AGENT_SYNC = "agent.sync"  # an agent fetches the entries it may serve and mints for them
    TOKEN_CREATE = "token.create"  # noqa: S105 (an action name)
    ATTESTOR_ADMIN = "attestor.admin"
    ENTRY_ADMIN = "entry.admin"
    SVID_DENY = "svid.deny"
    # Dynamic database credentials
    DB_CONNECTION_ADMIN = "db.connection.admin"
    DB_ROLE_ADMIN = "db.role.admin"
    DB_CREDS = "db.creds"
    LEASE_RENEW = "lease.renew"
    LEASE_REVOKE = "lease.revoke"
    LEASE_LIST = "lease.list"
    SUBJECT_REVOKE = "subject.revoke"  # end everything of an identity or owner (operators)
    # Static secrets
    SECRETS_PUT = "secrets.put"
    SECRETS_GET = "secrets.get"
    SECRETS_LIST = "secrets.list"
    SECRETS_SHOW = "secrets.show"
    SECRETS_ROTATE = "secrets.rotate"
    SECRETS_ROLLBACK = "secrets.rollback"
    SECRETS_REVOKE = "secrets.revoke"
    SECRETS_DELETE = "secrets.delete"
    SECRETS_SCAN = "secrets.scan"  # broker scan fingerprints  # pragma: allowlist secret
    KEK_ROTATE = "kek.rotate"
    # KMS keys (issue 16): administration, and use by the owning service
    KMS_KEY_CREATE = "kms.key.create"
    KMS_KEY_LIST = "kms.key.list"
    KMS_KEY_SHOW = "kms.key.show"
    KMS_KEY_ROTATE = "kms.key.rotate"
    KMS_KEY_DISABLE = "kms.key.disable"
    KMS_KEY_ENABLE = "kms.key.enable"
    KMS_KEY_DESTROY = "kms.key.destroy"  # schedule and cancel
    KMS_DATA_KEY = "kms.datakey"
    KMS_ENCRYPT = "kms.encrypt"
    KMS_DECRYPT = "kms.decrypt"
    KMS_REENCRYPT = "kms.reencrypt"
    KMS_SIGN = "kms.sign"
    KMS_VERIFY = "kms.verify"
    KMS_PUBLIC_KEY = "kms.pubkey"
    KMS_MAC = "kms.mac"
    REPORT_COMPLIANCE = "report.compliance"
    # Operators (people who log in)
    OPERATOR_LOGIN = "operator.login"  # no client certificate: the ID token is the credential
    OPERATOR_LOGIN_CONFIG = "operator.login_config"
    OPERATOR_WHOAMI = "operator.whoami"
    OPERATOR_LOGOUT = "operator.logout"
    OPERATOR_LIST = "operator.list"
    OPERATOR_REVOKE = "operator.revoke"
    # Policy as code, grants, approvals, break-glass
    POLICY_SET = "policy.set"
    POLICY_GET = "policy.get"
    POLICY_TEST = "policy.test"
    GRANT_CREATE = "grant.create"
    GRANT_LIST = "grant.list"
    GRANT_REVOKE = "grant.revoke"
    APPROVAL_REQUEST = "approval.request"
    APPROVAL_APPROVE = "approval.approve"
    APPROVAL_LIST = "approval.list"
    BREAK_GLASS = "breakglass.issue"
    BREAK_GLASS_LIST = "breakglass.list"
    BREAK_GLASS_REVOKE = "breakglass.revoke"


@dataclass(frozen=True)
class Caller:
    """An authenticated caller. `attributes` holds the parsed identity layout (tenant,
    environment, service) when the SPIFFE ID fits it.

    From its certificate: `serial` (lower-case hex), `not_after`, and `lineage` when it was
    minted through another certificate; `minted_by` is the operator who minted it (or an SVID it
    descends from) for someone else's ID, so policy counts its requests as that operator's."""

    spiffe_id: str
    is_operator: bool
    attributes: dict[str, str] = field(default_factory=dict)
    minted_by: str = ""
    serial: str = ""
    not_after: dt.datetime | None = None
    lineage: Lineage | None = None
    # Operator roles (admin, security, approver, auditor; see broker.operators.roles) and, for
    # a person who logged in (`broker login`, with MFA), the provider's subject.
    roles: frozenset[str] = frozenset()
    subject: str = ""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    rule: str
    # What the decision used or noticed, for the audit event: e.g. {"grant": id},
    # {"approval": id}, {"breakglass": id} (every request made with a break-glass credential).
    flags: Mapping[str, str] = field(default_factory=dict)


class Policy(Protocol):
    def decide(
        self,
        caller: Caller,
        action: str,
        resource: str,
        *,
        attributes: Mapping[str, str] | None = None,
        context: Mapping[str, str] | None = None,
    ) -> Decision:
        """`attributes` describe the resource when the servicer has loaded it (see
        `MethodSpec.deferred`): "tenant", "environment", "owner" (the owning service),
        "classification", "holder" (the SPIFFE ID a lease was issued to), ...; `context`
        carries request context such as "justification"."""
        ...


class Authorize(Protocol):
    """The domain port for a decision that needs a loaded resource: the request pipeline hands
    one to the domain call, which loads the resource and then asks. Returns the decision when
    allowed; raises PermissionDenied when refused. Either way the decision is the request's
    (its reason and rule go into the audit event), whatever the domain does next."""

    def __call__(
        self, resource: str, attributes: Mapping[str, str] | None = None, /
    ) -> Decision: ...


def decide_absent(
    authorize: Authorize, resource: str, attributes: Mapping[str, str], absent: BrokerError
) -> NoReturn:
    """The one rule for an absent resource: decide it as one nobody owns (`attributes` with an
    empty "owner"/"holder"), so a caller who may not use it gets the very refusal it would get
    for one that exists (PermissionDenied from `authorize`), and a caller who may (an operator,
    who administers it) learns that it is absent: `absent` (e.g. NotFound) is raised."""
    authorize(resource, attributes)
    raise absent


def opaque_refusals(authorize: Authorize, caller: Caller, refusal: str) -> Authorize:
    """`authorize`, except that a refused caller who is not an operator is told `refusal`
    (naming neither owner nor rule), the same for a resource that exists and one that does not,
    so names cannot be probed. Operators get the reason: they administer the resource. The
    audit event keeps the real reason either way."""

    def decide(resource: str, attributes: Mapping[str, str] | None = None, /) -> Decision:
        try:
            return authorize(resource, attributes)
        except PermissionDenied:
            if caller.is_operator:
                raise
            raise PermissionDenied(refusal) from None

    return decide


_ANY_CALLER = frozenset({Action.BUNDLE_GET, Action.HEALTH, Action.REFLECTION})
# Anyone may try to attest: the join token or JWT in the request is the credential.
_ATTEST = frozenset({Action.ATTEST})
# Anyone may try to log in: the ID token in the request is the credential.
_LOGIN = frozenset({Action.OPERATOR_LOGIN, Action.OPERATOR_LOGIN_CONFIG})
# Agents: renew only their own ID; sync and mint only for entries whose parent they are.
_AGENT_SELF = frozenset({Action.AGENT_RENEW})
_AGENT_PARENT = frozenset({Action.AGENT_SYNC})
_SELF_MINT = frozenset({Action.SVID_MINT, Action.JWT_MINT})
# Reading a credential: only the owning service, in the same tenant and environment.
_OWNER_ACTIONS = frozenset(
    {
        Action.SECRETS_GET,
        Action.DB_CREDS,
        Action.KMS_DATA_KEY,
        Action.KMS_ENCRYPT,
        Action.KMS_DECRYPT,
        Action.KMS_REENCRYPT,
        Action.KMS_SIGN,
        Action.KMS_VERIFY,
        Action.KMS_PUBLIC_KEY,
        Action.KMS_MAC,
    }
)
# Acting on a lease: only the identity it was issued to.
_HOLDER_ACTIONS = frozenset({Action.LEASE_RENEW, Action.LEASE_REVOKE})


def owner_decision(caller: Caller, action: str, attributes: Mapping[str, str]) -> Decision:
    """The standard's ownership rule: the caller's service is the resource's owner, in the
    same tenant and environment (so dev/test identities never read prod)."""
    mine = caller.attributes
    if not mine:
        return Decision(
            False,
            f"{caller.spiffe_id} is not a workload identity (tenant/environment/service)",
            "owner",
        )
    for key, mine_key in (("tenant", "tenant"), ("environment", "environment")):
        want = attributes.get(key, "")
        if not want or mine.get(mine_key) != want:
            return Decision(
                False,
                f"{caller.spiffe_id} is in {mine_key} {mine.get(mine_key)!r}, the resource in "
                f"{want!r}: {action} needs the same {key}",
                "owner",
            )
    owner = attributes.get("owner", "")
    if not owner or mine.get("service") != owner:
        return Decision(
            False,
            f"{action} is reserved for the owning service {owner!r}; "
            f"{caller.spiffe_id} is service {mine.get('service')!r}",
            "owner",
        )
    return Decision(True, f"{caller.spiffe_id} is the owning service", "owner")


def _operator_decision(caller: Caller, action: str) -> Decision:
    """Operators act by role: admin administers everything; security, approver and auditor
    only their own actions (broker.operators.roles); every operator may see and end its own
    login."""
    from broker.operators.roles import ADMIN, ROLE_ACTIONS, SELF_SERVICE_ACTIONS

    if ADMIN in caller.roles:
        return Decision(True, "operators with the admin role administer the broker", "operator")
    for role in sorted(caller.roles):
        if action in ROLE_ACTIONS.get(role, ()):
            return Decision(True, f"the {role} role may {action}", f"role:{role}")
    if action in SELF_SERVICE_ACTIONS or action in _ANY_CALLER:
        return Decision(True, f"any operator may {action}", "self-service")
    if action == Action.APPROVAL_REQUEST:
        return Decision(True, "any identity may ask for an approval", "approval-request")
    roles = ", ".join(sorted(caller.roles)) or "none"
    return Decision(
        False, f"{action} needs a role that allows it; {caller.spiffe_id} has: {roles}", "role"
    )


class DefaultPolicy:
    def __init__(self, operators: Iterable[str]) -> None:
        self._operators = frozenset(operators)

    def is_operator(self, spiffe_id: str) -> bool:
        return spiffe_id in self._operators

    def decide(
        self,
        caller: Caller,
        action: str,
        resource: str,
        *,
        attributes: Mapping[str, str] | None = None,
        context: Mapping[str, str] | None = None,
    ) -> Decision:
        if caller.is_operator:
            return _operator_decision(caller, action)
        if action in _ANY_CALLER:
            return Decision(True, f"any authenticated identity may {action}", "authenticated")
        if action in _ATTEST or action in _LOGIN:
            return Decision(True, "attestation is authenticated by its credential", "attest")
        if action in _AGENT_SELF:
            if resource == caller.spiffe_id:
                return Decision(True, "an agent renews its own identity", "agent-self")
            return Decision(False, f"{caller.spiffe_id} may renew only itself", "agent-self")
        if action in _AGENT_PARENT:
            parent = resource if attributes is None else attributes.get("parent", "")
            if parent == caller.spiffe_id:
                return Decision(True, "the agent is the entry's parent", "agent-parent")
            return Decision(
                False, f"{caller.spiffe_id} is not the parent of this entry", "agent-parent"
            )
        if action in _SELF_MINT:
            if resource == caller.spiffe_id:
                return Decision(True, "a workload may mint its own identity", "self-mint")
            return Decision(
                False,
                f"{caller.spiffe_id} may mint only its own SPIFFE ID, not {resource}",
                "self-mint",
            )
        if action in _OWNER_ACTIONS and attributes is not None:
            return owner_decision(caller, action, attributes)
        if action in _HOLDER_ACTIONS and attributes is not None:
            if attributes.get("holder") == caller.spiffe_id:
                return Decision(True, "the lease holder acts on its own lease", "holder")
            return Decision(False, f"{action} is reserved for the lease holder", "holder")
        return Decision(False, f"{action} is reserved for operators", "operator-only")
