from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
from fractions import Fraction

import pytest

from ca.clock import FakeClock
from ca.errors import CAStateError, InvalidPolicy
from ca.rotation import (
    Action,
    Activate,
    Expire,
    GenerationState,
    GenerationView,
    Prepare,
    Retire,
    RotationSchedule,
    check_max_svid_ttl,
    max_safe_svid_ttl,
    plan,
)

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
H = dt.timedelta(hours=1)
CA_TTL = dt.timedelta(hours=24)
SVID_TTL = 4 * H  # = CA_TTL / 6, the safe maximum
JWT_TTL = 5 * dt.timedelta(minutes=1)
SCHEDULE = RotationSchedule(CA_TTL)


def gen(
    gen_id: str,
    state: GenerationState | str,
    start: dt.datetime = T0,
    *,
    ttl: dt.timedelta = CA_TTL,
    retired_at: dt.datetime | None = None,
) -> GenerationView:
    return GenerationView(
        id=gen_id,
        state=GenerationState(state),
        not_before=start,
        not_after=start + ttl,
        activated_at=start if state == "active" else None,
        retired_at=retired_at,
    )


def run(now: dt.datetime, *gens: GenerationView, force: bool = False) -> list[Action]:
    return plan(now, list(gens), SCHEDULE, SVID_TTL, JWT_TTL, force=force)


# --- thresholds ----------------------------------------------------------------------------------


def test_max_safe_svid_ttl() -> None:
    assert max_safe_svid_ttl(CA_TTL) == 4 * H
    assert max_safe_svid_ttl(dt.timedelta(days=6)) == 24 * H
    assert SCHEDULE.max_safe_svid_ttl() == 4 * H
    assert max_safe_svid_ttl(CA_TTL, Fraction(3, 4)) == 6 * H


def test_check_svid_ttl() -> None:
    SCHEDULE.check_svid_ttl(4 * H)
    with pytest.raises(InvalidPolicy) as info:
        SCHEDULE.check_svid_ttl(24 * H)
    message = str(info.value)
    assert "24h" in message and "safe maximum 4h" in message
    assert "at least 144h" in message  # 6 days


def test_check_max_svid_ttl_function() -> None:
    check_max_svid_ttl(RotationSchedule(dt.timedelta(days=6)), 24 * H)
    with pytest.raises(InvalidPolicy, match="safe maximum 4h"):
        check_max_svid_ttl(SCHEDULE, 24 * H)


def test_plan_refuses_unsafe_svid_ttl() -> None:
    with pytest.raises(InvalidPolicy, match="safe maximum"):
        plan(T0, [], SCHEDULE, 5 * H, JWT_TTL)


@pytest.mark.parametrize(
    ("prepare_at", "activate_at"),
    [
        (Fraction(5, 6), Fraction(1, 2)),
        (Fraction(1, 2), Fraction(1, 2)),
        (Fraction(0), Fraction(1, 2)),
        (Fraction(1, 2), Fraction(1)),
    ],
)
def test_schedule_validation(prepare_at: Fraction, activate_at: Fraction) -> None:
    with pytest.raises(InvalidPolicy, match="0 < prepare_at < activate_at < 1"):
        RotationSchedule(CA_TTL, prepare_at, activate_at)


def test_schedule_needs_positive_ttl() -> None:
    with pytest.raises(InvalidPolicy, match="positive"):
        RotationSchedule(dt.timedelta(0))


def test_threshold_times() -> None:
    active = gen("a", "active")
    assert SCHEDULE.prepare_time(active) == T0 + 12 * H
    assert SCHEDULE.activate_time(active) == T0 + 20 * H


# --- plan rules ----------------------------------------------------------------------------------


def test_bootstrap_prepares_and_activates() -> None:
    assert run(T0) == [Prepare(), Activate(None)]


def test_bootstrap_with_prepared_activates_it() -> None:
    assert run(T0, gen("p", "prepared")) == [Activate("p")]


