"""`broker serve --workers 2`: two processes share the port and the storage; a rotation made
through one is followed by the other within seconds; the audit chain stays one chain; SIGTERM
stops every worker."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest

from tests.e2e.conftest import BrokerCli, BrokerProcess

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    root = tmp_path_factory.mktemp("workers")
    server = BrokerProcess(
        root / "data", root, ["--dev", "--data-dir", str(root / "data"), "--workers", "2"]
    )
    server.start()
    try:
        yield server
    finally:
        server.ensure_stopped()


def _worker_pids(server: BrokerProcess) -> list[int]:
    """Children of the supervisor, read from /proc (no procps needed)."""
    assert server._process is not None
    parent = server._process.pid
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == parent:
            children.append(int(entry.name))
    return children


def _kids(cli: BrokerCli, td: str, n: int) -> set[str]:
    kids = set()
    for _ in range(n):  # every CLI call is a new connection: the kernel spreads them
        token = cli.ok(
            "jwt", "mint", "--spiffe-id", f"spiffe://{td}/default/dev/web", "--audience", "db"
        ).stdout.strip()
        kids.add(jwt.get_unverified_header(token)["kid"])
    return kids


def test_two_workers_serve_follow_rotation_and_keep_one_chain(
    workers: BrokerProcess, tmp_path: Path
) -> None:
    assert "workers: 2" in workers.listening_line
    assert len(_worker_pids(workers)) >= 2
    cli = BrokerCli(workers, tmp_path)
    status = cli.ok("ca", "status", "--output", "json").json()
    td = status["trust_domain"]
    assert len(_kids(cli, td, 8)) == 1

    cli.ok("ca", "rotate", "--force")
    new_kid = next(
        a["jwt_kid"]
        for a in cli.ok("ca", "status", "--output", "json").json()["authorities"]
        if a["kind"] == "issuing" and a["state"] == "active"
    )
    deadline = time.monotonic() + 15
    while True:  # every worker picks the rotation up within its sync interval (2 s)
        kids = _kids(cli, td, 8)
        if kids == {new_kid}:
            break
        assert time.monotonic() < deadline, f"a worker still signs with {kids - {new_kid}}"
        time.sleep(1)

    verify = cli.ok("audit", "verify").stdout
    assert "intact" in verify


def test_sigterm_stops_every_worker(workers: BrokerProcess) -> None:
    pids = _worker_pids(workers)
    assert pids
    assert workers.stop() == 0
    deadline = time.monotonic() + 10
    while alive := [pid for pid in pids if Path(f"/proc/{pid}").exists()]:
        assert time.monotonic() < deadline, f"workers still running: {alive}"
        time.sleep(0.1)
