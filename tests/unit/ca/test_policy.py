from __future__ import annotations

import copy
import datetime as dt
import json
import tomllib
from typing import Any

import pytest

from ca.errors import InvalidInput, InvalidPolicy, InvalidTTL, PolicyViolation
from ca.policy import (
    DEFAULT_KEY_TYPES,
    HARD_MAX_TTL,
    CAPolicy,
    PolicyRule,
    RuleDefaults,
    SpiffeIdPattern,
)
from ca.spiffeid import SpiffeId

H = dt.timedelta(hours=1)
M = dt.timedelta(minutes=1)


def sid(text: str) -> SpiffeId:
    return SpiffeId.parse(text)


DOCUMENT: dict[str, Any] = {
    "version": 3,
    "rules": [
        {
            "pattern": "spiffe://example.org/acme/prod/*",
            "x509_default_ttl": "30m",
            "x509_max_ttl": "1h",
            "jwt_default_ttl": "5m",
            "jwt_max_ttl": "15m",
            "key_types": ["ec-p256"],
            "dns_names_allowed": True,
        },
        {
            "pattern": "spiffe://example.org/*/dev/**",
            "x509_default_ttl": "1h",
            "x509_max_ttl": "24h",
            "jwt_default_ttl": "5m",
            "jwt_max_ttl": "1h",
            "key_types": ["ec-p256", "ec-p384", "rsa-2048"],
        },
        {
            "pattern": "spiffe://example.org/**",
            "x509_default_ttl": "10m",
            "x509_max_ttl": "20m",
            "jwt_default_ttl": "1m",
            "jwt_max_ttl": "2m",
            "key_types": ["ec-p256", "ec-p384"],
        },
    ],
}


@pytest.fixture
def policy() -> CAPolicy:
    return CAPolicy.from_document(DOCUMENT)


def test_hard_ceiling_is_24h() -> None:
    assert dt.timedelta(hours=24) == HARD_MAX_TTL


# --- patterns ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "matching", "not_matching"),
    [
        (
            "spiffe://example.org/acme/prod/*",
            ["/acme/prod/web", "/acme/prod/db"],
            ["/acme/prod", "/acme/prod/web/worker", "/acme/dev/web"],
        ),
        (
            "spiffe://example.org/*/dev/**",
            ["/acme/dev/web", "/x/dev/web/worker/1"],
            ["/acme/dev", "/acme/prod/web", "/dev/web"],
        ),
        ("spiffe://example.org/**", ["/a", "/a/b/c"], []),
        ("spiffe://example.org/web", ["/web"], ["/web/x", "/WEB"]),
    ],
)
def test_pattern_matching(pattern: str, matching: list[str], not_matching: list[str]) -> None:
    p = SpiffeIdPattern.parse(pattern)
    assert str(p) == pattern
    for path in matching:
        assert p.matches(sid("spiffe://example.org" + path)), path
    for path in not_matching:
        assert not p.matches(sid("spiffe://example.org" + path)), path
    assert not p.matches(sid("spiffe://other.org" + (matching or ["/a"])[0]))
    assert not p.matches(sid("spiffe://example.org"))


@pytest.mark.parametrize(
    ("pattern", "fragment"),
    [
        ("example.org/**", "must start with 'spiffe://'"),
        ("spiffe://example.org", "has no path"),
        ("spiffe://example.org/", "has no path"),
        ("spiffe://example.org/a/", "empty path segments"),
        ("spiffe://example.org/a//b", "empty path segments"),
        ("spiffe://Example.org/**", "lowercase"),
        ("spiffe://*/web", "character '\\*'"),
        ("spiffe://example.org/**/web", "'\\*\\*' is only allowed as the last segment"),
        ("spiffe://example.org/web-*", "whole segment"),
        ("spiffe://example.org/a/../b", "'..' is not allowed"),
        ("spiffe://example.org/a b", "character ' '"),
    ],
)
def test_bad_patterns_refused(pattern: str, fragment: str) -> None:
    with pytest.raises(InvalidPolicy, match=fragment):
        SpiffeIdPattern.parse(pattern)


# --- document loading --------------------------------------------------------------------------


