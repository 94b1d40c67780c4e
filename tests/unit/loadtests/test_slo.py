"""The SLO gate, the per-operation figures it reads and the HTML page (made-up numbers only)."""

from __future__ import annotations

import re

import pytest

from loadtests import generator, hist, html, report, slo
from loadtests.scenarios import SCENARIOS, broker_operations


def _op(values_us: list[int], errors: int = 0, per_s: dict[int, int] | None = None) -> dict:
    h = hist.new_histogram()
    for v in values_us:
        hist.record_us(h, v)
    return {
        "ok": len(values_us),
        "errors": {"grpc UNAVAILABLE": errors} if errors else {},
        "samples": ["grpc UNAVAILABLE: down"] if errors else [],
        "histogram": hist.encode(h),
        "ok_per_s": per_s if per_s is not None else {0: len(values_us)},
        "errors_per_s": {0: errors} if errors else {},
    }


def _run(operations: dict[str, dict], target: str = "broker") -> report.RunResult:
    ok = sum(op["ok"] for op in operations.values() if op is not None)
    return report.RunResult(
        target=target,
        scenario="mixed",
        concurrency=32,
        round=1,
        processes=2,
        warmup_s=1.0,
        duration_s=2.0,
        ok=ok,
        operations=operations,
    )


def _objective(_op_name: str) -> float:
    return 150.0


def test_fast_and_error_free_meets_every_slo() -> None:
    run = _run({"svid-csr": _op([5_000] * 100), "jwt-mint": _op([2_000] * 100)})
    verdicts = slo.evaluate([run], _objective)
    assert {(v.slo, v.operation) for v in verdicts} == {
        ("availability", "svid-csr"),
        ("latency p95", "svid-csr"),
        ("availability", "jwt-mint"),
        ("latency p95", "jwt-mint"),
    }
    assert all(v.ok for v in verdicts)
    assert slo.format_verdicts(verdicts).startswith("SLO gate: all 4 met")


def test_slow_p95_is_named_as_the_missed_slo() -> None:
    # 94 fast answers and 6 at 200 ms: the p95 is 200 ms, over the 150 ms objective.
    run = _run({"secret-get": _op([10_000] * 94 + [200_000] * 6)})
    verdicts = slo.evaluate([run], _objective)
    missed = [v for v in verdicts if not v.ok]
    assert [(v.slo, v.operation) for v in missed] == [("latency p95", "secret-get")]
    text = slo.format_verdicts(verdicts)
    assert "MISSED: latency p95 of secret-get" in text
    assert re.search(r"MISSED latency p95 of secret-get .*: 200\.\d+ ms, objective < 150 ms", text)


def test_availability_needs_99_95_percent() -> None:
    # 1 failure in 2,000 (99.95 %) passes; 2 in 2,000 (99.90 %) does not.
    good = slo.evaluate([_run({"svid-csr": _op([1_000] * 1_999, errors=1)})], _objective)
    bad = slo.evaluate([_run({"svid-csr": _op([1_000] * 1_998, errors=2)})], _objective)
    assert all(v.ok for v in good)
    assert [v.slo for v in bad if not v.ok] == ["availability"]


def test_rotation_success_needs_99_percent_and_at_least_one_rotation() -> None:
    load = _op([1_000] * 100)
    ok = slo.evaluate(
        [_run({"svid-csr": load, slo.ROTATION_OPERATION: _op([50_000] * 99, errors=1)})],
        _objective,
    )
    failed = slo.evaluate(
        [_run({"svid-csr": load, slo.ROTATION_OPERATION: _op([50_000] * 9, errors=1)})],
        _objective,
    )
    none = slo.evaluate(
        [_run({"svid-csr": load, slo.ROTATION_OPERATION: _op([], per_s={})})], _objective
    )
    rotation = [v for v in ok if v.operation == slo.ROTATION_OPERATION]
    assert [v.slo for v in rotation] == ["rotation success"]  # no latency SLO for rotations
    assert all(v.ok for v in ok)
    assert [v.slo for v in failed if not v.ok] == ["rotation success"]
    assert [v.measured for v in none if not v.ok] == ["no request was made"]


def test_an_operation_with_no_request_fails_rather_than_passing_on_nothing() -> None:
    verdicts = slo.evaluate([_run({"svid-csr": _op([], per_s={})})], _objective)
    assert [v.slo for v in verdicts if not v.ok] == ["availability", "latency p95"]
    assert slo.format_verdicts([]).endswith("(missed)")


def test_peer_runs_are_not_judged() -> None:
    slow_peer = _run({"svid-csr": _op([900_000] * 10)}, target="openbao")
    assert slo.evaluate([slow_peer], _objective) == []


