"""Wrapped static secrets through the CLI against a real `broker serve --dev` (SQLite, SoftHSM2
token in the data dir): put, get, show, rotate, rollback, revoke, delete, due, `kek rotate`,
and a workload reading its secret with `broker exec`. Afterwards no file under the data dir
holds any value in plaintext."""

from __future__ import annotations

import json
import secrets as random
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import BrokerCli, BrokerProcess

pytestmark = pytest.mark.e2e

REF = "secret://payments/dev/stripe/api-key"
HOOK = "secret://payments/dev/webhook/token"
SHOW_ENV = "import os, sys; sys.stdout.write(os.environ['API_KEY'] + '|' + os.environ['HOOK'])"


def _value(tmp: Path, name: str) -> tuple[Path, bytes]:
    value = f"sk_e2e_{random.token_hex(16)}".encode()
    path = tmp / name
    path.write_bytes(value)
    return path, value


def _show(cli: BrokerCli, ref: str = REF) -> dict[str, Any]:
    document: dict[str, Any] = cli.ok("secrets", "show", ref, "--output", "json").json()
    return document


def _workload(cli: BrokerCli, tmp: Path, service: str) -> dict[str, str]:
    status = cli.ok("ca", "status", "--output", "json").json()
    spiffe_id = f"spiffe://{status['trust_domain']}/default/dev/{service}"
    out = tmp / service
    cli.ok("svid", "mint", "--spiffe-id", spiffe_id, "--out", str(out))
    return {"BROKER_CERT": str(out / "svid.pem"), "BROKER_KEY": str(out / "key.pem")}


def test_secret_lifecycle_through_the_cli(
    broker_cli: BrokerCli, broker_server: BrokerProcess, tmp_path: Path
) -> None:
    cli = broker_cli
    first_file, first = _value(tmp_path, "v1")
    put = cli.ok(
        "secrets", "put", REF, "--value-file", str(first_file), "--owner", "payments",
        "--classification", "confidential", "--rotation-period", "90d", "--output", "json",
    ).json()  # fmt: skip
    assert put["current_version"] == 1 and put["missing"] == []
    assert cli.ok("secrets", "get", REF).stdout == first.decode()

    again = cli.run(
        "secrets", "put", REF, "--generate", "--owner", "payments",
        "--classification", "confidential", "--rotation-period", "90d",
    )  # fmt: skip
    assert again.returncode == 1 and again.stderr_lines[0].startswith("broker: already exists")
    assert len(again.stderr_lines) == 1

    wrong_env = cli.run(
        "secrets", "rotate", REF, "--env", "prod", "--ticket", "SEC-1", "--justification", "t",
    )  # fmt: skip
    assert wrong_env.returncode == 1
    assert wrong_env.stderr_lines == [wrong_env.stderr_lines[0]]
    assert "does not match" in wrong_env.stderr and _show(cli)["current_version"] == 1

    second_file, second = _value(tmp_path, "v2")
    cli.ok(
        "secrets", "rotate", REF, "--env", "dev", "--value-file", str(second_file),
        "--ticket", "SEC-2", "--justification", "quarterly rotation",
    )  # fmt: skip
    assert cli.ok("secrets", "get", REF).stdout == second.decode()
    by_version = cli.ok("secrets", "get", REF, "--version", "1", "--output", "json").json()
    assert by_version["value"] == first.decode() and by_version["version"] == 1
    shown = _show(cli)
    assert [(v["version"], v["state"]) for v in shown["versions"]] == [
        (1, "previous"),
        (2, "current"),
    ]
    assert shown["versions"][0]["retire_at"] is not None

    cli.ok("secrets", "rollback", REF)
    assert cli.ok("secrets", "get", REF).stdout == first.decode()
    assert cli.run("secrets", "get", REF, "--version", "2").returncode == 1

    listed = cli.ok("secrets", "list", "--prefix", "secret://payments/", "--output", "json")
    assert [s["reference"] for s in listed.json()] == [REF]
    assert cli.ok("secrets", "due", "--output", "json").json() == []

    # KEK rotation: a new generation, everything rewrapped, the old KEK destroyed.
    rotations = cli.ok("kek", "rotate", "--tenant", "default", "--output", "json").json()
    assert rotations[0]["tenant"] == "default" and rotations[0]["rewrapped"] == 2
    assert rotations[0]["destroyed"] == ["kek.default.1"]
    assert cli.ok("secrets", "get", REF).stdout == first.decode()
    assert {v["kek"] for v in _show(cli)["versions"]} == {"kek.default.2"}

    revoked = cli.ok("secrets", "revoke", REF, "--justification", "leaked in a log")
    assert "revoked" in revoked.stdout
    refused = cli.run("secrets", "get", REF)
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr_lines[0].startswith("broker: failed precondition:")
    assert "revoked" in refused.stderr

    no_justification = cli.run("secrets", "revoke", HOOK)
    assert no_justification.returncode == 2  # a usage error

    cli.ok("secrets", "delete", REF)
    assert _show(cli)["state"] == "deleted"

    needles = [first, second, first.hex().encode(), second.hex().encode()]
    files = [p for p in broker_server.data_dir.rglob("*") if p.is_file()]
    assert any(p.name == "broker.db" for p in files)
    for path in files:  # the SQLite file and its WAL, the token, certificates, logs
        data = path.read_bytes()
        for needle in needles:
            assert needle not in data, f"plaintext in {path}"
    for path in broker_server.log_dir.glob("serve-*.stderr"):
        text = path.read_bytes()
        assert first not in text and second not in text


