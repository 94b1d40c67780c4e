"""The broker's own view of a run: its Prometheus endpoint scraped when the measured window
opens and after it ends, and the difference of `broker_rpc_duration_seconds` per method and
status code (requests, mean, and p50/p95/p99 interpolated within the histogram's buckets, as
PromQL's histogram_quantile does).

Server time runs from the pipeline's first look at a request to its answer; the client's
latency adds the transport and any queueing before that (in gRPC's core, the event loop),
so the two side by side show where the time goes. Requests that started in the warm-up but
ended in the window are counted here and not by the client: compare shapes, not counts.
"""

from __future__ import annotations

import math
import urllib.request
from collections import defaultdict
from typing import Any

__all__ = ["Snapshot", "diff", "quantile", "scrape"]

METRIC = "broker_rpc_duration_seconds"

# (method, code) -> {"count": n, "sum": s, "buckets": {le: cumulative count}}
Snapshot = dict[tuple[str, str], dict[str, Any]]


def scrape(url: str, timeout: float = 5.0) -> Snapshot:
    """Read the endpoint; raises OSError when it does not answer."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=timeout) as resp:  # loopback, our own broker
        text = resp.read().decode()
    out: Snapshot = defaultdict(lambda: {"count": 0.0, "sum": 0.0, "buckets": {}})
    for family in text_string_to_metric_families(text):
        if family.name != METRIC:
            continue
        for s in family.samples:
            key = (s.labels.get("method", ""), s.labels.get("code", ""))
            if s.name.endswith("_bucket"):
                out[key]["buckets"][float(s.labels["le"])] = s.value
            elif s.name.endswith("_count"):
                out[key]["count"] = s.value
            elif s.name.endswith("_sum"):
                out[key]["sum"] = s.value
    return dict(out)


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """histogram_quantile over cumulative bucket counts (seconds); None when empty."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    total = buckets[bounds[-1]]
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return prev_bound  # beyond the last finite bucket: its bound, as PromQL
            width = count - prev_count
            frac = (rank - prev_count) / width if width > 0 else 1.0
            return prev_bound + (bound - prev_bound) * frac
        prev_bound, prev_count = bound, count
    return prev_bound


def diff(before: Snapshot, after: Snapshot) -> list[dict[str, Any]]:
    """Per method and code with requests in between: count, mean and quantiles in ms."""
    rows = []
    for key, now in sorted(after.items()):
        then = before.get(key, {"count": 0.0, "sum": 0.0, "buckets": {}})
        count = now["count"] - then["count"]
        if count <= 0:
            continue
        buckets = {le: value - then["buckets"].get(le, 0.0) for le, value in now["buckets"].items()}
        row: dict[str, Any] = {
            "method": key[0],
            "code": key[1],
            "requests": int(count),
            "mean_ms": round((now["sum"] - then["sum"]) / count * 1000, 3),
        }
        for q in (0.5, 0.95, 0.99):
            v = quantile(q, buckets)
            row[f"p{int(q * 100)}_ms"] = None if v is None else round(v * 1000, 3)
        rows.append(row)
    return rows
