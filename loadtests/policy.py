"""What the Rego policy adds to a request: per-decision latency of the broker's policy.

    python -m loadtests.policy [--decisions N] [--distinct K] [--json FILE] [--slo]

Runs in process, on the policy objects the broker serves with (no network, no gRPC), so the
figures are the policy's own cost and nothing else:

- `builtin`: the built-in rules (`broker.policy.DefaultPolicy`), what the broker used before;
- `rego-cached`: `AccessControl.decide` with the shipped Rego policy, K distinct requests
  (callers x secrets, grants in force) repeated, so after the first round every decision is a
  cache hit on its full input (the steady state of a fleet fetching its secrets);
- `rego-uncached`: every decision a new input (a cache miss): regopy evaluates the policy.

The "added" figure is rego-cached minus builtin at each percentile. `--slo` exits 4 when the
cached policy adds 1 ms or more at p99 (the issue's budget). Decisions are timed one by one
with perf_counter_ns; the run interleaves nothing else, but the machine may (say so when you
quote figures).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker.access import AccessControl
from broker.policy import Caller, DefaultPolicy
from broker.storage import open_storage
from ca.clock import FakeClock

TD = "example.org"
OPERATOR = f"spiffe://{TD}/broker/operator/ops"
TENANTS = ("acme", "globex")
ENVIRONMENTS = ("dev", "prod")
SERVICES = ("web", "api", "db", "billing", "search")


def _percentiles(samples_ns: list[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)
    n = len(ordered)

    def at(q: float) -> float:
        return ordered[min(n - 1, int(q * n))] / 1000.0

    return {
        "p50_us": at(0.50),
        "p90_us": at(0.90),
        "p99_us": at(0.99),
        "p999_us": at(0.999),
        "max_us": ordered[-1] / 1000.0,
        "mean_us": sum(ordered) / n / 1000.0,
        "n": n,
    }


def _requests(distinct: int) -> list[tuple[Caller, str, str, dict[str, str]]]:
    """`distinct` (caller, action, resource, attributes) tuples: workloads reading secrets of
    every kind (own, other service, other environment, other tenant, prod+pii)."""
    out: list[tuple[Caller, str, str, dict[str, str]]] = []
    i = 0
    while len(out) < distinct:
        tenant = TENANTS[i % 2]
        environment = ENVIRONMENTS[(i // 2) % 2]
        service = SERVICES[(i // 4) % len(SERVICES)]
        caller = Caller(
            f"spiffe://{TD}/{tenant}/{environment}/{service}-{i // 40}",
            False,
            {"tenant": tenant, "environment": environment, "service": f"{service}-{i // 40}"},
        )
        owner = caller.attributes["service"] if i % 3 else "db"
        attributes = {
            "tenant": tenant if i % 7 else "globex",
            "environment": environment,
            "owner": owner,
            "classification": "pii" if i % 5 == 0 else "internal",
            "service": owner,
        }
        out.append((caller, "secrets.get", f"{i:064x}", attributes))
        i += 1
    return out


def _time(
    decide: Callable[[Caller, str, str, dict[str, str]], Any],
    requests: list[tuple[Caller, str, str, dict[str, str]]],
    decisions: int,
) -> list[int]:
    samples = []
    clock = time.perf_counter_ns
    k = len(requests)
    for n in range(decisions):
        caller, action, resource, attributes = requests[n % k]
        started = clock()
        decide(caller, action, resource, attributes)
        samples.append(clock() - started)
    return samples


async def run(decisions: int, distinct: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        storage = await open_storage(f"sqlite:///{Path(tmp) / 'broker.db'}")
        await storage.migrate()
        clock = FakeClock(dt.datetime.now(dt.UTC))
        access = AccessControl(
            storage.access(),
            storage,
            clock,
            trust_domain=TD,
            operators=[OPERATOR],
        )
        await access.load()
        requests = _requests(distinct)
        # a few grants in force, so the input carries some
        ops = Caller(OPERATOR, True, {})
        for caller, _, resource, _ in requests[: max(1, distinct // 20)]:
            await access.create_grant(
                ops, caller.spiffe_id, "secrets.get", resource, dt.timedelta(hours=8), "bench"
            )
        builtin = DefaultPolicy([OPERATOR])

        def via_builtin(c: Caller, a: str, r: str, attrs: dict[str, str]) -> Any:
            return builtin.decide(c, a, r, attributes=attrs)

        def via_rego(c: Caller, a: str, r: str, attrs: dict[str, str]) -> Any:
            return access.decide(c, a, r, attributes=attrs)

        # warm-up: fill the cache with the K distinct inputs, warm the interpreter
        _time(via_rego, requests, distinct)
        _time(via_builtin, requests, distinct)
        results: dict[str, Any] = {}
        results["builtin"] = _percentiles(_time(via_builtin, requests, decisions))
        hits = access.cache_hits
        results["rego-cached"] = _percentiles(_time(via_rego, requests, decisions))
        results["rego-cached"]["cache_hit_ratio"] = round((access.cache_hits - hits) / decisions, 4)
        misses_before = access.cache_misses
        unique = _requests(distinct + decisions // 10)[distinct:]
        results["rego-uncached"] = _percentiles(_time(via_rego, unique, len(unique)))
        results["rego-uncached"]["cache_miss_ratio"] = round(
            (access.cache_misses - misses_before) / len(unique), 4
        )
        await storage.close()
    added = {
        key: round(results["rego-cached"][key] - results["builtin"][key], 2)
        for key in ("p50_us", "p90_us", "p99_us", "p999_us")
    }
    return {
        "decisions": decisions,
        "distinct_inputs": distinct,
        "results": results,
        "added_by_cached_rego_us": added,
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average": list(os.getloadavg()),
        },
    }


def _line(name: str, r: dict[str, Any]) -> str:
    return (
        f"{name:14} n={r['n']:>7}  p50 {r['p50_us']:8.1f} us  p90 {r['p90_us']:8.1f} us  "
        f"p99 {r['p99_us']:8.1f} us  p99.9 {r['p999_us']:8.1f} us  max {r['max_us']:9.1f} us"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=100_000)
    parser.add_argument("--distinct", type=int, default=2_000)
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--slo", action="store_true", help="exit 4 if cached p99 adds >= 1 ms")
    args = parser.parse_args(argv)
    report = asyncio.run(run(args.decisions, args.distinct))
    for name, figures in report["results"].items():
        print(_line(name, figures))
    added = report["added_by_cached_rego_us"]
    hit_ratio = report["results"]["rego-cached"]["cache_hit_ratio"]
    print(
        f"added by the cached Rego policy: p50 {added['p50_us']} us, p99 {added['p99_us']} us, "
        f"p99.9 {added['p999_us']} us (hit ratio {hit_ratio}); load average "
        f"{report['machine']['load_average'][0]:.2f} on {report['machine']['cpus']} CPUs"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.slo and added["p99_us"] >= 1000:
        print("SLO missed: the cached policy adds 1 ms or more at p99", file=sys.stderr)
        return 4
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
