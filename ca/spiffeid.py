"""SPIFFE IDs and trust domain names, validated to the letter of the SPIFFE-ID standard.

A SPIFFE ID is `spiffe://<trust-domain>[/<segment>...]`:

- the scheme is exactly `spiffe://` (lowercase);
- the trust domain is 1..255 bytes of `[a-z0-9._-]` (no uppercase, no port, no userinfo);
- each path segment is non-empty `[a-zA-Z0-9._-]`, never `.` or `..`; no trailing slash;
- no query, no fragment, no percent-encoding; the whole ID is at most 2048 bytes.

Every refusal is an `InvalidSpiffeId` whose message names the exact problem. Parsing is pure and
idempotent: `SpiffeId.parse(str(x)) == x` for every valid `x`.
"""

from __future__ import annotations

import dataclasses
from typing import Final

from ca.errors import InvalidSpiffeId

__all__ = [
    "MAX_SPIFFE_ID_BYTES",
    "MAX_TRUST_DOMAIN_BYTES",
    "SCHEME_PREFIX",
    "SpiffeId",
    "TrustDomain",
    "validate_path_segment",
]

SCHEME_PREFIX: Final = "spiffe://"
MAX_SPIFFE_ID_BYTES: Final = 2048
MAX_TRUST_DOMAIN_BYTES: Final = 255

_TD_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_")
_SEGMENT_CHARS: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_"
)
# Inputs are echoed in messages; keep messages short even for a 1 MB hostile string.
_ECHO_LIMIT: Final = 80


def _echo(text: str) -> str:
    if len(text) <= _ECHO_LIMIT:
        return repr(text)
    return repr(text[:_ECHO_LIMIT]) + f"... ({len(text)} characters)"


def _check_trust_domain_name(name: str, context: str) -> None:
    if not name:
        raise InvalidSpiffeId(f"{context}: the trust domain is empty")
    if "@" in name:
        raise InvalidSpiffeId(f"{context}: userinfo ('user@') is not allowed in the trust domain")
    if ":" in name:
        raise InvalidSpiffeId(f"{context}: a port (':') is not allowed in the trust domain")
    for index, char in enumerate(name):
        if char not in _TD_CHARS:
            hint = " (trust domains must be lowercase)" if char.isupper() else ""
            raise InvalidSpiffeId(
                f"{context}: trust domain character {char!r} at position {index} is not allowed"
                f"{hint}; use only a-z, 0-9, '.', '-' and '_'"
            )
    if len(name.encode()) > MAX_TRUST_DOMAIN_BYTES:
        raise InvalidSpiffeId(
            f"{context}: the trust domain is {len(name)} bytes, over the limit of "
            f"{MAX_TRUST_DOMAIN_BYTES} bytes"
        )


def validate_path_segment(segment: str, context: str = "SPIFFE ID") -> None:
    """Check one path segment (without slashes); raise `InvalidSpiffeId` naming the problem."""
    if not isinstance(segment, str):
        raise InvalidSpiffeId(f"{context}: a path segment must be a string")
    if segment == "":
        raise InvalidSpiffeId(f"{context}: empty path segments ('//') are not allowed")
    if segment in (".", ".."):
        raise InvalidSpiffeId(f"SPIFFE ID path segment {segment!r} is not allowed ({context})")
    for char in segment:
        if char not in _SEGMENT_CHARS:
            what = "percent-encoding ('%')" if char == "%" else f"character {char!r}"
            raise InvalidSpiffeId(
                f"{context}: {what} in path segment {_echo(segment)} is not allowed; "
                "use only a-z, A-Z, 0-9, '.', '-' and '_'"
            )


@dataclasses.dataclass(frozen=True, slots=True)
class TrustDomain:
    """A validated trust domain name such as `example.org` (never with the scheme)."""

    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise InvalidSpiffeId("trust domain must be a string")
        _check_trust_domain_name(self.name, f"trust domain {_echo(self.name)}")

    @classmethod
    def parse(cls, text: str) -> TrustDomain:
        """Accept `example.org` or `spiffe://example.org` (an ID with no path)."""
        if not isinstance(text, str):
            raise InvalidSpiffeId("trust domain must be a string")
        if "://" in text:
            spiffe_id = SpiffeId.parse(text)
            if spiffe_id.path:
                raise InvalidSpiffeId(
                    f"trust domain {_echo(text)} has a path; give only "
                    f"'spiffe://{spiffe_id.trust_domain}' or '{spiffe_id.trust_domain}'"
                )
            return cls(spiffe_id.trust_domain)
        return cls(text)

    @classmethod
    def of(cls, value: TrustDomain | str) -> TrustDomain:
        """Coerce a `TrustDomain` or a string (bare name or `spiffe://name`)."""
        return value if isinstance(value, TrustDomain) else cls.parse(value)

    @property
    def id_string(self) -> str:
        """The trust domain's own SPIFFE ID, `spiffe://<name>` (used as the CA's URI SAN)."""
        return SCHEME_PREFIX + self.name

    def spiffe_id(self) -> SpiffeId:
        """The trust domain's SPIFFE ID (no path)."""
        return SpiffeId(self.name, "")

    def __str__(self) -> str:
        return self.name


