"""The [server] keys for refusal sampling and connection limits (issue 20, findings 9, 10)."""

import datetime as dt
from pathlib import Path

import pytest

from broker.config import load_config
from broker.errors import InvalidArgument

BASE = """
trust_domain = "example.org"
[storage]
dsn = "sqlite:///broker.db"
[keys]
uri = "software:path=keys"
[server]
operators = ["spiffe://example.org/broker/operator/alice"]
"""


def _load(tmp_path: Path, extra: str) -> object:
    path = tmp_path / "broker.toml"
    path.write_text(BASE + extra)
    return load_config(path, environ={})


def test_defaults_and_values_from_the_file(tmp_path: Path) -> None:
    server = _load(tmp_path, "").server  # type: ignore[attr-defined]
    assert server.refusal_audit_interval == dt.timedelta(seconds=10)
    assert server.handshake_timeout == dt.timedelta(seconds=10)
    assert server.attest_max_message_bytes == 64 * 1024
    assert (server.max_connections_per_peer, server.connection_gate) == (64, "attest")
    server = _load(
        tmp_path,
        'refusal_audit_interval = "1m"\nhandshake_timeout = "3s"\nmax_connections_per_peer = 8\n'
        'connection_gate = "all"\nattest_max_message_bytes = 16384\nmax_connections = 5000\n',
    ).server  # type: ignore[attr-defined]
    assert server.refusal_audit_interval == dt.timedelta(minutes=1)
    assert server.handshake_timeout == dt.timedelta(seconds=3)
    assert (server.max_connections_per_peer, server.max_connections) == (8, 5000)
    assert (server.connection_gate, server.attest_max_message_bytes) == ("all", 16384)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('handshake_timeout = "1h"', "handshake_timeout"),
        ("max_connections_per_peer = 0", "max_connections_per_peer"),
        ("max_connections = -1", "max_connections"),
        ('connection_gate = "sometimes"', "connection_gate"),
        ("attest_max_message_bytes = 100", "attest_max_message_bytes"),
        ("attest_max_message_bytes = 99999999", "attest_max_message_bytes"),
    ],
)
def test_bad_values_are_refused_with_a_clear_message(
    tmp_path: Path, extra: str, message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        _load(tmp_path, extra + "\n")
