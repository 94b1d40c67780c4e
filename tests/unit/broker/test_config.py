import datetime as dt
from pathlib import Path

import pytest

from broker.config import load_config
from broker.errors import InvalidArgument

GOOD = """
trust_domain = "example.org"
data_dir = "data"

[storage]
dsn = "postgresql://broker@db.internal:5432/broker"
password_file = "db-password"

[keys]
uri = "pkcs11:token=broker?module-path=/usr/lib/softhsm/libsofthsm2.so"
pin_source = "env:BROKER_HSM_PIN"

[ca]
issuing_ttl = "168h"

[server]
listen = "0.0.0.0:9443"
operators = ["spiffe://example.org/broker/operator/alice"]
rate_limit_rps = 200
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "broker.toml"
    path.write_text(text)
    return path


def test_loads_and_resolves_password_by_reference(tmp_path: Path) -> None:
    (tmp_path / "db-password").write_text("s3cret/with:chars\n")
    config = load_config(_write(tmp_path, GOOD), environ={})
    assert config.trust_domain == "example.org"
    assert config.data_dir == tmp_path / "data"
    assert config.ca.issuing_ttl == dt.timedelta(days=7)
    assert config.server.listen == "0.0.0.0:9443"
    assert config.server.rate_limit_rps == 200
    assert "s3cret" not in config.storage.dsn
    assert config.storage.resolved_dsn() == (
        "postgresql://broker:s3cret%2Fwith%3Achars@db.internal:5432/broker"
    )


def test_env_overrides_file(tmp_path: Path) -> None:
    config = load_config(
        _write(tmp_path, GOOD),
        environ={"BROKER_LISTEN": "127.0.0.1:1234", "BROKER_RATE_LIMIT_RPS": "5"},
    )
    assert config.server.listen == "127.0.0.1:1234"
    assert config.server.rate_limit_rps == 5


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("broker@db.internal", "broker:pw@db.internal", "must not contain a password"),
        ('pin_source = "env:BROKER_HSM_PIN"', 'pin_source = "env:X"\nfoo = 1', "unknown key 'foo'"),
        ('issuing_ttl = "168h"', 'issuing_ttl = "soon"', "issuing_ttl"),
        ('listen = "0.0.0.0:9443"', 'listen = "nowhere"', "HOST:PORT"),
        (
            'operators = ["spiffe://example.org/broker/operator/alice"]',
            "operators = []",
            "at least one",
        ),
        (
            'operators = ["spiffe://example.org/broker/operator/alice"]',
            'operators = ["spiffe://other.org/x"]',
            "not in trust domain",
        ),
        ('trust_domain = "example.org"', 'trust_domain = "Bad Domain"', "config"),
        ("module-path", "pin-value=1234&module-path", "PIN"),
    ],
)
def test_bad_config_is_refused_with_a_clear_message(
    tmp_path: Path, old: str, new: str, message: str
) -> None:
    assert old in GOOD
    with pytest.raises(InvalidArgument, match=message):
        load_config(_write(tmp_path, GOOD.replace(old, new)), environ={})


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="cannot read config"):
        load_config(tmp_path / "absent.toml", environ={})
    with pytest.raises(InvalidArgument, match="not valid TOML"):
        load_config(_write(tmp_path, "trust_domain = "), environ={})


def test_workers_from_file_and_env_and_bounds(tmp_path: Path) -> None:
    path = _write(
        tmp_path, GOOD.replace("rate_limit_rps = 200", "rate_limit_rps = 200\nworkers = 3")
    )
    assert load_config(path, environ={}).server.workers == 3
    assert load_config(path, environ={"BROKER_WORKERS": "2"}).server.workers == 2
    with pytest.raises(InvalidArgument, match="between 1 and 64"):
        load_config(path, environ={"BROKER_WORKERS": "0"})
    with pytest.raises(InvalidArgument, match="BROKER_WORKERS"):
        load_config(path, environ={"BROKER_WORKERS": "many"})


def test_audit_checkpoint_interval_from_file_and_env_and_bounds(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, GOOD), environ={}).audit.checkpoint_interval == (
        dt.timedelta(hours=1)
    )
    path = _write(tmp_path, GOOD + '\n[audit]\ncheckpoint_interval = "15m"\n')
    assert load_config(path, environ={}).audit.checkpoint_interval == dt.timedelta(minutes=15)
    env = {"BROKER_AUDIT_CHECKPOINT_INTERVAL": "2h"}
    assert load_config(path, environ=env).audit.checkpoint_interval == dt.timedelta(hours=2)
    for bad in ("10s", "8d"):
        bad_path = _write(tmp_path, GOOD + f'\n[audit]\ncheckpoint_interval = "{bad}"\n')
        with pytest.raises(InvalidArgument, match=r"audit\.checkpoint_interval"):
            load_config(bad_path, environ={})
