# The broker's shipped authorization policy: the Secrets & Key Management Standard as code.
#
# Input (built by broker.access for every decision):
#   input.action     "secrets.get", "db.creds", "svid.mint", "ca.policy.set", ...
#   input.caller     {id, operator, roles, subject, tenant, environment, service, attestation,
#                     grants: [{id, action, resource}], approvals: [{id, action, resource}],
#                     breakglass: {id, action, resource, active},   (breakglass only when the
#                     caller presents a break-glass credential; tenant/environment/service only
#                     when its SPIFFE ID fits the identity layout)
#                     minted_by}   (the operator who minted the caller's SVID for it; its
#                     approvals are then that operator's, and broker.access never counts it as
#                     the owning service for the two-person rule)
#   input.resource   {name, tenant, environment, owner, classification, plane, holder, ...}
#   input.context    {time (UTC, to the minute), justification, ticket}
#
# Output: two sets of {rule, reason} objects. The broker allows a request when `allow` is not
# empty and `deny` is empty; a deny always wins (guardrails), no allow means default-deny.
# Extra keys on an allow (grant, approval, breakglass) name what was used; they go into the
# audit event.
package broker.authz

import rego.v1

any_caller_actions := {"ca.bundle.get", "health.check", "reflection"}

self_mint_actions := {"svid.mint", "jwt.mint"}

# Reading a credential: the owning service in the same tenant and environment.
owner_actions := {"secrets.get", "db.creds"} | kms_use_actions

# Using a KMS key (issue 16): the owning service, in the key's tenant and environment.
kms_use_actions := {
	"kms.datakey", "kms.encrypt", "kms.decrypt", "kms.reencrypt", "kms.sign", "kms.verify",
	"kms.pubkey", "kms.mac",
}

# Acting on a lease: the identity it was issued to.
holder_actions := {"lease.renew", "lease.revoke"}

# Reading or rotating these off schedule needs a second person when the data is prod + pii.
two_person_actions := {
	"secrets.get", "secrets.rotate", "db.creds",
	"kms.key.rotate", "kms.key.disable", "kms.key.enable", "kms.key.destroy",
}

# Rotating a secret whose rotation period has run out is routine, not off schedule.
routine_rotation if {
	input.action == "secrets.rotate"
	input.resource.on_schedule == "true"
}

# Tenants whose identities form the control plane.
control_plane_tenants := {"_system", "platform"}

caller := input.caller

resource := input.resource

breakglass_caller if caller.breakglass

workload if {
	not caller.operator
	not breakglass_caller
	caller.service
}

is_owner if {
	workload
	caller.tenant == resource.tenant
	caller.environment == resource.environment
	caller.service == resource.owner
}

control_plane_resource if resource.plane == "control"

control_plane_resource if resource.tenant in control_plane_tenants

covers(pattern) if pattern == "*"

covers(pattern) if pattern == resource.name

covers(pattern) if pattern == resource.reference

# A wildcard matches the real name: the secret reference when there is one, never the SHA-256
# that names a secret in the ledger (`secret://api/*` covers secret://api/dev/key, `1d*` does
# not).
real_name := object.get(resource, "reference", "") if object.get(resource, "reference", "") != ""

real_name := resource.name if object.get(resource, "reference", "") == ""

covers(pattern) if {
	endswith(pattern, "*")
	startswith(real_name, trim_suffix(pattern, "*"))
}

# A grant or approval names its resource as written by the operator (e.g. a secret reference);
# the broker may name the resource by the SHA-256 of that reference instead.
covers_entry(e) if covers(e.resource)

covers_entry(e) if e.resource_sha256 == resource.name

granted contains g if {
	some g in caller.grants
	g.action == input.action
	covers_entry(g)
}

approved contains a if {
	some a in caller.approvals
	a.action == input.action
	covers_entry(a)
}

breakglass_covers if {
	caller.breakglass.active
	caller.breakglass.action in {input.action, "*"}
	covers_entry(caller.breakglass)
}

# ---------------------------------------------------------------------------------- allow

# Operators act by role (roles come from the login's ID token, mapped in the config; configured
# and dev-mode operators are admins). admin administers everything; the others only their own.
read_only_actions := {
	"audit.read", "audit.verify", "ca.status", "ca.policy.get", "policy.get", "grant.list",
	"approval.list", "breakglass.list", "lease.list", "secrets.list", "secrets.show",
	"operator.list", "kms.key.list", "kms.key.show", "report.compliance",
}

security_actions := {
	"svid.deny", "kek.rotate", "lease.revoke", "secrets.revoke", "breakglass.revoke",
	"approval.approve", "operator.revoke", "ca.rotate",
}

approver_actions := {"approval.approve", "approval.list", "ca.status"}

role_allows(role, action) if {
	role in {"security", "auditor"}
	action in read_only_actions
}

role_allows("security", action) if action in security_actions

role_allows("approver", action) if action in approver_actions

allow contains {"rule": "operator", "reason": "operators with the admin role administer the broker"} if {
	caller.operator
	"admin" in caller.roles
}

allow contains {"rule": sprintf("role:%s", [role]), "reason": sprintf("the %s role may %s", [role, input.action])} if {
	caller.operator
	some role in caller.roles
	role_allows(role, input.action)
}

