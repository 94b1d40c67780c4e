"""The Promela model of the rollout state machine (broker/rollout/rollout.pml) checked by spin:
no consumer left on a revoked version, the old version never revoked while a consumer uses it
(assertions), a failed stage always ends in rollback (LTL, under weak fairness), across broker
crashes and restarts. Each deliberately broken variant must be refuted, which shows the check
can fail. Under CI=true a missing spin or gcc fails the test (scripts/run installs both)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

MODEL = Path(__file__).resolve().parents[4] / "broker" / "rollout" / "rollout.pml"
CLAIM = "failed_rolls_back"


def _tools() -> None:
    missing = [tool for tool in ("spin", "gcc") if shutil.which(tool) is None]
    if missing:
        message = f"{', '.join(missing)} not installed (Debian packages spin, gcc)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def verify(tmp_path: Path, *defines: str) -> str:
    """Generate, compile and run the verifier; its report."""
    _tools()
    work = tmp_path / ("-".join(defines) or "model")
    work.mkdir()
    shutil.copy(MODEL, work / "rollout.pml")
    flags = [f"-D{d}" for d in defines]

    def run(*argv: str, timeout: float = 300) -> str:
        done = subprocess.run(
            argv, cwd=work, capture_output=True, text=True, timeout=timeout, check=False
        )
        return done.stdout + done.stderr

    generated = run("spin", *flags, "-a", "rollout.pml")
    assert (work / "pan.c").exists(), generated
    compiled = run("gcc", "-O2", "-DNFAIR=3", "-DMEMLIM=2048", "-w", "-o", "pan", "pan.c")
    assert (work / "pan").exists(), compiled
    return run("./pan", "-a", "-f", "-N", CLAIM, timeout=600)


def errors(report: str) -> int:
    found = re.search(r"errors: (\d+)", report)
    assert found is not None, report
    return int(found.group(1))


def test_the_model_holds(tmp_path: Path) -> None:
    report = verify(tmp_path)
    assert errors(report) == 0, report
    assert "never claim         \t+ (failed_rolls_back)" in report
    assert "assertion violations\t+" in report
    assert "acceptance   cycles \t+ (fairness enabled)" in report
    # The whole state space was searched (not cut short by memory or depth).
    assert "Search not completed" not in report and "max search depth too small" not in report
    states = re.search(r"([\d.e+]+) states, stored", report)
    assert states is not None and float(states.group(1)) > 100_000, report


@pytest.mark.parametrize(
    ("define", "refutation"),
    [
        ("BROKEN_NO_ROLLBACK", "acceptance cycle"),
        ("BROKEN_EARLY_REVOKE", "assertion violated  !((running[0]&&(holds[0]==1)))"),
        ("BROKEN_ROUTE_OLD", "assertion violated  !(revoked[v])"),
    ],
)
def test_spin_refutes_each_broken_variant(tmp_path: Path, define: str, refutation: str) -> None:
    report = verify(tmp_path, define)
    assert errors(report) >= 1, report
    assert refutation in report, report