def test_from_document(policy: CAPolicy) -> None:
    assert policy.version == 3
    assert len(policy.rules) == 3
    first = policy.rules[0]
    assert str(first.pattern) == "spiffe://example.org/acme/prod/*"
    assert first.x509_default_ttl == 30 * M
    assert first.x509_max_ttl == H
    assert first.jwt_default_ttl == 5 * M
    assert first.jwt_max_ttl == 15 * M
    assert first.key_types == frozenset({"ec-p256"})
    assert first.dns_names_allowed is True
    assert policy.rules[1].dns_names_allowed is False


def test_to_document_round_trip(policy: CAPolicy) -> None:
    doc = policy.to_document()
    assert CAPolicy.from_document(doc) == policy
    assert CAPolicy.from_document(json.loads(json.dumps(doc))).to_document() == doc
    assert doc["rules"][1]["key_types"] == ["ec-p256", "ec-p384", "rsa-2048"]  # sorted


def test_toml_shaped_document() -> None:
    text = """
    version = 1
    [[rules]]
    pattern = "spiffe://example.org/**"
    x509_default_ttl = "1h"
    x509_max_ttl = "24h"
    jwt_default_ttl = "5m"
    jwt_max_ttl = "1h"
    key_types = ["ec-p256"]
    """
    policy = CAPolicy.from_document(tomllib.loads(text))
    assert policy.rules[0].x509_max_ttl == HARD_MAX_TTL


def _doc_with(rule_changes: dict[str, Any], drop: tuple[str, ...] = ()) -> dict[str, Any]:
    doc = copy.deepcopy(DOCUMENT)
    doc["rules"][0].update(rule_changes)
    for key in drop:
        del doc["rules"][0][key]
    return doc


@pytest.mark.parametrize(
    ("changes", "drop", "fragment"),
    [
        ({"x509_max_ttl": "25h"}, (), "exceeds the hard ceiling of 24h"),
        ({"jwt_max_ttl": "2d"}, (), "jwt_max_ttl 48h exceeds the hard ceiling of 24h"),
        ({"x509_default_ttl": "2h"}, (), "x509_default_ttl 2h exceeds x509_max_ttl 1h"),
        ({"jwt_default_ttl": "20m"}, (), "jwt_default_ttl 20m exceeds jwt_max_ttl 15m"),
        ({"x509_default_ttl": "0s"}, (), "must be at least 1s"),
        ({"x509_max_ttl": "-1h"}, (), "rules\\[0\\].x509_max_ttl: duration '-1h' is negative"),
        ({"x509_max_ttl": "forever"}, (), "rules\\[0\\].x509_max_ttl.*not understood"),
        ({"x509_max_ttl": 3600}, (), "rules\\[0\\].x509_max_ttl.*must be a string"),
        ({"key_types": ["ec-p256", "dsa-1024"]}, (), "unknown key type\\(s\\) dsa-1024"),
        ({"key_types": []}, (), "key_types is empty"),
        ({"key_types": "ec-p256"}, (), "key_types must be a list"),
        ({"key_types": ["ec-p256", "ec-p256"]}, (), "twice"),
        ({"dns_names_allowed": "yes"}, (), "dns_names_allowed must be true or false"),
        ({"ttl": "1h"}, (), "unknown key\\(s\\) ttl"),
        ({"jwt_default_ttl": "2h"}, ("jwt_max_ttl",), "exceeds the default jwt_max_ttl 1h"),
        ({}, ("pattern",), "missing key\\(s\\) pattern"),
        ({"pattern": "spiffe://example.org/a*"}, (), "rules\\[0\\]: pattern"),
        ({"pattern": 7}, (), "pattern must be a string"),
    ],
)
def test_document_validation(changes: dict[str, Any], drop: tuple[str, ...], fragment: str) -> None:
    with pytest.raises(InvalidPolicy, match=fragment):
        CAPolicy.from_document(_doc_with(changes, drop))


@pytest.mark.parametrize(
    ("doc", "fragment"),
    [
        ([], "must be a table/object"),
        ({}, "missing key 'rules'"),
        ({"rules": {}}, "'rules' must be a list"),
        ({"rules": [], "extra": 1}, "unknown key\\(s\\) extra"),
        ({"rules": [], "version": 0}, "version must be a positive integer"),
        ({"rules": [], "version": True}, "version must be a positive integer"),
        ({"rules": ["x"]}, "rules\\[0\\] must be a table/object"),
    ],
)
def test_top_level_validation(doc: Any, fragment: str) -> None:
    with pytest.raises(InvalidPolicy, match=fragment):
        CAPolicy.from_document(doc)


