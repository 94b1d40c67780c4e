"""KMS keys through the CLI against a real `broker serve --dev` (SQLite, SoftHSM2 token in the
data dir): create, list, show, rotate, disable, enable, schedule-destroy, cancel-destroy,
one-line refusals for bad input with nothing changed, and `broker report compliance` produced
from that real data dir as JSON, CSV and one offline HTML page (checked in headless Chromium)."""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import BrokerCli, BrokerProcess

pytestmark = pytest.mark.e2e


def _show(cli: BrokerCli, name: str) -> dict[str, Any]:
    document: dict[str, Any] = cli.ok("key", "show", name, "--output", "json").json()
    return document


def test_key_lifecycle_through_the_cli(broker_cli: BrokerCli, broker_server: BrokerProcess) -> None:
    cli = broker_cli
    created = cli.ok(
        "key", "create", "orders-dek", "--purpose", "encrypt", "--type", "aes-256",
        "--owner", "orders", "--environment", "dev", "--classification", "confidential",
        "--rotation-period", "90d", "--output", "json",
    ).json()  # fmt: skip
    assert created["current_version"] == 1 and created["state"] == "enabled"
    assert created["rotation_period_seconds"] == 90 * 86400
    listed = cli.ok("key", "list", "--output", "json").json()
    assert [k["name"] for k in listed] == ["orders-dek"]

    assert "rotated key orders-dek" in cli.ok("key", "rotate", "orders-dek").stdout
    shown = _show(cli, "orders-dek")
    assert shown["current_version"] == 2 and [v["version"] for v in shown["versions"]] == [1, 2]

    cli.ok("key", "disable", "orders-dek")
    cli.ok("key", "schedule-destroy", "orders-dek", "--after", "30d")
    assert _show(cli, "orders-dek")["state"] == "pending-destroy"
    cli.ok("key", "cancel-destroy", "orders-dek")
    cli.ok("key", "enable", "orders-dek")
    assert _show(cli, "orders-dek")["state"] == "enabled"

    before = _show(cli, "orders-dek")
    for args, text in [
        (("key", "create", "short", "--purpose", "encrypt", "--type", "aes-256", "--owner",
          "orders", "--environment", "dev", "--classification", "internal",
          "--rotation-period", "12h"), "between 1 day and 10 years"),
        (("key", "create", "long", "--purpose", "encrypt", "--type", "aes-256", "--owner",
          "orders", "--environment", "dev", "--classification", "internal",
          "--rotation-period", "3651d"), "between 1 day and 10 years"),
        (("key", "create", "mismatch", "--purpose", "sign", "--type", "aes-256", "--owner",
          "orders", "--environment", "dev", "--classification", "internal",
          "--rotation-period", "90d"), "cannot sign"),
        (("key", "rotate", "nope"), "no key"),
        (("key", "schedule-destroy", "orders-dek", "--after", "30d"), "not disabled"),
    ]:  # fmt: skip
        result = cli.run(*args)
        assert result.returncode != 0, result.describe()
        assert len(result.stderr_lines) == 1 and text in result.stderr, result.describe()
        assert "Traceback" not in result.stderr
    assert _show(cli, "orders-dek") == before
    assert [k["name"] for k in cli.ok("key", "list", "--output", "json").json()] == ["orders-dek"]


