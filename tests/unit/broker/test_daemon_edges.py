"""`broker serve` refuses before creating anything: a data dir another broker holds (its lock),
a listen or metrics address that cannot be bound (issue 15, "the server's edges")."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from broker.daemon import LOCK_FILE, ServeOptions, check_addresses, serve
from broker.errors import FailedPrecondition, Unavailable

_HOLDER = """
import sys
from pathlib import Path
from broker.daemon import lock_data_dir
lock_data_dir(Path(sys.argv[1]))
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_second_broker_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(data_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        before = sorted(p.name for p in data_dir.iterdir())
        with pytest.raises(FailedPrecondition) as refused:
            serve(ServeOptions(dev=True, data_dir=data_dir, listen="127.0.0.1:0"))
        message = str(refused.value)
        assert f"in use by another broker (pid {holder.pid})" in message
        assert "--data-dir" in message
        # nothing was created: no token, no keys, no database, no operator identity
        assert sorted(p.name for p in data_dir.iterdir()) == before == [LOCK_FILE]
    finally:
        assert holder.stdin is not None and holder.stdout is not None
        holder.stdin.close()
        holder.wait(10)
        holder.stdout.close()


def test_a_port_in_use_is_refused_before_any_state_is_created(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(Unavailable) as refused:
            serve(ServeOptions(dev=True, data_dir=data_dir, listen=f"127.0.0.1:{port}"))
    assert f"cannot listen on 127.0.0.1:{port}" in str(refused.value)
    assert "nothing was created" in str(refused.value)
    assert [p.name for p in data_dir.iterdir()] == [LOCK_FILE]  # no hsm/, keys/, broker.db


def test_check_addresses_skips_port_zero_and_empty() -> None:
    check_addresses("", "127.0.0.1:0")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(Unavailable):
            check_addresses("127.0.0.1:0", f"127.0.0.1:{port}")
