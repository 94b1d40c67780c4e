"""How the `broker` CLI renders results: JSON documents for scripts, short text for people.

JSON shapes are part of the CLI contract (scripts parse them); text may change.
Times are RFC 3339 in UTC with a trailing "Z"; absent times are JSON null / "-".
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from broker.api.client.base import AuditEntry, Authority, CAPolicyDocument, CAStatusReport

__all__ = [
    "audit_entry_json",
    "audit_entry_line",
    "authority_json",
    "dumps",
    "pem",
    "policy_json",
    "status_json",
    "status_table",
    "timestamp",
]


def timestamp(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _text_time(value: datetime | None) -> str:
    return timestamp(value) or "-"


def dumps(document: Any) -> str:
    return json.dumps(document, indent=2, sort_keys=False, ensure_ascii=False)


def pem(label: str, der: bytes) -> bytes:
    """PEM armour for DER bytes, e.g. pem("CERTIFICATE", der), 64 characters a line."""
    body = base64.b64encode(der).decode("ascii")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return (
        "\n".join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----"]) + "\n"
    ).encode("ascii")


def authority_json(a: Authority) -> dict[str, Any]:
    return {
        "id": a.id,
        "kind": a.kind,
        "generation": a.generation,
        "state": a.state,
        "not_before": timestamp(a.not_before),
        "not_after": timestamp(a.not_after),
        "activated_at": timestamp(a.activated_at),
        "retired_at": timestamp(a.retired_at),
        "key_uri": a.key_uri,
        "jwt_kid": a.jwt_kid,
        "subject": a.subject,
        "serial": a.serial,
        "fingerprint_sha256": a.fingerprint_sha256,
    }


def status_json(status: CAStatusReport) -> dict[str, Any]:
    root = status.root
    return {
        "trust_domain": status.trust_domain,
        "key_backend": status.key_backend,
        "storage": status.storage,
        "bundle_sequence": status.bundle_sequence,
        "policy_version": status.policy_version,
        "authorities": [authority_json(a) for a in status.authorities],
        "root": authority_json(root) if root is not None else None,
        "issuing": [authority_json(a) for a in status.issuing],
    }


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def status_table(status: CAStatusReport) -> str:
    lines = _table(
        [
            ["trust domain", status.trust_domain],
            ["key backend", status.key_backend],
            ["storage", status.storage],
            ["bundle sequence", str(status.bundle_sequence)],
            ["policy version", str(status.policy_version)],
        ]
    )
    rows = [["KIND", "ID", "GEN", "STATE", "NOT BEFORE", "NOT AFTER", "SHA-256", "KEY"]]
    rows += [
        [
            a.kind,
            a.id,
            str(a.generation),
            a.state,
            _text_time(a.not_before),
            _text_time(a.not_after),
            a.fingerprint_sha256[:16] or "-",
            a.key_uri or "-",
        ]
        for a in sorted(status.authorities, key=lambda a: (a.kind != "root", a.kind, a.generation))
    ]
    return "\n".join([*lines, "", *_table(rows)])


def policy_json(policy: CAPolicyDocument) -> dict[str, Any]:
    try:
        document: Any = json.loads(policy.document_json) if policy.document_json else None
    except json.JSONDecodeError:
        document = policy.document_json
    return {
        "version": policy.version,
        "author": policy.author,
        "updated_at": timestamp(policy.updated_at),
        "document": document,
    }


def audit_entry_json(entry: AuditEntry) -> dict[str, Any]:
    return {"seq": entry.seq, "entry_hash": entry.entry_hash, "event": entry.event}


def audit_entry_line(entry: AuditEntry) -> str:
    event = entry.event

    def field(name: str) -> str:
        value = event.get(name)
        return "-" if value in (None, "") else " ".join(str(value).split())

    parts = [
        str(entry.seq),
        field("when"),
        field("who"),
        field("what"),
        field("resource"),
        field("decision"),
        field("outcome"),
    ]
    if event.get("error"):
        parts.append(f"({field('error')})")
    return "  ".join(parts)
