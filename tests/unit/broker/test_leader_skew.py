"""Leader leases between replicas whose clocks disagree (issue 19: "clock skew between replicas
of a few seconds: leases still behave"), and how fast a lease moves after its holder dies.

Two replicas share one storage and run the reaper's leader loop: every `INTERVAL` seconds of
their own clock they `try_lease` with the reaper's TTL (max(5 x interval, 5 s)). Each replica has
its own FakeClock, offset from the other by the skew; "real" time advances in half-second steps.
A replica's lease expiry is computed from its own clock and compared with the other's, which is
exactly what happens between two machines.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from broker.database.reaper import LEADER_LEASE
from broker.storage.factory import open_storage
from ca.clock import FakeClock

INTERVAL = 1.0
TTL = max(INTERVAL * 5, 5.0)
STEP = 0.5
T0 = dt.datetime(2026, 12, 3, 12, 0, tzinfo=dt.UTC)


async def _simulate(
    tmp_path: Path, skew: float, *, alive_for: float = 60.0, total: float = 90.0
) -> tuple[list[tuple[float, str]], float]:
    """Replica "a" (clock = real time) and "b" (clock = real time + skew) run the leader loop;
    "a" ticks on whole seconds, "b" half a second later; whoever leads first dies at
    `alive_for`. Returns the grants [(real time, owner)] and the death time."""
    storage = await open_storage(f"sqlite:///{tmp_path / f'skew{skew}.db'}")
    await storage.migrate()
    clocks = {"a": FakeClock(T0), "b": FakeClock(T0 + dt.timedelta(seconds=skew))}
    grants: list[tuple[float, str]] = []
    dead: str | None = None
    try:
        steps = int(total / STEP)
        for i in range(steps):
            real = i * STEP
            owner = "a" if i % 2 == 0 else "b"
            if real >= alive_for and dead is None and grants:
                dead = grants[-1][1]  # the current leader's machine dies
            if owner != dead:
                if await storage.try_lease(LEADER_LEASE, owner, TTL, clocks[owner].now()):
                    grants.append((real, owner))
            for clock in clocks.values():
                clock.advance(seconds=STEP)
    finally:
        await storage.close()
    return grants, alive_for


def _holders_while_alive(grants: list[tuple[float, str]], alive_for: float) -> set[str]:
    return {owner for real, owner in grants if real < alive_for}


@pytest.mark.parametrize("skew", [-3.0, -1.0, 0.0, 1.0, 3.0])
async def test_one_leader_under_a_few_seconds_of_skew(tmp_path: Path, skew: float) -> None:
    grants, died = await _simulate(tmp_path, skew)
    leaders = _holders_while_alive(grants, died)
    assert len(leaders) == 1, f"skew {skew}s: the lease changed hands while its holder lived"
    (first,) = leaders
    # After the holder dies, the other replica takes over within TTL + interval + |skew|.
    after = [(real, owner) for real, owner in grants if real >= died and owner != first]
    assert after, f"skew {skew}s: nobody took over after {first} died"
    moved_after = after[0][0] - died
    assert moved_after <= TTL + INTERVAL + abs(skew), (skew, moved_after)
    # ... and never before the dead holder's last lease ran out by the taker's clock.
    last_renewal = max(real for real, owner in grants if owner == first)
    assert after[0][0] >= last_renewal + TTL - max(skew, 0) - STEP, (skew, after[0][0])


async def test_skew_beyond_ttl_minus_interval_is_where_it_breaks(tmp_path: Path) -> None:
    """The documented bound (docs/ha.md): a clock ahead by more than TTL - interval sees the
    holder's lease as expired between two renewals and takes it. NTP keeps skew far below."""
    grants, died = await _simulate(tmp_path, TTL - INTERVAL + 0.5)
    assert len(_holders_while_alive(grants, died)) == 2
