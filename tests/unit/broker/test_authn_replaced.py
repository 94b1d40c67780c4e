"""After a compromised-root rotation the Authenticator refuses certificates issued under the
replaced issuing CAs: for good for everything but an agent's SyncAgent/RenewAgent, and for
those too once the grace is over."""

from __future__ import annotations

import pytest
from cryptography import x509

from broker.authn import GRACE_METHODS, Authenticator
from broker.errors import Unauthenticated
from tests.unit.broker.test_authn import CA, WEB, authenticator, ctx

AGENT = "spiffe://example.org/agents/node1"
SYNC = "/broker.v1.WorkloadIdentity/SyncAgent"
RENEW = "/broker.v1.WorkloadIdentity/RenewAgent"
SECRETS = "/broker.v1.Secrets/GetSecret"


def _kid(ca: CA) -> bytes:
    return x509.SubjectKeyIdentifier.from_public_key(ca.key.public_key()).digest


def _replaced(auth: Authenticator, ca: CA, grace: list[bool]) -> None:
    auth.replaced_issuers = lambda: (frozenset({_kid(ca)}), grace[0])


def test_grace_methods_are_the_agents_sync_and_renewal() -> None:
    assert frozenset({SYNC, RENEW}) == GRACE_METHODS


def test_certificates_under_a_replaced_issuer_are_refused_outside_the_agents_grace() -> None:
    old, new = CA(), CA()
    auth, grace = authenticator(), [True]
    agent_pem, web_pem = old.pem(AGENT), old.pem(WEB)
    assert auth.caller(ctx(web_pem), SECRETS).spiffe_id == WEB  # before: accepted
    _replaced(auth, old, grace)
    with pytest.raises(Unauthenticated, match="replaced as compromised"):
        auth.caller(ctx(web_pem), SECRETS)
    with pytest.raises(Unauthenticated, match="replaced as compromised"):
        auth.caller(ctx(agent_pem))  # no method: refused too
    assert auth.caller(ctx(agent_pem), SYNC).spiffe_id == AGENT  # the grace
    assert auth.caller(ctx(agent_pem), RENEW).spiffe_id == AGENT
    assert auth.caller(ctx(new.pem(WEB)), SECRETS).spiffe_id == WEB  # the new hierarchy
    grace[0] = False  # the grace is over: refused for every method
    for method in (SYNC, RENEW, SECRETS):
        with pytest.raises(Unauthenticated):
            auth.caller(ctx(agent_pem), method)
