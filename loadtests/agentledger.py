"""Ledger entries one idle agent costs: `broker serve --dev`, one join token and one
registration entry, then `broker agent` (default `--sync-interval`, 5 s) for `--seconds`; counts
the ledger rows written while the agent ran and reports them per agent per hour.

    .venv/bin/python -m loadtests.agentledger [--seconds 180] [--tree DIR]

`--tree` runs the broker and the agent from another source tree (e.g. `git archive` of an
older commit, to measure the agent that polls), with this interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loadtests.agent import _free_port


def _count(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM audit").fetchone()[0])


def _whats(db: Path, after: int) -> dict[str, int]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        rows = conn.execute("SELECT event FROM audit WHERE seq > ?", (after,)).fetchall()
    out: dict[str, int] = {}
    for (event,) in rows:
        what = str(json.loads(event).get("method", "?")).rsplit("/", 1)[-1]
        out[what] = out.get(what, 0) + 1
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.agentledger")
    p.add_argument("--seconds", type=float, default=180.0)
    p.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1])
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="agentledger-"))
    data = tmp / "data"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env.update(PYTHONPATH=str(args.tree), BROKER_ADDR=f"127.0.0.1:{port}",
               BROKER_DATA_DIR=str(data))  # fmt: skip
    cli = [sys.executable, "-m", "broker.cli"]
    serve = subprocess.Popen(
        [*cli, "serve", "--dev", "--data-dir", str(data), "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=args.tree,
    )  # fmt: skip
    agent = None
    try:
        assert serve.stdout is not None
        assert "listening" in serve.stdout.readline()

        def run(*a: str) -> str:
            return subprocess.run(
                [*cli, *a], env=env, cwd=args.tree, capture_output=True, text=True, check=True
            ).stdout.strip()

        node = "spiffe://broker.local/agents/ledger-node"
        run("entry", "create", "--spiffe-id", "spiffe://broker.local/acme/dev/web",
            "--parent-id", node, "--selector", f"unix:uid:{os.getuid()}")  # fmt: skip
        token = run("token", "create", "--spiffe-id", node)
        db = data / "broker.db"
        agent = subprocess.Popen(
            [*cli, "agent", "--server", f"127.0.0.1:{port}",
             "--attest-server", f"127.0.0.1:{port + 1}", "--bundle", str(data / "bundle.pem"),
             "--socket", str(tmp / "agent.sock")],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env={**env, "BROKER_JOIN_TOKEN": token}, cwd=args.tree,
        )  # fmt: skip
        assert agent.stdout is not None
        assert "serving the Workload API" in agent.stdout.readline()
        start = _count(db)
        began = time.monotonic()
        time.sleep(args.seconds)
        rows = _count(db) - start
        elapsed = time.monotonic() - began
        result = {
            "tree": str(args.tree),
            "seconds": round(elapsed, 1),
            "ledger_rows": rows,
            "per_agent_per_hour": round(rows * 3600 / elapsed, 1),
            "by_method": _whats(db, start),
        }
        print(json.dumps(result))
        return 0
    finally:
        for proc in (agent, serve):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()


if __name__ == "__main__":
    sys.exit(main())