allow contains {"rule": "self-service", "reason": sprintf("any operator may %s", [input.action])} if {
	caller.operator
	input.action in {"operator.whoami", "operator.logout"}
}

allow contains {"rule": "authenticated", "reason": sprintf("any authenticated identity may %s", [input.action])} if {
	input.action in any_caller_actions
}

# Whoever needs a second person's consent asks for it; only another operator can give it.
allow contains {"rule": "approval-request", "reason": "any identity may ask for an approval"} if {
	input.action == "approval.request"
	not breakglass_caller
}

allow contains {"rule": "self-mint", "reason": "a workload may mint its own identity"} if {
	input.action in self_mint_actions
	not breakglass_caller
	resource.name == caller.id
}

allow contains {"rule": "owner", "reason": sprintf("%s is the owning service", [caller.id])} if {
	input.action in owner_actions
	is_owner
}

allow contains {"rule": "holder", "reason": "the lease holder acts on its own lease"} if {
	input.action in holder_actions
	resource.holder == caller.id
}

# Whatever the broker's built-in rules allow for actions this policy does not name (attestation,
# agents, ...): input.builtin is the built-in decision.
allow contains {"rule": input.builtin.rule, "reason": input.builtin.reason} if {
	input.builtin.allowed
	not breakglass_caller
}

allow contains {
	"rule": "grant",
	"reason": sprintf("just-in-time grant %s (%s on %s)", [g.id, g.action, g.resource]),
	"grant": g.id,
} if {
	not breakglass_caller
	some g in granted
}

allow contains {
	"rule": "break-glass",
	"reason": sprintf("break-glass credential %s (%s on %s)", [b.id, b.action, b.resource]),
	"breakglass": b.id,
} if {
	breakglass_covers
	b := caller.breakglass
}

# ----------------------------------------------------------------------------- guardrails

deny contains {"rule": "breakglass-spent", "reason": sprintf("break-glass credential %s is used, revoked or expired", [caller.breakglass.id])} if {
	breakglass_caller
	not caller.breakglass.active
	not input.action in any_caller_actions
}

deny contains {"rule": "breakglass-scope", "reason": sprintf("break-glass credential %s covers only %s on %s", [caller.breakglass.id, caller.breakglass.action, caller.breakglass.resource])} if {
	caller.breakglass.active
	not breakglass_covers
	not input.action in any_caller_actions
}

deny contains {"rule": "self-mint", "reason": sprintf("%s may mint only its own SPIFFE ID, not %s", [caller.id, resource.name])} if {
	input.action in self_mint_actions
	not caller.operator
	resource.name != caller.id
}

deny contains {"rule": "tenant-isolation", "reason": sprintf("%s is in tenant '%s', the resource in '%s': %s needs the same tenant", [caller.id, caller.tenant, resource.tenant, input.action])} if {
	workload
	resource.tenant
	caller.tenant != resource.tenant
}

deny contains {"rule": "control-plane", "reason": sprintf("control-plane resources are never given to data-plane identities (%s is in tenant '%s')", [caller.id, caller.tenant])} if {
	workload
	control_plane_resource
	not caller.tenant in control_plane_tenants
}

deny contains {"rule": "prod-only", "reason": sprintf("prod resources go only to prod identities; %s is in environment '%s'", [caller.id, caller.environment])} if {
	workload
	resource.environment == "prod"
	caller.environment != "prod"
}

deny contains {"rule": "environment", "reason": sprintf("%s is in environment '%s', the resource in '%s': %s needs the same environment", [caller.id, caller.environment, resource.environment, input.action])} if {
	workload
	resource.environment
	resource.environment != "prod"
	caller.environment != resource.environment
}

deny contains {"rule": "cross-service", "reason": sprintf("%s is reserved for the owning service '%s'; %s is service '%s' (no cross-service sharing without a grant)", [input.action, resource.owner, caller.id, caller.service])} if {
	workload
	resource.owner
	caller.service != resource.owner
	count(granted) == 0
}

# A secret is owned by the service its namespace names (secret://<service>/...): a row whose
# owner says otherwise (written before this rule, or altered) is served to nobody by the owner
# rule; reading across services is a grant.
deny contains {"rule": "namespace", "reason": sprintf("the secret's owner '%s' does not match its namespace '%s'; only a grant lets another service read it", [resource.owner, resource.service])} if {
	workload
	resource.reference
	resource.owner
	resource.service
	resource.owner != resource.service
	count(granted) == 0
}

deny contains {"rule": "two-person", "reason": sprintf("%s on a prod pii resource by anyone but its owning service needs an approval by a second operator (broker approval request)", [input.action])} if {
	input.action in two_person_actions
	resource.environment == "prod"
	resource.classification == "pii"
	not routine_rotation
	not is_owner
	count(approved) == 0
	not breakglass_covers
}

deny contains {"rule": "owner", "reason": sprintf("%s is not a workload identity (tenant/environment/service)", [caller.id])} if {
	input.action in owner_actions
	not caller.operator
	not breakglass_caller
	not caller.service
	resource.owner
}
