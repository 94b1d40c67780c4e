"""DIR/report.html: the report as one self-contained page (inline SVG plots, matplotlib's
drawn in loadtests/plots.py; no script, no external resource), readable offline. Built from
the same dict as report.json, so `python -m loadtests html DIR` can redo it from a saved
report.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtests import hist, plots

__all__ = ["latency_bins", "render", "write_html"]

_W, _H, _PAD_L, _PAD_B, _PAD_T, _PAD_R = 560, 220, 56, 34, 12, 12
_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#17becf", "#7f7f7f")
_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:.5em 0 1.2em}
td,th{border:1px solid #ccc;padding:.2em .5em;text-align:right;font-size:90%}
th{background:#f3f3f3} td.l,th.l{text-align:left}
.met{color:#176b2c;font-weight:bold}.missed{color:#b00020;font-weight:bold}
svg{background:#fafafa;border:1px solid #ddd;margin:.3em .6em .3em 0}
.plots{display:flex;flex-wrap:wrap} figure{margin:0} figcaption{font-size:85%;color:#555}
.overview{display:flex;gap:1em;align-items:flex-start}
.overview>div{flex:1 1 0;min-width:0} .overview svg{max-width:100%;height:auto}
code{background:#f3f3f3;padding:0 .2em}
"""


def latency_bins(encoded: str, bins: int = 40) -> list[tuple[float, float, int]]:
    """(low_ms, high_ms, count) over log-spaced bins from the histogram's min to its max."""
    if not encoded:
        return []
    h = hist.decode(encoded)
    if h.get_total_count() == 0:
        return []
    lo = max(1, int(h.get_min_value()))
    hi = max(lo + 1, int(h.get_max_value()))
    edges = [lo * (hi / lo) ** (i / bins) for i in range(bins + 1)]
    counts = [0] * bins
    for item in h.get_recorded_iterator():
        v, c = item.value_iterated_to, item.count_added_in_this_iter_step
        i = min(bins - 1, max(0, int(math.log(max(v, lo) / lo) / math.log(hi / lo) * bins)))
        counts[i] += c
    return [(edges[i] / 1000, edges[i + 1] / 1000, counts[i]) for i in range(bins)]


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _fmt(value: Any, spec: str = ".2f") -> str:
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, int | float) else _esc(value)


def _axes(x_label: str, y_label: str, y_max: float, x_ticks: Sequence[tuple[float, str]]) -> str:
    plot_h = _H - _PAD_B - _PAD_T
    parts = [
        f'<line x1="{_PAD_L}" y1="{_H - _PAD_B}" x2="{_W - _PAD_R}" y2="{_H - _PAD_B}" '
        'stroke="#444"/>',
        f'<line x1="{_PAD_L}" y1="{_PAD_T}" x2="{_PAD_L}" y2="{_H - _PAD_B}" stroke="#444"/>',
        f'<text x="{(_W + _PAD_L) / 2}" y="{_H - 4}" font-size="11" text-anchor="middle">'
        f"{_esc(x_label)}</text>",
        f'<text x="12" y="{_PAD_T + plot_h / 2}" font-size="11" text-anchor="middle" '
        f'transform="rotate(-90 12 {_PAD_T + plot_h / 2})">{_esc(y_label)}</text>',
    ]
    for frac in (0.0, 0.5, 1.0):
        y = _H - _PAD_B - frac * plot_h
        parts.append(
            f'<text x="{_PAD_L - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">'
            f"{y_max * frac:.4g}</text>"
        )
    for x, label in x_ticks:
        parts.append(
            f'<text x="{x:.1f}" y="{_H - _PAD_B + 13}" font-size="10" text-anchor="middle">'
            f"{_esc(label)}</text>"
        )
    return "".join(parts)


