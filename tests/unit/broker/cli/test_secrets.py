"""`broker secrets ...` and `broker kek rotate` against a fake secrets client: JSON documents
(docs/secrets.md) and text lines; values only from `secrets get`."""

from __future__ import annotations

import json
from pathlib import Path

from tests.unit.broker.cli.fakes import (
    DETAILS,
    KEK_ROTATION,
    META,
    READ,
    Z0,
    Z1,
    Recorder,
    harness,
)

REF = META.reference
META_KEYS = {
    "tenant",
    "reference",
    "reference_sha256",
    "service",
    "environment",
    "owner",
    "classification",
    "rotation_period_seconds",
    "last_rotated",
    "rotation_due",
    "created_at",
    "state",
    "current_version",
    "revoked_at",
    "deleted_at",
    "missing",
}


def test_show_json_is_the_metadata_with_its_versions(tmp_path: Path) -> None:
    h = harness(tmp_path, secrets=Recorder(show=DETAILS))
    document = json.loads(h.invoke("secrets", "show", REF, "--output", "json").stdout)
    assert set(document) == META_KEYS | {"versions"}
    assert document["rotation_due"] == Z1 and document["missing"] == []
    assert document["revoked_at"] is None
    assert document["versions"][1] == {
        "version": 1,
        "state": "previous",
        "created_at": Z0,
        "retire_at": Z1,
        "revoked_at": None,
        "kek": "kek.default.1",
    }
    text = h.invoke("secrets", "show", REF).stdout
    assert f"reference:       {REF}\n" in text
    assert "rotation period: 90d 0h\n" in text
    assert f"  v1  previous  created {Z0}  kek.default.1 (rollback window until {Z1})" in text
    assert "the-value" not in text


def test_list_json_and_lines(tmp_path: Path) -> None:
    h = harness(tmp_path, secrets=Recorder(list_secrets=[META], due=[]))
    listed = json.loads(h.invoke("secrets", "list", "--output", "json").stdout)
    assert [set(m) for m in listed] == [META_KEYS]
    line = h.invoke("secrets", "list").stdout.strip()
    assert line == (
        f"{REF}  tenant=default owner=payments class=internal v2 active rotation-due={Z1}"
    )
    assert h.invoke("secrets", "due").stdout == ""


def test_get_prints_the_value_or_a_json_document(tmp_path: Path) -> None:
    h = harness(tmp_path, secrets=Recorder(get=READ))
    assert h.invoke("secrets", "get", REF).stdout_bytes == b"the-value"
    document = json.loads(h.invoke("secrets", "get", REF, "--output", "json").stdout)
    assert document["value"] == "the-value" and document["encoding"] == "utf-8"
    assert document["version"] == 2 and document["created_at"] == Z1
    assert set(document["metadata"]) == META_KEYS


def test_state_changes_print_one_line(tmp_path: Path) -> None:
    h = harness(tmp_path, secrets=Recorder(rollback=DETAILS, delete=DETAILS))
    line = h.invoke("secrets", "rollback", REF).stdout
    assert line == f"rolled back {REF} (tenant default, version 2, active)\n"
    deleted = json.loads(h.invoke("secrets", "delete", REF, "--output", "json").stdout)
    assert deleted["reference"] == REF and len(deleted["versions"]) == 2


def test_kek_rotate_json_and_text(tmp_path: Path) -> None:
    h = harness(tmp_path, secrets=Recorder(rotate_kek=[KEK_ROTATION]))
    document = json.loads(h.invoke("kek", "rotate", "--output", "json").stdout)
    assert document == [
        {
            "tenant": "default",
            "new_kek": "kek.default.2",
            "rewrapped": 3,
            "destroyed": ["kek.default.1"],
            "kept": [],
        }
    ]
    text = h.invoke("kek", "rotate").stdout
    assert text == (
        "default: now kek.default.2; 3 data key(s) rewrapped; destroyed kek.default.1\n"
    )
