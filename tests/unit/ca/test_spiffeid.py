import dataclasses

import pytest

from ca.errors import InvalidInput, InvalidSpiffeId
from ca.spiffeid import SpiffeId, TrustDomain, validate_path_segment


@pytest.mark.parametrize(
    ("text", "trust_domain", "path", "segments"),
    [
        ("spiffe://example.org", "example.org", "", ()),
        ("spiffe://example.org/web", "example.org", "/web", ("web",)),
        (
            "spiffe://example.org/acme/prod/web",
            "example.org",
            "/acme/prod/web",
            ("acme", "prod", "web"),
        ),
        (
            "spiffe://a-b_c.9/A.b-C_d/...x/.a",
            "a-b_c.9",
            "/A.b-C_d/...x/.a",
            ("A.b-C_d", "...x", ".a"),
        ),
        ("spiffe://x/..../-", "x", "/..../-", ("....", "-")),
    ],
)
def test_parse_valid(text: str, trust_domain: str, path: str, segments: tuple[str, ...]) -> None:
    sid = SpiffeId.parse(text)
    assert sid.trust_domain == trust_domain
    assert sid.path == path
    assert sid.segments == segments
    assert str(sid) == text
    assert sid.id_string == text
    assert SpiffeId.parse(str(sid)) == sid


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("example.org/web", "must start with 'spiffe://'"),
        ("http://example.org/web", "must start with 'spiffe://'"),
        ("spiffe:/example.org/web", "must start with 'spiffe://'"),
        ("SPIFFE://example.org/web", "scheme must be lowercase"),
        ("Spiffe://example.org/web", "scheme must be lowercase"),
        ("spiffe://", "trust domain is empty"),
        ("spiffe:///web", "trust domain is empty"),
        ("spiffe://Example.org/web", "trust domains must be lowercase"),
        ("spiffe://EXAMPLE.ORG", "trust domains must be lowercase"),
        ("spiffe://exa mple.org/web", "character ' '"),
        ("spiffe://exämple.org/web", "character 'ä'"),
        ("spiffe://example.org:8080/web", "port"),
        ("spiffe://user@example.org/web", "userinfo"),
        ("spiffe://example.org/web?x=1", "query"),
        ("spiffe://example.org/web#frag", "fragment"),
        ("spiffe://example.org/a/../b", "SPIFFE ID path segment '..' is not allowed"),
        ("spiffe://example.org/..", "SPIFFE ID path segment '..' is not allowed"),
        ("spiffe://example.org/./b", "SPIFFE ID path segment '.' is not allowed"),
        ("spiffe://example.org//web", "empty path segments"),
        ("spiffe://example.org/a//b", "empty path segments"),
        ("spiffe://example.org/", "trailing slash"),
        ("spiffe://example.org/web/", "trailing slash"),
        ("spiffe://example.org/we%20b", "percent-encoding"),
        ("spiffe://example.org/we b", "character ' '"),
        ("spiffe://example.org/we*b", "character '*'"),
        ("spiffe://example.org/wéb", "character 'é'"),
        ("spiffe://example.org/a\nb", "character '\\n'"),
    ],
)
def test_parse_invalid_names_the_problem(text: str, fragment: str) -> None:
    with pytest.raises(InvalidSpiffeId) as info:
        SpiffeId.parse(text)
    assert fragment in str(info.value)


def test_invalid_spiffe_id_is_invalid_input() -> None:
    with pytest.raises(InvalidInput):
        SpiffeId.parse("spiffe://example.org/a/../b")


def test_length_limit_is_2048_bytes() -> None:
    prefix = "spiffe://example.org/"
    exactly = prefix + "a" * (2048 - len(prefix))
    assert len(SpiffeId.parse(exactly).id_string) == 2048
    with pytest.raises(InvalidSpiffeId, match="2049 bytes, over the limit of 2048"):
        SpiffeId.parse(exactly + "b")