class _Page(HTMLParser):
    """Collects table ids, rows per table, and whether anything external is referenced."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, int] = {}
        self.current = ""
        self.external: list[str] = []
        self.svg_bars = 0
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "table":
            self.current = values.get("id") or ""
            self.tables[self.current] = 0
        elif tag == "tr" and self.current:
            self.tables[self.current] += 1
        elif tag == "rect" and values.get("class") == "bar":
            self.svg_bars += 1
        elif tag == "script":
            self.scripts += 1
        for name in ("src", "href"):
            if values.get(name):
                self.external.append(str(values[name]))


def test_compliance_report_from_a_real_data_dir(
    broker_cli: BrokerCli, broker_server: BrokerProcess, tmp_path: Path
) -> None:
    cli = broker_cli
    cli.ok(
        "key", "create", "report-key", "--purpose", "sign", "--type", "ec-p256",
        "--owner", "billing", "--environment", "dev", "--classification", "pii",
        "--rotation-period", "1d",
    )  # fmt: skip
    value = tmp_path / "value"
    value.write_bytes(b"sk_report_e2e")
    cli.ok(
        "secrets", "put", "secret://billing/dev/api", "--value-file", str(value),
        "--owner", "billing", "--classification", "confidential", "--rotation-period", "90d",
    )  # fmt: skip
    cli.ok("audit", "checkpoint", "--new")
    document = cli.ok("report", "compliance", "--output", "json").json()
    names = {(c["kind"], c["name"]) for c in document["credentials"]}
    assert ("key", "report-key") in names and ("secret", "secret://billing/dev/api") in names
    key_row = next(c for c in document["credentials"] if c["name"] == "report-key")
    assert key_row["owner"] == "billing" and key_row["classification"] == "pii"
    assert key_row["rotation_due"] and key_row["overdue"] is False and key_row["missing"] == []
    assert document["audit"]["intact"] is True and document["audit"]["checkpoint_seq"] >= 1
    assert document["operators"] and document["summary"]["credentials"] >= 2

    text = cli.ok("report", "compliance", "--output", "csv").stdout
    rows = list(csv.DictReader(io.StringIO(text)))
    assert any(r["section"] == "credential" and r["name"] == "report-key" for r in rows)
    assert any(r["section"] == "audit" and r["state"] == "intact" for r in rows)

    out = tmp_path / "report.html"
    cli.ok("report", "compliance", "--output", "html", "--out", str(out))
    page = _Page()
    page.feed(out.read_text())
    assert page.tables["credentials"] >= 3  # header + the key + the secret
    assert {"grants", "breakglass", "operators"} <= page.tables.keys()
    assert page.svg_bars >= 2 and page.scripts == 0 and page.external == []
    assert "sk_report_e2e" not in out.read_text()
    _check_in_chromium(out, tmp_path)


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    message = "Chromium is not installed (apt-get install chromium)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message}; CI installs it (scripts/run test)", pytrace=False)
    pytest.skip(message)


def _check_in_chromium(page: Path, tmp_path: Path) -> None:
    """The page renders in headless Chromium with the network off: its DOM after load has the
    tables and the plot, and a screenshot is made."""
    chromium = _chromium()
    common = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
    ]  # fmt: skip
    dom = subprocess.run(
        [*common, "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert dom.returncode == 0, dom.stderr[-2000:]
    for marker in ('id="credentials"', 'id="grants"', 'id="operators"', 'id="rotation-age"'):
        assert marker in dom.stdout, marker
    shot = tmp_path / "report.png"
    made = subprocess.run(
        [*common, f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert made.returncode == 0 and shot.stat().st_size > 10_000, made.stderr[-2000:]


def test_rsa_3072_signing_key_through_the_cli(
    broker_cli: BrokerCli, broker_server: BrokerProcess
) -> None:
    """Made after the other tests' keys (the server is shared by the module): an rsa-3072 key
    is generated in the data dir's SoftHSM2 token and rotates; an RSA encryption key is refused
    in one line with nothing created."""
    cli = broker_cli
    created = cli.ok(
        "key", "create", "invoices-rsa", "--purpose", "sign", "--type", "rsa-3072",
        "--owner", "invoices", "--environment", "dev", "--classification", "internal",
        "--output", "json",
    ).json()  # fmt: skip
    assert created["key_type"] == "rsa-3072" and created["purpose"] == "sign"
    assert created["current_version"] == 1 and created["state"] == "enabled"
    cli.ok("key", "rotate", "invoices-rsa")
    cli.ok("key", "rotate", "invoices-rsa")
    shown = _show(cli, "invoices-rsa")
    assert shown["current_version"] == 3
    assert [v["version"] for v in shown["versions"]] == [1, 2, 3]

    names = [k["name"] for k in cli.ok("key", "list", "--output", "json").json()]
    result = cli.run(
        "key", "create", "invoices-rsa-enc", "--purpose", "encrypt", "--type", "rsa-3072",
        "--owner", "invoices", "--environment", "dev", "--classification", "internal",
    )  # fmt: skip
    assert result.returncode != 0, result.describe()
    assert len(result.stderr_lines) == 1 and "cannot encrypt" in result.stderr, result.describe()
    assert "Traceback" not in result.stderr
    assert [k["name"] for k in cli.ok("key", "list", "--output", "json").json()] == names
    assert _show(cli, "invoices-rsa") == shown
