"""The [operators] section: parsed from TOML, validated at startup with one clear line."""

from __future__ import annotations

import datetime as dt
import tomllib
from pathlib import Path

import pytest

from broker.config import config_from_document
from broker.errors import InvalidArgument

BASE = """
trust_domain = "example.org"
[storage]
dsn = "sqlite:///tmp/x.db"
[keys]
uri = "software:"
[server]
operators = ["spiffe://example.org/broker/operator/ops"]
"""


def load(extra: str) -> object:
    doc = tomllib.loads(BASE + extra)
    return config_from_document(doc, Path("/tmp")).validate()


def test_defaults_and_roles_are_read() -> None:
    config = load(
        """
[operators]
issuer = "https://login.example.org"
client_id = "broker-cli"
session_max = "4h"
[operators.roles]
admin = ["ops"]
auditor = "audit"
"""
    )
    ops = config.operators  # type: ignore[attr-defined]
    assert ops.enabled and ops.audiences == ("broker-cli",)
    assert ops.mfa_amr == ("mfa", "otp", "hwk", "swk")
    assert ops.roles == {"admin": ("ops",), "auditor": ("audit",)}
    assert ops.roles_claim == "groups" and ops.subject_claim == "sub"
    assert (ops.default_ttl, ops.max_ttl) == (dt.timedelta(hours=1), dt.timedelta(hours=8))
    assert ops.session_max == dt.timedelta(hours=4)


def test_no_section_means_login_is_off() -> None:
    assert not load("").operators.enabled  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ('issuer = "http://login.example.org"\nclient_id = "c"', "must be an https URL"),
        ('issuer = "https://x"', "client_id is required"),
        ('issuer = "https://x"\nclient_id = "c"\nmax_ttl = "9h"', "between 1m and 8h"),
        (
            'issuer = "https://x"\nclient_id = "c"\ndefault_ttl = "3h"\nmax_ttl = "2h"',
            "default_ttl",
        ),
        ('issuer = "https://x"\nclient_id = "c"\nalgorithms = ["HS256"]', "asymmetric"),
        ('issuer = "https://x"\nclient_id = "c"\nmfa_amr = []', "MFA is required"),
        ('issuer = "https://x"\nclient_id = "c"\n[operators.roles]\nroot = ["x"]', "unknown role"),
        ('issuer = "https://x"\nclient_id = "c"\nclient_secret = "s"', "unknown key"),
    ],
)
def test_bad_sections_are_refused_in_one_line(section: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message) as info:
        load("[operators]\n" + section)
    assert "\n" not in str(info.value)
