"""Compliance reports (issue 16): where the fleet stands against the secrets standard.

`ComplianceReporter.build` reads storage and the audit ledger and returns one JSON-ready
document; `to_csv` and `to_html` render it (the HTML is one offline page: inline CSS and an
inline SVG plot of rotation age by classification, no script, no external resource).

Sections: `credentials` (secrets, KMS keys, static and dynamic database roles: owner,
classification, last rotated, due date, overdue, missing metadata), `grants` and `breakglass`
(created or used in the window, with justifications and approvers), `operators` (last login),
`audit` (verification status and the last signed checkpoint). Values of secrets are never read.
"""

from __future__ import annotations

import csv
import datetime as dt
import html
import io
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Final, Protocol

from broker.audit import AuditLedger
from broker.kms.keys import KeyService
from broker.secrets import missing_metadata
from broker.storage.access import BreakGlassRecord, GrantRecord
from broker.storage.database import RoleRecord, StaticRoleRecord
from broker.storage.kms import KeyState
from broker.storage.operators import OperatorSessionRecord
from broker.storage.secrets import SecretRecord
from ca.clock import Clock

__all__ = ["ComplianceReporter", "to_csv", "to_html"]

DEFAULT_WINDOW: Final = dt.timedelta(days=30)
_CSV_COLUMNS: Final = (
    "section",
    "kind",
    "tenant",
    "name",
    "owner",
    "environment",
    "classification",
    "state",
    "last_rotated",
    "rotation_due",
    "overdue",
    "missing",
    "detail",
)


class _Secrets(Protocol):
    async def list_secrets(
        self, tenant: str | None = None, prefix: str = ""
    ) -> list[SecretRecord]: ...


class _Roles(Protocol):
    async def list_roles(self) -> list[RoleRecord]: ...

    async def list_static_roles(self, owner: str | None = None) -> list[StaticRoleRecord]: ...


class _Access(Protocol):
    async def list_grants(self, active_at: dt.datetime | None = None) -> list[GrantRecord]: ...

    async def list_approvals(self, active_at: dt.datetime | None = None) -> list[Any]: ...

    async def list_breakglass(
        self, active_at: dt.datetime | None = None
    ) -> list[BreakGlassRecord]: ...


class _Operators(Protocol):
    async def list_sessions(
        self, active_at: dt.datetime | None = None
    ) -> list[OperatorSessionRecord]: ...


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.astimezone(dt.UTC).isoformat(timespec="seconds")