def _histogram_svg(bins: list[tuple[float, float, int]], title: str) -> str:
    if not bins:
        return f"<p>{_esc(title)}: no successful request</p>"
    top = max(c for _, _, c in bins) or 1
    plot_w, plot_h = _W - _PAD_L - _PAD_R, _H - _PAD_B - _PAD_T
    bar_w = plot_w / len(bins)
    bars = []
    for i, (lo, hi, c) in enumerate(bins):
        h = plot_h * c / top
        bars.append(
            f'<rect x="{_PAD_L + i * bar_w:.1f}" y="{_H - _PAD_B - h:.1f}" '
            f'width="{max(bar_w - 1, 1):.1f}" height="{h:.1f}" fill="{_COLOURS[0]}">'
            f"<title>{lo:.3f}-{hi:.3f} ms: {c}</title></rect>"
        )
    ticks = [
        (_PAD_L + i * bar_w, f"{bins[i][0]:.3g}")
        for i in range(0, len(bins), max(1, len(bins) // 5))
    ]
    ticks.append((_W - _PAD_R, f"{bins[-1][1]:.3g}"))
    return (
        f'<figure><svg width="{_W}" height="{_H}" xmlns="http://www.w3.org/2000/svg" '
        f'role="img" aria-label="{_esc(title)}">'
        + _axes("latency, ms (log scale)", "requests", top, ticks)
        + "".join(bars)
        + f"</svg><figcaption>{_esc(title)}</figcaption></figure>"
    )


def _timeline_svg(series: dict[str, list[int]], title: str, duration_s: float) -> str:
    series = {k: v for k, v in series.items() if v}
    if not series:
        return ""
    n = max(len(v) for v in series.values())
    # The last second may be partial (a fractional duration): plot rates, not counts.
    widths = [min(1.0, duration_s - i) if duration_s > i else 1.0 for i in range(n)]
    rates = {
        k: [v[i] / widths[i] if i < len(v) else 0 for i in range(n)] for k, v in series.items()
    }
    top = max(max(v) for v in rates.values()) or 1.0
    plot_w, plot_h = _W - _PAD_L - _PAD_R, _H - _PAD_B - _PAD_T
    step = plot_w / max(1, n - 1) if n > 1 else plot_w
    lines, legend = [], []
    for k, (name, values) in enumerate(sorted(rates.items())):
        colour = "#b00020" if name.endswith("errors") else _COLOURS[k % len(_COLOURS)]
        pts = " ".join(
            f"{_PAD_L + i * step:.1f},{_H - _PAD_B - plot_h * v / top:.1f}"
            for i, v in enumerate(values)
        )
        lines.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.6" points="{pts}"/>')
        legend.append(
            f'<text x="{_PAD_L + 8}" y="{_PAD_T + 12 + 13 * k}" font-size="11" '
            f'fill="{colour}">{_esc(name)}</text>'
        )
    ticks = [(_PAD_L + i * step, str(i)) for i in range(0, n, max(1, n // 8))]
    return (
        f'<figure><svg width="{_W}" height="{_H}" xmlns="http://www.w3.org/2000/svg" '
        f'role="img" aria-label="{_esc(title)}">'
        + _axes("second of the measured window", "requests/s", top, ticks)
        + "".join(lines)
        + "".join(legend)
        + f"</svg><figcaption>{_esc(title)}</figcaption></figure>"
    )


def _runs_table(runs: list[dict[str, Any]]) -> str:
    rows = [
        "<table><tr><th class=l>target</th><th>round</th><th>clients</th>"
        "<th class=l>operation</th><th>req/s</th><th>p50 ms</th><th>p95 ms</th><th>p99 ms</th>"
        "<th>max ms</th><th>ok</th><th>errors</th><th>error rate</th>"
        "<th>server CPU ms/req</th></tr>"
    ]
    for r in runs:
        ops = r.get("operations") or {
            r["scenario"]: {
                "throughput_rps": r["throughput_rps"],
                "latency_ms": r["latency_ms"],
                "requests_ok": r["requests_ok"],
                "error_count": r["error_count"],
                "error_rate": r["error_rate"],
            }
        }
        if len(ops) > 1:
            # Server CPU is measured for the whole run: one row for all operations carries it,
            # rather than the same number on every operation's row.
            ops = {**ops, "all operations": r}
        for name, op in ops.items():
            lat = op["latency_ms"]
            cpu = r.get("server_cpu_ms_per_request") if len(ops) == 1 or op is r else None
            rows.append(
                f"<tr><td class=l>{_esc(r['target'])}</td><td>{r['round']}</td>"
                f"<td>{r['concurrency']}</td><td class=l>{_esc(name)}</td>"
                f"<td>{_fmt(op['throughput_rps'], '.1f')}</td><td>{_fmt(lat['p50'])}</td>"
                f"<td>{_fmt(lat['p95'])}</td><td>{_fmt(lat['p99'])}</td>"
                f"<td>{_fmt(lat['max'])}</td><td>{op['requests_ok']}</td>"
                f"<td>{op['error_count']}</td><td>{_fmt(op['error_rate'] * 100, '.3f')} %</td>"
                f"<td>{_fmt(cpu, '.3f')}</td></tr>"
            )
    rows.append("</table>")
    return "".join(rows)


def _comparisons_table(comparisons: list[dict[str, Any]]) -> str:
    if not comparisons:
        return ""
    rows = [
        "<h2>Side by side (ratios: broker / peer)</h2><table><tr><th>round</th>"
        "<th>clients</th><th class=l>operation</th><th>throughput x<br>(higher is better)</th>"
        "<th>p50 latency x<br>(lower is better)</th><th>p99 latency x<br>(lower is better)</th>"
        "<th>server CPU/req x<br>(lower is better)</th>"
        "<th class=l>more req/s and lower p99</th></tr>"
    ]
    for c in comparisons:
        rows.append(
            f"<tr><td>{c['round']}</td><td>{c['concurrency']}</td>"
            f"<td class=l>{_esc(c.get('operation', ''))}</td>"
            f"<td>{_fmt(c['throughput_ratio'])}</td><td>{_fmt(c['p50_ratio'])}</td>"
            f"<td>{_fmt(c['p99_ratio'])}</td><td>{_fmt(c['server_cpu_per_request_ratio'])}</td>"
            f"<td class=l>{'met' if c['target_met'] else 'not met'}</td></tr>"
        )
    rows.append("</table>")
    return "".join(rows)


def _slo_section(slo: dict[str, Any] | None) -> str:
    if not slo:
        return "<p>SLO gate not run (add <code>--slo</code>).</p>"
    verdicts = slo.get("verdicts", [])
    state = "met" if slo.get("met") else "missed"
    rows = [
        f"<h2>SLO gate: <span class={state}>{state.upper()}</span></h2>"
        "<table><tr><th class=l>SLO</th><th class=l>operation</th><th>clients</th><th>round</th>"
        "<th class=l>objective</th><th class=l>measured</th><th class=l>verdict</th></tr>"
    ]
    for v in verdicts:
        cls = "met" if v["met"] else "missed"
        rows.append(
            f"<tr><td class=l>{_esc(v['slo'])}</td><td class=l>{_esc(v['operation'])}</td>"
            f"<td>{v['concurrency']}</td><td>{v['round']}</td>"
            f"<td class=l>{_esc(v['objective'])}</td><td class=l>{_esc(v['measured'])}</td>"
            f"<td class='l {cls}'>{cls}</td></tr>"
        )
    rows.append("</table>")
    return "".join(rows)


def _server_view(rows: list[dict[str, Any]]) -> str:
    """The broker's own latency (its /metrics, over the window) beside the client's."""
    if not rows:
        return ""
    out = [
        "<table><tr><th class=l>broker's own view: method</th><th class=l>code</th>"
        "<th>requests</th><th>mean ms</th><th>p50 ms</th><th>p95 ms</th><th>p99 ms</th></tr>"
    ]
    for row in rows:
        out.append(
            f"<tr><td class=l>{_esc(row['method'])}</td><td class=l>{_esc(row['code'])}</td>"
            f"<td>{row['requests']}</td><td>{_fmt(row['mean_ms'])}</td>"
            f"<td>{_fmt(row['p50_ms'])}</td><td>{_fmt(row['p95_ms'])}</td>"
            f"<td>{_fmt(row['p99_ms'])}</td></tr>"
        )
    out.append("</table>")
    return "".join(out)


def render(report: dict[str, Any]) -> str:
    settings = report.get("settings", {})
    machine = report.get("machine", {})
    runs = report.get("runs", [])
    source = (report.get("targets", {}).get("broker") or {}).get("source") or {}
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>Load test: {_esc(report.get('scenario'))}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>Load test: {_esc(report.get('scenario'))}</h1>",
        f"<p><code>{_esc(settings.get('command', ''))}</code><br>",
        f"{_esc(report.get('started_at'))} to {_esc(report.get('finished_at'))}; "
        f"machine: {_esc(machine.get('nproc'))} CPUs, {_esc(machine.get('cpu_model', ''))}; "
        f"broker source: {_esc(source.get('commit', '-'))}</p>",
    ]
    if report.get("failure") or report.get("interrupted"):
        parts.append(
            f"<p class=missed>Run incomplete: {_esc(report.get('failure') or 'interrupted')}</p>"
        )
    overview = [plots.concurrency_svg(runs)]
    for round_, concurrency in sorted({(r["round"], r["concurrency"]) for r in runs}):
        overview.append(plots.percentile_curves_svg(runs, round_, concurrency))
    # The SLO verdicts beside the plots that show them.
    parts.append(
        f"<div class=overview><div>{_slo_section(report.get('slo'))}</div>"
        f"<div class=plots>{''.join(overview)}</div></div>"
    )
    parts.append(_comparisons_table(report.get("comparisons", [])))
    parts.append("<h2>Runs</h2>")
    parts.append(_runs_table(runs))
    for r in runs:
        label = f"{r['target']}, {r['concurrency']} clients, round {r['round']}"
        parts.append(f"<h3>{_esc(label)}</h3><div class=plots>")
        ops = r.get("operations") or {}
        series: dict[str, list[int]] = {}
        for name, op in ops.items():
            series[name] = op.get("ok_per_s", [])
            if any(op.get("errors_per_s", [])):
                series[f"{name} errors"] = op["errors_per_s"]
        parts.append(_timeline_svg(series, f"throughput over time: {label}", r["duration_s"]))
        parts.append(plots.latency_over_time_svg(r, label))
        parts.append(plots.errors_svg(r, label))
        if ops:
            for name, op in ops.items():
                parts.append(
                    _histogram_svg(
                        latency_bins(op.get("histogram_us_hdr", "")),
                        f"latency histogram: {name}, {label}",
                    )
                )
        else:
            parts.append(
                _histogram_svg(
                    latency_bins(r.get("histogram_us_hdr", "")), f"latency histogram: {label}"
                )
            )
        parts.append("</div>")
        parts.append(_server_view(r.get("notes", {}).get("server_rpc_latency") or []))
    parts.append("</body></html>\n")
    return "".join(parts)


def write_html(directory: Path, report: dict[str, Any]) -> Path:
    path = directory / "report.html"
    path.write_text(render(report), encoding="utf-8")
    return path
