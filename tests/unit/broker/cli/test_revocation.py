"""`broker revoke` against a fake client: what it sends, its JSON and text, its refusals."""

from __future__ import annotations

import json
from pathlib import Path

from broker.api.client.revocation import RevocationResult, RevokedObject
from tests.unit.broker.cli.fakes import Recorder, harness

WEB = "spiffe://example.org/acme/prod/web"
DONE = RevocationResult(
    WEB, [RevokedObject("lease", "db/app/1"), RevokedObject("static-role", "web-app")]
)


def test_revoke_an_identity(tmp_path: Path) -> None:
    fake = Recorder(revoke=DONE)
    h = harness(tmp_path, revocation=fake)
    result = h.invoke(
        "revoke", "--identity", WEB, "--reason", "personnel-change", "--ticket", "HR-1",
        "--output", "json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "subject": WEB,
        "objects": [
            {"kind": "lease", "id": "db/app/1", "error": None},
            {"kind": "static-role", "id": "web-app", "error": None},
        ],
    }
    assert fake.calls == [
        (
            "revoke",
            (),
            {"identity": WEB, "owner": "", "reason": "personnel-change", "ticket": "HR-1"},
        )
    ]
    text = h.invoke("revoke", "--owner", "web", "--reason", "personnel-change").stdout
    assert text.splitlines()[0] == f"{WEB}: 2 ended, 0 failed"


def test_usage_errors_send_nothing(tmp_path: Path) -> None:
    fake = Recorder(revoke=DONE)
    h = harness(tmp_path, revocation=fake)
    for args in (
        ["revoke", "--reason", "personnel-change"],
        ["revoke", "--identity", WEB, "--owner", "web", "--reason", "personnel-change"],
        ["revoke", "--identity", WEB, "--reason", "bored"],
    ):
        assert h.invoke(*args).exit_code == 2
    assert fake.calls == []


def test_a_partial_failure_exits_1_with_one_line(tmp_path: Path) -> None:
    partial = RevocationResult(WEB, [RevokedObject("lease", "db/app/1", "database away")])
    h = harness(tmp_path, revocation=Recorder(revoke=partial))
    result = h.invoke("revoke", "--identity", WEB, "--reason", "personnel-change")
    assert result.exit_code == 1
    assert result.stderr.startswith("broker: 1 object(s) could not be ended")
    assert len(result.stderr.splitlines()) == 1