class ComplianceReporter:
    def __init__(
        self,
        secrets: _Secrets,
        keys: KeyService,
        roles: _Roles,
        access: _Access,
        operators: _Operators,
        configured_operators: Sequence[str],
        ledger: AuditLedger,
        clock: Clock,
    ) -> None:
        self._secrets = secrets
        self._keys = keys
        self._roles = roles
        self._access = access
        self._operators = operators
        self._configured = tuple(configured_operators)
        self._ledger = ledger
        self._clock = clock

    async def build(
        self, tenant: str | None = None, window: dt.timedelta = DEFAULT_WINDOW
    ) -> dict[str, Any]:
        """The report for one tenant (every tenant when None) over the last `window`."""
        now = self._clock.now()
        since = now - window
        credentials: list[dict[str, Any]] = []
        for s in await self._secrets.list_secrets(tenant):
            if s.state in ("deleted", "destroyed"):
                continue
            due = (
                None
                if s.last_rotated is None or s.rotation_period_s is None
                else s.last_rotated + dt.timedelta(seconds=s.rotation_period_s)
            )
            credentials.append(
                self._row(
                    "secret", s.tenant, s.ref, s.owner, s.environment, s.classification,
                    s.state, s.last_rotated, due, now, list(missing_metadata(s)),
                )
            )  # fmt: skip
        for k in await self._keys.list_keys(tenant):
            r = k.record
            if r.state == KeyState.DESTROYED:
                continue
            credentials.append(
                self._row(
                    "key", r.tenant, r.name, r.owner, r.environment, r.classification,
                    r.state, r.last_rotated, k.rotation_due, now, [],
                    detail=f"{r.purpose}/{r.key_type} v{r.current_version}",
                )
            )  # fmt: skip
        for role in await self._roles.list_roles():
            if tenant is not None and role.tenant != tenant:
                continue
            # Dynamic roles issue a fresh credential per lease: nothing to rotate; a role
            # created before classifications were recorded reports it missing.
            credentials.append(
                self._row(
                    "database-role", role.tenant, role.name, role.owner, role.environment,
                    role.classification or None, "active", None, None, now,
                    [] if role.classification else ["data-classification"],
                    detail=f"connection {role.connection}, max ttl {role.max_ttl}s",
                )
            )  # fmt: skip
        for static in await self._roles.list_static_roles():
            if tenant is not None and static.tenant != tenant:
                continue
            # A static role's password is rotated by the broker on its period (issue 12).
            credentials.append(
                self._row(
                    "static-role", static.tenant, static.name, static.owner,
                    static.environment, None, "active", static.rotated_at,
                    static.next_rotation_at, now, ["data-classification"],
                    detail=f"connection {static.connection}, user {static.username}, "
                    f"v{static.version}",
                )
            )  # fmt: skip
        complete = sum(1 for c in credentials if not c["missing"])
        approvals = {a.id: a for a in await self._access.list_approvals()}
        grants = [
            {
                "id": g.id,
                "grantee": g.grantee,
                "action": g.action,
                "resource": g.resource,
                "justification": g.justification,
                "created_by": g.created_by,
                "created_at": _iso(g.created_at),
                "expires_at": _iso(g.expires_at),
                "revoked_at": _iso(g.revoked_at),
            }
            for g in await self._access.list_grants()
            if g.created_at >= since
        ]
        breakglass = []
        for b in await self._access.list_breakglass():
            if b.issued_at < since and (b.used_at is None or b.used_at < since):
                continue
            approval = approvals.get(b.approval_id)
            breakglass.append(
                {
                    "id": b.id,
                    "operator": b.operator,
                    "action": b.action,
                    "resource": b.resource,
                    "issued_at": _iso(b.issued_at),
                    "used_at": _iso(b.used_at),
                    "justification": getattr(approval, "justification", ""),
                    "approved_by": getattr(approval, "approved_by", None),
                }
            )
        last_login: dict[str, dt.datetime] = {}
        for session in await self._operators.list_sessions():
            seen = last_login.get(session.subject)
            if seen is None or session.issued_at > seen:
                last_login[session.subject] = session.issued_at
        operators = [
            {"operator": op, "kind": "configured", "last_login": None} for op in self._configured
        ] + [
            {"operator": subject, "kind": "login", "last_login": _iso(when)}
            for subject, when in sorted(last_login.items())
        ]
        verification = await self._ledger.verify()
        checkpoint = await self._ledger.latest_checkpoint()
        return {
            "generated_at": _iso(now),
            "tenant": tenant,
            "window_days": window.days,
            "summary": {
                "credentials": len(credentials),
                "overdue": sum(1 for c in credentials if c["overdue"]),
                "metadata_complete": complete,
                "metadata_completeness": round(complete / len(credentials), 4)
                if credentials
                else 1.0,
                "grants": len(grants),
                "breakglass": len(breakglass),
            },
            "credentials": credentials,
            "grants": grants,
            "breakglass": breakglass,
            "operators": operators,
            "audit": {
                "intact": verification.intact,
                "entries": verification.entries,
                "reason": verification.reason,
                "checkpoint_seq": None if checkpoint is None else checkpoint.seq,
                "checkpoint_time": None if checkpoint is None else checkpoint.time,
            },
        }

    @staticmethod
    def _row(
        kind: str,
        tenant: str,
        name: str,
        owner: str | None,
        environment: str | None,
        classification: str | None,
        state: str,
        last_rotated: dt.datetime | None,
        due: dt.datetime | None,
        now: dt.datetime,
        missing: list[str],
        *,
        detail: str = "",
    ) -> dict[str, Any]:
        return {
            "kind": kind,
            "tenant": tenant,
            "name": name,
            "owner": owner or "",
            "environment": environment or "",
            "classification": classification or "",
            "state": state,
            "last_rotated": _iso(last_rotated),
            "rotation_due": _iso(due),
            "overdue": due is not None and due <= now,
            "age_days": None
            if last_rotated is None
            else round((now - last_rotated).total_seconds() / 86400, 2),
            "missing": missing,
            "detail": detail,
        }


