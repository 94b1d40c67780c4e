"""A relying party beside the load: every SVID the load generator receives is verified.

The load workers hand each X.509-SVID chain (and JWT-SVID) they receive, with the moment it
arrived, to a queue (an enqueue only: the verification happens here, in a thread of the parent
process, so its cost is not in the measured latency). This relying party behaves as a real one:

- it holds the trust domain's bundle, fetched from the broker (CertificateAuthority/GetBundle),
  and fetches it again when the bundle's `spiffe_refresh_hint` has passed (or every
  `refresh_max_s` if that is shorter: a relying party that polls more often than the hint,
  as a SPIRE agent syncs every few seconds; `--bundle-refresh`);
- it verifies each SVID against the bundle it holds at that moment (X.509: RFC 5280 path
  validation to one of the X.509 authorities plus the SPIFFE leaf profile; JWT: signature by
  one of the bundle's JWT authorities, audience, expiry);
- when a verification fails it fetches the bundle once more and verifies again; only if that
  fails too is it counted in `svid_verification_failures`.

Each SVID is also put in a phase of a root rotation, as the relying party sees it: `overlap`
when its issuing CA is signed by another root than the oldest X.509 authority held (the new
root signs; also when the relying party does not hold that root yet and the SVID verified
through the cross-certificate in its chain), else `publishing` when more than one authority
is held (the new root is published, not yet signing), else `steady`. A JWT-SVID gets the
phase of the last X.509-SVID seen.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import queue
import threading
import time
from collections import Counter
from typing import Any

__all__ = ["RelyingParty"]

MAX_FAILURE_SAMPLES = 5


class RelyingParty:
    """Verifies what arrives on `self.queue` (a spawn-context multiprocessing queue the load
    workers put `(kind, received_monotonic, payload)` on: kind `x509` with the DER chain, leaf
    first, or `jwt` with the token)."""

    def __init__(
        self,
        address: str,
        ident: Any,  # loadtests.targets.broker.BrokerIdentity
        server_name: str | None,
        trust_domain: str,
        jwt_audience: str,
        refresh_max_s: float | None = None,
    ) -> None:
        import multiprocessing as mp

        self._address, self._ident, self._server_name = address, ident, server_name
        self.trust_domain = trust_domain
        self.jwt_audience = jwt_audience
        self.refresh_max_s = refresh_max_s
        self.queue: Any = mp.get_context("spawn").Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relying-party", daemon=True)
        self._channel: Any = None
        self._bundle: Any = None  # ca.bundle.TrustBundle
        self._fetched_at = 0.0
        self.verified: Counter[str] = Counter()  # by "<kind> <phase>"
        self.failures: Counter[str] = Counter()
        self.recovered: Counter[str] = Counter()  # failed first, verified after the refetch
        self.failure_samples: list[str] = []
        self.fetches = {"refresh_hint": 0, "after_failure": 0, "errors": 0}
        self.sequences: list[int] = []
        self.lag_max_s = 0.0
        self._phase = "steady"

    # -- bundle ----------------------------------------------------------------------------

    def _download(self) -> Any:
        """The broker's bundle now (a `ca.bundle.TrustBundle`), over mTLS; raises on failure."""
        from broker.api._proto import ca_pb2
        from ca.bundle import TrustBundle

        if self._channel is None:
            from loadtests.targets.broker import _channel

            self._channel = _channel(self._address, self._ident, self._server_name)
        call = self._channel.unary_unary(
            "/broker.v1.CertificateAuthority/GetBundle",
            response_deserializer=ca_pb2.GetBundleResponse.FromString,
        )
        answer = call(ca_pb2.GetBundleRequest().SerializeToString(), timeout=30)
        return TrustBundle.from_jwks(self.trust_domain, answer.jwks)

    def _fetch(self, why: str) -> None:
        try:
            bundle = self._download()
        except Exception as exc:  # counted; the bundle held stays in use
            self.fetches["errors"] += 1
            self._sample(f"bundle fetch ({why}): {str(exc)[:200]}")
            return
        self.fetches[why] = self.fetches.get(why, 0) + 1
        self._bundle, self._fetched_at = bundle, time.monotonic()
        if not self.sequences or self.sequences[-1] != bundle.sequence:
            self.sequences.append(bundle.sequence)

    def start(self) -> None:
        """Fetch the first bundle (raises if it cannot), then verify in the background."""
        self._fetch("refresh_hint")
        if self._bundle is None:
            from loadtests.procs import StartupError

            raise StartupError(f"relying party: no trust bundle: {self.failure_samples}")
        self._thread.start()

    # -- verification ----------------------------------------------------------------------

    def _verify_once(self, kind: str, payload: Any) -> str:
        """Raise when `payload` does not verify against the bundle held; return its phase."""
        from cryptography import x509

        from ca.jwtsvid import validate_jwt_svid
        from ca.x509svid import verify_chain

        now = dt.datetime.now(dt.UTC)
        bundle = self._bundle
        if kind == "jwt":
            validate_jwt_svid(
                payload,
                self.jwt_audience,
                bundle.jwt_authorities,
                now,
                leeway=5,
                trust_domain=self.trust_domain,
            )
            return self._phase
        chain = [x509.load_der_x509_certificate(der) for der in payload]
        verify_chain(
            chain[0], chain[1:], bundle.x509_authorities, now, trust_domain=self.trust_domain
        )
        roots = bundle.x509_authorities
        oldest = min(roots, key=lambda c: c.not_valid_before_utc)
        issuer = _issuer_key_id(chain[1]) if len(chain) > 1 else None
        if issuer is not None and issuer != _key_id(oldest):
            self._phase = "overlap"
        elif len(roots) > 1:
            self._phase = "publishing"
        else:
            self._phase = "steady"
        return self._phase

    def _check(self, kind: str, received: float, payload: Any) -> None:
        self.lag_max_s = max(self.lag_max_s, time.monotonic() - received)
        every = float(self._bundle.refresh_hint_seconds)
        if self.refresh_max_s is not None:
            every = min(every, self.refresh_max_s)
        if time.monotonic() - self._fetched_at >= every:
            self._fetch("refresh_hint")
        try:
            phase = self._verify_once(kind, payload)
        except Exception:
            self._fetch("after_failure")  # as a relying party does: refetch once, try again
            try:
                phase = self._verify_once(kind, payload)
            except Exception as exc:
                self.failures[f"{kind} {self._phase}"] += 1
                self._sample(f"{kind}: {str(exc)[:300]}")
                return
            self.recovered[f"{kind} {phase}"] += 1
        self.verified[f"{kind} {phase}"] += 1

    def _sample(self, text: str) -> None:
        if len(self.failure_samples) < MAX_FAILURE_SAMPLES:
            self.failure_samples.append(text)

    def _run(self) -> None:
        while True:
            try:
                kind, received, payload = self.queue.get(timeout=0.2)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            self._check(kind, received, payload)

    def finish(self) -> dict[str, Any]:
        """After the load workers ended: verify what is still queued, then the figures."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(300)
        if self._channel is not None:
            with contextlib.suppress(Exception):
                self._channel.close()
        self.queue.close()
        failures = sum(self.failures.values())
        verified = sum(self.verified.values())
        phases = sorted({k.split(" ", 1)[1] for k in (*self.verified, *self.failures)})
        return {
            "svids_verified": verified,
            "svid_verification_failures": failures,
            "by_kind_and_phase": {
                key: {"verified": self.verified[key], "failures": self.failures[key]}
                for key in sorted({*self.verified, *self.failures})
            },
            "phases": phases,
            "verified_after_refetch": dict(sorted(self.recovered.items())),
            "bundle_fetches": dict(self.fetches),
            "bundle_sequences_seen": self.sequences,
            "failure_samples": list(self.failure_samples),
            "verify_lag_max_s": round(self.lag_max_s, 3),
            "bundle_refresh_max_s": self.refresh_max_s,
            "how": (
                "every X.509-SVID and JWT-SVID the load workers received, verified in a thread "
                "of the parent process (off the measured latency) against the bundle held, "
                "fetched by GetBundle and refreshed on spiffe_refresh_hint; a failure refetches "
                "once and verifies again before it counts"
            ),
        }


def _key_id(cert: Any) -> bytes:
    from cryptography import x509

    try:
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return bytes(ski.digest)
    except x509.ExtensionNotFound:
        return cert.subject.public_bytes()  # type: ignore[no-any-return]


def _issuer_key_id(cert: Any) -> bytes | None:
    from cryptography import x509

    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return None
    return None if aki.key_identifier is None else bytes(aki.key_identifier)
