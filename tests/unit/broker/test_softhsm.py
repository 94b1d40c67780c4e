"""SoftHSM2 token provisioning for dev mode and the test fixtures (moved out of the CA library,
issue 17): configuration files and refusals of bad input before softhsm2-util runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.softhsm import init_token, write_config
from ca.errors import InvalidInput


def test_write_config_points_softhsm_at_our_directory(tmp_path: Path) -> None:
    conf = write_config(tmp_path)
    assert conf == tmp_path / "softhsm2.conf"
    text = conf.read_text()
    assert f"directories.tokendir = {tmp_path / 'tokens'}\n" in text
    assert "objectstore.backend = file\n" in text
    assert "log.level = ERROR\n" in text
    assert (tmp_path / "tokens").is_dir()
    assert write_config(tmp_path) == conf  # idempotent


@pytest.mark.parametrize(
    ("label", "pin", "message"),
    [
        ("", b"123456", "token label"),
        ("x" * 33, b"123456", "token label"),
        ("ok", b"123", "4 to 255"),
        ("ok", b"-123456", "must not start"),
    ],
)
def test_init_token_refuses_bad_input(tmp_path: Path, label: str, pin: bytes, message: str) -> None:
    with pytest.raises(InvalidInput, match=message) as excinfo:
        init_token(tmp_path, label, pin, b"so-pin-1234")
    assert pin.decode() not in str(excinfo.value)
