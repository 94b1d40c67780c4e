"""`broker db ...` and `broker lease ...` against a fake database client: the JSON documents
(field names scripts rely on, docs/database.md) and the text lines."""

from __future__ import annotations

import json
from pathlib import Path

from tests.unit.broker.cli.fakes import (
    CONNECTION,
    CREDENTIALS,
    LEASE,
    ROLE,
    STUCK,
    Z0,
    Z1,
    CliHarness,
    Recorder,
    harness,
)

LEASE_KEYS = {
    "lease_id",
    "role",
    "connection",
    "username",
    "holder",
    "state",
    "created_at",
    "expires_at",
    "max_expires_at",
    "lease_duration",
    "renewable",
    "attempts",
    "last_error",
    "next_attempt_at",
}


def _db(tmp_path: Path, **answers: object) -> tuple[Recorder, CliHarness]:
    fake = Recorder(**answers)
    return fake, harness(tmp_path, database=fake)


def test_lease_list_json_and_text(tmp_path: Path) -> None:
    fake, h = _db(tmp_path, list_leases=[LEASE, STUCK])
    result = h.invoke("lease", "list", "--prefix", "db/app/", "--output", "json")
    assert result.exit_code == 0, result.stderr
    leases = json.loads(result.stdout)
    assert [set(item) for item in leases] == [LEASE_KEYS, LEASE_KEYS]
    assert leases[0] == {
        "lease_id": "db/app/abc",
        "role": "app",
        "connection": "pg",
        "username": "v_app_x",
        "holder": "spiffe://td/payments",
        "state": "active",
        "created_at": Z0,
        "expires_at": Z1,
        "max_expires_at": Z1,
        "lease_duration": 3600,
        "renewable": True,
        "attempts": 0,
        "last_error": None,
        "next_attempt_at": None,
    }
    assert leases[1]["last_error"] == "connection refused\nby peer"
    assert leases[1]["next_attempt_at"] == Z1
    assert result.stderr == ""  # the irrevocable warning is for people, not for JSON
    assert fake.calls == [("list_leases", ("db/app/",), {})]

    text = h.invoke("lease", "list")
    lines = text.stdout.splitlines()
    header = "LEASE USERNAME STATE EXPIRES HOLDER ATTEMPTS NEXT RETRY LAST ERROR"
    assert lines[0].split() == header.split()
    assert lines[1].split()[:4] == ["db/app/abc", "v_app_x", "active", Z1]
    assert lines[2].endswith("connection refused by peer")
    assert "1 irrevocable lease(s)" in text.stderr


def test_an_empty_lease_list_prints_nothing(tmp_path: Path) -> None:
    _, h = _db(tmp_path, list_leases=[])
    assert h.invoke("lease", "list").stdout == ""
    assert json.loads(h.invoke("lease", "list", "--output", "json").stdout) == []


def test_creds_and_renew_show_the_lease_terms(tmp_path: Path) -> None:
    _, h = _db(tmp_path, creds=CREDENTIALS, renew=STUCK)
    creds = json.loads(h.invoke("db", "creds", "app", "--output", "json").stdout)
    assert creds == {
        "username": "v_app_x",
        "password": "s3cret-password",
        "lease_id": "db/app/abc",
        "lease_duration": 3600,
        "renewable": True,
        "expires_at": Z1,
    }
    text = h.invoke("db", "creds", "app").stdout.splitlines()
    assert text[0].split() == ["username", "v_app_x"]
    assert text[1].split() == ["password", "s3cret-password"]
    renewed = json.loads(h.invoke("lease", "renew", "db/app/def", "--output", "json").stdout)
    assert renewed == {
        "lease_id": "db/app/def",
        "lease_duration": 0,
        "renewable": False,
        "expires_at": Z0,
    }
    line = h.invoke("lease", "renew", "db/app/def").stdout.strip()
    assert line == f"lease db/app/def renewed until {Z0} (capped at the max TTL)"


def test_role_json_names_and_show_text(tmp_path: Path) -> None:
    _, h = _db(tmp_path, get_role=ROLE, list_roles=[ROLE])
    document = json.loads(h.invoke("db", "role", "show", "app", "--output", "json").stdout)
    assert document["default_ttl"] == 3600 and document["max_ttl"] == 86400
    assert "default_ttl_seconds" not in document
    assert document["revocation_statements"] is None  # empty means "the default"
    assert document["creation_statements"] == "CREATE ROLE {{name}};"
    assert document["created_at"] == Z0
    assert document["classification"] is None and document["rotation_period"] is None
    shown = h.invoke("db", "role", "show", "app").stdout
    assert shown.splitlines()[0].split() == ["name", "app"]
    assert "\n-- creation statements\nCREATE ROLE {{name}};" in shown
    assert "revocation statements" not in shown
    listed = h.invoke("db", "role", "list").stdout.splitlines()
    assert listed[1].split() == ["app", "pg", "default/dev/payments", "3600s", "86400s"]


def test_connection_json_is_redacted_and_show_text_lists_pairs(tmp_path: Path) -> None:
    _, h = _db(tmp_path, get_connection=CONNECTION, list_connections=[CONNECTION])
    document = json.loads(h.invoke("db", "connection", "show", "pg", "--output", "json").stdout)
    assert document == {
        "name": "pg",
        "plugin": "postgresql",
        "dsn": "postgresql://admin@db:5432/app",
        "created_at": Z0,
        "root_rotated_at": None,
        "kek_label": "kek.1",
    }
    shown = h.invoke("db", "connection", "show", "pg").stdout.splitlines()
    assert [line.split()[0] for line in shown] == list(document)
    assert shown[4].split() == ["root_rotated_at", "-"]


def test_revoke_prefix_reports_errors_in_json_and_exits_1(tmp_path: Path) -> None:
    _, h = _db(tmp_path, revoke_prefix=(2, ["db/app/x: unreachable"]))
    result = h.invoke("lease", "revoke", "--prefix", "db/app/", "--output", "json")
    assert result.exit_code == 1
    assert json.loads(result.stdout) == {"revoked": 2, "errors": ["db/app/x: unreachable"]}
    assert result.stderr.startswith("broker: 1 lease(s) could not be revoked")
