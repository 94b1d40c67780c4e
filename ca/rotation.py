"""Issuing-CA rotation as pure threshold functions (SPIRE style), driven by an injected `now`.

A *generation* is one issuing authority: an issuing CA certificate (signed by the root) plus a
JWT signing key. Its life: prepared -> active -> retired -> expired.

- **prepared**: created at `prepare_at` (1/2) of the active generation's life. It signs nothing
  yet, but its JWT key is already published in the trust bundle, so every relying party has it
  well before the first JWT it signs (the lesson of spire#2704).
- **active**: the one generation that signs. The prepared one is activated, and the old one
  retired, at `activate_at` (5/6) of the active generation's life.
- **retired**: signs nothing, but stays published until everything it signed has expired:
  X509-SVIDs cannot outlive its certificate's notAfter (leaves are capped at the issuer's
  notAfter), and its JWTs live at most `max_jwt_ttl` after retirement.
- **expired**: removed from the bundle.

The X.509 trust bundle holds the root(s), not the issuing CAs: a workload's chain carries its
issuing CA, so rotating the issuing CA never invalidates an SVID that is still valid.

`plan` only decides, and is pure and idempotent for a given state. The caller applies the
actions in order while it holds a leader lease (one replica at a time), each as its own
compare-and-set transition (prepared -> active only if still prepared, and so on), so a
transition another replica already made is skipped rather than repeated; then it publishes the
new bundle. There is no single transaction around the whole plan: a crash between two
transitions leaves a state that the next `plan` continues from.

With the defaults, the safe maximum SVID TTL is `ca_ttl * (1 - activate_at)` = CA TTL / 6: an
SVID issued just before activation still gets its full TTL from the retiring CA. 24 h SVIDs
therefore need an issuing CA TTL of at least 6 days.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
from collections.abc import Sequence
from fractions import Fraction
from typing import Final

from ca.clock import utc
from ca.duration import format_duration
from ca.errors import CAStateError, InvalidPolicy

__all__ = [
    "DEFAULT_ACTIVATE_AT",
    "DEFAULT_PREPARE_AT",
    "Action",
    "Activate",
    "Expire",
    "GenerationState",
    "GenerationView",
    "Prepare",
    "Retire",
    "RotationSchedule",
    "check_max_svid_ttl",
    "max_safe_svid_ttl",
    "plan",
]

DEFAULT_PREPARE_AT: Final = Fraction(1, 2)
DEFAULT_ACTIVATE_AT: Final = Fraction(5, 6)
_MICROSECOND: Final = dt.timedelta(microseconds=1)


def _scale(value: dt.timedelta, fraction: Fraction) -> dt.timedelta:
    """Exact `value * fraction`, rounded down to the microsecond."""
    micros = value // _MICROSECOND
    return dt.timedelta(microseconds=micros * fraction.numerator // fraction.denominator)


def _fraction(value: Fraction | float | int, name: str) -> Fraction:
    if isinstance(value, bool) or not isinstance(value, Fraction | float | int):
        raise InvalidPolicy(f"{name} must be a fraction such as 1/2")
    return Fraction(value).limit_denominator(1_000_000)


def max_safe_svid_ttl(
    ca_ttl: dt.timedelta, activate_at: Fraction | float = DEFAULT_ACTIVATE_AT
) -> dt.timedelta:
    """`ca_ttl * (1 - activate_at)`: the longest SVID TTL that rotation never truncates."""
    return _scale(ca_ttl, 1 - _fraction(activate_at, "activate_at"))


def check_max_svid_ttl(schedule: RotationSchedule, max_svid_ttl: dt.timedelta) -> None:
    """Raise `InvalidPolicy` if `max_svid_ttl` exceeds `schedule.max_safe_svid_ttl()`.

    Call it when CA policy changes (with `CAPolicy.max_x509_ttl()`), to refuse a policy the
    rotation schedule cannot honour.
    """
    schedule.check_svid_ttl(max_svid_ttl)


class GenerationState(enum.StrEnum):
    PREPARED = "prepared"
    ACTIVE = "active"
    RETIRED = "retired"
    EXPIRED = "expired"


@dataclasses.dataclass(frozen=True, slots=True)
class GenerationView:
    """What `plan` needs to know about one generation (read from the CA journal).

    `not_before`/`not_after` are the issuing CA certificate's validity. A retired generation
    must carry `retired_at` (else `CAStateError`).
    """

    id: str
    state: GenerationState
    not_before: dt.datetime
    not_after: dt.datetime
    activated_at: dt.datetime | None = None
    retired_at: dt.datetime | None = None

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "state", GenerationState(self.state))
        except ValueError:
            raise CAStateError(
                f"generation {self.id}: unknown state {self.state!r}; expected one of "
                f"{', '.join(s.value for s in GenerationState)}"
            ) from None
        object.__setattr__(self, "not_before", utc(self.not_before))
        object.__setattr__(self, "not_after", utc(self.not_after))
        if self.not_after <= self.not_before:
            raise CAStateError(f"generation {self.id}: not_after is not after not_before")
        if self.state is GenerationState.RETIRED and self.retired_at is None:
            raise CAStateError(f"generation {self.id} is retired but has no retired_at")
        for name in ("activated_at", "retired_at"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, utc(value))


@dataclasses.dataclass(frozen=True, slots=True)
class RotationSchedule:
    """When to prepare and activate, as fractions of the active generation's lifetime."""

    ca_ttl: dt.timedelta
    prepare_at: Fraction = DEFAULT_PREPARE_AT
    activate_at: Fraction = DEFAULT_ACTIVATE_AT

    def __post_init__(self) -> None:
        if not isinstance(self.ca_ttl, dt.timedelta) or self.ca_ttl <= dt.timedelta(0):
            raise InvalidPolicy("CA TTL must be a positive duration")
        prepare_at = _fraction(self.prepare_at, "prepare_at")
        activate_at = _fraction(self.activate_at, "activate_at")
        if not 0 < prepare_at < activate_at < 1:
            raise InvalidPolicy(
                f"rotation thresholds must satisfy 0 < prepare_at < activate_at < 1 "
                f"(got prepare_at={prepare_at}, activate_at={activate_at})"
            )
        object.__setattr__(self, "prepare_at", prepare_at)
        object.__setattr__(self, "activate_at", activate_at)

    def prepare_time(self, generation: GenerationView) -> dt.datetime:
        life = generation.not_after - generation.not_before
        return generation.not_before + _scale(life, self.prepare_at)

    def activate_time(self, generation: GenerationView) -> dt.datetime:
        life = generation.not_after - generation.not_before
        return generation.not_before + _scale(life, self.activate_at)

    def max_safe_svid_ttl(self) -> dt.timedelta:
        return max_safe_svid_ttl(self.ca_ttl, self.activate_at)

    def check_svid_ttl(self, max_svid_ttl: dt.timedelta) -> None:
        """Raise `InvalidPolicy` if `max_svid_ttl` is longer than rotation can honour."""
        safe = self.max_safe_svid_ttl()
        if max_svid_ttl > safe:
            needed = _scale(max_svid_ttl, 1 / (1 - self.activate_at))
            raise InvalidPolicy(
                f"maximum X509-SVID TTL {format_duration(max_svid_ttl)} is longer than the "
                f"safe maximum {format_duration(safe)} for a CA TTL of "
                f"{format_duration(self.ca_ttl)} (activation at {self.activate_at} of its life); "
                f"lower the SVID TTL or raise the CA TTL to at least {format_duration(needed)}"
            )


