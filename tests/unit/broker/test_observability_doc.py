"""docs/observability.md stays true: its metric table names exactly the broker_* metrics the
registry has (counters with the `_total` suffix they are scraped with), with the type the
registry says, and the standard's five signals each name a metric that exists."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import REGISTRY

import broker.metrics  # noqa: F401  (registers the metrics)

DOC = Path(__file__).resolve().parents[3] / "docs" / "observability.md"
_ROW = re.compile(r"^\|\s*`(broker_[a-z0-9_]+)`\s*\|\s*([a-z]+)")


def _section(title: str) -> str:
    text = DOC.read_text()
    start = text.index(title)
    end = text.find("\n## ", start + len(title))
    return text[start : end if end != -1 else len(text)]


def documented() -> dict[str, str]:
    """name -> type of every row of the "Metric names" table."""
    rows = {}
    for line in _section("## Metric names").splitlines():
        m = _ROW.match(line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


def registered() -> dict[str, str]:
    """name (as scraped; counters with _total) -> type of every broker_* metric."""
    out = {}
    for family in REGISTRY.collect():
        if not family.name.startswith("broker_"):
            continue
        name = family.name + "_total" if family.type == "counter" else family.name
        out[name] = family.type
    return out


def test_every_documented_metric_exists_with_its_type_and_every_metric_is_documented() -> None:
    docs, registry = documented(), registered()
    assert len(docs) >= 15  # the table was found and read
    assert sorted(set(docs) - set(registry)) == [], "documented but not registered"
    assert sorted(set(registry) - set(docs)) == [], "registered but not documented"
    for name, kind in docs.items():
        assert registry[name] == kind, name


def test_the_standards_signals_each_name_a_registered_metric() -> None:
    section = _section("### The standard's metrics, by name")
    signals = {
        "fetch latency",
        "cache hit rate (SDK)",
        "rotation duration",
        "access anomalies",
        "audit forward lag",
    }
    registry = registered()
    seen = set()
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or cells[0] not in signals:
            continue
        seen.add(cells[0])
        names = re.findall(r"`(broker_[a-z0-9_]+)", cells[1])
        assert names, line
        for name in names:
            assert name in registry, (cells[0], name)
    assert seen == signals
