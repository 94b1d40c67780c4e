"""The node agent's trust in its broker across root CA rotations (docs/identity.md, "Rotating
the root CA").

- `TrustStore`: the roots the agent verifies the broker with. It starts from the pinned
  `--bundle` file and follows the bundle updates the agent accepted over its authenticated
  connection; with a file (`--trust-store`) they are kept there (written atomically), so a
  restarted agent trusts the new root without anyone redistributing `--bundle` files. The file
  is used at start when it is newer than the `--bundle` file; an operator who replaces the
  `--bundle` file (e.g. after a compromised root on a pre-rotation broker) wins.
- `vouched_for`: a bundle that keeps none of the roots the agent trusts (the emergency path
  drops the compromised root at once) is accepted only when one of its roots is certified by a
  trusted, unexpired root through a cross-certificate the broker sent with it.
- `needs_remint`: whether an SVID's chain no longer verifies against the roots now trusted;
  called where a new bundle is applied, so such SVIDs are minted again at once.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from broker.errors import InvalidArgument
from broker.files import write_private_file
from ca.errors import CAError
from ca.x509svid import trust_domain_of_roots, verify_chain

__all__ = ["TrustStore", "needs_remint", "vouched_for"]

log = logging.getLogger("broker.agent")


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def needs_remint(
    chain_der: Sequence[bytes],
    roots: Sequence[x509.Certificate],
    now: dt.datetime,
    trust_domain: str,
) -> bool:
    """True when the chain (leaf first) does not verify against `roots` at `now`."""
    try:
        certs = [x509.load_der_x509_certificate(c) for c in chain_der]
        verify_chain(certs[0], certs[1:], roots, now, trust_domain=trust_domain)
    except (CAError, ValueError, IndexError):
        return True
    return False


def vouched_for(
    new_roots: Iterable[x509.Certificate],
    cross_der: Iterable[bytes],
    trusted: Sequence[x509.Certificate],
    now: dt.datetime,
) -> bool:
    """Whether one of `new_roots` is certified, by a cross-certificate valid at `now`, by one
    of the `trusted` roots that is itself valid at `now`."""
    anchors = [r for r in trusted if r.not_valid_before_utc <= now < r.not_valid_after_utc]
    crosses = []
    for der in cross_der:
        try:
            crosses.append(x509.load_der_x509_certificate(der))
        except ValueError:
            continue
    for root in new_roots:
        for cross in crosses:
            if cross.subject != root.subject or _spki(cross) != _spki(root):
                continue
            if not cross.not_valid_before_utc <= now < cross.not_valid_after_utc:
                continue
            for anchor in anchors:
                try:
                    cross.verify_directly_issued_by(anchor)
                except (ValueError, TypeError, InvalidSignature):
                    continue
                return True
    return False


class TrustStore:
    """The roots the agent trusts for its broker, optionally kept in `path` (PEM)."""

    def __init__(self, pinned_pem: bytes, path: Path | None = None, pinned_mtime: float = 0.0):
        self._path = path
        roots = _load(pinned_pem, "the --bundle file")
        self._td = trust_domain_of_roots(roots).name if roots else ""
        if path is not None and path.is_file() and path.stat().st_mtime >= pinned_mtime:
            try:
                stored = _load(path.read_bytes(), f"the trust store {path}")
                if trust_domain_of_roots(stored).name != self._td:
                    raise InvalidArgument(f"the trust store {path} is for another trust domain")
                roots = stored
                log.info("trusting the %d root(s) kept in %s", len(roots), path)
            except (InvalidArgument, CAError, OSError) as exc:
                log.warning("ignoring the trust store: %s; using the --bundle file", exc)
        self._roots = tuple(roots)

    @property
    def roots(self) -> tuple[x509.Certificate, ...]:
        return self._roots

    def pem(self) -> bytes:
        return b"".join(r.public_bytes(serialization.Encoding.PEM) for r in self._roots)

    def replace(self, roots: Sequence[x509.Certificate]) -> None:
        """Trust `roots` from now on (a bundle the agent accepted); keep them in the file."""
        self._roots = tuple(roots)
        if self._path is None:
            return
        try:
            write_private_file(self._path, self.pem(), 0o644)
        except OSError as exc:
            log.warning("cannot keep the trusted roots in %s: %s", self._path, exc)


def _load(pem: bytes, what: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise InvalidArgument(f"{what} holds no PEM certificates") from None
