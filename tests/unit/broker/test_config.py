import datetime as dt
import secrets
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


def test_a_multi_host_dsn_keeps_every_host_when_the_password_is_added(tmp_path: Path) -> None:
    """Issue 19: a Patroni cluster's DSN lists its members; adding the password from its file
    used to read `.port` of "h1:5432,h2:5432" and crash (ValueError) before the broker started."""
    word = secrets.token_hex(6)  # generated: no credential-like literal in the source
    (tmp_path / "db-password").write_text(word + "\n")
    hosts = "db1:5432,db2:5433,db3:5434/broker?target_session_attrs=read-write"
    config = load_config(
        _write(
            tmp_path,
            GOOD.replace(
                "postgresql://broker@db.internal:5432/broker", "postgresql://broker@" + hosts
            ),
        ),
        environ={},
    )
    assert config.storage.resolved_dsn() == "postgresql://broker:" + word + "@" + hosts


def test_env_overrides_file(tmp_path: Path) -> None:
    config = load_config(
        _write(tmp_path, GOOD),
        environ={"BROKER_LISTEN": "127.0.0.1:1234", "BROKER_RATE_LIMIT_RPS": "5"},
    )
    assert config.server.listen == "127.0.0.1:1234"
    assert config.server.rate_limit_rps == 5


def test_server_names_from_env(tmp_path: Path) -> None:
    """A container sets its serving certificate's names without a config file."""
    config = load_config(
        _write(tmp_path, GOOD),
        environ={"BROKER_SERVER_NAMES": "broker.internal, 10.0.0.7,,localhost"},
    )
    assert config.server.server_names == ("broker.internal", "10.0.0.7", "localhost")


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


def test_secrets_justification_required(tmp_path: Path) -> None:
    (tmp_path / "db-password").write_text("pw\n")
    assert load_config(_write(tmp_path, GOOD), environ={}).secrets.justification_required == (
        "prod",
        "pii",
    )
    custom = GOOD + '\n[secrets]\njustification_required = ["pii", "confidential"]\n'
    config = load_config(_write(tmp_path, custom), environ={})
    assert config.secrets.justification_required == ("pii", "confidential")
    for bad in ('"prod"', '["Prod!"]', "[1]"):
        text = GOOD + f"\n[secrets]\njustification_required = {bad}\n"
        with pytest.raises(InvalidArgument, match="justification_required"):
            load_config(_write(tmp_path, text), environ={})


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("rate_limit_rps = 200", "rate_limit_rps = -5", "rate_limit_rps must be a number"),
        ("rate_limit_rps = 200", "rate_limit_rps = nan", "rate_limit_rps must be a number"),
        ("rate_limit_rps = 200", "rate_limit_rps = inf", "rate_limit_rps must be a number"),
        ("rate_limit_rps = 200", "rate_limit_rps = 0", "rate_limit_rps must be a number"),
        ("rate_limit_rps = 200", "rate_limit_burst = -nan", "rate_limit_burst must be a number"),
        ("rate_limit_rps = 200", 'rate_limit_rps = "fast"', "wrong type"),
        ("rate_limit_rps = 200", 'workers = "many"', "wrong type"),
        ('issuing_ttl = "168h"', 'issuing_ttl = "168h"\nroot_ttl = "1s"', "ca.root_ttl must be"),
        ('issuing_ttl = "168h"', 'root_ttl = "2d"', "at least twice"),
        ('issuing_ttl = "168h"', 'issuing_ttl = "1s"', "ca.issuing_ttl must be"),
        ('issuing_ttl = "168h"', 'backdate = "3h"', "ca.backdate must be"),
        ('listen = "0.0.0.0:9443"', 'server_cert_ttl = "1s"', "server_cert_ttl must be"),
    ],
)
def test_out_of_range_numbers_and_durations_are_refused(
    tmp_path: Path, old: str, new: str, message: str
) -> None:
    assert old in GOOD
    with pytest.raises(InvalidArgument, match=message) as info:
        load_config(_write(tmp_path, GOOD.replace(old, new)), environ={})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("value", ["-5", "nan", "NaN", "inf", "0"])
def test_rate_limit_from_the_environment_is_range_checked(tmp_path: Path, value: str) -> None:
    with pytest.raises(InvalidArgument, match="rate_limit_rps must be a number"):
        load_config(_write(tmp_path, GOOD), environ={"BROKER_RATE_LIMIT_RPS": value})


