import pytest

from broker.errors import ResourceExhausted
from broker.ratelimit import RateLimiter
from ca.clock import FakeClock


def test_burst_then_refused_then_refills() -> None:
    clock = FakeClock()
    limiter = RateLimiter(clock, rate=10, burst=3)
    for _ in range(3):
        limiter.check("spiffe://td/a")
    with pytest.raises(ResourceExhausted, match="rate limit of 10 requests/s"):
        limiter.check("spiffe://td/a")
    clock.advance(0.1)  # one token back
    limiter.check("spiffe://td/a")
    with pytest.raises(ResourceExhausted):
        limiter.check("spiffe://td/a")


def test_identities_have_separate_buckets() -> None:
    limiter = RateLimiter(FakeClock(), rate=1, burst=1)
    limiter.check("spiffe://td/a")
    limiter.check("spiffe://td/b")
    with pytest.raises(ResourceExhausted):
        limiter.check("spiffe://td/a")


def test_zero_rate_disables_limiting() -> None:
    limiter = RateLimiter(FakeClock(), rate=0, burst=1)
    for _ in range(1000):
        limiter.check("spiffe://td/a")


def test_table_is_bounded() -> None:
    clock = FakeClock()
    limiter = RateLimiter(clock, rate=1, burst=1, max_keys=10)
    for i in range(10):
        limiter.check(f"spiffe://td/{i}")
    clock.advance(5)
    limiter.check("spiffe://td/new")
    assert len(limiter._buckets) <= 10