def test_duplicate_pattern_refused() -> None:
    doc = copy.deepcopy(DOCUMENT)
    doc["rules"].append(copy.deepcopy(doc["rules"][0]))
    with pytest.raises(InvalidPolicy, match="appears twice"):
        CAPolicy.from_document(doc)


def test_invalid_policy_is_invalid_input() -> None:
    with pytest.raises(InvalidInput):
        CAPolicy.from_document({"rules": "nope"})


# --- resolution --------------------------------------------------------------------------------


def test_first_matching_rule_wins(policy: CAPolicy) -> None:
    assert str(policy.rule_for(sid("spiffe://example.org/acme/prod/web")).pattern).endswith(
        "prod/*"
    )
    assert str(policy.rule_for(sid("spiffe://example.org/acme/dev/web/x")).pattern).endswith(
        "dev/**"
    )
    assert str(policy.rule_for(sid("spiffe://example.org/acme/prod/web/x")).pattern).endswith(
        "org/**"
    )


def test_resolve_x509_defaults_and_requests(policy: CAPolicy) -> None:
    prod = sid("spiffe://example.org/acme/prod/web")
    assert policy.resolve_x509(prod, None, "ec-p256") == 30 * M
    assert policy.resolve_x509(prod, 45 * M, "ec-p256") == 45 * M
    assert policy.resolve_x509(prod, H, "ec-p256") == H
    dev = sid("spiffe://example.org/acme/dev/web")
    assert policy.resolve_x509(dev, 24 * H, "rsa-2048") == 24 * H


def test_resolve_over_rule_max_names_the_limit(policy: CAPolicy) -> None:
    with pytest.raises(PolicyViolation) as info:
        policy.resolve_x509(sid("spiffe://example.org/acme/prod/web"), 2 * H, "ec-p256")
    assert "requested TTL 2h exceeds the maximum of 1h for spiffe://example.org/acme/prod/*" in str(
        info.value
    )


def test_resolve_over_hard_ceiling(policy: CAPolicy) -> None:
    dev = sid("spiffe://example.org/acme/dev/web")
    with pytest.raises(PolicyViolation, match="hard ceiling of 24h"):
        policy.resolve_x509(dev, 24 * H + dt.timedelta(seconds=1), "ec-p256")
    with pytest.raises(PolicyViolation, match="hard ceiling of 24h"):
        policy.resolve_jwt(dev, 48 * H)


@pytest.mark.parametrize("ttl", [dt.timedelta(0), dt.timedelta(seconds=-1), -H])
def test_resolve_non_positive_ttl(policy: CAPolicy, ttl: dt.timedelta) -> None:
    prod = sid("spiffe://example.org/acme/prod/web")
    with pytest.raises(InvalidTTL, match="must be positive"):
        policy.resolve_x509(prod, ttl, "ec-p256")
    with pytest.raises(InvalidTTL, match="must be positive"):
        policy.resolve_jwt(prod, ttl)


def test_resolve_key_type_not_allowed(policy: CAPolicy) -> None:
    with pytest.raises(PolicyViolation, match=r"rsa-2048 is not allowed.*allowed: ec-p256"):
        policy.resolve_x509(sid("spiffe://example.org/acme/prod/web"), None, "rsa-2048")


def test_resolve_no_rule(policy: CAPolicy) -> None:
    with pytest.raises(PolicyViolation) as info:
        policy.resolve_x509(sid("spiffe://other.org/web"), None, "ec-p256")
    assert str(info.value) == "no CA policy rule allows issuing spiffe://other.org/web"
    with pytest.raises(PolicyViolation, match="no CA policy rule"):
        CAPolicy(rules=()).resolve_jwt(sid("spiffe://example.org/web"), None)


def test_resolve_jwt(policy: CAPolicy) -> None:
    prod = sid("spiffe://example.org/acme/prod/web")
    assert policy.resolve_jwt(prod, None) == 5 * M
    assert policy.resolve_jwt(prod, 15 * M) == 15 * M
    with pytest.raises(PolicyViolation, match="exceeds the maximum of 15m"):
        policy.resolve_jwt(prod, 16 * M)


def test_dns_names(policy: CAPolicy) -> None:
    policy.check_dns_names(sid("spiffe://example.org/acme/prod/web"), ["web.example.org"])
    policy.check_dns_names(sid("spiffe://example.org/acme/dev/web"), [])
    with pytest.raises(PolicyViolation, match=r"DNS name 'x\.example\.org' is not allowed"):
        policy.check_dns_names(sid("spiffe://example.org/acme/dev/web"), ["x.example.org"])


