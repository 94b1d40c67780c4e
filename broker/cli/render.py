"""How the `broker` CLI renders results: JSON documents for scripts, short text for people.

JSON shapes are part of the CLI contract (scripts parse them); text may change.
Times are RFC 3339 in UTC with a trailing "Z"; absent times are JSON null / "-".
A record's JSON is derived from the client's dataclass by one function, `record_json`; a
command prints through `render`, which picks JSON or text by `--output`.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from enum import Enum
from typing import Any

import click

from broker.cli.clients import CAPolicyDocument
from broker.cli.options import output_format

__all__ = [
    "dumps",
    "pem",
    "policy_json",
    "record_json",
    "render",
    "table",
    "text_time",
    "timestamp",
    "wants_json",
]

Text = str | Iterable[str] | Callable[[], str | Iterable[str]]


def timestamp(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def text_time(value: datetime | None) -> str:
    """A time for people: RFC 3339 UTC, or "-" when absent."""
    return timestamp(value) or "-"


def dumps(document: Any) -> str:
    return json.dumps(document, indent=2, sort_keys=False, ensure_ascii=False)


def wants_json(ctx: click.Context) -> bool:
    return output_format(ctx) == "json"


def render(ctx: click.Context, document: Any, text: Text) -> None:
    """Print `document` as JSON under `--output json`, else `text`: a string (one echo), lines
    (one echo each; none prints nothing), or a callable giving either (only called for text)."""
    if wants_json(ctx):
        click.echo(dumps(document))
        return
    shown = text() if callable(text) else text
    if isinstance(shown, str):
        click.echo(shown)
        return
    for line in shown:
        click.echo(line)


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return timestamp(value)
    if isinstance(value, Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return record_json(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def record_json(
    record: Any,
    *,
    rename: Mapping[str, str] | None = None,
    exclude: Collection[str] = (),
    null_if_empty: Collection[str] = (),
    convert: Mapping[str, Callable[[Any], Any]] | None = None,
) -> dict[str, Any]:
    """A client record (a dataclass) as a JSON object, field by field in declaration order:
    times as RFC 3339 UTC, enums as their values, tuples as lists, nested records likewise.
    `rename` maps a field to its published JSON name, `exclude` drops fields, `null_if_empty`
    turns "" into null, `convert` applies a function to a field's value first (e.g. redaction).
    """
    rename = rename or {}
    convert = convert or {}
    out: dict[str, Any] = {}
    for f in dataclasses.fields(record):
        if f.name in exclude:
            continue
        value = getattr(record, f.name)
        if f.name in convert:
            value = convert[f.name](value)
        if f.name in null_if_empty and value in ("", (), []):
            value = None
        out[rename.get(f.name, f.name)] = _plain(value)
    return out


def pem(label: str, der: bytes) -> bytes:
    """PEM armour for DER bytes, e.g. pem("CERTIFICATE", der), 64 characters a line."""
    body = base64.b64encode(der).decode("ascii")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return (
        "\n".join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----"]) + "\n"
    ).encode("ascii")


def table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows as left-aligned columns two spaces apart (the first row is usually a header)."""
    if not rows:
        return []
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def policy_json(policy: CAPolicyDocument) -> dict[str, Any]:
    """The CA policy with its document parsed (`broker ca policy get`, `broker policy get`)."""
    try:
        document: Any = json.loads(policy.document_json) if policy.document_json else None
    except json.JSONDecodeError:
        document = policy.document_json
    return {
        "version": policy.version,
        "author": policy.author,
        "updated_at": timestamp(policy.updated_at),
        "document": document,
    }
