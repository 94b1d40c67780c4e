from broker.policy import Action, Caller, DefaultPolicy

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