def test_a_workload_gets_its_secrets_with_broker_exec(
    broker_cli: BrokerCli, tmp_path: Path
) -> None:
    cli = broker_cli
    key_file, key = _value(tmp_path, "key")
    hook_file, hook = _value(tmp_path, "hook")
    for ref, path in ((REF.replace("api-key", "exec-key"), key_file), (HOOK, hook_file)):
        cli.ok(
            "secrets", "put", ref, "--value-file", str(path), "--owner", "payments",
            "--classification", "internal", "--rotation-period", "30d",
        )  # fmt: skip
    payments = _workload(cli, tmp_path, "payments")
    result = cli.ok(
        "exec", "--env", f"API_KEY={REF.replace('api-key', 'exec-key')}", "--env", f"HOOK={HOOK}",
        "--", sys.executable, "-c", SHOW_ENV, env=payments,
    )  # fmt: skip
    assert result.stdout == f"{key.decode()}|{hook.decode()}"

    web = _workload(cli, tmp_path, "web")
    denied = cli.run(
        "exec", "--env", f"HOOK={HOOK}", "--", sys.executable, "-c", "print('ran')", env=web
    )
    assert denied.returncode == 1 and "ran" not in denied.stdout
    assert denied.stderr_lines[0].startswith("broker: cannot resolve the secrets")
    assert "PERMISSION_DENIED" in denied.stderr

    bad = cli.run("exec", "--env", "1X=secret://a/b/c", "--", "true", env=payments)
    assert bad.returncode == 2

    # As the shell: 127 when the command is not found, 126 when it cannot be executed.
    missing = cli.run("exec", "--env", f"HOOK={HOOK}", "--", str(tmp_path / "nonexistent"),
                      env=payments)  # fmt: skip
    assert missing.returncode == 127 and len(missing.stderr_lines) == 1, missing.describe()
    assert missing.stderr.startswith("broker: cannot run ")
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    refused = cli.run("exec", "--env", f"HOOK={HOOK}", "--", str(script), env=payments)
    assert refused.returncode == 126 and "Permission denied" in refused.stderr, refused.describe()

    # File delivery: 0600 files in a directory, removed once the secret is revoked.
    out = tmp_path / "run" / "secrets"
    synced = cli.ok(
        "secrets", "sync", "--write-dir", str(out), "--file", f"hook={HOOK}", "--once",
        env=payments,
    )  # fmt: skip
    assert synced.stdout.startswith("hook: written (version 1)")
    assert (out / "hook").read_bytes() == hook
    assert stat.S_IMODE((out / "hook").stat().st_mode) == 0o600
    cli.ok("secrets", "revoke", HOOK, "--justification", "rotate the webhook")
    gone = cli.run(
        "secrets", "sync", "--write-dir", str(out), "--file", f"hook={HOOK}", "--once",
        env=payments,
    )  # fmt: skip
    assert gone.returncode == 1 and len(gone.stderr_lines) == 1
    assert "hook removed" in gone.stderr and "revoked" in gone.stderr
    assert not (out / "hook").exists()

    tail = cli.ok("audit", "tail", "-n", "50", "--output", "json").json()
    text = json.dumps(tail)
    assert HOOK not in text and key.decode() not in text and hook.decode() not in text
