"""`broker dev ls` and `broker dev pull` against a fake secrets client and a dev vault with the
software key file: JSON documents (docs/developers.md) and text lines, never a value."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path

import pytest

from broker.cli.clients import ClientError
from broker.devvault import DevVault, PulledValue
from ca.clock import FakeClock
from tests.unit.broker.cli.fakes import META, READ, Recorder, harness

# Far enough ahead that the CLI's own clock (the system's) finds nothing expired.
PULLED = dt.datetime(2099, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
DEV_REF = "secret://payments/dev/stripe/api-key"
DB_REF = "secret://payments/dev/db/password"  # pragma: allowlist secret


@pytest.fixture(autouse=True)
def file_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_DEV_VAULT_KEY", "file")


def _fill(home: Path) -> None:
    vault = DevVault(home / "dev-vault", clock=FakeClock(PULLED))
    try:
        vault.store(
            "dev",
            [
                PulledValue(DEV_REF, "dev", 2, b"value-one"),
                PulledValue(DB_REF, "dev", 5, b"value-two"),
            ],
            dt.timedelta(hours=1),
            softhsm=False,
        )
    finally:
        vault.close()


def test_dev_ls_json_and_lines(tmp_path: Path) -> None:
    h = harness(tmp_path)
    _fill(h.data_dir)  # the harness's BROKER_HOME
    listed = json.loads(h.invoke("dev", "ls", "--output", "json").stdout)
    assert listed == [
        {
            "reference": DB_REF,
            "environment": "dev",
            "version": 5,
            "pulled_at": "2099-01-02T03:04:05Z",
            "expires_at": "2099-01-02T04:04:05Z",
        },
        {
            "reference": DEV_REF,
            "environment": "dev",
            "version": 2,
            "pulled_at": "2099-01-02T03:04:05Z",
            "expires_at": "2099-01-02T04:04:05Z",
        },
    ]
    text = h.invoke("dev", "ls")
    assert text.stdout.splitlines() == [
        f"{DB_REF}  v5  expires 2099-01-02T04:04:05Z",
        f"{DEV_REF}  v2  expires 2099-01-02T04:04:05Z",
    ]
    assert "value-" not in text.stdout + text.stderr
    assert h.settings == []  # ls reads the local vault only


def test_dev_ls_of_an_empty_vault(tmp_path: Path) -> None:
    h = harness(tmp_path)
    assert json.loads(h.invoke("dev", "ls", "--output", "json").stdout) == []
    assert h.invoke("dev", "ls").stdout == ""


def test_dev_pull_json_reports_stored_and_refused(tmp_path: Path) -> None:
    dev_meta = dataclasses.replace(META, reference=DEV_REF, environment="dev")
    other = dataclasses.replace(META, reference=DB_REF, environment="dev")
    secrets = Recorder(list_secrets=[dev_meta, other], get=READ)
    h = harness(tmp_path, secrets=secrets)
    result = h.invoke("dev", "pull", "--env", "dev", "--ttl", "1h", "--output", "json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert set(document) == {"stored", "dropped", "refused", "expires_at"}
    assert document["stored"] == 2 and document["dropped"] == [] and document["refused"] == []
    assert [c[0] for c in secrets.calls] == ["list_secrets", "get", "get"]
    assert all(c[2].get("purpose") == "dev-pull" for c in secrets.calls[1:])
    assert "the-value" not in result.stdout

    secrets.answers["get"] = ClientError("PERMISSION_DENIED", "dev pull refused")
    again = h.invoke("dev", "pull", "--env", "dev", "--ttl", "1h", "--output", "json")
    document = json.loads(again.stdout)
    assert document["refused"] == [
        {"reference": DEV_REF, "reason": "PERMISSION_DENIED: dev pull refused"},
        {"reference": DB_REF, "reason": "PERMISSION_DENIED: dev pull refused"},
    ]
    assert sorted(document["dropped"]) == sorted([DEV_REF, DB_REF])
    assert f"broker dev: not pulled {DEV_REF}: " in again.stderr


def test_dev_pull_text_line(tmp_path: Path) -> None:
    dev_meta = dataclasses.replace(META, reference=DEV_REF, environment="dev")
    h = harness(tmp_path, secrets=Recorder(list_secrets=[dev_meta], get=READ))
    line = h.invoke("dev", "pull", "--env", "dev").stdout
    assert line.startswith(f"pulled 1 secret(s) of dev into {h.data_dir / 'dev-vault'} until ")


def test_dev_pull_of_production_is_refused_before_connecting(tmp_path: Path) -> None:
    h = harness(tmp_path, secrets=Recorder())
    result = h.invoke("dev", "pull", "--env", "prod")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith("broker: environment 'prod' is production")
    assert len(result.stderr.splitlines()) == 1
    assert h.settings == []
    assert not (h.data_dir / "dev-vault" / "vault.json").exists()
