"""`broker db static-role ...` and `broker db static-creds` against a fake client: the JSON
documents (docs/database.md), the text lines, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

from broker.api.client.static_roles import StaticCreds, StaticRole
from tests.unit.broker.cli.fakes import T0, T1, Z0, Z1, CliHarness, Recorder, harness

ROLE = StaticRole(
    name="app",
    connection="pg",
    username="app_user",
    owner="web",
    tenant="acme",
    environment="prod",
    rotation_period_seconds=30 * 86400,
    rotation_statements="",
    version=1,
    rotated_at=T0,
    next_rotation_at=T1,
    created_at=T0,
)
KEYS = {
    "name",
    "connection",
    "username",
    "owner",
    "tenant",
    "environment",
    "rotation_period",
    "rotation_statements",
    "version",
    "rotated_at",
    "next_rotation_at",
    "created_at",
    "rotation_in_flight",
}


def _h(tmp_path: Path, **answers: object) -> tuple[Recorder, CliHarness]:
    fake = Recorder(**answers)
    return fake, harness(tmp_path, static_roles=fake)


def test_add_sends_the_period_and_statements_and_prints_the_role(tmp_path: Path) -> None:
    fake, h = _h(tmp_path, add=ROLE)
    statements = tmp_path / "rotate.sql"
    statements.write_text("ALTER ROLE {{name}} PASSWORD {{password}};")
    result = h.invoke(
        "db", "static-role", "add", "app", "--connection", "pg", "--username", "app_user",
        "--rotation-period", "30d", "--rotation-statements", str(statements),
        "--owner", "web", "--output", "json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert set(document) == KEYS
    assert document["rotation_period"] == 30 * 86400
    assert document["rotation_statements"] is None
    assert (document["rotated_at"], document["next_rotation_at"]) == (Z0, Z1)
    name, args, kwargs = fake.calls[0]
    assert (name, args) == ("add", ("app", "pg", "app_user"))
    assert kwargs["rotation_period_seconds"] == 30 * 86400
    assert kwargs["rotation_statements"] == "ALTER ROLE {{name}} PASSWORD {{password}};"
    text = h.invoke(
        "db", "static-role", "add", "app", "--connection", "pg", "--username", "app_user"
    ).stdout
    assert text == f"static role app added for app_user on pg (version 1, next rotation {Z1})\n"


def test_rotate_needs_reason_and_ticket(tmp_path: Path) -> None:
    fake, h = _h(tmp_path, rotate=ROLE)
    refused = h.invoke("db", "static-role", "rotate", "app", "--reason", "personnel-change")
    assert refused.exit_code == 2
    assert fake.calls == []
    done = h.invoke(
        "db", "static-role", "rotate", "app", "--reason", "personnel-change", "--ticket", "T-1"
    )
    assert done.exit_code == 0
    assert fake.calls == [("rotate", ("app", "personnel-change", "T-1"), {})]
    assert done.stdout.startswith("static role app rotated (version 1")


def test_static_creds_json_and_text(tmp_path: Path) -> None:
    _, h = _h(tmp_path, creds=StaticCreds("app_user", "s3cret-pw", 4, T1))
    document = json.loads(h.invoke("db", "static-creds", "app", "--output", "json").stdout)
    assert document == {
        "username": "app_user",
        "password": "s3cret-pw",
        "version": 4,
        "next_rotation_at": Z1,
    }
    lines = h.invoke("db", "static-creds", "app").stdout.splitlines()
    assert lines[0].split() == ["username", "app_user"]
    assert lines[1].split() == ["password", "s3cret-pw"]


def test_list_show_delete(tmp_path: Path) -> None:
    _, h = _h(tmp_path, list=[ROLE], get=ROLE, delete=None)
    listed = json.loads(h.invoke("db", "static-role", "list", "--output", "json").stdout)
    assert [set(r) for r in listed] == [KEYS]
    table = h.invoke("db", "static-role", "list").stdout.splitlines()
    assert table[0].split() == [
        "NAME",
        "CONNECTION",
        "USERNAME",
        "OWNER",
        "VERSION",
        "NEXT",
        "ROTATION",
    ]
    assert table[1].split() == ["app", "pg", "app_user", "acme/prod/web", "1", Z1]
    shown = h.invoke("db", "static-role", "show", "app").stdout
    assert "password" not in shown
    assert h.invoke("db", "static-role", "delete", "app").stdout == "static role app deleted\n"


def test_a_refusal_is_one_line_on_stderr(tmp_path: Path) -> None:
    from broker.api.client.base import ClientError

    _, h = _h(
        tmp_path, creds=ClientError("PERMISSION_DENIED", "db.creds refused: no such static role")
    )
    result = h.invoke("db", "static-creds", "app")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("broker: ")
