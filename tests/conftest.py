"""Shared pytest configuration. Fixtures that start real services live in tests/fixtures/."""

pytest_plugins = [
    "tests.fixtures.softhsm",
    "tests.fixtures.p11kit",
    "tests.fixtures.postgres",
    "tests.fixtures.mariadb",
    "tests.fixtures.oidc_provider",
    "tests.fixtures.rsyslog",
    "tests.fixtures.webhook",
    "tests.fixtures.otlp",
    "tests.fixtures.patroni",
]
