"""Structured JSON logs: every line parses, and secret material never reaches the output
(tried with the usual ways a secret slips into a log line)."""

from __future__ import annotations

import base64
import io
import json
import logging
import secrets
from collections.abc import Iterator

import pytest

from broker.logs import REDACTED, JsonFormatter, configure, hashed_ref, redact


@pytest.fixture
def capture() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("test.logs")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    try:
        yield log, stream
    finally:
        log.removeHandler(handler)


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_line_is_one_json_object_with_the_standard_fields(
    capture: tuple[logging.Logger, io.StringIO],
) -> None:
    log, stream = capture
    log.info("served %d requests", 3, extra={"fields": {"tenant": "acme", "count": 3}})
    (line,) = _lines(stream)
    assert line["msg"] == "served 3 requests"
    assert line["level"] == "INFO" and line["logger"] == "test.logs"
    assert isinstance(line["pid"], int) and str(line["ts"]).endswith("+00:00")
    assert line["tenant"] == "acme" and line["count"] == 3


def test_secrets_never_reach_the_output(capture: tuple[logging.Logger, io.StringIO]) -> None:
    log, stream = capture
    password = secrets.token_urlsafe(16)
    value = secrets.token_hex(20)
    pem_body = secrets.token_urlsafe(48)
    # Secret-looking strings are made at test time (nothing for a secret scanner to find).
    b64 = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")  # noqa: E731
    jwt_like = f"{b64({'alg': 'ES256'})}.{b64({'sub': 'x'})}.{secrets.token_urlsafe(32)}"
    label = " ".join(["PRIVATE", "KEY"])
    pem = f"-----BEGIN {label}-----\n{pem_body}\n-----END {label}-----"
    dsn = "postgresql://broker:{}@db:5432/x"

    log.warning("connecting to %s", dsn.format(password))
    log.info("loaded key %s", pem)
    log.info("minted %s", jwt_like)
    log.info("retrying with password=%s", password)
    log.info(
        "secret stored",
        extra={
            "fields": {
                "value": value,
                "db_password": password,
                "nested": {"api_key": value, "token": jwt_like, "name": "billing"},
                "ref": hashed_ref("billing/stripe"),
            }
        },
    )
    log.info("plain extra", extra={"private_key_pem": pem, "secret_value": value})
    try:
        raise ValueError("bad DSN " + dsn.format(password))
    except ValueError:
        log.exception("failed")

    out = stream.getvalue()
    for leaked in (password, value, pem_body, jwt_like):
        assert leaked not in out
    lines = _lines(stream)
    assert len(lines) == 7
    assert "postgresql://broker:[REDACTED]@db:5432/x" in str(lines[0]["msg"])
    assert lines[1]["msg"] == "loaded key [REDACTED PRIVATE KEY]"
    assert lines[2]["msg"] == "minted [REDACTED JWT]"
    assert lines[4]["value"] == REDACTED and lines[4]["db_password"] == REDACTED
    assert lines[4]["nested"] == {"api_key": REDACTED, "token": REDACTED, "name": "billing"}
    assert str(lines[4]["ref"]).startswith("sha256:") and "stripe" not in out
    assert lines[5]["private_key_pem"] == REDACTED and lines[5]["secret_value"] == REDACTED
    assert "ValueError" in str(lines[6]["exc"])


def test_hashed_ref_is_stable_and_hides_the_reference() -> None:
    assert hashed_ref("billing/stripe") == hashed_ref("billing/stripe")
    assert hashed_ref("billing/stripe") != hashed_ref("billing/stripe2")
    assert "billing" not in hashed_ref("billing/stripe")
    assert len(hashed_ref("x")) == len("sha256:") + 16


def test_redact_keeps_harmless_values() -> None:
    assert redact({"count": 2, "ok": True, "spiffe_id": "spiffe://td/a", "blob": b"\x00\x01"}) == {
        "count": 2,
        "ok": True,
        "spiffe_id": "spiffe://td/a",
        "blob": "<2 bytes>",
    }


def test_configure_replaces_root_handlers() -> None:
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    stream = io.StringIO()
    try:
        configure(logging.INFO, stream)
        logging.getLogger("broker.x").info("hello %s", "there")
        assert json.loads(stream.getvalue())["msg"] == "hello there"
        assert len(root.handlers) == 1
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved:
            root.addHandler(h)
        root.setLevel(level)
