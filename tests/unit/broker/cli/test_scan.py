"""`broker scan` against a fake scan client: the JSON document (docs/developers.md) and the
text lines name where a managed value was found and which secret it is, never the value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from broker.cli.clients import ClientError
from broker.scan.fingerprints import Fingerprint, ScanKeySet, fingerprint
from tests.unit.broker.cli.fakes import Recorder, harness

KEY = b"k" * 32
REF = "secret://payments/dev/stripe/api-key"
VALUE = b"Zq4vN8tR2xW7pL1mK9sB3dF6"  # pragma: allowlist secret


def _keyset() -> ScanKeySet:
    return ScanKeySet("scan-1", KEY, (Fingerprint(REF, 3, fingerprint(KEY, VALUE), len(VALUE)),))


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # no ./.secrets.baseline of the repository's
    src = tmp_path / "src"
    src.mkdir()
    (src / "settings.py").write_bytes(b"DEBUG = True\nSTRIPE_KEY = '" + VALUE + b"'\n")
    (src / "clean.py").write_bytes(b"print('hello')\n")
    return src


def test_scan_json_names_the_location_and_the_reference(tmp_path: Path, tree: Path) -> None:
    scan = Recorder(fingerprints=_keyset())
    h = harness(tmp_path, scan=scan)
    result = h.invoke(
        "scan", str(tree), "--no-detect-secrets", "--tenant", "acme", "--output", "json"
    )
    assert result.exit_code == 1  # a managed value was found
    document = json.loads(result.stdout)
    assert set(document) == {"hits", "unmanaged", "skipped", "scanned"}
    assert document["hits"] == [
        {"location": str(tree / "settings.py"), "line": 2, "reference": REF, "version": 3}
    ]
    assert document["unmanaged"] == [] and document["skipped"] == []
    assert document["scanned"]["blobs"] == 2
    assert set(document["scanned"]) == {"blobs", "bytes", "seconds"}
    assert VALUE.decode() not in result.stdout + result.stderr
    assert scan.calls == [("fingerprints", (), {"tenant": "acme", "prefix": ""})]


def test_scan_text_one_line_per_hit_and_a_summary_on_stderr(tmp_path: Path, tree: Path) -> None:
    h = harness(tmp_path, scan=Recorder(fingerprints=_keyset()))
    result = h.invoke("scan", str(tree), "--no-detect-secrets")
    assert result.exit_code == 1
    assert result.stdout == (
        f"{tree / 'settings.py'}:2: managed secret {REF} (version 3); answer with: "
        f"broker secrets rotate {REF} --env dev (or broker secrets revoke {REF})\n"
    )
    assert "2 blob(s)" in result.stderr and "1 managed fingerprint(s)" in result.stderr
    assert "1 managed hit(s), 0 unmanaged, 0 skipped" in result.stderr
    assert VALUE.decode() not in result.stdout + result.stderr


def test_clean_scan_exits_zero(tmp_path: Path, tree: Path) -> None:
    (tree / "settings.py").unlink()
    h = harness(tmp_path, scan=Recorder(fingerprints=_keyset()))
    result = h.invoke("scan", str(tree), "--no-detect-secrets", "--output", "json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["hits"] == []
    assert h.invoke("scan", str(tree), "--no-detect-secrets").stdout == ""


def test_offline_scan_asks_the_broker_nothing(tmp_path: Path, tree: Path) -> None:
    scan = Recorder()  # any call would fail: the fake was told nothing
    h = harness(tmp_path, scan=scan)
    result = h.invoke("scan", str(tree), "--offline", "--output", "json")
    assert json.loads(result.stdout)["hits"] == []
    assert scan.calls == [] and h.settings == []


def test_a_refused_fingerprint_request_is_one_line(tmp_path: Path, tree: Path) -> None:
    refused = ClientError("PERMISSION_DENIED", "secrets.scan is not allowed")
    h = harness(tmp_path, scan=Recorder(fingerprints=refused))
    result = h.invoke("scan", str(tree), "--no-detect-secrets")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == "broker: permission denied: secrets.scan is not allowed\n"


def test_scan_without_inputs_is_a_usage_error(tmp_path: Path, tree: Path) -> None:
    result = harness(tmp_path).invoke("scan")
    assert result.exit_code == 2 and "give PATHS, --git RANGE or --image FILE" in result.stderr
