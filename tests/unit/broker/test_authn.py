"""The Authenticator reads a caller's lineage from its certificate: who minted it, the serials it
was minted through (the denylist walks them), and never takes a minted SVID for an operator."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from broker.authn import Authenticator
from broker.errors import PermissionDenied, Unauthenticated
from broker.storage.identity import DenyRecord
from broker.workloads import Denylist
from ca.layout import IdentityLayout
from ca.x509svid import LINEAGE_OID, Lineage, build_intermediate, build_leaf, build_root

NOW = dt.datetime.now(dt.UTC)
TD = "example.org"
ALICE = f"spiffe://{TD}/broker/operator/alice"
WEB = f"spiffe://{TD}/acme/prod/web"


class CA:
    def __init__(self) -> None:
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = build_root(self.root_key, TD, NOW, dt.timedelta(days=1))
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = build_intermediate(
            self.root_key, self.root, self.key.public_key(), TD, NOW, dt.timedelta(hours=12)
        )

    def pem(self, spiffe_id: str, lineage: Lineage | None = None) -> bytes:
        public = ec.generate_private_key(ec.SECP256R1()).public_key()
        leaf = build_leaf(
            self.key, self.cert, public, spiffe_id, NOW, dt.timedelta(hours=1), lineage=lineage
        )
        return leaf.public_bytes(serialization.Encoding.PEM)

    def raw_pem(self, spiffe_id: str, extension: x509.ExtensionType) -> bytes:
        """A leaf with an arbitrary extension (what a forged or broken lineage would look like,
        were the CA to sign it)."""
        public = ec.generate_private_key(ec.SECP256R1()).public_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.cert.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW)
            .not_valid_after(NOW + dt.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
                critical=True,
            )
            .add_extension(extension, critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA()


def authenticator() -> Authenticator:
    auth = Authenticator(TD, [ALICE], IdentityLayout("{tenant}/{environment}/{service}"))
    auth.denylist = Denylist()
    return auth


def ctx(pem: bytes) -> dict[str, Any]:
    return {"x509_pem_cert": [pem]}


def test_a_plain_certificate_has_no_lineage(ca: CA) -> None:
    caller = authenticator().caller(ctx(ca.pem(WEB)))
    assert (caller.minted_by, caller.lineage) == ("", None)
    assert caller.serial and caller.not_after is not None
    assert caller.attributes == {"tenant": "acme", "environment": "prod", "service": "web"}


def test_minted_by_is_read_and_never_makes_an_operator(ca: CA) -> None:
    auth = authenticator()
    minted = auth.caller(ctx(ca.pem(WEB, Lineage(minted_by=ALICE, ancestors=("a1",)))))
    assert (minted.minted_by, minted.is_operator) == (ALICE, False)
    # Even a certificate for an operator's ID is no operator when it says it was minted.
    odd = auth.caller(ctx(ca.pem(ALICE, Lineage(minted_by=ALICE, ancestors=("a1",)))))
    assert odd.is_operator is False
    assert auth.caller(ctx(ca.pem(ALICE))).is_operator is True


def test_denying_an_ancestor_serial_denies_the_descendant(ca: CA) -> None:
    auth = authenticator()
    pem = ca.pem(WEB, Lineage(ancestors=("a1", "b2")))
    assert auth.caller(ctx(pem)).lineage == Lineage(ancestors=("a1", "b2"))
    assert auth.denylist is not None
    auth.denylist.add(DenyRecord("serial", "a1", NOW))  # type: ignore[attr-defined]
    with pytest.raises(PermissionDenied, match="denylist"):
        auth.caller(ctx(pem))
    assert auth.caller(ctx(ca.pem(WEB))).spiffe_id == WEB  # other certificates of the ID


@pytest.mark.parametrize(
    "value",
    [
        b"\x04\x02{}",  # not a UTF8String
        b"\x0c\x05[1,2]",  # not an object
        b'\x0c\x11{"ancestors":[1]}',  # a serial that is not hex text
        b"\x0c\x7f{",  # a length past the end
    ],
)
def test_a_malformed_lineage_is_unauthenticated(ca: CA, value: bytes) -> None:
    pem = ca.raw_pem(WEB, x509.UnrecognizedExtension(LINEAGE_OID, value))
    with pytest.raises(Unauthenticated, match=r"not an X\.509-SVID"):
        authenticator().caller(ctx(pem))