def test_nothing_to_do_early_in_life() -> None:
    assert run(T0 + H, gen("a", "active")) == []
    assert run(T0 + 12 * H - dt.timedelta(seconds=1), gen("a", "active")) == []


def test_prepare_at_half_life() -> None:
    assert run(T0 + 12 * H, gen("a", "active")) == [Prepare()]
    assert run(T0 + 12 * H, gen("a", "active"), gen("p", "prepared", T0 + 12 * H)) == []


def test_activate_at_five_sixths() -> None:
    active, prepared = gen("a", "active"), gen("p", "prepared", T0 + 12 * H)
    assert run(T0 + 20 * H - dt.timedelta(seconds=1), active, prepared) == []
    assert run(T0 + 20 * H, active, prepared) == [Activate("p"), Retire("a")]


def test_late_without_prepared_prepares_first() -> None:
    assert run(T0 + 21 * H, gen("a", "active")) == [Prepare()]


def test_expired_active_is_replaced_at_once() -> None:
    assert run(T0 + 25 * H, gen("a", "active")) == [Prepare(), Activate(None), Retire("a")]
    prepared = gen("p", "prepared", T0 + 12 * H)
    assert run(T0 + 25 * H, gen("a", "active"), prepared) == [Activate("p"), Retire("a")]


def test_force() -> None:
    assert run(T0 + H, gen("a", "active"), force=True) == [Prepare(), Activate(None), Retire("a")]
    prepared = gen("p", "prepared", T0 + H)
    assert run(T0 + 2 * H, gen("a", "active"), prepared, force=True) == [
        Activate("p"),
        Retire("a"),
    ]
    assert run(T0, force=True) == [Prepare(), Activate(None)]


def test_retired_expires_only_after_not_after_and_jwt_ttl() -> None:
    active = gen("b", "active", T0 + 20 * H)
    retired = gen("a", "retired", retired_at=T0 + 20 * H)
    assert run(T0 + 24 * H - dt.timedelta(seconds=1), active, retired) == []
    assert run(T0 + 24 * H, active, retired) == [Expire("a")]
    # Retired late (e.g. a forced rotation just before its end): the JWT key stays until the last
    # JWT it signed has expired, even after its certificate's notAfter.
    late = gen("a", "retired", retired_at=T0 + 24 * H - dt.timedelta(minutes=1))
    assert run(T0 + 24 * H, active, late) == []
    assert run(T0 + 24 * H + 4 * dt.timedelta(minutes=1), active, late) == [Expire("a")]


def test_expired_generations_are_left_alone() -> None:
    assert run(T0 + 100 * H, gen("b", "active", T0 + 90 * H), gen("a", "expired")) == []


def test_prepared_that_expired_unused_is_dropped() -> None:
    stale = gen("p", "prepared", T0 - 48 * H)
    assert run(T0 + H, gen("a", "active"), stale) == [Expire("p")]
    assert run(T0 + 13 * H, gen("a", "active"), stale) == [Expire("p"), Prepare()]


def test_thresholds_follow_the_generation_own_lifetime() -> None:
    # An issuing CA capped short by its root's notAfter rotates on its own clock.
    short = gen("a", "active", ttl=6 * H)
    assert run(T0 + 3 * H, short) == [Prepare()]


def test_inconsistent_journal_refused() -> None:
    with pytest.raises(CAStateError, match="2 active generations"):
        run(T0, gen("a", "active"), gen("b", "active"))
    with pytest.raises(CAStateError, match="2 prepared generations"):
        run(T0, gen("a", "prepared"), gen("b", "prepared"))


def test_generation_view_validation() -> None:
    with pytest.raises(CAStateError, match="retired but has no retired_at"):
        gen("a", "retired")
    with pytest.raises(CAStateError, match="unknown state 'zombie'"):
        GenerationView("a", "zombie", T0, T0 + H)  # type: ignore[arg-type]
    with pytest.raises(CAStateError, match="not_after is not after not_before"):
        GenerationView("a", GenerationState.ACTIVE, T0, T0)
    view = GenerationView("a", "active", T0.replace(tzinfo=None), T0 + H)  # type: ignore[arg-type]
    assert view.state is GenerationState.ACTIVE
    assert view.not_before == T0


