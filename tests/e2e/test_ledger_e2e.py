"""The audit ledger end to end (issue 20, finding 11): the audit MAC key removed from the SoftHSM2
token stops `broker serve` with a message naming the key and the runbook; an operator starts a
new epoch on purpose; verify then reports the boundary, and an exported checkpoint still holds."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from broker.devmode import TOKEN_LABEL
from broker.softhsm import softhsm_missing

from .conftest import BrokerCli, BrokerProcess, _child_env, free_port

_DESTROY = """
import sys
from ca.keys.pkcs11 import Pkcs11Backend
from ca.keys.uri import DEFAULT_PKCS11_MODULE
pin = open(sys.argv[1], "rb").read().strip()
keys = Pkcs11Backend(sys.argv[2], pin, module_path=DEFAULT_PKCS11_MODULE)
assert keys.has_key("broker-audit-mac")
keys.destroy_key("broker-audit-mac")
assert not keys.has_key("broker-audit-mac")
keys.close()
"""


def _python(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = _child_env({"SOFTHSM2_CONF": str(data_dir / "hsm" / "softhsm2.conf")})
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )


def test_lost_audit_key_stops_the_broker_until_a_new_epoch(tmp_path: Path) -> None:
    if softhsm_missing():
        pytest.fail("SoftHSM2 is required for this test (apt-get install softhsm2)")
    data_dir = tmp_path / "data"
    server = BrokerProcess(data_dir, tmp_path)
    cli = BrokerCli(server, tmp_path)
    checkpoint = tmp_path / "checkpoint.json"
    server.start()
    try:
        cli.ok("ca", "status")
        assert cli.ok("audit", "verify").stdout.startswith("audit ledger intact:")
        cli.ok("audit", "checkpoint", "--out", str(checkpoint))
        assert server.stop() == 0

        # the attack as reported: remove the HMAC key object from the token, restart
        destroyed = _python(data_dir, "-c", _DESTROY, str(data_dir / "hsm" / "pin"), TOKEN_LABEL)
        assert destroyed.returncode == 0, destroyed.stderr
        refused = _python(
            data_dir,
            "-m",
            "broker.cli",
            "serve",
            "--dev",
            "--data-dir",
            str(data_dir),
            "--listen",
            f"127.0.0.1:{free_port()}",
        )
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "listening" not in refused.stdout
        last = refused.stderr.strip().splitlines()[-1]
        assert last.startswith("broker: the audit MAC key 'broker-audit-mac' is missing"), last
        assert "docs/ledger.md" in last and "broker audit new-epoch" in last
        offline = _python(
            data_dir,
            "-m",
            "broker.cli",
            "audit",
            "verify",
            "--offline",
            "--data-dir",
            str(data_dir),
        )
        assert offline.returncode == 1
        assert "MAC key 'broker-audit-mac' is missing" in offline.stderr

        # the operator starts a new epoch on purpose, offline
        epoch = _python(
            data_dir,
            "-m",
            "broker.cli",
            "audit",
            "new-epoch",
            "--dev",
            "--data-dir",
            str(data_dir),
            "--reason",
            "audit key lost, INC-42",
        )
        assert epoch.returncode == 0, epoch.stderr
        assert epoch.stdout.startswith("audit ledger epoch 2 started at entry ")

        server.start()
        verified = cli.ok("audit", "verify", "--checkpoint", str(checkpoint)).stdout
        assert verified.startswith("audit ledger intact:")
        assert "epoch 2 begins at entry" in verified and "audit key lost, INC-42" in verified
        assert "checked by hash chain only" in verified
        assert "checkpoint of" in verified
    finally:
        server.ensure_stopped()


def test_cut_off_tail_makes_the_broker_refuse_until_an_operator_acts(tmp_path: Path) -> None:
    """Finding 1 as reported: delete the last row (after dropping the append-only trigger); the
    next requests must not chain onto the shortened ledger and make it look intact."""
    data_dir = tmp_path / "data"
    server = BrokerProcess(data_dir, tmp_path)
    cli = BrokerCli(server, tmp_path)
    server.start()
    try:
        cli.ok("ca", "status")
        cli.ok("audit", "tail", "-n", "1")
        with sqlite3.connect(data_dir / "broker.db") as conn:
            conn.execute("DROP TRIGGER audit_no_delete")
            conn.execute("DELETE FROM audit WHERE seq = (SELECT MAX(seq) FROM audit)")
            rows = conn.execute("SELECT COUNT(*) FROM audit").fetchone()[0]
        for _ in range(2):  # the first verify used to be appended and "repair" the second
            refused = cli.run("audit", "verify")
            assert refused.returncode == 1
            assert refused.stderr_lines == [
                "broker: failed precondition: audit ledger failed its integrity check; request "
                "refused "
                "(operators: broker audit verify, docs/ledger.md#key-loss-runbook)"
            ], refused.describe()
        offline = cli.run("audit", "verify", "--offline")
        assert offline.returncode == 1
        assert "were cut off the end of the ledger" in offline.stderr, offline.describe()
        with sqlite3.connect(data_dir / "broker.db") as conn:
            assert conn.execute("SELECT COUNT(*) FROM audit").fetchone()[0] == rows
    finally:
        server.ensure_stopped()