def test_huge_input_gives_short_message() -> None:
    with pytest.raises(InvalidSpiffeId) as info:
        SpiffeId.parse("spiffe://example.org/" + "a" * 1_000_000)
    assert len(str(info.value)) < 200


def test_trust_domain_limit_is_255_bytes() -> None:
    assert TrustDomain("a" * 255).name == "a" * 255
    with pytest.raises(InvalidSpiffeId, match="256 bytes, over the limit of 255"):
        SpiffeId.parse("spiffe://" + "a" * 256 + "/web")


def test_non_string_refused() -> None:
    with pytest.raises(InvalidSpiffeId, match="must be a string"):
        SpiffeId.parse(b"spiffe://example.org/web")  # type: ignore[arg-type]


def test_constructor_validates_too() -> None:
    with pytest.raises(InvalidSpiffeId, match=r"'..' is not allowed"):
        SpiffeId("example.org", "/a/../b")
    with pytest.raises(InvalidSpiffeId, match="must start with '/'"):
        SpiffeId("example.org", "web")
    with pytest.raises(InvalidSpiffeId, match="lowercase"):
        SpiffeId("Example.org", "/web")


def test_frozen() -> None:
    sid = SpiffeId.parse("spiffe://example.org/web")
    with pytest.raises(dataclasses.FrozenInstanceError):
        sid.path = "/other"  # type: ignore[misc]
    assert hash(sid) == hash(SpiffeId.parse("spiffe://example.org/web"))


def test_require_workload() -> None:
    workload = SpiffeId.parse("spiffe://example.org/web")
    assert workload.require_workload() is workload
    assert workload.is_workload()
    with pytest.raises(InvalidSpiffeId, match="has no path"):
        SpiffeId.parse("spiffe://example.org").require_workload()


def test_member_of() -> None:
    sid = SpiffeId.parse("spiffe://example.org/web")
    assert sid.member_of("example.org")
    assert sid.member_of("spiffe://example.org")
    assert sid.member_of(TrustDomain("example.org"))
    assert not sid.member_of("example.com")
    assert not sid.member_of("sub.example.org")
    assert sid.require_member_of("example.org") is sid
    with pytest.raises(InvalidSpiffeId, match=r"not in 'other.org'"):
        sid.require_member_of("other.org")


def test_trust_domain_helper() -> None:
    td = TrustDomain.parse("spiffe://example.org")
    assert td == TrustDomain("example.org") == TrustDomain.of("example.org")
    assert td.id_string == "spiffe://example.org"
    assert str(td) == "example.org"
    assert td.spiffe_id() == SpiffeId.parse("spiffe://example.org")
    assert SpiffeId.parse("spiffe://example.org/x").trust_domain_id == td
    with pytest.raises(InvalidSpiffeId, match="has a path"):
        TrustDomain.parse("spiffe://example.org/web")
    with pytest.raises(InvalidSpiffeId, match="lowercase"):
        TrustDomain.parse("Example.org")
    with pytest.raises(InvalidSpiffeId, match="port"):
        TrustDomain.parse("example.org:443")
    with pytest.raises(InvalidSpiffeId, match="empty"):
        TrustDomain.parse("")


def test_from_segments() -> None:
    sid = SpiffeId.from_segments("example.org", "acme", "prod", "web")
    assert str(sid) == "spiffe://example.org/acme/prod/web"
    assert SpiffeId.from_segments("example.org") == SpiffeId.parse("spiffe://example.org")
    with pytest.raises(InvalidSpiffeId, match=r"'..' is not allowed"):
        SpiffeId.from_segments("example.org", "acme", "..")
    with pytest.raises(InvalidSpiffeId, match="character '/'"):
        SpiffeId.from_segments("example.org", "a/b")


def test_validate_path_segment() -> None:
    validate_path_segment("ok-segment_1.x")
    with pytest.raises(InvalidSpiffeId, match="empty"):
        validate_path_segment("")
