"""broker.dsn: a password anywhere in a DSN is found, and redaction removes it."""

import pytest

from broker.database.engine import parse_dsn
from broker.dsn import password_in_dsn, redact
from broker.errors import InvalidArgument
from broker.storage.factory import redact_dsn

SMUGGLED = "hunter2hunter2"
WITH_PASSWORD = [
    f"postgresql://postgres@db:5432/app?password={SMUGGLED}",
    f"postgresql://postgres@db:5432/app?PassWord={SMUGGLED}",
    f"postgresql://postgres@db:5432/app?pass%77ord={SMUGGLED}",
    f"postgresql://postgres@db:5432/app?pass%2577ord={SMUGGLED}",
    f"postgresql://postgres@db:5432/app?sslmode=disable&password={SMUGGLED}",
    f"postgresql://postgres@db:5432/app?sslpassword={SMUGGLED}",
    f"postgresql://postgres@db:5432/app?passfile=/tmp/{SMUGGLED}",
    f"postgresql://postgres@db:5432/app?x=1;password={SMUGGLED}",
    f"postgresql://postgres:{SMUGGLED}@db:5432/app",
    f"postgresql://postgres%3A{SMUGGLED}@db:5432/app",
    f"postgresql://postgres:{SMUGGLED}/x@db:5432/app",
    f"postgresql://postgres@db:5432/app#password={SMUGGLED}",
    f"mysql://root@db:3306/app?password={SMUGGLED}",
    f"mysql://root@db:3306/app?PASSWD={SMUGGLED}",
    f"mysql://root@db:3306/app?pwd={SMUGGLED}",
    f"mysql://root:{SMUGGLED}@db:3306/app",
]


@pytest.mark.parametrize("dsn", WITH_PASSWORD)
def test_a_password_anywhere_is_found_and_redacted(dsn: str) -> None:
    assert password_in_dsn(dsn) is not None
    assert SMUGGLED not in redact(dsn)
    assert SMUGGLED not in redact_dsn(dsn)


@pytest.mark.parametrize("dsn", WITH_PASSWORD)
def test_engine_dsn_check_refuses_without_echoing_the_password(dsn: str) -> None:
    plugin = "mysql" if dsn.startswith("mysql") else "postgresql"
    with pytest.raises(InvalidArgument, match="must not carry a password") as info:
        parse_dsn(plugin, dsn)
    assert SMUGGLED not in str(info.value)


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://postgres@db:5432/app?sslmode=require",
        "mysql://root@db/app?unix_socket=/run/mysqld/mysqld.sock",
        "sqlite:///var/lib/broker/broker.db",
    ],
)
def test_clean_dsns_pass_unchanged(dsn: str) -> None:
    assert password_in_dsn(dsn) is None
    assert redact(dsn) == dsn


@pytest.mark.parametrize("dsn", WITH_PASSWORD)
def test_without_password_leaves_no_password(dsn: str) -> None:
    from broker.dsn import without_password

    clean = without_password(dsn)
    if clean is not None:  # None: cannot tell where the password ends (refused, not cleaned)
        assert SMUGGLED not in clean and password_in_dsn(clean) is None
        assert clean.startswith(dsn.partition("://")[0] + "://")


def test_without_password_keeps_everything_else() -> None:
    from broker.dsn import without_password

    assert (
        without_password(f"postgresql://postgres:{SMUGGLED}@db:5432/app?sslmode=require&password=x")
        == "postgresql://postgres@db:5432/app?sslmode=require"
    )