def to_csv(report: dict[str, Any]) -> str:
    """One table, a `section` column telling credentials, grants, break-glass, operators and
    the audit status apart."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(_CSV_COLUMNS)
    for c in report["credentials"]:
        writer.writerow(
            [
                "credential", c["kind"], c["tenant"], c["name"], c["owner"], c["environment"],
                c["classification"], c["state"], c["last_rotated"] or "",
                c["rotation_due"] or "", "yes" if c["overdue"] else "no",
                ";".join(c["missing"]), c["detail"],
            ]
        )  # fmt: skip
    for g in report["grants"]:
        detail = f"{g['action']} on {g['resource']} by {g['created_by']}: {g['justification']}"
        writer.writerow(["grant", "", "", g["id"], g["grantee"], *[""] * 7, detail])
    for b in report["breakglass"]:
        detail = (
            f"{b['action']} on {b['resource']} used {b['used_at'] or '-'} approved by "
            f"{b['approved_by'] or '-'}: {b['justification']}"
        )
        writer.writerow(["breakglass", "", "", b["id"], b["operator"], *[""] * 7, detail])
    for o in report["operators"]:
        writer.writerow(
            ["operator", o["kind"], "", o["operator"], "", *[""] * 7, o["last_login"] or "never"]
        )
    a = report["audit"]
    writer.writerow(
        [
            "audit", "", "", "ledger", "", "", "", "intact" if a["intact"] else "BROKEN",
            *[""] * 4,
            f"{a['entries']} entries; checkpoint seq {a['checkpoint_seq']} at "
            f"{a['checkpoint_time']}",
        ]
    )  # fmt: skip
    return out.getvalue()


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], table_id: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{html.escape('' if v is None else str(v))}</td>" for v in row)
        + "</tr>"
        for row in rows
    )
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _plot(credentials: Sequence[dict[str, Any]]) -> str:
    """An inline SVG bar chart: the oldest and mean rotation age (days) per classification."""
    ages: dict[str, list[float]] = defaultdict(list)
    for c in credentials:
        if c["age_days"] is not None:
            ages[c["classification"] or "unclassified"].append(c["age_days"])
    classes = sorted(ages)
    width, bar, gap, height = 640, 36, 28, 220
    top = max((max(v) for v in ages.values()), default=1.0) or 1.0
    parts = [
        f'<svg id="rotation-age" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height + 60}" role="img" aria-label="rotation age by classification">'
    ]
    for i, name in enumerate(classes):
        oldest = max(ages[name])
        mean = sum(ages[name]) / len(ages[name])
        x = 40 + i * (2 * bar + gap)
        for j, (value, colour) in enumerate(((oldest, "#c0392b"), (mean, "#2e86c1"))):
            h = int(height * value / top)
            parts.append(
                f'<rect class="bar" x="{x + j * bar}" y="{height - h + 10}" width="{bar - 4}" '
                f'height="{h}" fill="{colour}"><title>{html.escape(name)}: '
                f"{'oldest' if j == 0 else 'mean'} {value:.1f} days</title></rect>"
            )
        parts.append(f'<text x="{x}" y="{height + 30}" font-size="12">{html.escape(name)}</text>')
    parts.append(
        f'<text x="40" y="{height + 52}" font-size="11">red: oldest, blue: mean rotation age '
        f"(days, max {top:.1f})</text></svg>"
    )
    return "".join(parts)


def to_html(report: dict[str, Any]) -> str:
    """One offline page (no script, no external resource)."""
    s = report["summary"]
    a = report["audit"]
    credentials = _table(
        ("kind", "tenant", "name", "owner", "environment", "classification", "state",
         "last rotated", "rotation due", "overdue", "missing"),
        [
            (c["kind"], c["tenant"], c["name"], c["owner"], c["environment"],
             c["classification"], c["state"], c["last_rotated"], c["rotation_due"],
             "OVERDUE" if c["overdue"] else "", ", ".join(c["missing"]))
            for c in report["credentials"]
        ],
        "credentials",
    )  # fmt: skip
    grants = _table(
        ("id", "grantee", "action", "resource", "justification", "by", "created", "expires"),
        [
            (g["id"], g["grantee"], g["action"], g["resource"], g["justification"],
             g["created_by"], g["created_at"], g["expires_at"])
            for g in report["grants"]
        ],
        "grants",
    )  # fmt: skip
    breakglass = _table(
        ("id", "operator", "action", "resource", "issued", "used", "justification", "approver"),
        [
            (b["id"], b["operator"], b["action"], b["resource"], b["issued_at"], b["used_at"],
             b["justification"], b["approved_by"])
            for b in report["breakglass"]
        ],
        "breakglass",
    )  # fmt: skip
    operators = _table(
        ("operator", "kind", "last login"),
        [(o["operator"], o["kind"], o["last_login"] or "never") for o in report["operators"]],
        "operators",
    )
    status = "intact" if a["intact"] else f"BROKEN: {a['reason']}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>Compliance report</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #999;padding:2px 6px;font-size:13px}th{background:#eee}"
        "</style></head><body>"
        f'<h1>Compliance report</h1><p id="generated">Generated '
        f"{html.escape(str(report['generated_at']))}, tenant "
        f"{html.escape(str(report['tenant'] or 'all'))}, window {report['window_days']} days."
        f'</p><p id="summary">{s["credentials"]} credentials, {s["overdue"]} overdue, '
        f"metadata complete for {s['metadata_complete']} "
        f"({s['metadata_completeness'] * 100:.0f}%).</p>"
        f"<h2>Rotation age by classification</h2>{_plot(report['credentials'])}"
        f"<h2>Credentials</h2>{credentials}<h2>Grants</h2>{grants}"
        f"<h2>Break-glass uses</h2>{breakglass}<h2>Operators</h2>{operators}"
        f'<h2>Audit ledger</h2><p id="audit">{html.escape(status)}; {a["entries"]} entries; '
        f"last signed checkpoint: seq {a['checkpoint_seq']} at "
        f"{html.escape(str(a['checkpoint_time']))}</p></body></html>\n"
    )
