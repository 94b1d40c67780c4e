"""The report's plots, drawn with matplotlib (Agg, no display) and inlined as SVG: latency over
time with rotation events, HDR percentile curves of broker and peer on shared axes, throughput
and p99 against concurrency, errors over time. Each function takes report.json's `runs` and
returns an SVG string ("" when it has nothing to draw)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
matplotlib.rcParams["svg.fonttype"] = "none"  # text as <text>: smaller, selectable, searchable
import matplotlib.pyplot as plt  # noqa: E402  - after choosing the headless backend
from matplotlib.figure import Figure  # noqa: E402

from loadtests import hist  # noqa: E402

__all__ = [
    "concurrency_svg",
    "errors_svg",
    "latency_over_time_svg",
    "percentile_curves_svg",
    "rotation_seconds",
]

_SIZE = (6.4, 3.0)
_ROTATION = ("ca-rotate", "rotation")


def _svg(fig: Figure) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buffer.getvalue()
    # Inline in the page: drop the XML prolog and doctype, keep the <svg> element.
    return text[text.index("<svg") :]


def _is_rotation(name: str) -> bool:
    return any(word in name for word in _ROTATION)


def rotation_seconds(run: dict[str, Any]) -> list[int]:
    """The seconds of the window in which a CA/KEK rotation completed."""
    seconds: set[int] = set()
    for name, op in (run.get("operations") or {}).items():
        if _is_rotation(name):
            seconds.update(i for i, n in enumerate(op.get("ok_per_s", [])) if n)
    return sorted(seconds)


def latency_over_time_svg(run: dict[str, Any], label: str) -> str:
    """p50 and p99 of each second per operation, rotation events as vertical lines."""
    ops = {
        name: op
        for name, op in (run.get("operations") or {}).items()
        if not _is_rotation(name) and any(v is not None for v in op.get("p99_ms_per_s", []))
    }
    if not ops:
        return ""
    fig, ax = plt.subplots(figsize=_SIZE)
    for k, (name, op) in enumerate(sorted(ops.items())):
        colour = f"C{k % 10}"
        xs = range(len(op["p99_ms_per_s"]))
        ax.plot(xs, op["p50_ms_per_s"], color=colour, linestyle="--", label=f"{name} p50")
        ax.plot(xs, op["p99_ms_per_s"], color=colour, label=f"{name} p99")
    for i, second in enumerate(rotation_seconds(run)):
        ax.axvline(second, color="#b00020", alpha=0.6, label="rotation" if i == 0 else None)
    ax.set_xlabel("second of the measured window")
    ax.set_ylabel("latency, ms")
    ax.set_title(f"latency over time: {label}", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    return _svg(fig)


def errors_svg(run: dict[str, Any], label: str) -> str:
    """Failed requests per second per operation (drawn only when some failed)."""
    ops = {
        name: op["errors_per_s"]
        for name, op in (run.get("operations") or {}).items()
        if any(op.get("errors_per_s", []))
    }
    if not ops:
        return ""
    fig, ax = plt.subplots(figsize=_SIZE)
    for name, values in sorted(ops.items()):
        ax.step(range(len(values)), values, where="mid", label=name)
    ax.set_xlabel("second of the measured window")
    ax.set_ylabel("errors / s")
    ax.set_title(f"errors over time: {label}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _svg(fig)


def _percentile_curve(encoded: str) -> tuple[list[float], list[float]]:
    """(x = 1/(1-p) for p from 0 to 99.999 %, latency ms): the HDR percentile distribution."""
    h = hist.decode(encoded)
    if h.get_total_count() == 0:
        return [], []
    xs, ys = [], []
    for p in (0, 10, 25, 50, 75, 90, 95, 99, 99.5, 99.9, 99.95, 99.99, 99.999):
        xs.append(1.0 / (1.0 - p / 100.0))
        ys.append(h.get_value_at_percentile(p) / 1000.0)
    return xs, ys


def percentile_curves_svg(runs: Sequence[dict[str, Any]], round_: int, concurrency: int) -> str:
    """Every target's (and operation's) HDR percentile curve of one round and concurrency,
    on the same axes, so broker and peer read against each other directly."""
    fig, ax = plt.subplots(figsize=_SIZE)
    drawn = 0
    for run in runs:
        if run.get("round") != round_ or run.get("concurrency") != concurrency:
            continue
        whole = {"histogram_us_hdr": run.get("histogram_us_hdr", "")}
        ops = run.get("operations") or {run["scenario"]: whole}
        for name, op in sorted(ops.items()):
            if _is_rotation(name) or not op.get("histogram_us_hdr"):
                continue
            xs, ys = _percentile_curve(op["histogram_us_hdr"])
            if xs:
                style = "-" if run["target"] == "broker" else "--"
                ax.plot(xs, ys, style, marker=".", label=f"{run['target']}: {name}")
                drawn += 1
    if not drawn:
        plt.close(fig)
        return ""
    ax.set_xscale("log")
    ticks = [1, 10, 100, 1000, 10000, 100000]
    ax.set_xticks(ticks, ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"])
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency, ms")
    ax.set_title(f"HDR percentile curves: round {round_}, {concurrency} clients", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _svg(fig)


def concurrency_svg(runs: Sequence[dict[str, Any]]) -> str:
    """Throughput and p99 against concurrency per target (drawn when several levels ran)."""
    levels = sorted({int(r["concurrency"]) for r in runs})
    if len(levels) < 2:
        return ""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 3.0))
    for target in sorted({r["target"] for r in runs}):
        points: dict[int, list[dict[str, Any]]] = {}
        for r in runs:
            if r["target"] == target:
                points.setdefault(int(r["concurrency"]), []).append(r)
        xs = sorted(points)
        tput = [max(r["throughput_rps"] for r in points[x]) for x in xs]
        p99 = [min(r["latency_ms"]["p99"] or 0.0 for r in points[x]) for x in xs]
        left.plot(xs, tput, marker="o", label=target)
        right.plot(xs, p99, marker="o", label=target)
    for ax, ylabel in ((left, "requests/s (best round)"), (right, "p99 ms (best round)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(x) for x in levels])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("throughput and p99 against concurrency", fontsize=9)
    return _svg(fig)
