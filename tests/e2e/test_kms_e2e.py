"""KMS keys through the CLI against a real `broker serve --dev` (SQLite, SoftHSM2 token in the
data dir): create, list, show, rotate, disable, enable, schedule-destroy, cancel-destroy, and
one-line refusals for bad input with nothing changed."""

from __future__ import annotations

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
