"""Files the operator hands to a command (CSRs, policies, statements, tokens): read here so a
missing or unreadable file is one refusal naming it."""

from __future__ import annotations

import json
import tomllib
from datetime import date, time
from pathlib import Path
from typing import Any

from broker.cli.refusals import Refusal, one_line

__all__ = ["policy_document_json", "read_input_file", "read_text_file"]


def read_input_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise Refusal(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def read_text_file(path: Path, what: str) -> str:
    """The file as UTF-8 text (a BOM is dropped); refused when it is not UTF-8."""
    data = read_input_file(path, what)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise Refusal(f"{what} {path} is not UTF-8 text") from None


def _json_value(value: Any) -> Any:
    if isinstance(value, date | time):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not representable in JSON")


def policy_document_json(path: Path, data: bytes) -> str:
    """The policy file as JSON text: .toml is TOML, .json is JSON, anything else is sniffed
    (JSON first). Raises Refusal naming the file and the parse error."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise Refusal(f"policy file {path} is not UTF-8 text") from None
    suffix = path.suffix.lower()
    document: Any
    if suffix == ".toml":
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise Refusal(one_line(f"policy file {path} is not valid TOML: {exc}")) from None
    elif suffix == ".json":
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise Refusal(one_line(f"policy file {path} is not valid JSON: {exc}")) from None
    else:
        try:
            document = json.loads(text)
        except json.JSONDecodeError as json_error:
            try:
                document = tomllib.loads(text)
            except tomllib.TOMLDecodeError:
                raise Refusal(
                    one_line(f"policy file {path} is neither JSON nor TOML: {json_error}")
                ) from None
    if not isinstance(document, dict):
        raise Refusal(f"policy file {path} must hold an object (a table), not a list or value")
    if _is_policy_get_output(document):
        # What `broker ca policy get --output json` printed: set its document, so the output
        # of `get` feeds back into `set` unchanged (version/author/updated_at are the broker's).
        document = document["document"]
    return json.dumps(document, default=_json_value, ensure_ascii=False)


_POLICY_GET_KEYS = frozenset({"version", "author", "updated_at", "document"})


def _is_policy_get_output(document: dict[str, Any]) -> bool:
    return (
        "document" in document
        and set(document) <= _POLICY_GET_KEYS
        and isinstance(document["document"], dict)
    )