def test_negative_jwt_ttl_refused() -> None:
    with pytest.raises(InvalidPolicy, match="JWT"):
        plan(T0, [], SCHEDULE, SVID_TTL, -H)


def test_plan_is_pure() -> None:
    gens = [gen("a", "active"), gen("p", "prepared", T0 + 12 * H)]
    snapshot = list(gens)
    assert run(T0 + 20 * H, *gens) == run(T0 + 20 * H, *gens)
    assert gens == snapshot


# --- a simulated CA over many lifetimes ---------------------------------------------------------


@dataclasses.dataclass
class Journal:
    """A tiny executor standing in for the CA manager: applies actions, checks invariants."""

    generations: dict[str, GenerationView] = dataclasses.field(default_factory=dict)
    published_at: dict[str, dt.datetime] = dataclasses.field(default_factory=dict)
    ids: itertools.count[int] = dataclasses.field(default_factory=itertools.count)

    def views(self) -> list[GenerationView]:
        return list(self.generations.values())

    def apply(self, now: dt.datetime, actions: list[Action]) -> None:
        just_prepared: str | None = None
        for action in actions:
            if isinstance(action, Prepare):
                just_prepared = f"g{next(self.ids)}"
                self.generations[just_prepared] = GenerationView(
                    just_prepared, GenerationState.PREPARED, now, now + CA_TTL
                )
                self.published_at[just_prepared] = now
            elif isinstance(action, Activate):
                target = action.id or just_prepared
                assert target is not None
                self._set(target, state=GenerationState.ACTIVE, activated_at=now)
            elif isinstance(action, Retire):
                self._set(action.id, state=GenerationState.RETIRED, retired_at=now)
            elif isinstance(action, Expire):
                self._set(action.id, state=GenerationState.EXPIRED)

    def _set(self, gen_id: str, **changes: object) -> None:
        self.generations[gen_id] = dataclasses.replace(self.generations[gen_id], **changes)  # type: ignore[arg-type]


def test_simulated_rotation_keeps_every_svid_verifiable() -> None:
    clock = FakeClock(T0)
    journal = Journal()
    step = dt.timedelta(minutes=10)
    issued: list[tuple[str, dt.datetime, dt.datetime]] = []  # (generation, issued, expires)
    activations = 0
    while clock.now() < T0 + 10 * CA_TTL:
        now = clock.now()
        actions = run(now, *journal.views())
        activations += sum(isinstance(a, Activate) for a in actions)
        journal.apply(now, actions)
        states = [g.state for g in journal.views()]
        assert states.count(GenerationState.ACTIVE) == 1
        assert states.count(GenerationState.PREPARED) <= 1
        active = next(g for g in journal.views() if g.state is GenerationState.ACTIVE)
        # Issue an SVID with the maximum TTL, capped at the issuer's notAfter as build_leaf does.
        expires = min(now + SVID_TTL, active.not_after)
        assert expires == now + SVID_TTL, "rotation truncated an SVID below its TTL"
        issued.append((active.id, now, expires))
        # Everything still valid was signed by a generation that is still published.
        for gen_id, _, svid_expires in issued:
            if svid_expires > now:
                assert journal.generations[gen_id].state is not GenerationState.EXPIRED
        clock.advance(step.total_seconds())
    assert activations >= 9
    # Except at bootstrap, each generation was published well before it was activated.
    for view in journal.views():
        if view.activated_at is not None and view.id != "g0":
            lead = view.activated_at - journal.published_at[view.id]
            assert lead >= CA_TTL / 3 - step  # (activate_at - prepare_at) of a life
    assert sum(g.state is GenerationState.EXPIRED for g in journal.views()) >= 8
