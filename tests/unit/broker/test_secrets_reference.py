"""Secret references: `secret://<service>/<environment>/<name>[/<more>]`, validated."""

from __future__ import annotations

import pytest

from broker.errors import InvalidArgument
from broker.secrets import SecretRef, check_tenant, reference_hash


def test_parse_a_valid_reference() -> None:
    ref = SecretRef.parse("secret://payments/prod/stripe/api-key")
    assert (ref.service, ref.environment, ref.path) == ("payments", "prod", ("stripe", "api-key"))
    assert ref.text == "secret://payments/prod/stripe/api-key"
    assert ref.sha256 == reference_hash(ref.text)
    assert len(ref.sha256) == 64 and ref.text not in ref.sha256


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "required"),
        ("payments/prod/api", "starts with secret://"),
        ("https://payments/prod/api", "starts with secret://"),
        ("secret://payments/prod", "<service>/<environment>/<name>"),
        ("secret://payments//api", "empty"),
        ("secret://payments/prod/api/", "empty"),
        ("secret://payments/prod/./api", "'.'"),
        ("secret://payments/prod/../../other/prod/api", "'..'"),
        ("secret://payments/prod/api key", "characters"),
        ("secret://payments/prod/ключ", "characters"),
        ("secret://payments/prod/a%2Fb", "characters"),
        ("secret://payments/prod/" + "a" * 129, "longer than 128"),
        ("secret://payments/prod/" + "/".join("a" * 15), "at most 16 segments"),
        ("secret://payments/prod/" + "a/" * 250 + "a", "longer than 512"),
    ],
)
def test_invalid_references_are_refused(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        SecretRef.parse(text)


@pytest.mark.parametrize("tenant", ["", "_system", "Acme", "a b", "x" * 64])
def test_invalid_or_reserved_tenants_are_refused(tenant: str) -> None:
    with pytest.raises(InvalidArgument):
        check_tenant(tenant)
