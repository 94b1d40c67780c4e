"""`broker health` against a fake health client: SERVING exits 0 (text and JSON), anything
else is a one-line refusal with exit 1, and an unreachable broker is one line too."""

from __future__ import annotations

import json
from pathlib import Path

from broker.api.client.base import ClientError
from tests.unit.broker.cli.fakes import Recorder, harness


def test_serving_exits_zero(tmp_path: Path) -> None:
    fake = Recorder(check="SERVING")
    h = harness(tmp_path, health=fake)
    result = h.invoke("health")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "SERVING\n"
    assert fake.calls == [("check", ("",), {})]
    as_json = h.invoke("health", "--service", "broker.v1.CertificateAuthority", "--output", "json")
    assert json.loads(as_json.stdout) == {
        "service": "broker.v1.CertificateAuthority",
        "status": "SERVING",
    }


def test_not_serving_is_a_refusal(tmp_path: Path) -> None:
    h = harness(tmp_path, health=Recorder(check="NOT_SERVING"))
    result = h.invoke("health")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == "broker: the broker is NOT_SERVING\n"


def test_unreachable_broker_is_one_line(tmp_path: Path) -> None:
    down = ClientError("UNAVAILABLE", "failed to connect to all addresses")
    h = harness(tmp_path, health=Recorder(check=down))
    result = h.invoke("health")
    assert result.exit_code == 1
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("broker: ")
