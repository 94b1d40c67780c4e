"""CI smoke runs of the load-test suite with the SLO gate on: `python -m loadtests run
--scenario mixed|rotation --smoke --slo` starts its own dev broker (SoftHSM2), drives the mixed
load (X.509 and JWT SVIDs, secret reads; in `rotation` while the CA and the secret are
rotated), and must pass the gate and write both reports.
A few seconds; no OpenBao (the comparison is a benchmark, not a CI gate).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.softhsm]

ROOT = Path(__file__).resolve().parents[2]


def _loadtests(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    return subprocess.run(
        [sys.executable, "-m", "loadtests", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_list_names_every_scenario() -> None:
    res = _loadtests("list")
    assert res.returncode == 0, res.stderr
    names = [line.split()[0] for line in res.stdout.splitlines() if line.strip()]
    assert {"svid-csr", "jwt-mint", "mixed", "rotation"} <= set(names)


def _smoke(out: Path, scenario: str, *extra: str) -> dict:
    res = _loadtests(
        "run", "--scenario", scenario, "--smoke", "--slo", "--report", str(out), *extra
    )
    assert res.returncode == 0, f"stdout:\n{res.stdout}\nstderr:\n{res.stderr[-4000:]}"
    assert "SLO gate: all" in res.stdout
    rep = json.loads((out / "report.json").read_text())
    assert rep["slo"]["met"] is True and rep["slo"]["missed"] == []
    return rep


def test_mixed_smoke_passes_the_slo_gate(tmp_path: Path) -> None:
    """Every SLO at its real objective: p95 < 150 ms, availability >= 99.95 %."""
    out = tmp_path / "report"
    rep = _smoke(out, "mixed")
    (run,) = rep["runs"]
    ops = run["operations"]
    assert set(ops) == {"svid-csr", "jwt-mint", "secret-get"}
    for name in ops:
        assert ops[name]["requests_ok"] > 0
        assert ops[name]["error_count"] == 0
    judged = {(v["slo"], v["operation"]) for v in rep["slo"]["verdicts"]}
    assert judged == {(slo, op) for slo in ("latency p95", "availability") for op in ops}
    assert {v["objective"] for v in rep["slo"]["verdicts"] if v["slo"] == "latency p95"} == {
        "< 150 ms"
    }
    # the issued credentials were checked before the load
    assert rep["targets"]["broker"]["sample_certificate"]["chain_len"] == 2
    assert rep["targets"]["broker"]["sample_jwt-mint"]["alg"] == "ES256"

    page = (out / "report.html").read_text()
    assert "<svg" in page and "SLO gate" in page


def test_rotation_smoke_keeps_every_request_and_rotation(tmp_path: Path) -> None:
    """The CA and the secret are rotated during the load; availability (>= 99.95 %) and
    rotation success (>= 99 %) are judged at their real objectives. The p95 objective is
    loosened to 2 s here only: with 2 clients and a 2 s window, the one forced CA rotation
    (two HSM key generations holding the PKCS#11 lock, ~0.2-0.6 s on a busy machine) can
    hold more than 5 % of an operation's few requests (docs/loadtests.md measures the
    rotation scenario's latency at full length)."""
    rep = _smoke(tmp_path / "report", "rotation", "--slo-p95-ms", "2000")
    (run,) = rep["runs"]
    ops = run["operations"]
    assert set(ops) == {
        "svid-csr", "jwt-mint", "secret-get", "ca-rotate", "secret-rotate",
        "secret-rollout-rotate",
    }  # fmt: skip
    assert ops["ca-rotate"]["requests_ok"] >= 1  # the CA did rotate during the load
    assert ops["secret-rotate"]["requests_ok"] >= 1  # and so did the secret
    # A staged rollout (stages 50%,100%, 1 s bake) was started and followed to completion.
    assert ops["secret-rollout-rotate"]["requests_ok"] >= 1
    for name in ("svid-csr", "jwt-mint", "secret-get"):
        assert ops[name]["requests_ok"] > 0
        assert ops[name]["error_count"] == 0
    judged = {(v["slo"], v["operation"]) for v in rep["slo"]["verdicts"]}
    assert ("rotation success", "ca-rotate") in judged
    assert ("rotation success", "secret-rotate") in judged
    assert ("rotation success", "secret-rollout-rotate") in judged
    assert ("availability", "secret-get") in judged
    # A relying party verified every SVID the load received (loadtests/relyingparty.py).
    assert ("svid verification", "relying-party") in judged
    checked = run["notes"]["svid_verification"]
    assert checked["svid_verification_failures"] == 0, checked["failure_samples"]
    assert checked["svids_verified"] > 0


def test_a_missed_slo_exits_4_and_names_it(tmp_path: Path) -> None:
    """An objective no real broker can meet (p95 under 1 µs): the gate must fail, exit 4,
    and name the latency SLO of the operation that missed it."""
    out = tmp_path / "r"
    res = _loadtests(
        "run",
        "--scenario",
        "svid-csr",
        "--smoke",
        "--slo",
        "--slo-p95-ms",
        "0.001",
        "--report",
        str(out),
    )
    assert res.returncode == 4, res.stderr[-3000:]
    assert "SLO missed: latency p95 of svid-csr" in res.stderr
    rep = json.loads((out / "report.json").read_text())
    assert rep["slo"]["met"] is False
    assert [(m["slo"], m["operation"]) for m in rep["slo"]["missed"]] == [
        ("latency p95", "svid-csr")
    ]


def test_an_unreachable_broker_is_no_pass(tmp_path: Path) -> None:
    """No broker identity or server: exit 3, and the report does not claim the SLOs held."""
    res = _loadtests(
        "run",
        "--scenario",
        "svid-csr",
        "--smoke",
        "--slo",
        "--report",
        str(tmp_path / "r"),
        "--server",
        "127.0.0.1:9",
        "--data-dir",
        str(tmp_path / "data"),
    )
    assert res.returncode == 3
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert rep["slo"]["met"] is False


def test_preload_smoke_fills_the_tables_and_the_ledger_still_verifies(tmp_path: Path) -> None:
    """`python -m loadtests preload --smoke`: the benchmark of issue 18 item 5 at tens of rows.
    Both phases serve secret reads and SVIDs without an error; the preloaded rows are in the
    tables; `broker audit verify` (online, and offline with the broker stopped) passes over
    the preloaded ledger. No timing is asserted."""
    out = tmp_path / "report"
    res = _loadtests("preload", "--smoke", "--report", str(out), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads((out / "preload.json").read_text())
    empty, full = rep["empty"], rep["preloaded"]
    for phase in (empty, full):
        for scenario in ("secret-get", "svid-csr"):
            run = phase["runs"][scenario]
            assert run["throughput_rps"] > 0 and not run["errors"], (scenario, run)
        assert phase["audit_verify"]["exit"] == 0, phase["audit_verify"]
        assert "intact" in phase["audit_verify"]["output"][0]
    offline = full["audit_verify_offline"]
    assert offline["exit"] == 0 and "intact" in offline["output"][0], offline
    verified = int(offline["output"][0].split(":")[1].split()[0])
    assert verified >= empty["counts"]["audit"] + 50
    assert full["counts"]["secrets"] == empty["counts"]["secrets"] + 20
    assert full["counts"]["db_leases"] == empty["counts"]["db_leases"] + 20
    assert full["counts"]["registration_entries"] == empty["counts"]["registration_entries"] + 10
    assert "| broker start |" in res.stdout


def test_fleet_smoke_connects_every_agent_and_pushes_a_rotation_to_all(tmp_path: Path) -> None:
    """`--scenario fleet --smoke`: a handful of simulated agents over two processes against
    two replicas on one storage; every agent attests, holds its sync stream and its SVIDs, and
    the forced CA rotation reaches every agent's stream. Figures are measured, not judged."""
    out = tmp_path / "fleet"
    res = _loadtests(
        "run", "--scenario", "fleet", "--smoke", "--agents", "6", "--procs", "2",
        "--replicas", "2", "--report", str(out),
    )  # fmt: skip
    assert res.returncode == 0, f"stdout:\n{res.stdout}\nstderr:\n{res.stderr[-4000:]}"
    rep = json.loads((out / "fleet.json").read_text())
    assert rep["agents"] == 6 and rep["connected"] == 6 and rep["replicas"] == 2
    assert rep["errors"] == 0, rep["error_samples"]
    assert rep["rotation"]["agents_reached"] == 6
    assert rep["rotation"]["all_reached_s"] is not None
    assert rep["kib_per_agent"] is not None
    assert "CA rotation pushed to 6 agents" in res.stdout
