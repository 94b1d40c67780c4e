"""`broker token|attestor|entry ...` and `broker svid deny` against a fake identity client."""

from __future__ import annotations

import json
from pathlib import Path

from tests.unit.broker.cli.fakes import ATTESTOR, ENTRY, JOIN_TOKEN, Z0, Z1, Recorder, harness


def test_entry_json_and_text(tmp_path: Path) -> None:
    fake = Recorder(create_entry=ENTRY, list_entries=[ENTRY], get_entry=ENTRY)
    h = harness(tmp_path, identity=fake)
    args = ["entry", "create", "--spiffe-id", ENTRY.spiffe_id, "--parent-id", ENTRY.parent_id]
    created = h.invoke(
        *args, "--selector", "unix:uid:1000", "--x509-ttl", "10m", "--output", "json"
    )
    assert json.loads(created.stdout) == {
        "id": "e-1",
        "spiffe_id": "spiffe://td/web",
        "parent_id": "spiffe://td/agents/a",
        "selectors": ["unix:uid:1000"],
        "x509_ttl_seconds": 600,
        "jwt_ttl_seconds": 0,
        "dns_names": ["web.local"],
        "created_at": Z0,
    }
    assert fake.calls[0] == (
        "create_entry",
        (ENTRY.spiffe_id, ENTRY.parent_id, ("unix:uid:1000",), 600, 0, ()),
        {},
    )
    assert h.invoke(*args, "--selector", "unix:uid:1000").stdout == "e-1\n"
    listed = json.loads(h.invoke("entry", "list", "--output", "json").stdout)
    assert [e["id"] for e in listed] == ["e-1"]
    line = h.invoke("entry", "show", "e-1").stdout.strip()
    assert line == (
        "e-1  spiffe://td/web  parent=spiffe://td/agents/a  selectors=unix:uid:1000 "
        "x509_ttl=600s dns=web.local"
    )


def test_attestor_list_json_and_text(tmp_path: Path) -> None:
    h = harness(tmp_path, identity=Recorder(list_attestors=[ATTESTOR], remove_attestor=None))
    document = json.loads(h.invoke("attestor", "list", "--output", "json").stdout)
    assert document == [
        {
            "name": "k8s",
            "issuer": "https://issuer",
            "audience": "broker",
            "template": "spiffe://{td}/ns/{ns}",
            "algorithms": ["RS256"],
            "created_at": Z0,
            "key_ids": ["kid-1"],
        }
    ]
    text = h.invoke("attestor", "list").stdout
    assert text == "k8s  https://issuer  aud=broker  spiffe://{td}/ns/{ns}\n"
    removed = h.invoke("attestor", "remove", "k8s", "--output", "json").stdout
    assert json.loads(removed) == {"removed": "k8s"}
    assert h.invoke("attestor", "remove", "k8s").stdout == "removed attestor k8s\n"


def test_token_and_deny(tmp_path: Path) -> None:
    fake = Recorder(create_join_token=JOIN_TOKEN, deny=("spiffe_id", "spiffe://td/web"))
    h = harness(tmp_path, identity=fake)
    args = ["token", "create", "--spiffe-id", "spiffe://td/agents/a"]
    assert json.loads(h.invoke(*args, "--output", "json").stdout) == {
        "token": "tok-123",
        "spiffe_id": "spiffe://td/agents/a",
        "expires_at": Z1,
    }
    assert h.invoke(*args).stdout == "tok-123\n"
    denied = h.invoke("svid", "deny", "spiffe://td/web", "--output", "json").stdout
    assert json.loads(denied) == {"kind": "spiffe_id", "value": "spiffe://td/web"}
    assert (
        h.invoke("svid", "deny", "spiffe://td/web").stdout == "denied spiffe_id spiffe://td/web\n"
    )