@pytest.mark.parametrize("uri", ["software:", "software:object=x", "software: "])
def test_in_memory_keys_with_persistent_storage_are_refused(tmp_path: Path, uri: str) -> None:
    text = GOOD.replace(
        'uri = "pkcs11:token=broker?module-path=/usr/lib/softhsm/libsofthsm2.so"',
        f'uri = "{uri}"',
    )
    with pytest.raises(InvalidArgument, match="in memory"):
        load_config(_write(tmp_path, text), environ={})
    ok = text.replace(f'uri = "{uri}"', f'uri = "software:path={tmp_path}"')
    assert load_config(_write(tmp_path, ok), environ={}).keys.uri.startswith("software:path=")


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{tenant}/{environment}", "must appear exactly once"),
        ("{tenant}/{environment}/{service}/{bogus}", "placeholder"),
        ("{tenant}/{environment}/{service" * 2000, "too long"),
        ("/".join(["a"] * 40) + "/{tenant}/{environment}/{service}", "too long"),
        ("{tenant}/{environment}/{service}/" + "a" * 200 + "!", "is not allowed"),
        ("{tenant}/{environment}/{service}/bad segment", "invalid"),
    ],
)
def test_bad_identity_template_is_refused_at_once(
    tmp_path: Path, template: str, message: str
) -> None:
    text = GOOD + f"\n[identity]\ntemplate = {template!r}\n".replace("'", '"')
    with pytest.raises(InvalidArgument, match=message) as info:
        load_config(_write(tmp_path, text), environ={})
    assert str(info.value).startswith("config: ")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://broker@db.internal:5432/broker?password=hunter2hunter2",
        "postgresql://broker@db.internal:5432/broker?PASSWORD=hunter2hunter2",
        "postgresql://broker@db.internal:5432/broker?pass%77ord=hunter2hunter2",
        "postgresql://broker@db.internal:5432/broker?sslmode=require&Password=hunter2hunter2",
        "postgresql://broker@db.internal:5432/broker?passfile=/etc/shadow",
        f"postgresql://broker:{'hunter2' * 2}@db.internal:5432/broker",
        "postgresql://broker@db.internal:5432/broker#password=hunter2hunter2",
    ],
)
def test_storage_dsn_with_a_password_anywhere_is_refused(tmp_path: Path, dsn: str) -> None:
    """Issue 20 finding 8 (storage DSN): in the file and in BROKER_STORAGE_DSN."""
    text = GOOD.replace("postgresql://broker@db.internal:5432/broker", dsn)
    for document, env in ((text, {}), (GOOD, {"BROKER_STORAGE_DSN": dsn})):
        path = _write(tmp_path, document)
        with pytest.raises(InvalidArgument, match="must not contain a password") as info:
            load_config(path, environ=env)
        assert "hunter2" not in str(info.value) and "shadow" not in str(info.value)


def test_scram_iterations_setting(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, GOOD), environ={}).database.scram_iterations == 4096
    text = GOOD + "\n[database]\nscram_iterations = 1\n"
    assert load_config(_write(tmp_path, text), environ={}).database.scram_iterations == 1
    for bad, message in (("0", "between 1 and"), ('"many"', "whole number"), ("1.5", "whole")):
        text = GOOD + f"\n[database]\nscram_iterations = {bad}\n"
        with pytest.raises(InvalidArgument, match=message):
            load_config(_write(tmp_path, text), environ={})


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


def test_rotation_periods(tmp_path: Path) -> None:
    (tmp_path / "db-password").write_text("pw\n")
    default = load_config(_write(tmp_path, GOOD), environ={}).rotation
    assert (default.kek_period, default.data_key_period) == (
        dt.timedelta(days=365),
        dt.timedelta(days=90),
    )
    custom = GOOD + '\n[rotation]\nkek_period = "180d"\ndata_key_period = "30d"\n'
    config = load_config(_write(tmp_path, custom), environ={}).rotation
    assert (config.kek_period, config.data_key_period) == (
        dt.timedelta(days=180),
        dt.timedelta(days=30),
    )
    for bad, message in (
        ('data_key_period = "1h"', "data_key_period must be at least 1d"),
        ('kek_period = "0s"', "kek_period must be at least 1d"),
        ('check_interval = "2h"', "check_interval must be between"),
        ('dek_period = "90d"', "dek_period"),
    ):
        with pytest.raises(InvalidArgument, match=message):
            load_config(_write(tmp_path, GOOD + f"\n[rotation]\n{bad}\n"), environ={})
