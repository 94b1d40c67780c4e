"""The runtime SDK's cache: TTL <= 5 min, refresh before expiry, cached value while the broker is
briefly unreachable, refusals (revocation) evict at once. A FakeClock drives time."""

from __future__ import annotations

import pytest

from broker.api.client.sdk import (
    FetchedSecret,
    SecretRefused,
    SecretResolver,
    SecretUnavailable,
)
from ca.clock import FakeClock

REF = "secret://payments/prod/stripe/api-key"


class FakeSource:
    def __init__(self) -> None:
        self.value = b"v1"
        self.version = 1
        self.calls = 0
        self.down = False
        self.refuse: str | None = None

    def fetch(self, reference: str) -> FetchedSecret:
        self.calls += 1
        if self.down:
            raise SecretUnavailable("UNAVAILABLE: connection refused")
        if self.refuse:
            raise SecretRefused("FAILED_PRECONDITION", self.refuse)
        return FetchedSecret(self.value, self.version)


@pytest.fixture
def source() -> FakeSource:
    return FakeSource()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_ttl_is_capped_at_five_minutes(source: FakeSource) -> None:
    with pytest.raises(ValueError, match="ttl_seconds"):
        SecretResolver(source, ttl_seconds=301)
    with pytest.raises(ValueError, match="refresh_fraction"):
        SecretResolver(source, refresh_fraction=1.0)


def test_cached_until_the_refresh_point_then_refetched(
    source: FakeSource, clock: FakeClock
) -> None:
    sdk = SecretResolver(source, clock=clock, ttl_seconds=300)
    assert sdk.get(REF) == b"v1"
    source.value, source.version = b"v2", 2
    clock.advance(239)  # refresh point is 80 % of 300 s = 240 s
    assert sdk.get(REF) == b"v1"
    assert source.calls == 1
    clock.advance(1)
    assert sdk.get_versioned(REF) == FetchedSecret(b"v2", 2)  # refreshed before expiry
    assert source.calls == 2


def test_serves_the_cache_while_the_broker_is_briefly_down(
    source: FakeSource, clock: FakeClock
) -> None:
    sdk = SecretResolver(source, clock=clock, ttl_seconds=300)
    assert sdk.get(REF) == b"v1"
    source.down = True
    clock.advance(250)
    assert sdk.get(REF) == b"v1"  # past the refresh point, within the TTL: cached value
    clock.advance(49)
    assert sdk.get(REF) == b"v1"
    assert source.calls == 3  # it kept trying
    clock.advance(1)  # TTL reached
    with pytest.raises(SecretUnavailable):
        sdk.get(REF)
    source.down = False
    assert sdk.get(REF) == b"v1"


def test_unreachable_without_a_cached_value_raises(source: FakeSource, clock: FakeClock) -> None:
    source.down = True
    with pytest.raises(SecretUnavailable):
        SecretResolver(source, clock=clock).get(REF)


def test_a_refusal_evicts_at_once(source: FakeSource, clock: FakeClock) -> None:
    sdk = SecretResolver(source, clock=clock, ttl_seconds=60)
    assert sdk.get(REF) == b"v1"
    source.refuse = "the secret was revoked"
    clock.advance(48)
    with pytest.raises(SecretRefused, match="revoked"):
        sdk.get(REF)
    source.down = True  # even if the broker then goes away, the revoked value is not served
    with pytest.raises(SecretUnavailable):
        sdk.get(REF)


def test_refresh_due_refreshes_idle_entries(source: FakeSource, clock: FakeClock) -> None:
    sdk = SecretResolver(source, clock=clock, ttl_seconds=100)
    sdk.get(REF)
    sdk.get("secret://payments/prod/other")
    assert sdk.refresh_due() == {}
    assert source.calls == 2
    clock.advance(80)
    source.value = b"v2"
    assert sdk.refresh_due() == {}
    assert source.calls == 4
    source.down = True
    clock.advance(10)
    assert sdk.get(REF) == b"v2"  # served from the refreshed entry without a call
    assert source.calls == 4
    clock.advance(70)
    errors = sdk.refresh_due()
    assert set(errors) == {REF, "secret://payments/prod/other"}
    assert sdk.get(REF) == b"v2"  # 80 s after the refresh: still within the TTL


def test_resolve_env(source: FakeSource, clock: FakeClock) -> None:
    sdk = SecretResolver(source, clock=clock)
    assert sdk.resolve_env({"STRIPE": REF}) == {"STRIPE": "v1"}
    sdk.forget()
    source.value = b"v3"
    assert sdk.get_text(REF) == "v3"


def _sdk_cache_count(result: str) -> float:
    from broker import metrics

    value = metrics.SDK_CACHE.labels("secret", result)._value.get()
    return float(value)


def test_cache_hits_and_misses_are_counted(source: FakeSource, clock: FakeClock) -> None:
    hits, misses = _sdk_cache_count("hit"), _sdk_cache_count("miss")
    sdk = SecretResolver(source, clock=clock, ttl_seconds=300)
    sdk.get(REF)  # miss: fetched
    sdk.get(REF)  # hit
    sdk.get(REF)  # hit
    clock.advance(240)
    sdk.get(REF)  # past the refresh point: a miss again
    assert _sdk_cache_count("hit") - hits == 2
    assert _sdk_cache_count("miss") - misses == 2
