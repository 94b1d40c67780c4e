"""`broker policy|grant|approval|breakglass ...` against fake access and CA clients."""

from __future__ import annotations

import json
from pathlib import Path

from tests.unit.broker.cli.fakes import (
    APPROVAL,
    BREAKGLASS,
    BREAKGLASS_CREDENTIAL,
    CA_POLICY,
    DECISION,
    GRANT,
    REGO,
    Z0,
    Z1,
    Recorder,
    harness,
)


def test_grant_json_is_the_record_and_text_is_a_table(tmp_path: Path) -> None:
    h = harness(tmp_path, access=Recorder(list_grants=[GRANT], create_grant=GRANT))
    listed = json.loads(h.invoke("grant", "list", "--output", "json").stdout)
    assert listed == [
        {
            "id": "g-1",
            "grantee": "spiffe://td/ops/alice",
            "action": "secrets.get",
            "resource": "secret://payments/*",
            "justification": "INC-1",
            "created_by": "spiffe://td/ops/bob",
            "created_at": Z0,
            "expires_at": Z1,
            "revoked_at": None,
            "revoked_by": "",
            "state": "active",
        }
    ]
    table = h.invoke("grant", "list").stdout.splitlines()
    assert table[0].split() == ["ID", "GRANTEE", "ACTION", "RESOURCE", "EXPIRES", "STATE", "BY"]
    assert table[1].split()[0] == "g-1" and Z1 in table[1]
    args = ["grant", "create", "--to", GRANT.grantee, "--action", "secrets.get"]
    created = h.invoke(*args, "--resource", "secret://payments/*", "--ttl", "1h",
                       "--justification", "INC-1")  # fmt: skip
    assert created.stdout == "g-1\n"  # the id alone on stdout
    assert "may secrets.get on secret://payments/* until" in created.stderr


def test_empty_lists_print_nothing(tmp_path: Path) -> None:
    h = harness(tmp_path, access=Recorder(list_grants=[], list_approvals=[], list_breakglass=[]))
    for group in ("grant", "approval", "breakglass"):
        assert h.invoke(group, "list").stdout == ""
        assert json.loads(h.invoke(group, "list", "--output", "json").stdout) == []


def test_approval_approve_json_and_text(tmp_path: Path) -> None:
    h = harness(tmp_path, access=Recorder(approve=APPROVAL))
    document = json.loads(h.invoke("approval", "approve", "a-1", "--output", "json").stdout)
    assert document["approved_by"] == "spiffe://td/ops/bob" and document["used_at"] is None
    assert h.invoke("approval", "approve", "a-1").stdout == (
        f"approved a-1: spiffe://td/ops/alice may secrets.rotate on "
        f"secret://payments/prod/stripe/api-key once, until {Z1}\n"
    )


def test_breakglass_issue_writes_files_and_reports_them(tmp_path: Path) -> None:
    h = harness(tmp_path, access=Recorder(issue_breakglass=BREAKGLASS_CREDENTIAL))
    out = tmp_path / "bg"
    result = h.invoke("breakglass", "issue", "--approval", "a-1", "--out", str(out),
                      "--output", "json")  # fmt: skip
    document = json.loads(result.stdout)
    assert document["id"] == "b-1" and document["issued_at"] == Z0
    assert document["files"] == [str(out / n) for n in ("svid.pem", "key.pem", "bundle.pem")]
    assert (out / "key.pem").stat().st_mode & 0o777 == 0o600
    listed = harness(tmp_path / "2", access=Recorder(list_breakglass=[BREAKGLASS]))
    assert listed.invoke("breakglass", "list").stdout.splitlines()[1].split()[:2] == [
        "b-1",
        "spiffe://td/ops/alice",
    ]


def test_policy_get_and_test(tmp_path: Path) -> None:
    h = harness(
        tmp_path,
        access=Recorder(get_rego_policy=REGO, test_policy=DECISION),
        ca=Recorder(get_policy=CA_POLICY),
    )
    document = json.loads(h.invoke("policy", "get", "--output", "json").stdout)
    assert document["rego"] == {
        "version": 4,
        "modules": {"main.rego": "package broker\n"},
        "author": "spiffe://td/ops/bob",
        "updated_at": Z0,
    }
    assert document["ca"] == {
        "version": 2,
        "author": "spiffe://td/ops/bob",
        "updated_at": Z0,
        "document": {"rules": []},
    }
    text = h.invoke("policy", "get", "--rego").stdout
    assert text == (
        f"# Rego policy version 4, set by spiffe://td/ops/bob at {Z0}\n"
        "# --- main.rego ---\npackage broker\n"
    )
    request = tmp_path / "in.json"
    request.write_text('{"a": 1}')
    decided = json.loads(h.invoke("policy", "test", "--input", str(request), "--output",
                                  "json").stdout)  # fmt: skip
    assert decided == {
        "decision": "allow",
        "rule": "allow_owner",
        "reason": "the owner reads",
        "flags": {"breakglass": "no"},
        "input": {"a": 1},
    }
    lines = h.invoke("policy", "test", "--input", str(request)).stdout
    assert lines == "allow (rule allow_owner): the owner reads\n  breakglass: no\n"
    refused = h.invoke("policy", "test", "--input", str(request), "--expect", "deny")
    assert refused.exit_code == 1
    assert refused.stderr == "broker: expected deny, the policy says allow (rule allow_owner)\n"


def test_policy_test_exits_1_on_deny_and_0_when_deny_is_expected(tmp_path: Path) -> None:
    """Issue 15: a deny is exit 1 (the decision still on stdout), like grep's no-match."""
    import dataclasses

    from tests.unit.broker.cli.fakes import DECISION

    deny = dataclasses.replace(DECISION, allowed=False, rule="prod-only", reason="no")
    h = harness(tmp_path, access=Recorder(test_policy=deny))
    request = tmp_path / "in.json"
    request.write_text('{"a": 1}')
    denied = h.invoke("policy", "test", "--input", str(request))
    assert (denied.exit_code, denied.stderr) == (1, "")
    assert denied.stdout.startswith("deny (rule prod-only): no")
    as_json = h.invoke("policy", "test", "--input", str(request), "-o", "json")
    assert as_json.exit_code == 1 and json.loads(as_json.stdout)["decision"] == "deny"
    expected = h.invoke("policy", "test", "--input", str(request), "--expect", "deny")
    assert expected.exit_code == 0 and expected.stdout.startswith("deny (rule prod-only)")
