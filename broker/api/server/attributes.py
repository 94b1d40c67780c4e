"""Resource names and attributes the servicers hand to the policy for identities they would
issue: the layout attributes of a SPIFFE ID, and of an attestor's ID template."""

from __future__ import annotations

from broker.access import PROD_ENVIRONMENT
from broker.attestation import template_can_yield
from broker.authn import Authenticator
from ca.errors import CAError
from ca.spiffeid import SpiffeId

__all__ = ["identity_attributes", "resource_name", "template_attributes"]

_MAX_RESOURCE = 2100  # a valid SPIFFE ID is at most 2048 bytes; longer ones are cut in the log


def resource_name(text: str) -> str:
    """`text` as the resource an audit event names, cut at a bounded length."""
    return text if len(text) <= _MAX_RESOURCE else text[:_MAX_RESOURCE] + "...(truncated)"


def identity_attributes(auth: Authenticator | None, spiffe_id: str) -> dict[str, str]:
    """The layout attributes (tenant, environment, service) of the SPIFFE ID an RPC would issue
    a credential for, as the resource's attributes for policy: an operator issuing a prod
    identity needs a second operator. An ID outside the layout or the trust domain has none
    (the domain refuses a malformed one afterwards, with its own message)."""
    if auth is None:
        return {}
    try:
        sid = SpiffeId.parse(spiffe_id)
    except CAError:
        return {}
    if not sid.member_of(auth.trust_domain):
        return {}
    return dict(auth.caller_for_id(sid).attributes)


def template_attributes(auth: Authenticator | None, template: str) -> dict[str, str]:
    """The resource attributes of an attestor's ID template, for policy: environment "prod"
    (as `identity_attributes` gives a prod ID) when some claims make it yield a production
    identity, so an operator adding it needs a second operator; none otherwise."""
    if auth is None or not template_can_yield(
        template, auth.trust_domain, auth.layout, PROD_ENVIRONMENT
    ):
        return {}
    return {"environment": PROD_ENVIRONMENT, "template": template[:_MAX_RESOURCE]}