def _rule_doc(**extra: Any) -> dict[str, Any]:
    rule = dict(DOCUMENT["rules"][1])
    rule.pop("dns_names_allowed", None)
    rule.update(extra)
    return {"rules": [rule]}


DEV = "spiffe://example.org/acme/dev/web"


def test_dns_name_patterns_allow_only_what_they_match() -> None:
    policy = CAPolicy.from_document(_rule_doc(dns_names=["*.Web.Internal.", "api.example.org"]))
    assert policy.rules[0].dns_names == ("*.web.internal", "api.example.org")
    policy.check_dns_names(sid(DEV), ["a.web.internal", "API.example.org.", "*.web.internal"])
    for name in ("web.internal", "a.b.web.internal", "a.web.internal.evil", "x.example.org"):
        with pytest.raises(PolicyViolation, match=r"is not allowed .*\*\.web\.internal"):
            policy.check_dns_names(sid(DEV), [name])
    round_trip = CAPolicy.from_document(json.loads(json.dumps(policy.to_document())))
    assert round_trip == policy


def test_the_old_flag_is_still_read() -> None:
    allowed = CAPolicy.from_document(_rule_doc(dns_names_allowed=True))
    assert allowed.rules[0].dns_names == ("*",)
    allowed.check_dns_names(sid(DEV), ["anything.example.net"])
    assert allowed.to_document()["rules"][0]["dns_names"] == ["*"]
    assert "dns_names_allowed" not in allowed.to_document()["rules"][0]
    refused = CAPolicy.from_document(_rule_doc(dns_names_allowed=False))
    assert refused.rules[0].dns_names == ()
    with pytest.raises(PolicyViolation, match="patterns: none"):
        refused.check_dns_names(sid(DEV), ["a.example.net"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"dns_names": "*.web.internal"}, "dns_names must be a list"),
        ({"dns_names": [7]}, "patterns must be strings"),
        ({"dns_names": ["web.*.internal"]}, r"'web\.\*\.internal' is not valid"),
        ({"dns_names": ["*web.internal"]}, "is not valid"),
        ({"dns_names": ["**.web.internal"]}, "is not valid"),
        ({"dns_names": ["*.internal"]}, "domain of at least two labels"),
        ({"dns_names": [""]}, "is not valid"),
        ({"dns_names": ["bad_name.example"]}, "is not valid"),
        ({"dns_names": ["*.example.org.spiffe.invalid"]}, "reserved for the broker"),
        ({"dns_names": [], "dns_names_allowed": True}, "not both"),
        ({"dns_names_allowed": "yes"}, "dns_names_allowed must be true or false"),
    ],
)
def test_invalid_dns_name_patterns_are_refused(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidPolicy, match=message):
        CAPolicy.from_document(_rule_doc(**extra))


def test_the_brokers_server_names_are_never_issued_whatever_the_rule_says() -> None:
    policy = CAPolicy.from_document(_rule_doc(dns_names=["*"]))
    reserved = ("localhost", "broker.internal")
    for name in (
        "localhost",
        "LOCALHOST.",
        "broker.internal",
        "*.internal",
        "server.broker.example.org.spiffe.invalid",
        "*.example.org.spiffe.invalid",
        "spiffe.invalid",
    ):
        with pytest.raises(PolicyViolation, match="broker's own server names"):
            policy.check_dns_names(sid(DEV), ["ok.example.org", name], reserved=reserved)
    policy.check_dns_names(sid(DEV), ["web.internal", "x.localhost"], reserved=reserved)


def test_default_policy() -> None:
    policy = CAPolicy.default("example.org")
    assert len(policy.rules) == 1
    assert str(policy.rules[0].pattern) == "spiffe://example.org/**"
    web = sid("spiffe://example.org/default/dev/web")
    assert policy.resolve_x509(web, None, "ec-p256") == H
    assert policy.resolve_x509(web, 24 * H, "rsa-4096") == 24 * H
    with pytest.raises(PolicyViolation, match="hard ceiling of 24h"):
        policy.resolve_x509(web, 25 * H, "ec-p256")
    assert policy.resolve_jwt(web, None) == 5 * M
    with pytest.raises(PolicyViolation, match="exceeds the maximum of 1h"):
        policy.resolve_jwt(web, 2 * H)
    assert (
        policy.rules[0].key_types
        == DEFAULT_KEY_TYPES
        == frozenset({"ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096"})
    )
    with pytest.raises(PolicyViolation, match="ed25519 is not allowed"):
        policy.resolve_x509(web, None, "ed25519")
    with pytest.raises(PolicyViolation):
        policy.resolve_x509(sid("spiffe://other.org/web"), None, "ec-p256")
    assert policy.max_x509_ttl() == 24 * H
    assert policy.max_jwt_ttl() == H


