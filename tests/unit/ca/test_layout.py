import pytest

from ca.errors import InvalidInput, InvalidSpiffeId
from ca.layout import DEFAULT_TEMPLATE, DEV_TENANT, IdentityLayout, WorkloadIdentity
from ca.spiffeid import SpiffeId


def test_default_template() -> None:
    layout = IdentityLayout()
    assert layout.template == DEFAULT_TEMPLATE == "{tenant}/{environment}/{service}"
    identity = layout.parse(SpiffeId.parse("spiffe://example.org/acme/prod/web"))
    assert identity == WorkloadIdentity(
        spiffe_id=SpiffeId.parse("spiffe://example.org/acme/prod/web"),
        tenant="acme",
        environment="prod",
        service="web",
        rest=(),
    )


def test_extra_segments_go_to_rest() -> None:
    identity = IdentityLayout().parse("spiffe://example.org/acme/prod/web/worker/7")
    assert (identity.tenant, identity.environment, identity.service) == ("acme", "prod", "web")
    assert identity.rest == ("worker", "7")


def test_dev_mode_ids_live_under_default_tenant() -> None:
    identity = IdentityLayout().parse("spiffe://dev.local/default/dev/api")
    assert identity.tenant == DEV_TENANT == "default"


def test_literal_segments_and_default_tenant() -> None:
    layout = IdentityLayout("ns/{environment}/sa/{service}", default_tenant="default")
    identity = layout.parse("spiffe://k8s.example.org/ns/staging/sa/payments")
    assert (identity.tenant, identity.environment, identity.service) == (
        "default",
        "staging",
        "payments",
    )
    with pytest.raises(InvalidSpiffeId, match="segment 3 is 'serviceaccount', expected 'sa'"):
        layout.parse("spiffe://k8s.example.org/ns/staging/serviceaccount/payments")


def test_too_few_segments() -> None:
    with pytest.raises(InvalidSpiffeId, match="has 2 path segment"):
        IdentityLayout().parse("spiffe://example.org/acme/prod")
    with pytest.raises(InvalidSpiffeId, match="has 0 path segment"):
        IdentityLayout().parse("spiffe://example.org")


def test_malformed_id_refused() -> None:
    with pytest.raises(InvalidSpiffeId, match=r"'..' is not allowed"):
        IdentityLayout().parse("spiffe://example.org/acme/../web")


def test_leading_and_trailing_slashes_in_template_are_ignored() -> None:
    assert IdentityLayout("/{tenant}/{environment}/{service}/") == IdentityLayout()


@pytest.mark.parametrize(
    ("template", "default_tenant", "fragment"),
    [
        ("", None, "is empty"),
        ("{tenant}/{service}", None, "{environment} must appear exactly once (found 0)"),
        ("{tenant}/{environment}", None, "{service} must appear exactly once (found 0)"),
        ("{tenant}/{environment}/{service}/{service}", None, "(found 2)"),
        ("{tenant}/{tenant}/{environment}/{service}", None, "at most once (found 2)"),
        ("{environment}/{service}", None, "give default_tenant"),
        ("{tenant}/{environment}/{service}", "default", "default_tenant is only for"),
        ("{tenant}/{env}/{service}", None, "placeholder '{env}'"),
        ("{tenant}/x{environment}/{service}", None, "placeholder 'x{environment}'"),
        ("{tenant}/{environment}/svc-{service}", None, "is not one of"),
        ("{tenant}/{environment}/a b/{service}", None, "literal segment is invalid"),
        ("{tenant}/../{environment}/{service}", None, "literal segment is invalid"),
        ("{environment}/{service}", "bad tenant", "default_tenant 'bad tenant' is invalid"),
    ],
)
def test_template_validation(template: str, default_tenant: str | None, fragment: str) -> None:
    with pytest.raises(InvalidInput) as info:
        IdentityLayout(template, default_tenant=default_tenant)
    assert fragment in str(info.value)


def test_build_is_inverse_of_parse() -> None:
    layout = IdentityLayout()
    sid = layout.build("example.org", tenant="acme", environment="prod", service="web")
    assert str(sid) == "spiffe://example.org/acme/prod/web"
    assert layout.parse(sid).service == "web"
    with_rest = layout.build(
        "example.org", tenant="acme", environment="prod", service="web", rest=("w1",)
    )
    assert layout.parse(with_rest).rest == ("w1",)
    with pytest.raises(InvalidInput, match="needs a tenant"):
        layout.build("example.org", environment="prod", service="web")
    with pytest.raises(InvalidSpiffeId, match=r"'..' is not allowed"):
        layout.build("example.org", tenant="acme", environment="..", service="web")


def test_build_with_fixed_tenant() -> None:
    layout = IdentityLayout("ns/{environment}/sa/{service}", default_tenant="default")
    sid = layout.build("example.org", environment="prod", service="web")
    assert str(sid) == "spiffe://example.org/ns/prod/sa/web"
    with pytest.raises(InvalidInput, match="fixed tenant 'default'"):
        layout.build("example.org", tenant="acme", environment="prod", service="web")


def test_equality_and_repr() -> None:
    a = IdentityLayout("{environment}/{service}", default_tenant="default")
    b = IdentityLayout("{environment}/{service}", default_tenant="default")
    assert a == b and hash(a) == hash(b)
    assert a != IdentityLayout()
    assert "default_tenant='default'" in repr(a)
