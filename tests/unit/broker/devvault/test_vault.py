"""The dev vault with a fake clock and the software key file: sealing, expiry, the TTL cap
and prod refusal, and refusals of altered vaults (no SoftHSM2 needed here; the e2e tests use
a real token)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from broker.devvault import (
    DevVault,
    PulledValue,
    PullRefused,
    VaultCorrupted,
    VaultKeyGone,
    check_pull,
)
from ca.clock import FakeClock

REF = "secret://payments/dev/stripe/api-key"
T0 = dt.datetime(2026, 1, 1, 9, tzinfo=dt.UTC)


def _vault(tmp_path: Path, clock: FakeClock) -> DevVault:
    vault = DevVault(tmp_path / "dev-vault", clock=clock)
    vault.store("dev", [PulledValue(REF, "dev", 3, b"s3cr3t-value")], dt.timedelta(hours=8),
                softhsm=False)  # fmt: skip
    return vault


def test_sealed_at_rest_and_expired_by_the_clock(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    vault = _vault(tmp_path, clock)
    assert b"s3cr3t-value" not in vault.path.read_bytes()
    assert (tmp_path / "dev-vault" / "vault.key").stat().st_mode & 0o777 == 0o600
    assert DevVault(vault.directory, clock=clock).get(REF) == b"s3cr3t-value"
    clock.advance(hours=8)
    later = DevVault(vault.directory, clock=clock)
    with pytest.raises(KeyError):
        later.get(REF)
    assert later.gc() == [REF] and later.entries() == []


def test_a_pull_replaces_the_environment(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    vault = _vault(tmp_path, clock)
    stored, dropped = vault.store("dev", [], dt.timedelta(hours=1), softhsm=False)
    assert (stored, dropped) == (0, [REF])


@pytest.mark.parametrize("env", ["prod", "production", "prod-eu", "PRD", "live"])
def test_prod_is_never_pulled(env: str) -> None:
    with pytest.raises(PullRefused):
        check_pull(env, dt.timedelta(hours=1))


def test_the_ttl_is_capped() -> None:
    check_pull("dev", dt.timedelta(hours=8))
    for ttl in (dt.timedelta(hours=8, seconds=1), dt.timedelta(0)):
        with pytest.raises(PullRefused):
            check_pull("dev", ttl)


def test_altered_vaults_are_refused(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    vault = _vault(tmp_path, clock)
    doc = json.loads(vault.path.read_text())
    doc["entries"][REF]["version"] = 4
    vault.path.write_text(json.dumps(doc))
    with pytest.raises(VaultCorrupted):
        DevVault(vault.directory, clock=clock).get(REF)
    (vault.directory / "vault.key").unlink()
    with pytest.raises(VaultKeyGone):
        DevVault(vault.directory, clock=clock).get(REF)
