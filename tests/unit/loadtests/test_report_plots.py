"""report.html's matplotlib plots (made-up numbers only): latency over time with rotation
events, broker and peer percentile curves on shared axes, throughput and p99 against
concurrency, errors over time, SLO verdicts beside the plots, the ratio table's direction; and
the page as headless Chromium renders it (a screenshot that is not blank)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

from loadtests import generator, hist, html, report, slo


def _op(per_second_us: list[list[int]], errors_per_s: dict[int, int] | None = None) -> dict:
    """A worker's tally of one operation: the successes' latencies of each second."""
    whole = hist.new_histogram()
    per_s = {}
    for second, values in enumerate(per_second_us):
        h = hist.new_histogram()
        for v in values:
            hist.record_us(h, v)
            hist.record_us(whole, v)
        per_s[second] = hist.encode(h)
    errors = errors_per_s or {}
    return {
        "ok": sum(len(v) for v in per_second_us),
        "errors": {"grpc UNAVAILABLE": sum(errors.values())} if errors else {},
        "samples": [],
        "histogram": hist.encode(whole),
        "ok_per_s": {s: len(v) for s, v in enumerate(per_second_us)},
        "errors_per_s": errors,
        "histogram_per_s": per_s,
    }


def _run(target: str, concurrency: int, scale: int, rotate: bool = False) -> report.RunResult:
    slow_second = [[scale * (1 + i % 7) for i in range(200)] for _ in range(4)]
    slow_second[2] = [v * 6 for v in slow_second[2]]  # the second of a rotation
    ops = {"svid-csr": _op(slow_second, errors_per_s={2: 3} if rotate else None)}
    if rotate:
        ops["ca-rotate"] = _op([[], [], [40_000], []])
    return report.RunResult(
        target=target,
        scenario="svid-csr",
        concurrency=concurrency,
        round=1,
        processes=1,
        warmup_s=1.0,
        duration_s=4.0,
        ok=sum(op["ok"] for op in ops.values()),
        histogram=ops["svid-csr"]["histogram"],
        operations=generator.merge_operations([ops]),
    )


def _report() -> dict:
    runs = [
        _run("broker", 8, 400, rotate=True),
        _run("openbao", 8, 900),
        _run("broker", 32, 700, rotate=True),
        _run("openbao", 32, 2_000),
    ]
    verdicts = slo.evaluate([r for r in runs if r.target == "broker"], lambda _op: 150.0)
    rep = report.build_report(
        scenario="svid-csr",
        settings={"command": "python -m loadtests run --scenario svid-csr --compare openbao"},
        machine={"nproc": 2},
        targets={},
        runs=runs,
        comparisons=report.compare(runs, "broker", "openbao"),
        started_at="t0",
        finished_at="t1",
    )
    rep["slo"] = {
        "met": all(v.ok for v in verdicts),
        "verdicts": [v.to_json() for v in verdicts],
        "missed": [v.to_json() for v in verdicts if not v.ok],
    }
    return rep


def test_per_second_percentiles_are_kept() -> None:
    stats = _run("broker", 8, 400, rotate=True).operation_stats()
    p99 = stats["svid-csr"]["p99_ms_per_s"]
    assert len(p99) == 4 and all(v is not None for v in p99)
    assert p99[2] > 5 * p99[0]  # the slow second shows as a slow second
    assert stats["svid-csr"]["p50_ms_per_s"][0] < p99[0]
    assert stats["ca-rotate"]["p99_ms_per_s"][:2] == [None, None]


def test_page_has_the_plots_a_person_wants() -> None:
    page = html.render(_report())
    for title in (
        "latency over time: broker, 8 clients, round 1",
        "errors over time: broker, 8 clients, round 1",
        "HDR percentile curves: round 1, 8 clients",
        "HDR percentile curves: round 1, 32 clients",
        "throughput and p99 against concurrency",
    ):
        assert title in page, title
    assert "rotation" in page  # the rotation event's legend entry
    # Each percentile plot holds both targets, on one pair of axes.
    at = page.index("HDR percentile curves: round 1, 8 clients")
    curves = page[page.rindex("<svg", 0, at) : page.index("</svg>", at)]
    assert "broker: svid-csr" in curves and "openbao: svid-csr" in curves
    # The SLO verdicts sit in the same row as the overview plots.
    overview = page.split("<div class=overview>", 1)[1].split("<h2>Side by side", 1)[0]
    assert "SLO gate" in overview and "<svg" in overview
    # The ratio table names the operation and says which way is better.
    table = page.split("<h2>Side by side", 1)[1].split("</table>", 1)[0]
    assert "(higher is better)" in table and "(lower is better)" in table
    assert table.count("<td class=l>svid-csr</td>") == 2
    assert "<script" not in page


def test_chromium_renders_the_page(tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    assert chromium, "chromium is not installed (bash scripts/run test installs it)"
    page = html.write_html(tmp_path, _report())
    shot = tmp_path / "report.png"
    done = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1280,2200",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    assert len(pixels) == 1280 * 2200
    ink = int((pixels.min(axis=1) < 200).sum())
    colours = len(np.unique(pixels, axis=0))
    # Text, axes and coloured curves: a blank or failed page is one or two colours.
    assert ink > 0.02 * len(pixels), ink
    assert colours > 50, colours
    # matplotlib's default blue (#1f77b4) curves are on the page.
    blue = (abs(pixels[:, 0] - 31) < 40) & (abs(pixels[:, 1] - 119) < 40) & (pixels[:, 2] > 150)
    assert int(blue.sum()) > 100