@dataclasses.dataclass(frozen=True, slots=True)
class Prepare:
    """Create a new generation in state prepared and publish its JWT key."""


@dataclasses.dataclass(frozen=True, slots=True)
class Activate:
    """Make a prepared generation the active one.

    `id` None means "the generation created by the `Prepare` earlier in this plan" (bootstrap
    or forced rotation, where no generation was prepared ahead of time).
    """

    id: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class Retire:
    """Stop signing with this generation; keep it published."""

    id: str


@dataclasses.dataclass(frozen=True, slots=True)
class Expire:
    """Remove this generation from the bundle; nothing it signed is still valid."""

    id: str


Action = Prepare | Activate | Retire | Expire


def _single(generations: Sequence[GenerationView], state: GenerationState) -> GenerationView | None:
    found = [g for g in generations if g.state is state]
    if len(found) > 1:
        ids = ", ".join(g.id for g in found)
        raise CAStateError(
            f"CA journal has {len(found)} {state.value} generations ({ids}); at most one is allowed"
        )
    return found[0] if found else None


def plan(
    now: dt.datetime,
    generations: Sequence[GenerationView],
    schedule: RotationSchedule,
    max_svid_ttl: dt.timedelta,
    max_jwt_ttl: dt.timedelta,
    *,
    force: bool = False,
) -> list[Action]:
    """The actions due at `now`, in the order to apply them. [] means nothing to do.

    - no usable active generation (bootstrap, or the active one has expired): Prepare (unless a
      usable prepared one exists) and Activate at once, retiring the expired one;
    - active past `prepare_at` and nothing prepared: Prepare;
    - active past `activate_at` and a prepared one exists: Activate(prepared), Retire(active);
      past `activate_at` with nothing prepared (the broker was down): Prepare now, activate on
      the next plan;
    - retired generations: Expire once now >= not_after and now >= retired_at + max_jwt_ttl;
    - a prepared generation that expired unused: Expire;
    - `force`: Prepare (if needed), Activate and Retire now. With nothing prepared, the new JWT
      key signs before relying parties have fetched it: they must refresh their bundle.

    Raises `InvalidPolicy` if `max_svid_ttl` exceeds `schedule.max_safe_svid_ttl()`, and
    `CAStateError` for an inconsistent journal (two active or two prepared generations).
    """
    now = utc(now)
    schedule.check_svid_ttl(max_svid_ttl)
    if max_jwt_ttl < dt.timedelta(0):
        raise InvalidPolicy("maximum JWT-SVID TTL must not be negative")
    active = _single(generations, GenerationState.ACTIVE)
    prepared = _single(generations, GenerationState.PREPARED)
    actions: list[Action] = []

    if prepared is not None and now >= prepared.not_after:
        actions.append(Expire(prepared.id))
        prepared = None

    if active is None or now >= active.not_after or force:
        if prepared is None:
            actions.append(Prepare())
        actions.append(Activate(prepared.id if prepared is not None else None))
        if active is not None:
            actions.append(Retire(active.id))
    elif now >= schedule.activate_time(active):
        if prepared is not None:
            actions.append(Activate(prepared.id))
            actions.append(Retire(active.id))
        else:
            actions.append(Prepare())
    elif now >= schedule.prepare_time(active) and prepared is None:
        actions.append(Prepare())

    for generation in generations:
        if generation.state is not GenerationState.RETIRED:
            continue
        assert generation.retired_at is not None  # checked by GenerationView
        if now >= generation.not_after and now >= generation.retired_at + max_jwt_ttl:
            actions.append(Expire(generation.id))
    return actions
