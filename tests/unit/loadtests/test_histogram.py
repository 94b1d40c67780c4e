"""The load generator's arithmetic: histogram merge across processes and report figures.

No timing assertions: every latency here is a made-up number.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtests import hist, report
from loadtests.generator import split_users


def _hist_of(values_us: list[int]) -> str:
    h = hist.new_histogram()
    for v in values_us:
        hist.record_us(h, v)
    return hist.encode(h)


def test_merge_equals_recording_everything_in_one_histogram() -> None:
    a = [100, 200, 300, 1_000, 50_000]
    b = [150, 250, 2_000_000]
    c: list[int] = []  # a worker that measured nothing
    merged = hist.merge([_hist_of(a), _hist_of(b), _hist_of(c)])
    single = hist.decode(_hist_of(a + b))

    assert merged.get_total_count() == len(a) + len(b)
    assert merged.get_min_value() == single.get_min_value()
    assert merged.get_max_value() == single.get_max_value()
    for p in (50, 90, 95, 99, 99.9, 100):
        assert merged.get_value_at_percentile(p) == single.get_value_at_percentile(p)
    assert hist.summarize(merged) == hist.summarize(single)


def test_merge_accepts_bytes_and_str_encodings() -> None:
    enc = _hist_of([500, 700])
    assert hist.merge([enc, enc.encode("ascii")]).get_total_count() == 4


def test_summary_is_in_milliseconds_within_three_significant_digits() -> None:
    values = list(range(1_000, 101_000, 1_000))  # 1 ms .. 100 ms, one each
    s = hist.summarize(hist.decode(_hist_of(values)))
    assert s["count"] == 100
    assert s["min"] == pytest.approx(1.0, rel=1e-3)
    assert s["p50"] == pytest.approx(50.0, rel=1e-3)
    assert s["p95"] == pytest.approx(95.0, rel=1e-3)
    assert s["p99"] == pytest.approx(99.0, rel=1e-3)
    assert s["max"] == pytest.approx(100.0, rel=1e-3)
    assert s["mean"] == pytest.approx(50.5, rel=1e-3)


def test_empty_summary_has_no_figures() -> None:
    s = hist.summarize(hist.new_histogram())
    assert s["count"] == 0
    assert s["p99"] is None and s["max"] is None


def test_out_of_range_values_are_clamped_not_dropped() -> None:
    h = hist.new_histogram()
    hist.record_us(h, 0)
    hist.record_us(h, 10 * hist.HIGHEST_US)
    assert h.get_total_count() == 2
    assert h.get_min_value() == hist.LOWEST_US
    assert h.get_max_value() >= hist.HIGHEST_US


def _run(target: str, ok: int, values_us: list[int], **kw: object) -> report.RunResult:
    fields: dict[str, object] = {
        "target": target,
        "scenario": "svid-csr",
        "concurrency": 8,
        "round": 1,
        "processes": 2,
        "warmup_s": 1.0,
        "duration_s": 10.0,
        "ok": ok,
        "histogram": _hist_of(values_us),
    }
    fields.update(kw)
    return report.RunResult(**fields)  # type: ignore[arg-type]


def test_run_figures() -> None:
    r = _run(
        "broker",
        ok=1_000,
        values_us=[2_000] * 99 + [40_000],
        errors={"grpc UNAVAILABLE": 8, "timeout": 2},
        client_cpu_s=2.0,
        server_cpu_s=5.05,
    )
    assert r.throughput == pytest.approx(100.0)
    assert r.error_count == 10
    assert r.attempts == 1_010
    assert r.error_rate == pytest.approx(10 / 1_010)
    assert r.per_request_ms(r.server_cpu_s) == pytest.approx(5.0)
    assert r.per_request_ms(None) is None
    doc = r.to_json()
    json.dumps(doc)  # serializable as is
    assert doc["throughput_rps"] == 100.0
    assert doc["latency_ms"]["p50"] == pytest.approx(2.0, rel=1e-3)
    assert doc["latency_ms"]["max"] == pytest.approx(40.0, rel=1e-3)
    assert hist.decode(doc["histogram_us_hdr"]).get_total_count() == 100


def test_compare_pairs_same_round_and_concurrency() -> None:
    runs = [
        _run("broker", ok=2_000, values_us=[1_000] * 100, server_cpu_s=1.0),
        _run("openbao", ok=1_000, values_us=[4_000] * 100, server_cpu_s=1.0),
        _run("broker", ok=500, values_us=[1_000] * 10, concurrency=32),  # no peer: skipped
    ]
    (c,) = report.compare(runs, "broker", "openbao")
    assert c["concurrency"] == 8
    assert c["throughput_ratio"] == pytest.approx(2.0)
    assert c["p99_ratio"] == pytest.approx(0.25, rel=1e-3)
    assert c["server_cpu_per_request_ratio"] == pytest.approx(0.5)
    assert c["target_met"] is True
    assert "met" in report.format_comparisons([c])
    assert "broker" in report.format_table(runs)


def test_target_not_met_with_errors_or_a_worse_tail() -> None:
    peer = _run("openbao", ok=1_000, values_us=[4_000] * 100)
    worse_tail = _run("broker", ok=2_000, values_us=[8_000] * 100)
    with_errors = _run("broker", ok=2_000, values_us=[1_000] * 100, errors={"x": 1}, round=2)
    peer2 = _run("openbao", ok=1_000, values_us=[4_000] * 100, round=2)
    got = report.compare([worse_tail, peer, with_errors, peer2], "broker", "openbao")
    assert [c["target_met"] for c in got] == [False, False]


def test_report_document(tmp_path: Path) -> None:
    runs = [_run("broker", ok=10, values_us=[1_000])]
    doc = report.build_report(
        scenario="svid-csr",
        settings={"duration_s": 10.0},
        machine={"nproc": 2},
        targets={"broker": {}},
        runs=runs,
        comparisons=[],
        started_at="t0",
        finished_at="t1",
    )
    path = report.write_report(tmp_path / "out", doc)
    loaded = json.loads(path.read_text())
    assert loaded["schema"] == report.REPORT_SCHEMA
    assert loaded["runs"][0]["requests_ok"] == 10


@pytest.mark.parametrize(
    ("concurrency", "processes", "expected"),
    [(1, 2, [1]), (8, 2, [4, 4]), (33, 2, [17, 16]), (32, 3, [11, 11, 10]), (2, 8, [1, 1])],
)
def test_users_are_spread_evenly_over_workers(
    concurrency: int, processes: int, expected: list[int]
) -> None:
    assert split_users(concurrency, processes) == expected
