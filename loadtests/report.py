"""Results of runs, side-by-side comparisons, the printed table and DIR/report.json."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtests import hist

__all__ = [
    "REPORT_SCHEMA",
    "RunResult",
    "build_report",
    "compare",
    "format_comparisons",
    "format_table",
    "write_report",
]

REPORT_SCHEMA = "credential-broker/loadtest-report/v1"


@dataclass
class RunResult:
    """One target driven at one concurrency for one measured window."""

    target: str
    scenario: str
    concurrency: int
    round: int
    processes: int
    warmup_s: float
    duration_s: float
    ok: int
    errors: dict[str, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)
    histogram: str = ""  # HdrHistogram encoding of the successful requests' latencies (µs)
    client_cpu_s: float = 0.0
    server_cpu_s: float | None = None
    started_at: str = ""
    notes: dict[str, Any] = field(default_factory=dict)
    # per operation (see generator.merge_operations): ok, errors, samples, histogram,
    # ok_per_s, errors_per_s; a rotation scenario adds "ca-rotate"
    operations: dict[str, dict[str, Any]] = field(default_factory=dict)

    def operation_stats(self) -> dict[str, dict[str, Any]]:
        """Per operation: throughput, latency percentiles, error rate, availability and the
        successes/failures of each second of the window."""
        out: dict[str, dict[str, Any]] = {}
        seconds = max(1, int(self.duration_s + 0.999))
        for name, op in sorted(self.operations.items()):
            ok = int(op["ok"])
            errors = int(sum(op["errors"].values()))
            attempts = ok + errors
            h = hist.decode(op["histogram"]) if op.get("histogram") else hist.new_histogram()
            per_s = {int(k): v for k, v in op.get("ok_per_s", {}).items()}
            err_s = {int(k): v for k, v in op.get("errors_per_s", {}).items()}
            out[name] = {
                "requests_ok": ok,
                "errors": dict(sorted(op["errors"].items())),
                "error_count": errors,
                "error_rate": round(errors / attempts, 6) if attempts else 0.0,
                "availability": round(ok / attempts, 6) if attempts else None,
                "throughput_rps": round(ok / self.duration_s, 2) if self.duration_s > 0 else 0.0,
                "latency_ms": hist.summarize(h),
                "ok_per_s": [per_s.get(i, 0) for i in range(seconds)],
                "errors_per_s": [err_s.get(i, 0) for i in range(seconds)],
                **_percentiles_per_s(op.get("histogram_per_s", {}), seconds),
                "error_samples": op.get("samples", []),
                "histogram_us_hdr": op.get("histogram", ""),
            }
        return out

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def attempts(self) -> int:
        return self.ok + self.error_count

    @property
    def error_rate(self) -> float:
        return self.error_count / self.attempts if self.attempts else 0.0

    @property
    def throughput(self) -> float:
        """Successful requests per second of measured window."""
        return self.ok / self.duration_s if self.duration_s > 0 else 0.0

    def latency(self) -> dict[str, Any]:
        h = hist.decode(self.histogram) if self.histogram else hist.new_histogram()
        return hist.summarize(h)

    def per_request_ms(self, cpu_s: float | None) -> float | None:
        if cpu_s is None or self.attempts == 0:
            return None
        return round(cpu_s * 1000.0 / self.attempts, 4)

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "scenario": self.scenario,
            "concurrency": self.concurrency,
            "round": self.round,
            "processes": self.processes,
            "started_at": self.started_at,
            "warmup_s": self.warmup_s,
            "duration_s": self.duration_s,
            "requests_ok": self.ok,
            "errors": dict(sorted(self.errors.items())),
            "error_count": self.error_count,
            "error_rate": round(self.error_rate, 6),
            "error_samples": self.error_samples,
            "throughput_rps": round(self.throughput, 2),
            "latency_ms": self.latency(),
            "client_cpu_s": round(self.client_cpu_s, 3),
            "client_cpu_ms_per_request": self.per_request_ms(self.client_cpu_s),
            "server_cpu_s": None if self.server_cpu_s is None else round(self.server_cpu_s, 3),
            "server_cpu_ms_per_request": self.per_request_ms(self.server_cpu_s),
            "histogram_us_hdr": self.histogram,
            "operations": self.operation_stats(),
            "notes": self.notes,
        }


def _percentiles_per_s(encoded: dict[Any, str], seconds: int) -> dict[str, list[float | None]]:
    """p50 and p99 (ms) of each second of the window; None for a second with no success."""
    p50: list[float | None] = [None] * seconds
    p99: list[float | None] = [None] * seconds
    for key, value in encoded.items():
        second = int(key)
        if 0 <= second < seconds and value:
            h = hist.decode(value)
            if h.get_total_count():
                p50[second] = round(h.get_value_at_percentile(50) / 1000.0, 3)
                p99[second] = round(h.get_value_at_percentile(99) / 1000.0, 3)
    return {"p50_ms_per_s": p50, "p99_ms_per_s": p99}


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def compare(runs: list[RunResult], subject: str, peer: str) -> list[dict[str, Any]]:
    """Pair `subject` with `peer` runs of the same round and concurrency.

    throughput_ratio > 1 means the subject served more; p99_ratio < 1 means its p99 was lower.
    """
    by_key = {(r.target, r.round, r.concurrency): r for r in runs}
    out = []
    for r in runs:
        if r.target != subject:
            continue
        p = by_key.get((peer, r.round, r.concurrency))
        if p is None:
            continue
        mine, theirs = r.latency(), p.latency()
        tput = _ratio(r.throughput, p.throughput)
        p99 = _ratio(mine["p99"], theirs["p99"])
        out.append(
            {
                "round": r.round,
                "concurrency": r.concurrency,
                "operation": r.scenario,
                "subject": subject,
                "peer": peer,
                "throughput_ratio": tput,
                "p50_ratio": _ratio(mine["p50"], theirs["p50"]),
                "p99_ratio": p99,
                "server_cpu_per_request_ratio": _ratio(
                    r.per_request_ms(r.server_cpu_s), p.per_request_ms(p.server_cpu_s)
                ),
                "target_met": bool(
                    tput is not None
                    and p99 is not None
                    and tput > 1.0
                    and p99 < 1.0
                    and r.error_count == 0
                ),
            }
        )
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(runs: list[RunResult]) -> str:
    head = (
        f"{'target':<9} {'round':>5} {'conc':>5} {'req/s':>9} {'p50 ms':>8} {'p95 ms':>8} "
        f"{'p99 ms':>8} {'max ms':>8} {'ok':>8} {'errors':>6} {'srv cpu/req':>11} "
        f"{'cli cpu/req':>11}"
    )
    lines = [head, "-" * len(head)]
    for r in runs:
        lat = r.latency()
        lines.append(
            f"{r.target:<9} {r.round:>5} {r.concurrency:>5} {r.throughput:>9.1f} "
            f"{_fmt(lat['p50'], '8.2f')} {_fmt(lat['p95'], '8.2f')} {_fmt(lat['p99'], '8.2f')} "
            f"{_fmt(lat['max'], '8.2f')} {r.ok:>8} {r.error_count:>6} "
            f"{_fmt(r.per_request_ms(r.server_cpu_s), '9.3f'):>9}ms "
            f"{_fmt(r.per_request_ms(r.client_cpu_s), '9.3f'):>9}ms"
        )
        ops = r.operation_stats()
        if len(ops) > 1:
            for name, op in ops.items():
                lat = op["latency_ms"]
                lines.append(
                    f"  {name:<18} {op['throughput_rps']:>9.1f} "
                    f"{_fmt(lat['p50'], '8.2f')} {_fmt(lat['p95'], '8.2f')} "
                    f"{_fmt(lat['p99'], '8.2f')} {_fmt(lat['max'], '8.2f')} "
                    f"{op['requests_ok']:>8} {op['error_count']:>6}"
                )
    return "\n".join(lines)


def format_comparisons(comparisons: list[dict[str, Any]]) -> str:
    if not comparisons:
        return ""
    head = (
        f"{'round':>5} {'conc':>5} {'throughput x':>12} {'p50 x':>7} {'p99 x':>7} "
        f"{'srv cpu/req x':>13}  target (more req/s, lower p99)"
    )
    lines = [
        f"{comparisons[0]['subject']} / {comparisons[0]['peer']} ratios",
        head,
        "-" * len(head),
    ]
    for c in comparisons:
        lines.append(
            f"{c['round']:>5} {c['concurrency']:>5} {_fmt(c['throughput_ratio'], '12.2f')} "
            f"{_fmt(c['p50_ratio'], '7.2f')} {_fmt(c['p99_ratio'], '7.2f')} "
            f"{_fmt(c['server_cpu_per_request_ratio'], '13.2f')}  "
            f"{'met' if c['target_met'] else 'NOT met'}"
        )
    return "\n".join(lines)


def build_report(
    *,
    scenario: str,
    settings: dict[str, Any],
    machine: dict[str, Any],
    targets: dict[str, Any],
    runs: list[RunResult],
    comparisons: list[dict[str, Any]],
    started_at: str,
    finished_at: str,
) -> dict[str, Any]:
    return {
        "schema": REPORT_SCHEMA,
        "scenario": scenario,
        "started_at": started_at,
        "finished_at": finished_at,
        "settings": settings,
        "machine": machine,
        "targets": targets,
        "runs": [r.to_json() for r in runs],
        "comparisons": comparisons,
    }


def write_report(directory: Path, report: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "report.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path
