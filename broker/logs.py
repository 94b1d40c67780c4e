"""Structured logs: one JSON object per line on stderr, with secret material redacted.

Every record becomes `{"ts", "level", "logger", "pid", "msg", ...}`; fields passed with
`log.info("...", extra={"fields": {...}})` are added under their own names. Redaction, applied
to the message, its arguments, the extra fields and exception text:

- a field whose *name* says it holds a secret (password, secret, token, private key, PIN,
  credential, authorization, api key, DSN, or exactly `value`) is replaced by "[REDACTED]";
- inside any string: the password in a URL's user-info part, a PEM private key
  block, a compact JWT, and `password=...`/`token: ...` style pairs are replaced.

Secrets are named in logs by a hashed reference only: `hashed_ref(reference)`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import re
import sys
from collections.abc import Mapping
from typing import Any, TextIO

__all__ = ["REDACTED", "JsonFormatter", "configure", "hashed_ref", "redact", "redact_text"]

REDACTED = "[REDACTED]"

_SECRET_KEY = re.compile(
    r"(?i)(passw(or)?d|secret|token|private[_-]?key|key[_-]?pem|\bpin\b|^pin$|credential"
    r"|authorization|api[_-]?key|dsn|plaintext|^value$)"
)
_TEXT_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(r"-----BEGIN ([A-Z ]*)PRIVATE KEY-----.*?(-----END \1PRIVATE KEY-----|$)", re.S),
        "[REDACTED PRIVATE KEY]",
    ),
    (re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]*:)[^@\s/]+@"), r"\1" + REDACTED + "@"),
    (re.compile(r"\beyJ[A-Za-z0-9_-]+\.eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"), "[REDACTED JWT]"),
    (
        re.compile(
            r"(?i)\b(passw(?:or)?d|secret|token|api[_-]?key|pin)(\s*[=:]\s*)(\"[^\"]*\"|'[^']*'|\S+)"
        ),
        r"\1\2" + REDACTED,
    ),
)
_STANDARD = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)


def hashed_ref(reference: str) -> str:
    """What a log line carries instead of a reference: `sha256` and the first 16 hex digits of
    its SHA-256 (never the reference, never the value)."""
    return "sha256:" + hashlib.sha256(reference.encode()).hexdigest()[:16]


def redact_text(text: str) -> str:
    for pattern, replacement in _TEXT_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def redact(value: Any, key: str = "") -> Any:
    """A copy of `value` safe to log: secret-named fields replaced, strings scrubbed."""
    if key and _SECRET_KEY.search(key):
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, bytes | bytearray):
        return f"<{len(value)} bytes>"
    if isinstance(value, Mapping):
        return {str(k): redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [redact(v) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return redact_text(str(value))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not lose the line
            message = f"{record.msg!r} {record.args!r}"
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "msg": redact_text(message),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            for k, v in fields.items():
                if str(k) not in out:
                    out[str(k)] = redact(v, str(k))
        for k, v in vars(record).items():
            if k not in _STANDARD and k != "fields" and k not in out:
                out[k] = redact(v, k)
        if record.exc_info:
            out["exc"] = redact_text(self.formatException(record.exc_info))
        return json.dumps(out, default=str, ensure_ascii=False)


def configure(level: int = logging.INFO, stream: TextIO | None = None) -> None:
    """Send the root logger's records, as JSON lines, to `stream` (stderr by default)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
