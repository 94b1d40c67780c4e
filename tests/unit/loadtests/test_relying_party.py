"""The load's relying party (loadtests/relyingparty.py) on certificates made here: an SVID under
a root it does not hold yet verifies after one refetch of the bundle (counted as such, in the
overlap phase); one that the refetched bundle does not cover either is a failure; and the SLO
gate fails a run with any verification failure, or with nothing verified."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from ca.bundle import TrustBundle
from ca.x509svid import build_intermediate, build_leaf, build_root
from loadtests import report, slo
from loadtests.relyingparty import RelyingParty

TD = "example.org"
NOW = dt.datetime.now(dt.UTC)
HOUR = dt.timedelta(hours=1)


class _Root:
    def __init__(self, name: str, age: dt.timedelta = dt.timedelta(0)) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = build_root(self.key, TD, NOW - age, 48 * HOUR, subject_cn=name)

    def svid(self) -> tuple[bytes, ...]:
        """A leaf under a fresh issuing CA of this root: DER, leaf first, no root."""
        issuing = ec.generate_private_key(ec.SECP256R1())
        inter = build_intermediate(self.key, self.cert, issuing.public_key(), TD, NOW, 4 * HOUR)
        workload = ec.generate_private_key(ec.SECP256R1())
        leaf = build_leaf(issuing, inter, workload.public_key(), f"spiffe://{TD}/w", NOW, HOUR)
        return (leaf.public_bytes(Encoding.DER), inter.public_bytes(Encoding.DER))


class _Scripted(RelyingParty):
    """Fetches come from `bundles` in turn (the last one stays)."""

    def __init__(self, bundles: list[list[Any]]) -> None:
        super().__init__("127.0.0.1:1", None, None, TD, "aud")
        self._script = [
            TrustBundle(TD, roots, {}, sequence=i + 1, refresh_hint_seconds=300)
            for i, roots in enumerate(bundles)
        ]

    def _download(self) -> Any:
        return self._script.pop(0) if len(self._script) > 1 else self._script[0]


def test_a_new_roots_svid_verifies_after_one_refetch_and_an_unknown_root_fails() -> None:
    old, new, stranger = _Root("old", age=HOUR), _Root("new"), _Root("stranger")
    rp = _Scripted([[old.cert], [old.cert, new.cert]])
    rp._fetch("refresh_hint")  # the first bundle: the old root only
    rp._check("x509", time.monotonic(), old.svid())
    rp._check("x509", time.monotonic(), new.svid())  # not held: refetch, then verifies
    rp._check("x509", time.monotonic(), old.svid())  # both held now
    rp._check("x509", time.monotonic(), stranger.svid())  # refetched again: still not held
    out = rp.finish()
    assert out["svids_verified"] == 3
    assert out["svid_verification_failures"] == 1
    assert out["by_kind_and_phase"]["x509 steady"] == {"verified": 1, "failures": 0}
    assert out["by_kind_and_phase"]["x509 overlap"]["verified"] == 1
    assert out["by_kind_and_phase"]["x509 publishing"]["verified"] == 1
    assert out["verified_after_refetch"] == {"x509 overlap": 1}
    assert out["bundle_fetches"]["after_failure"] == 2
    assert out["bundle_sequences_seen"] == [1, 2]
    assert len(out["failure_samples"]) == 1 and "does not verify" in out["failure_samples"][0]


def _run(notes: dict[str, Any]) -> report.RunResult:
    return report.RunResult(
        target="broker",
        scenario="rotation",
        concurrency=2,
        round=1,
        processes=1,
        warmup_s=1.0,
        duration_s=2.0,
        ok=0,
        operations={},
        notes=notes,
    )


def test_the_slo_gate_fails_a_run_with_a_verification_failure_or_nothing_verified() -> None:
    def verdicts(failures: int, verified: int) -> list[slo.Verdict]:
        note = {"svid_verification_failures": failures, "svids_verified": verified}
        found = slo.evaluate([_run({"svid_verification": note})], lambda _op: 150.0)
        return [v for v in found if v.slo == "svid verification"]

    (good,) = verdicts(0, 500)
    assert good.ok and good.measured == "0 failures, 500 SVIDs verified"
    (bad,) = verdicts(1, 499)
    assert not bad.ok
    (empty,) = verdicts(0, 0)
    assert not empty.ok
    assert [
        v for v in slo.evaluate([_run({})], lambda _op: 150.0) if v.slo.startswith("svid")
    ] == []
