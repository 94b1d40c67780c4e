"""`broker key list/show/rotate` and `broker report compliance` against a fake Kms client: JSON
documents (docs/kms.md), text lines, the report as JSON, CSV and HTML, and refusals."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from broker.api.client.base import ClientError
from tests.unit.broker.cli.fakes import (
    COMPLIANCE_REPORT,
    KEY_DETAILS,
    KEY_META,
    Z0,
    Z1,
    Recorder,
    harness,
)

META_KEYS = [
    "tenant",
    "name",
    "purpose",
    "key_type",
    "owner",
    "environment",
    "classification",
    "rotation_period_seconds",
    "state",
    "current_version",
    "created_at",
    "last_rotated",
    "rotation_due",
    "destroy_after",
]


def test_key_list_json_and_text(tmp_path: Path) -> None:
    kms = Recorder(list_keys=[KEY_META])
    h = harness(tmp_path, kms=kms)
    result = h.invoke("key", "list", "--tenant", "default", "--output", "json")
    assert result.exit_code == 0, result.output
    (document,) = json.loads(result.stdout)
    assert list(document) == META_KEYS
    assert document["created_at"] == Z0 and document["rotation_due"] == Z1
    assert document["destroy_after"] is None and document["current_version"] == 2
    assert kms.calls == [("list_keys", (), {"tenant": "default"})]
    text = h.invoke("key", "list").stdout
    assert text == (
        "orders-dek  tenant=default encrypt/aes-256 owner=orders env=prod class=confidential "
        f"v2 enabled rotation-due={Z1}\n"
    )


def test_key_list_prints_nothing_when_there_are_no_keys(tmp_path: Path) -> None:
    h = harness(tmp_path, kms=Recorder(list_keys=[]))
    assert h.invoke("key", "list").stdout == ""
    assert json.loads(h.invoke("key", "list", "--output", "json").stdout) == []


def test_key_show_json_and_text(tmp_path: Path) -> None:
    kms = Recorder(show_key=KEY_DETAILS)
    h = harness(tmp_path, kms=kms)
    document = json.loads(h.invoke("key", "show", "orders-dek", "--output", "json").stdout)
    assert list(document) == [*META_KEYS, "versions"]
    assert document["versions"] == [
        {"version": 1, "state": "enabled", "created_at": Z0, "destroyed_at": None},
        {"version": 2, "state": "enabled", "created_at": Z1, "destroyed_at": None},
    ]
    assert kms.calls[0] == ("show_key", ("orders-dek",), {"tenant": ""})
    lines = h.invoke("key", "show", "orders-dek").stdout.splitlines()
    assert lines[0].startswith("orders-dek  tenant=default encrypt/aes-256 owner=orders")
    assert lines[1:] == [f"  v1  enabled   created {Z0}", f"  v2  enabled   created {Z1}"]


def test_key_rotate_says_what_it_did(tmp_path: Path) -> None:
    h = harness(tmp_path, kms=Recorder(rotate_key=KEY_DETAILS))
    assert h.invoke("key", "rotate", "orders-dek").stdout == (
        "rotated key orders-dek (tenant default, version 2, enabled)\n"
    )
    document = json.loads(h.invoke("key", "rotate", "orders-dek", "--output", "json").stdout)
    assert document["name"] == "orders-dek" and len(document["versions"]) == 2


def test_a_refused_key_command_is_one_line_and_exit_1(tmp_path: Path) -> None:
    error = ClientError("PERMISSION_DENIED", "kms.key.show refused: needs a role that allows it")
    h = harness(tmp_path, kms=Recorder(show_key=error))
    result = h.invoke("key", "show", "orders-dek")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("broker: ")


def test_report_compliance_json_csv_html(tmp_path: Path) -> None:
    kms = Recorder(compliance_report=COMPLIANCE_REPORT)
    h = harness(tmp_path, kms=kms)
    result = h.invoke("report", "compliance", "--tenant", "default", "--window", "7d")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == COMPLIANCE_REPORT
    assert kms.calls == [
        ("compliance_report", (), {"tenant": "default", "window_seconds": 7 * 86400})
    ]
    rows = list(csv.reader(io.StringIO(h.invoke("report", "compliance", "--output", "csv").stdout)))
    assert rows[0][:4] == ["section", "kind", "tenant", "name"]
    sections = [r[0] for r in rows[1:]]
    assert sections == ["credential", "operator", "audit"]
    assert rows[1][1:4] == ["key", "default", "orders-dek"]
    page = h.invoke("report", "compliance", "--output", "html").stdout
    assert page.lstrip().lower().startswith("<!doctype html>")
    assert "orders-dek" in page and "<script" not in page.lower()


def test_report_compliance_writes_the_file_it_is_given(tmp_path: Path) -> None:
    h = harness(tmp_path, kms=Recorder(compliance_report=COMPLIANCE_REPORT))
    out = tmp_path / "report.html"
    result = h.invoke("report", "compliance", "--output", "html", "--out", str(out))
    assert result.exit_code == 0 and result.stdout == ""
    assert "orders-dek" in out.read_text()
    refused = h.invoke("report", "compliance", "--out", str(tmp_path / "missing" / "r.json"))
    assert refused.exit_code == 1
    assert refused.stderr.startswith("broker: cannot write ")
    assert len(refused.stderr.splitlines()) == 1