@dataclasses.dataclass(frozen=True, slots=True)
class SpiffeId:
    """A validated SPIFFE ID. `path` is "" or starts with "/" (e.g. "/acme/prod/web").

    Construct with `SpiffeId.parse(text)` or `SpiffeId.from_segments(td, *segments)`; the
    constructor validates too, so an invalid `SpiffeId` cannot exist.
    """

    trust_domain: str
    path: str

    def __post_init__(self) -> None:
        if not isinstance(self.trust_domain, str) or not isinstance(self.path, str):
            raise InvalidSpiffeId("SPIFFE ID trust domain and path must be strings")
        context = f"SPIFFE ID {_echo(SCHEME_PREFIX + self.trust_domain + self.path)}"
        _check_trust_domain_name(self.trust_domain, context)
        if self.path:
            if not self.path.startswith("/"):
                raise InvalidSpiffeId(f"{context}: the path must start with '/'")
            segments = self.path[1:].split("/")
            if segments[-1] == "":
                raise InvalidSpiffeId(f"{context}: a trailing slash is not allowed")
            for segment in segments:
                validate_path_segment(segment, context)
        size = len(SCHEME_PREFIX) + len(self.trust_domain) + len(self.path)
        if size > MAX_SPIFFE_ID_BYTES:
            raise InvalidSpiffeId(
                f"SPIFFE ID is {size} bytes, over the limit of {MAX_SPIFFE_ID_BYTES} bytes"
            )

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Parse and validate `text`; raise `InvalidSpiffeId` naming the exact problem."""
        if not isinstance(text, str):
            raise InvalidSpiffeId(f"SPIFFE ID must be a string, not {type(text).__name__}")
        if text == "":
            raise InvalidSpiffeId("SPIFFE ID is empty; expected spiffe://<trust-domain>/<path>")
        size = len(text.encode("utf-8", errors="surrogatepass"))
        if size > MAX_SPIFFE_ID_BYTES:
            raise InvalidSpiffeId(
                f"SPIFFE ID is {size} bytes, over the limit of {MAX_SPIFFE_ID_BYTES} bytes"
            )
        context = f"SPIFFE ID {_echo(text)}"
        if not text.startswith(SCHEME_PREFIX):
            if text[: len(SCHEME_PREFIX)].lower() == SCHEME_PREFIX:
                raise InvalidSpiffeId(f"{context}: the scheme must be lowercase 'spiffe://'")
            raise InvalidSpiffeId(f"{context}: must start with 'spiffe://'")
        if "?" in text:
            raise InvalidSpiffeId(f"{context}: a query ('?') is not allowed")
        if "#" in text:
            raise InvalidSpiffeId(f"{context}: a fragment ('#') is not allowed")
        rest = text[len(SCHEME_PREFIX) :]
        trust_domain, slash, path = rest.partition("/")
        return cls(trust_domain, slash + path)

    @classmethod
    def from_segments(cls, trust_domain: TrustDomain | str, *segments: str) -> SpiffeId:
        """Build `spiffe://<td>/<seg1>/<seg2>...`, validating each segment."""
        td = TrustDomain.of(trust_domain)
        for segment in segments:
            validate_path_segment(segment, f"SPIFFE ID in trust domain {td.name!r}")
        return cls(td.name, "".join("/" + s for s in segments))

    @property
    def id_string(self) -> str:
        return SCHEME_PREFIX + self.trust_domain + self.path

    @property
    def segments(self) -> tuple[str, ...]:
        """Path segments, e.g. ("acme", "prod", "web"); () for a trust-domain ID."""
        return tuple(self.path[1:].split("/")) if self.path else ()

    @property
    def trust_domain_id(self) -> TrustDomain:
        return TrustDomain(self.trust_domain)

    def is_workload(self) -> bool:
        return bool(self.path)

    def require_workload(self) -> SpiffeId:
        """Return self if the ID names a workload (non-empty path), else raise InvalidSpiffeId."""
        if not self.path:
            raise InvalidSpiffeId(
                f"SPIFFE ID {self.id_string!r} has no path; a workload ID needs one "
                f"(e.g. {self.id_string}/<tenant>/<environment>/<service>)"
            )
        return self

    def member_of(self, trust_domain: TrustDomain | str) -> bool:
        """True if this ID lives in `trust_domain` (a name or `spiffe://name`)."""
        return self.trust_domain == TrustDomain.of(trust_domain).name

    def require_member_of(self, trust_domain: TrustDomain | str) -> SpiffeId:
        """Return self if in `trust_domain`, else raise InvalidSpiffeId naming both domains."""
        td = TrustDomain.of(trust_domain)
        if self.trust_domain != td.name:
            raise InvalidSpiffeId(
                f"SPIFFE ID {self.id_string!r} is in trust domain {self.trust_domain!r}, "
                f"not in {td.name!r}"
            )
        return self

    def __str__(self) -> str:
        return self.id_string