def test_rule_constructor_validates() -> None:
    with pytest.raises(InvalidPolicy, match="hard ceiling"):
        PolicyRule(
            pattern=SpiffeIdPattern.parse("spiffe://example.org/**"),
            x509_default_ttl=H,
            x509_max_ttl=25 * H,
            jwt_default_ttl=M,
            jwt_max_ttl=H,
            key_types=frozenset({"ec-p256"}),
        )


def test_omitted_rule_keys_take_the_built_in_defaults() -> None:
    # Only the pattern is required: what SPIRE and step-ca users expect (X.509 1 h, JWT 5 m).
    policy = CAPolicy.from_document({"rules": [{"pattern": "spiffe://example.org/**"}]})
    (rule,) = policy.rules
    assert (rule.x509_default_ttl, rule.x509_max_ttl) == (H, HARD_MAX_TTL)
    assert (rule.jwt_default_ttl, rule.jwt_max_ttl) == (5 * M, H)
    assert rule.key_types == DEFAULT_KEY_TYPES
    assert rule.dns_names == ()
    assert policy.rules == CAPolicy.default("example.org").rules


def test_an_omitted_default_ttl_follows_a_lower_maximum() -> None:
    doc = {
        "rules": [
            {"pattern": "spiffe://example.org/**", "x509_max_ttl": "30m", "jwt_max_ttl": "2m"}
        ]
    }
    (rule,) = CAPolicy.from_document(doc).rules
    assert (rule.x509_default_ttl, rule.x509_max_ttl) == (30 * M, 30 * M)
    assert (rule.jwt_default_ttl, rule.jwt_max_ttl) == (2 * M, 2 * M)


def test_defaults_capped_by_the_rotation_schedule() -> None:
    defaults = RuleDefaults.capped(30 * M)
    (rule,) = CAPolicy.from_document(
        {"rules": [{"pattern": "spiffe://example.org/**"}]}, defaults
    ).rules
    assert (rule.x509_default_ttl, rule.x509_max_ttl) == (30 * M, 30 * M)
    assert RuleDefaults.capped(48 * H).x509_max_ttl == HARD_MAX_TTL


def test_readme_policy_example_with_omitted_keys_round_trips() -> None:
    doc = tomllib.loads(
        """
[[rules]]
pattern = "spiffe://example.org/acme/prod/*"
x509_default_ttl = "1h"
x509_max_ttl = "12h"
jwt_default_ttl = "5m"
jwt_max_ttl = "15m"
key_types = ["ec-p256", "ec-p384"]

[[rules]]
pattern = "spiffe://example.org/*/dev/**"
x509_max_ttl = "24h"
"""
    )
    policy = CAPolicy.from_document(doc)
    dev = policy.rules[1]
    assert (dev.x509_default_ttl, dev.x509_max_ttl, dev.jwt_max_ttl) == (H, 24 * H, H)
    canonical = policy.to_document()
    assert set(canonical["rules"][1]) >= {"x509_default_ttl", "jwt_max_ttl", "key_types"}
    assert CAPolicy.from_document(json.loads(json.dumps(canonical))) == policy


@pytest.mark.parametrize(
    ("rule", "fragment"),
    [
        ({"x509_ttl": "1h"}, "unknown key\\(s\\) x509_ttl"),
        ({"x509_max_ttl": "25h"}, "hard ceiling"),
        ({"key_types": ["dsa-1024"]}, "unknown key type"),
        ({"x509_default_ttl": "soon"}, "x509_default_ttl"),
        ({"x509_default_ttl": "25h"}, "exceeds the default x509_max_ttl 24h"),
    ],
)
def test_defaults_do_not_hide_bad_keys_or_values(rule: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InvalidPolicy, match=fragment):
        CAPolicy.from_document({"rules": [{"pattern": "spiffe://example.org/**", **rule}]})
