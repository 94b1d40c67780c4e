"""HDR latency histograms: one shape for every process, merged through their compact encoding.

Latencies are recorded in microseconds, from 1 µs to 120 s, with 3 significant digits (a
recorded value is within 0.1 % of the true one). Worker processes send their histogram to the
parent as the standard HdrHistogram base64 encoding; the parent decodes and adds them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from hdrh.histogram import HdrHistogram

__all__ = [
    "HIGHEST_US",
    "LOWEST_US",
    "PERCENTILES",
    "SIGNIFICANT_FIGURES",
    "decode",
    "encode",
    "merge",
    "new_histogram",
    "record_us",
    "summarize",
]

LOWEST_US = 1
HIGHEST_US = 120_000_000
SIGNIFICANT_FIGURES = 3
PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9)


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_FIGURES)


def record_us(hist: HdrHistogram, micros: int) -> None:
    """Record one latency, clamped into the trackable range (never silently dropped)."""
    hist.record_value(min(max(int(micros), LOWEST_US), HIGHEST_US))


def encode(hist: HdrHistogram) -> str:
    return bytes(hist.encode()).decode("ascii")


def decode(encoded: str | bytes) -> HdrHistogram:
    data = encoded.encode("ascii") if isinstance(encoded, str) else encoded
    return HdrHistogram.decode(data)


def merge(encoded: Iterable[str | bytes]) -> HdrHistogram:
    """One histogram holding every value of the encoded ones."""
    total = new_histogram()
    for item in encoded:
        part = decode(item)
        if part.get_total_count():
            total.add(part)
    return total


def _ms(micros: float) -> float:
    return round(micros / 1000.0, 3)


def summarize(hist: HdrHistogram) -> dict[str, Any]:
    """Count, min/mean/max and the standard percentiles, in milliseconds (None when empty)."""
    count = int(hist.get_total_count())
    out: dict[str, Any] = {"count": count}
    keys = ["min", "mean", *(_pkey(p) for p in PERCENTILES), "max"]
    if count == 0:
        out.update(dict.fromkeys(keys))
        return out
    out["min"] = _ms(hist.get_min_value())
    out["mean"] = _ms(hist.get_mean_value())
    for p in PERCENTILES:
        out[_pkey(p)] = _ms(hist.get_value_at_percentile(p))
    out["max"] = _ms(hist.get_max_value())
    return out


def _pkey(p: float) -> str:
    text = f"{p:g}".replace(".", "")
    return f"p{text}"
