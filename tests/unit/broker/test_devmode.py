"""Issue 20 finding 14: the dev data dir's softhsm2.conf held an absolute token path, so a
copied or restored data dir silently used the original's token. It is now regenerated at every
start from the data dir's own location, and a data dir whose token is missing or lives
elsewhere is refused. Needs SoftHSM2 (softhsm2-util) installed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import broker.devmode as devmode
from broker.errors import FailedPrecondition
from broker.softhsm import softhsm_available

pytestmark = pytest.mark.skipif(
    not softhsm_available() and os.environ.get("CI") != "true", reason="SoftHSM2 not installed"
)


def _tokendir(data_dir: Path) -> str:
    conf = (data_dir / "hsm" / "softhsm2.conf").read_text()
    (line,) = [x for x in conf.splitlines() if x.startswith("directories.tokendir")]
    return line.partition("=")[2].strip()


@pytest.fixture
def configured(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Record configure_process instead of pointing this test process at the token."""
    calls: list[Path] = []
    monkeypatch.setattr(devmode, "configure_process", calls.append)
    return calls


def test_a_copied_data_dir_uses_its_own_token(tmp_path: Path, configured: list[Path]) -> None:
    original, copy = tmp_path / "original", tmp_path / "copy"
    warnings: list[str] = []
    devmode.prepare(original, None, warnings.append)
    assert _tokendir(original) == str(original / "hsm" / "tokens")
    shutil.copytree(original, copy)
    assert _tokendir(copy) == str(original / "hsm" / "tokens")  # the attack's starting point

    config = devmode.prepare(copy, None, warnings.append)
    assert _tokendir(copy) == str(copy / "hsm" / "tokens")
    assert configured[-1] == copy / "hsm" / "softhsm2.conf"
    assert str(copy) in (config.keys.pin_source or "")
    assert any(str(original / "hsm" / "tokens") in w for w in warnings)
    assert _tokendir(original) == str(original / "hsm" / "tokens")  # the original untouched

    # restored after the original is gone: still its own token, no warning the second time
    shutil.rmtree(original)
    warnings.clear()
    devmode.prepare(copy, None, warnings.append)
    assert _tokendir(copy) == str(copy / "hsm" / "tokens") and warnings == []


def test_a_token_elsewhere_or_missing_is_refused(tmp_path: Path, configured: list[Path]) -> None:
    original = tmp_path / "original"
    devmode.prepare(original, None, lambda _: None)
    calls = len(configured)

    linked = tmp_path / "linked"
    shutil.copytree(original, linked)
    shutil.rmtree(linked / "hsm" / "tokens")
    (linked / "hsm" / "tokens").symlink_to(original / "hsm" / "tokens")
    before = (linked / "hsm" / "softhsm2.conf").read_text()
    with pytest.raises(FailedPrecondition, match="points outside"):
        devmode.prepare(linked, None, lambda _: None)
    assert (linked / "hsm" / "softhsm2.conf").read_text() == before

    missing = tmp_path / "missing"
    shutil.copytree(original, missing)
    shutil.rmtree(missing / "hsm" / "tokens")
    with pytest.raises(FailedPrecondition, match="is missing"):
        devmode.prepare(missing, None, lambda _: None)

    empty = tmp_path / "empty"
    shutil.copytree(original, empty)
    for child in (empty / "hsm" / "tokens").iterdir():
        shutil.rmtree(child)
    with pytest.raises(FailedPrecondition, match="holds no token"):
        devmode.prepare(empty, None, lambda _: None)
    assert len(configured) == calls  # none of them was pointed at any token


def test_a_linked_conf_is_replaced_not_written_through(
    tmp_path: Path, configured: list[Path]
) -> None:
    original, copy = tmp_path / "original", tmp_path / "copy"
    devmode.prepare(original, None, lambda _: None)
    shutil.copytree(original, copy)
    conf = copy / "hsm" / "softhsm2.conf"
    conf.unlink()
    conf.symlink_to(original / "hsm" / "softhsm2.conf")
    devmode.prepare(copy, None, lambda _: None)
    assert not conf.is_symlink()
    assert _tokendir(copy) == str(copy / "hsm" / "tokens")
    assert _tokendir(original) == str(original / "hsm" / "tokens")
