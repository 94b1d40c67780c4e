"""The SLO gate: the standard's service-level objectives checked against the broker's runs.

- latency: every operation's p95 under its scenario's `slo_p95_ms` (150 ms, the standard's
  secret-fetch SLO, unless a scenario says otherwise);
- availability: at least 99.95 % of every operation's requests in the window succeed;
- rotation: at least 99 % of the rotations made during a rotation scenario succeed (the
  operations named `*-rotate`: `ca-rotate`, `secret-rotate`);
- SVID verification: when a relying party verified the SVIDs the load received (the run's
  `svid_verification` note, loadtests/relyingparty.py), zero failures out of at least one.

Only the broker's runs are judged (a peer is a comparison, not a subject). An operation with
no request at all fails its availability SLO: a gate must not pass on nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from loadtests.report import RunResult

__all__ = [
    "AVAILABILITY",
    "ROTATION_OPERATION",
    "ROTATION_SUCCESS",
    "Verdict",
    "evaluate",
    "format_verdicts",
    "is_rotation",
]

AVAILABILITY = 0.9995
ROTATION_SUCCESS = 0.99
ROTATION_OPERATION = "ca-rotate"


def is_rotation(operation: str) -> bool:
    """Rotations made during the load are operations named `<what>-rotate`."""
    return operation.endswith("-rotate")


@dataclass(frozen=True)
class Verdict:
    slo: str  # "latency p95", "availability", "rotation success"
    operation: str
    concurrency: int
    round: int
    target: str  # human-readable objective, e.g. "< 150 ms"
    measured: str
    ok: bool

    def line(self) -> str:
        state = "met" if self.ok else "MISSED"
        return (
            f"{state:<6} {self.slo} of {self.operation} at {self.concurrency} clients "
            f"(round {self.round}): {self.measured}, objective {self.target}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "slo": self.slo,
            "operation": self.operation,
            "concurrency": self.concurrency,
            "round": self.round,
            "objective": self.target,
            "measured": self.measured,
            "met": self.ok,
        }


def evaluate(
    runs: Iterable[RunResult],
    p95_objective_ms: Callable[[str], float],
    *,
    subject: str = "broker",
) -> list[Verdict]:
    """One verdict per SLO, operation and run of `subject`. `p95_objective_ms(op)` is the
    latency objective of an operation."""
    out: list[Verdict] = []
    for run in runs:
        if run.target != subject:
            continue
        for name, op in run.operation_stats().items():
            attempts = op["requests_ok"] + op["error_count"]
            success = op["requests_ok"] / attempts if attempts else 0.0
            measured = (
                f"{success * 100:.3f} % of {attempts} requests"
                if attempts
                else "no request was made"
            )

            c, rnd = run.concurrency, run.round
            if is_rotation(name):
                ok = attempts > 0 and success >= ROTATION_SUCCESS
                target = f">= {ROTATION_SUCCESS * 100:g} %"
                out.append(Verdict("rotation success", name, c, rnd, target, measured, ok))
                continue
            ok = attempts > 0 and success >= AVAILABILITY
            target = f">= {AVAILABILITY * 100:g} %"
            out.append(Verdict("availability", name, c, rnd, target, measured, ok))
            p95 = op["latency_ms"]["p95"]
            limit = p95_objective_ms(name)
            value = "no successful request" if p95 is None else f"{p95:g} ms"
            ok = p95 is not None and p95 < limit
            out.append(Verdict("latency p95", name, c, rnd, f"< {limit:g} ms", value, ok))
        checked = run.notes.get("svid_verification")
        if checked is not None:
            failures = int(checked["svid_verification_failures"])
            verified = int(checked["svids_verified"])
            measured = f"{failures} failures, {verified} SVIDs verified"
            ok = failures == 0 and verified > 0
            out.append(
                Verdict(
                    "svid verification", "relying-party", run.concurrency, run.round,
                    "0 failures", measured, ok,
                )
            )  # fmt: skip
    return out


def format_verdicts(verdicts: list[Verdict]) -> str:
    missed = [v for v in verdicts if not v.ok]
    if missed:
        names = ", ".join(sorted({f"{v.slo} of {v.operation}" for v in missed}))
        head = f"SLO gate: {len(verdicts) - len(missed)} of {len(verdicts)} met; MISSED: {names}"
    elif verdicts:
        head = f"SLO gate: all {len(verdicts)} met"
    else:
        head = "SLO gate: nothing was measured (missed)"
    return "\n".join([head, *(v.line() for v in verdicts)])
