"""loadtests.policy: a tiny run yields every figure, a cache that really hits, misses that
really miss."""

from __future__ import annotations

from loadtests.policy import run


async def test_a_small_run_reports_hits_misses_and_the_added_cost() -> None:
    report = await run(decisions=400, distinct=40)
    results = report["results"]
    assert set(results) == {"builtin", "rego-cached", "rego-uncached"}
    assert results["rego-cached"]["cache_hit_ratio"] == 1.0
    assert results["rego-uncached"]["cache_miss_ratio"] == 1.0
    assert results["rego-cached"]["n"] == 400 and results["rego-uncached"]["n"] == 40
    for figures in results.values():
        assert 0 < figures["p50_us"] <= figures["p99_us"] <= figures["max_us"]
    assert set(report["added_by_cached_rego_us"]) == {"p50_us", "p90_us", "p99_us", "p999_us"}