def test_per_operation_stats_fill_empty_seconds_and_rates() -> None:
    run = _run({"svid-csr": _op([1_000, 3_000, 5_000], errors=1, per_s={1: 3})})
    stats = run.operation_stats()["svid-csr"]
    assert stats["ok_per_s"] == [0, 3]  # 2 s window: second 0 had nothing
    assert stats["errors_per_s"] == [1, 0]
    assert stats["error_rate"] == 0.25
    assert stats["availability"] == 0.75
    assert stats["throughput_rps"] == 1.5
    assert stats["latency_ms"]["max"] == pytest.approx(5.0, rel=1e-3)


def test_worker_tallies_merge_per_operation() -> None:
    a = {"svid-csr": _op([1_000, 2_000], per_s={0: 2}), "jwt-mint": _op([500], per_s={1: 1})}
    b = {"svid-csr": _op([4_000], errors=2, per_s={0: 1})}
    merged = generator.merge_operations([a, b])
    assert sorted(merged) == ["jwt-mint", "svid-csr"]
    svid = merged["svid-csr"]
    assert svid["ok"] == 3
    assert svid["errors"] == {"grpc UNAVAILABLE": 2}
    assert svid["ok_per_s"] == {0: 3}
    assert hist.decode(svid["histogram"]).get_total_count() == 3
    assert merged["jwt-mint"]["ok_per_s"] == {1: 1}


def test_composite_scenarios_name_registered_ones() -> None:
    for sc in SCENARIOS.values():
        parts = broker_operations(sc)
        assert parts, sc.name
        for part in parts:
            assert part.broker_requests is not None, (sc.name, part.name)
            assert not part.mix
    assert SCENARIOS["rotation"].rotate_every_s
    assert {"svid-csr", "jwt-mint"} <= set(SCENARIOS["mixed"].mix)


def test_html_page_is_self_contained_with_plots_and_verdicts() -> None:
    run = _run({"svid-csr": _op([1_000, 2_000, 40_000], errors=1), "jwt-mint": _op([700])})
    verdicts = slo.evaluate([run], _objective)
    rep = report.build_report(
        scenario="mixed<script>",
        settings={"command": "python -m loadtests run --scenario mixed"},
        machine={"nproc": 2},
        targets={},
        runs=[run],
        comparisons=[],
        started_at="t0",
        finished_at="t1",
    )
    rep["slo"] = {
        "met": False,
        "verdicts": [v.to_json() for v in verdicts],
        "missed": [v.to_json() for v in verdicts if not v.ok],
    }
    page = html.render(rep)
    # One timeline, one latency histogram per operation, the HDR percentile curves, and (as
    # svid-csr failed once) errors over time.
    assert page.count("<svg") == 5
    assert "throughput over time" in page and "latency histogram: svid-csr" in page
    assert "HDR percentile curves" in page and "errors over time" in page
    # Server CPU is a whole-run figure: on the run's "all operations" row, not on each op's.
    assert "<td class=l>all operations</td>" in page
    assert "MISSED" in page and "availability" in page
    assert "<script" not in page  # escaped, and the page has no script of its own
    assert not re.search(r"(src|href)=\"?https?:", page)  # nothing fetched from outside


def test_latency_bins_hold_every_request() -> None:
    h = hist.new_histogram()
    for v in [100, 1_000, 1_000, 10_000, 100_000]:
        hist.record_us(h, v)
    bins = html.latency_bins(hist.encode(h), bins=10)
    assert len(bins) == 10
    assert sum(c for _, _, c in bins) == 5
    assert bins[0][0] == 0.1 and bins[-1][1] >= 100.0
    assert html.latency_bins("") == []


def test_server_metrics_diff_and_quantiles_follow_promql() -> None:
    from loadtests import servermetrics

    key = ("/broker.v1.CertificateAuthority/MintX509SVID", "OK")
    before = {key: {"count": 10.0, "sum": 0.1, "buckets": {0.01: 10.0, 0.1: 10.0, math_inf: 10.0}}}
    # 100 more requests: 50 under 10 ms, 40 in (10, 100] ms, 10 beyond the last finite bucket
    after = {
        key: {"count": 110.0, "sum": 4.1, "buckets": {0.01: 60.0, 0.1: 100.0, math_inf: 110.0}},
        ("/x", "OK"): {"count": 3.0, "sum": 1.0, "buckets": {}},  # no change: left out
    }
    before[("/x", "OK")] = after[("/x", "OK")]
    (row,) = servermetrics.diff(before, after)
    assert row["requests"] == 100 and row["mean_ms"] == 40.0
    assert row["p50_ms"] == 10.0  # the 50th of 100 is the last of the first bucket
    assert row["p95_ms"] == 100.0  # in the +Inf bucket: the last finite bound
    assert servermetrics.quantile(0.5, {}) is None
    assert servermetrics.quantile(0.75, {1.0: 0.0, 2.0: 4.0}) == pytest.approx(1.75)


math_inf = float("inf")
