"""Operator roles, the certificate extension that carries them, and operator subjects.

Roles: `admin` administers everything (CA policy, entries, attestors, database connections and
roles, secrets, policy, grants; it includes the other roles), `security` (revocation, KEK
rotation, denylist, break-glass), `approver` (two-party approvals), `auditor` (audit read and
verify, read-only listings). They come from a configured claim of the ID token (default
`groups`) mapped in the config, and travel in the operator SVID as a non-critical extension
(`ROLES_OID`) that only the login path writes, signed by the CA like the rest of the
certificate: every broker process reads them from the presented certificate, with no lookup.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from cryptography import x509

from broker.errors import Unauthenticated

__all__ = [
    "ADMIN",
    "ROLES",
    "ROLES_OID",
    "ROLE_ACTIONS",
    "SELF_SERVICE_ACTIONS",
    "OperatorClaims",
    "map_roles",
    "operator_claims_of",
    "roles_extension",
    "subject_segment",
]

ADMIN: Final = "admin"
ROLES: Final = ("admin", "security", "approver", "auditor")
# An OID under the UUID arc (ITU-T X.667), so no registration is needed and nothing collides.
ROLES_OID: Final = x509.ObjectIdentifier("2.25.324335596550113199533326396576412773840")

_READ_ONLY: Final = frozenset(
    {
        "audit.read",
        "audit.verify",
        "ca.status",
        "ca.policy.get",
        "policy.get",
        "grant.list",
        "approval.list",
        "breakglass.list",
        "lease.list",
        "secrets.list",
        "secrets.show",
        "operator.list",
        "kms.key.list",
        "kms.key.show",
        "report.compliance",
    }
)
# What each role may do besides what any caller may (the admin role may do everything).
ROLE_ACTIONS: Final[Mapping[str, frozenset[str]]] = {
    "security": _READ_ONLY
    | {
        "svid.deny",
        "kek.rotate",
        "lease.revoke",
        "secrets.revoke",
        "secrets.scan",  # leak-scan fingerprints (broker scan)
        "breakglass.revoke",
        "approval.approve",
        "operator.revoke",
        "ca.rotate",
    },
    "approver": frozenset({"approval.approve", "approval.list", "ca.status"}),
    "auditor": _READ_ONLY,
}
# Every operator, whatever the role: about its own login.
SELF_SERVICE_ACTIONS: Final = frozenset({"operator.whoami", "operator.logout"})

_SEGMENT_OK = re.compile(r"^[A-Za-z0-9.-]$")
_MAX_SUBJECT = 128


def subject_segment(value: object) -> str:
    """The provider's subject as one SPIFFE path segment. Letters, digits, '.' and '-' stay;
    '_' becomes '__', '@' and '+' become '_40' and '_2b' (an injective escape, so two subjects
    never share a segment). Anything else (path characters such as '/', '%', '\\', spaces,
    controls), '.' or '..', empty or over 128 characters: Unauthenticated."""
    if not isinstance(value, str) or not value:
        raise Unauthenticated("the ID token's subject claim is missing or not a string")
    if len(value) > _MAX_SUBJECT:
        raise Unauthenticated(f"the ID token's subject is longer than {_MAX_SUBJECT} characters")
    if value in (".", ".."):
        raise Unauthenticated("the ID token's subject is not usable in a SPIFFE ID")
    out = []
    for ch in value:
        if _SEGMENT_OK.match(ch):
            out.append(ch)
        elif ch == "_":
            out.append("__")
        elif ch in "@+":
            out.append(f"_{ord(ch):02x}")
        else:
            raise Unauthenticated(
                f"the ID token's subject contains {ch!r}, which is not allowed in an operator "
                "identity (letters, digits, '.', '-', '_', '@' and '+' only)"
            )
    return "".join(out)


def map_roles(
    claims: Mapping[str, Any], claim: str, mapping: Mapping[str, Iterable[str]]
) -> frozenset[str]:
    """The broker roles whose configured claim values appear in the token's `claim` (a string
    or a list of strings)."""
    raw = claims.get(claim)
    values = {raw} if isinstance(raw, str) else {v for v in raw or () if isinstance(v, str)}
    if not isinstance(raw, str | list | tuple | type(None)):
        values = set()
    return frozenset(role for role, wanted in mapping.items() if values & set(wanted))


@dataclass(frozen=True)
class OperatorClaims:
    """What an operator SVID says about the person: subject, roles, authentication methods."""

    subject: str
    roles: frozenset[str]
    amr: tuple[str, ...]
    issuer: str


def _der_utf8(text: str) -> bytes:
    data = text.encode()
    n = len(data)
    if n < 0x80:
        length = bytes([n])
    else:
        size = (n.bit_length() + 7) // 8
        length = bytes([0x80 | size]) + n.to_bytes(size, "big")
    return b"\x0c" + length + data


def _from_der_utf8(data: bytes) -> str:
    if len(data) < 2 or data[0] != 0x0C:
        raise ValueError("not a UTF8String")
    first = data[1]
    if first < 0x80:
        n, start = first, 2
    else:
        size = first & 0x7F
        n, start = int.from_bytes(data[2 : 2 + size], "big"), 2 + size
    if start + n != len(data):
        raise ValueError("bad length")
    return data[start:].decode()


def roles_extension(claims: OperatorClaims) -> x509.UnrecognizedExtension:
    doc = {
        "sub": claims.subject,
        "roles": sorted(claims.roles),
        "amr": list(claims.amr),
        "iss": claims.issuer,
    }
    return x509.UnrecognizedExtension(ROLES_OID, _der_utf8(json.dumps(doc, sort_keys=True)))


def operator_claims_of(cert: x509.Certificate) -> OperatorClaims | None:
    """The login claims in an operator SVID, or None (not from `broker login`, or unreadable)."""
    try:
        ext = cert.extensions.get_extension_for_oid(ROLES_OID).value
        doc = json.loads(_from_der_utf8(ext.value))  # type: ignore[attr-defined]
        roles = frozenset(str(r) for r in doc["roles"] if r in ROLES)
        return OperatorClaims(
            str(doc["sub"]), roles, tuple(str(a) for a in doc.get("amr", ())), str(doc["iss"])
        )
    except (x509.ExtensionNotFound, ValueError, KeyError, TypeError, AttributeError):
        return None
