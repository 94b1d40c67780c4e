"""RefusalSampler: which refusals of a flood reach the audit ledger (issue 20, finding 9)."""

from broker.ratelimit import RefusalSampler
from ca.clock import FakeClock


def test_first_refusal_of_each_interval_is_audited_with_the_previous_count() -> None:
    clock = FakeClock()
    sampler = RefusalSampler(clock, interval=10.0)
    assert sampler.admit("rate:a") == 0
    assert [sampler.admit("rate:a") for _ in range(999)] == [None] * 999
    clock.advance(9.999)
    assert sampler.admit("rate:a") is None
    clock.advance(0.001)
    assert sampler.admit("rate:a") == 1001  # the whole previous window, audited one included
    assert sampler.admit("rate:a") is None


def test_keys_have_their_own_windows() -> None:
    sampler = RefusalSampler(FakeClock(), interval=10.0)
    assert sampler.admit("rate:a") == 0
    assert sampler.admit("unauthenticated:10.0.0.1") == 0
    assert sampler.admit("rate:a") is None
    assert sampler.admit("unauthenticated:10.0.0.2") == 0


def test_zero_interval_audits_every_refusal() -> None:
    sampler = RefusalSampler(FakeClock(), interval=0)
    assert [sampler.admit("k") for _ in range(3)] == [0, 0, 0]


def test_the_table_stays_bounded_under_many_keys() -> None:
    clock = FakeClock()
    sampler = RefusalSampler(clock, interval=1.0, max_keys=100)
    for i in range(100):
        sampler.admit(f"k{i}")
    clock.advance(1.0)
    for i in range(100, 1000):
        assert sampler.admit(f"k{i}") == 0
    assert len(sampler._windows) <= 100
