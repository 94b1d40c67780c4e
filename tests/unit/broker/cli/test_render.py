"""`record_json` (a client record as its published JSON) and `render` (JSON or text)."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone

import click
from click.testing import CliRunner

from broker.cli.options import connection_options
from broker.cli.render import record_json, render


class State(enum.StrEnum):
    ACTIVE = "active"


@dataclass(frozen=True)
class Inner:
    at: datetime | None


@dataclass(frozen=True)
class Record:
    id: str
    state: State
    when: datetime
    inner: Inner
    tags: tuple[str, ...]
    note: str
    secret: str


def test_record_json_converts_times_enums_nesting_and_names() -> None:
    plus_two = timezone(timedelta(hours=2))
    record = Record(
        id="r-1",
        state=State.ACTIVE,
        when=datetime(2026, 1, 2, 5, 4, 5, tzinfo=plus_two),
        inner=Inner(None),
        tags=("a", "b"),
        note="",
        secret="s",
    )
    document = record_json(
        record,
        rename={"id": "record_id"},
        exclude={"secret"},
        null_if_empty={"note"},
        convert={"tags": lambda tags: [t.upper() for t in tags]},
    )
    assert document == {
        "record_id": "r-1",
        "state": "active",
        "when": "2026-01-02T03:04:05Z",
        "inner": {"at": None},
        "tags": ["A", "B"],
        "note": None,
    }
    assert list(document) == ["record_id", "state", "when", "inner", "tags", "note"]
    assert json.loads(json.dumps(document)) == document


def test_render_picks_json_or_text_and_builds_text_only_for_text() -> None:
    built: list[str] = []

    def lines() -> list[str]:
        built.append("text")
        return ["one", "two"]

    @click.command()
    @connection_options(on_group=False)
    @click.pass_context
    def show(ctx: click.Context) -> None:
        render(ctx, {"at": datetime(2026, 1, 1, tzinfo=UTC).isoformat()}, lines)

    as_json = CliRunner().invoke(show, ["--output", "json"])
    assert json.loads(as_json.output) == {"at": "2026-01-01T00:00:00+00:00"}
    assert built == []
    assert CliRunner().invoke(show, []).output == "one\ntwo\n"
    assert built == ["text"]
