"""CA policy: which SPIFFE IDs may get which credentials, for how long, with which keys.

Operators write an ordered list of rules; the first rule whose pattern matches the SPIFFE ID
decides. Patterns are SPIFFE IDs whose path segments may be `*` (exactly one segment) or, as the
last segment only, `**` (one or more segments):

    spiffe://example.org/acme/prod/*      matches /acme/prod/web, not /acme/prod/web/worker
    spiffe://example.org/*/dev/**         matches /acme/dev/web and /acme/dev/web/worker

Whatever a rule says, no TTL exceeds `HARD_MAX_TTL` (24 h): documents asking for more are
refused at load time, requests asking for more are refused at issue time.

Document shape (JSON or TOML), strictly validated (unknown keys and bad values refused; only
`pattern` is required, every other key has a default, see `RuleDefaults`):

    {"version": 1,
     "rules": [{"pattern": "spiffe://example.org/**",
                "x509_default_ttl": "1h", "x509_max_ttl": "24h",
                "jwt_default_ttl": "5m", "jwt_max_ttl": "1h",
                "key_types": ["ec-p256", "ec-p384", "rsa-2048"],
                "dns_names": ["*.web.internal", "web.example.org"]}]}

`dns_names` lists the DNS SANs a rule's SVIDs may carry, as patterns: an exact host name, or
`*.<suffix>` for exactly one label before `<suffix>` (also the wildcard name `*.<suffix>`
itself), or `*` alone for any name. No pattern (the default) means no DNS SANs. The broker's
own server names are refused whatever a rule says (`check_dns_names(reserved=...)`, and
`ca.x509svid.is_reserved_dns_name`), and no pattern may name the reserved `spiffe.invalid`
domain. Older documents said `"dns_names_allowed": true/false`; they are still read, `true` as
`["*"]` and `false` as `[]`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Any, Final

from ca.duration import format_duration, parse_duration
from ca.errors import InvalidInput, InvalidPolicy, InvalidTTL, PolicyViolation
from ca.spiffeid import SCHEME_PREFIX, SpiffeId, TrustDomain, validate_path_segment

__all__ = [
    "DEFAULT_KEY_TYPES",
    "HARD_MAX_TTL",
    "KNOWN_KEY_TYPES",
    "SERVER_NAME_DOMAIN",
    "CAPolicy",
    "PolicyRule",
    "RuleDefaults",
    "SpiffeIdPattern",
    "is_reserved_dns_name",
]

HARD_MAX_TTL: Final = dt.timedelta(hours=24)
"""No SVID, X.509 or JWT, is ever issued for longer than this, whatever the policy says."""

KNOWN_KEY_TYPES: Final = frozenset(
    {"ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096", "ed25519"}
)
DEFAULT_KEY_TYPES: Final = frozenset({"ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096"})

_MIN_TTL: Final = dt.timedelta(seconds=1)
_X509_DEFAULT_TTL: Final = dt.timedelta(hours=1)
_JWT_DEFAULT_TTL: Final = dt.timedelta(minutes=5)
_JWT_MAX_TTL: Final = dt.timedelta(hours=1)
_RULE_KEYS: Final = frozenset(
    {
        "pattern",
        "x509_default_ttl",
        "x509_max_ttl",
        "jwt_default_ttl",
        "jwt_max_ttl",
        "key_types",
        "dns_names",
        "dns_names_allowed",  # the old yes/no flag, read as ["*"] or []
    }
)
_REQUIRED_RULE_KEYS: Final = frozenset({"pattern"})
_ANY_DNS_NAME: Final = "*"
_MAX_DNS_PATTERNS: Final = 100
_DNS_LABEL_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
SERVER_NAME_DOMAIN: Final = "spiffe.invalid"
"""Names under this domain are the broker's own (`ca.x509svid.server_name`): `.invalid` is never
resolvable nor issued by a public CA (RFC 6761), and this CA refuses it to every workload."""
_DOCUMENT_KEYS: Final = frozenset({"version", "rules"})


@dataclasses.dataclass(frozen=True, slots=True)
class RuleDefaults:
    """What a rule that omits a key gets: the built-in default policy's values (SPIRE's and
    step-ca's defaults: X.509-SVIDs 1 h, at most `x509_max_ttl`; JWT-SVIDs 5 m, at most 1 h; EC
    and RSA keys; no DNS names). A default TTL is lowered to the rule's maximum when the rule
    sets a smaller one, so `x509_max_ttl = "30m"` alone is a valid rule."""

    x509_default_ttl: dt.timedelta = _X509_DEFAULT_TTL
    x509_max_ttl: dt.timedelta = HARD_MAX_TTL
    jwt_default_ttl: dt.timedelta = _JWT_DEFAULT_TTL
    jwt_max_ttl: dt.timedelta = _JWT_MAX_TTL
    key_types: frozenset[str] = DEFAULT_KEY_TYPES

    @classmethod
    def capped(cls, x509_max_ttl: dt.timedelta) -> RuleDefaults:
        """The defaults with the X.509 maximum lowered to `x509_max_ttl` (never above 24 h),
        e.g. what the issuing CA's rotation schedule can honour."""
        x509_max = min(x509_max_ttl, HARD_MAX_TTL)
        return cls(x509_default_ttl=min(_X509_DEFAULT_TTL, x509_max), x509_max_ttl=x509_max)


@dataclasses.dataclass(frozen=True, slots=True)
class SpiffeIdPattern:
    """A SPIFFE ID pattern; see the module docstring. Build with `SpiffeIdPattern.parse`."""

    trust_domain: str
    segments: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> SpiffeIdPattern:
        """Raise `InvalidPolicy` naming the problem if `text` is not a valid pattern."""
        if not isinstance(text, str):
            raise InvalidPolicy("pattern must be a string like 'spiffe://example.org/acme/*'")
        context = f"pattern {text[:120]!r}"
        if not text.startswith(SCHEME_PREFIX):
            raise InvalidPolicy(f"{context} must start with 'spiffe://'")
        trust_domain, _, path = text[len(SCHEME_PREFIX) :].partition("/")
        try:
            td = TrustDomain(trust_domain)
        except InvalidInput as exc:
            raise InvalidPolicy(f"{context}: {exc}") from None
        if not path:
            raise InvalidPolicy(
                f"{context} has no path; use 'spiffe://{td.name}/**' for every workload "
                "in the trust domain"
            )
        segments = tuple(path.split("/"))
        for index, segment in enumerate(segments):
            if segment == "**":
                if index != len(segments) - 1:
                    raise InvalidPolicy(f"{context}: '**' is only allowed as the last segment")
            elif segment != "*":
                if "*" in segment:
                    raise InvalidPolicy(
                        f"{context}: a wildcard must be a whole segment ('*' or '**'), "
                        f"not {segment!r}"
                    )
                try:
                    validate_path_segment(segment, context)
                except InvalidInput as exc:
                    raise InvalidPolicy(str(exc)) from None
        if len(text.encode()) > 2048:
            raise InvalidPolicy(f"{context} is longer than 2048 bytes")
        return cls(td.name, segments)

    def matches(self, spiffe_id: SpiffeId) -> bool:
        if spiffe_id.trust_domain != self.trust_domain:
            return False
        segments = spiffe_id.segments
        if self.segments and self.segments[-1] == "**":
            head = self.segments[:-1]
            if len(segments) <= len(head):
                return False
            segments = segments[: len(head)]
        else:
            head = self.segments
            if len(segments) != len(head):
                return False
        return all(p in ("*", s) for p, s in zip(head, segments, strict=True))

    def __str__(self) -> str:
        return SCHEME_PREFIX + self.trust_domain + "".join("/" + s for s in self.segments)


def _valid_host_name(name: str) -> bool:
    labels = name.split(".")
    return 0 < len(name) <= 253 and all(
        0 < len(label) <= 63
        and label[0] != "-"
        and label[-1] != "-"
        and all(c in _DNS_LABEL_CHARS for c in label)
        for label in labels
    )


def _dns_pattern(raw: object, where: str) -> str:
    """One normalised DNS-name pattern (lowercase, no trailing dot); `InvalidPolicy` if bad."""
    if not isinstance(raw, str):
        raise InvalidPolicy(f"{where}: DNS name patterns must be strings")
    pattern = raw.strip().lower().rstrip(".")
    if pattern == _ANY_DNS_NAME:
        return pattern
    host = pattern[2:] if pattern.startswith("*.") else pattern
    if not _valid_host_name(host) or (pattern.startswith("*.") and "." not in host):
        raise InvalidPolicy(
            f"{where}: DNS name pattern {raw[:80]!r} is not valid; use a host name "
            "('web.example.org'), '*.<domain>' for one label under a domain of at least two "
            "labels ('*.web.internal'), or '*' for any name"
        )
    if host == SERVER_NAME_DOMAIN or host.endswith("." + SERVER_NAME_DOMAIN):
        raise InvalidPolicy(
            f"{where}: DNS name pattern {raw[:80]!r} is in {SERVER_NAME_DOMAIN}, which is "
            "reserved for the broker's own serving certificate"
        )
    return pattern


def _dns_matches(pattern: str, name: str) -> bool:
    if pattern == _ANY_DNS_NAME:
        return True
    if pattern.startswith("*."):
        label, dot, rest = name.partition(".")
        return bool(label) and bool(dot) and rest == pattern[2:]
    return name == pattern


def is_reserved_dns_name(name: str, reserved: Iterable[str] = ()) -> bool:
    """Whether a certificate naming `name` could pose as the broker: `name` (or, for a
    wildcard `*.x`, a name it covers) is under `SERVER_NAME_DOMAIN` or is one of `reserved`
    (the broker's configured server names). Case and a trailing dot are ignored."""
    wanted = name.lower().rstrip(".")
    if wanted == SERVER_NAME_DOMAIN or wanted.endswith("." + SERVER_NAME_DOMAIN):
        return True
    for other in reserved:
        target = other.lower().rstrip(".")
        if wanted == target:
            return True
        if wanted.startswith("*.") and target.partition(".")[2] == wanted[2:]:
            return True
    return False


def _check_rule_ttl(name: str, value: dt.timedelta, pattern: str) -> None:
    if not isinstance(value, dt.timedelta):
        raise InvalidPolicy(f"rule {pattern}: {name} must be a duration")
    if value < _MIN_TTL:
        raise InvalidPolicy(
            f"rule {pattern}: {name} {format_duration(value)} must be at least "
            f"{format_duration(_MIN_TTL)}"
        )
    if value > HARD_MAX_TTL:
        raise InvalidPolicy(
            f"rule {pattern}: {name} {format_duration(value)} exceeds the hard ceiling of "
            f"{format_duration(HARD_MAX_TTL)} (24 h) that no policy may raise"
        )


@dataclasses.dataclass(frozen=True, slots=True)
class PolicyRule:
    """One rule; validated on construction (`InvalidPolicy`)."""

    pattern: SpiffeIdPattern
    x509_default_ttl: dt.timedelta
    x509_max_ttl: dt.timedelta
    jwt_default_ttl: dt.timedelta
    jwt_max_ttl: dt.timedelta
    key_types: frozenset[str]
    dns_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.pattern, str):
            object.__setattr__(self, "pattern", SpiffeIdPattern.parse(self.pattern))
        if not isinstance(self.pattern, SpiffeIdPattern):
            raise InvalidPolicy("rule pattern must be a SpiffeIdPattern or a string")
        p = str(self.pattern)
        for name in ("x509_default_ttl", "x509_max_ttl", "jwt_default_ttl", "jwt_max_ttl"):
            _check_rule_ttl(name, getattr(self, name), p)
        for kind in ("x509", "jwt"):
            default = getattr(self, f"{kind}_default_ttl")
            maximum = getattr(self, f"{kind}_max_ttl")
            if default > maximum:
                raise InvalidPolicy(
                    f"rule {p}: {kind}_default_ttl {format_duration(default)} exceeds "
                    f"{kind}_max_ttl {format_duration(maximum)}"
                )
        key_types = frozenset(self.key_types)
        unknown = key_types - KNOWN_KEY_TYPES
        if unknown:
            raise InvalidPolicy(
                f"rule {p}: unknown key type(s) {', '.join(sorted(unknown))}; known: "
                f"{', '.join(sorted(KNOWN_KEY_TYPES))}"
            )
        if not key_types:
            raise InvalidPolicy(f"rule {p}: key_types is empty; list at least one key type")
        object.__setattr__(self, "key_types", key_types)
        if isinstance(self.dns_names, str) or not isinstance(self.dns_names, list | tuple):
            raise InvalidPolicy(f"rule {p}: dns_names must be a list of DNS name patterns")
        if len(self.dns_names) > _MAX_DNS_PATTERNS:
            raise InvalidPolicy(f"rule {p}: at most {_MAX_DNS_PATTERNS} DNS name patterns")
        patterns: list[str] = []
        for raw in self.dns_names:
            pattern = _dns_pattern(raw, f"rule {p}")
            if pattern not in patterns:
                patterns.append(pattern)
        object.__setattr__(self, "dns_names", tuple(patterns))

    @property
    def dns_names_allowed(self) -> bool:
        """Whether the rule allows any DNS SAN at all (the old flag's meaning)."""
        return bool(self.dns_names)

    def allows_dns_name(self, name: str) -> bool:
        """Whether `name` (lowercase, no trailing dot) matches one of the rule's patterns."""
        return any(_dns_matches(p, name) for p in self.dns_names)

    @classmethod
    def from_document(
        cls, doc: Mapping[str, Any], where: str = "rule", defaults: RuleDefaults | None = None
    ) -> PolicyRule:
        """Build from a JSON/TOML-shaped rule; omitted keys take `defaults` (`RuleDefaults()`).
        `InvalidPolicy` names an unknown key or a bad value."""
        defaults = defaults or RuleDefaults()
        if not isinstance(doc, Mapping):
            raise InvalidPolicy(f"{where} must be a table/object")
        unknown = set(doc) - _RULE_KEYS
        if unknown:
            raise InvalidPolicy(
                f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; allowed: "
                f"{', '.join(sorted(_RULE_KEYS))}"
            )
        missing = _REQUIRED_RULE_KEYS - set(doc)
        if missing:
            raise InvalidPolicy(f"{where}: missing key(s) {', '.join(sorted(missing))}")
        try:
            pattern = SpiffeIdPattern.parse(doc["pattern"])
        except InvalidPolicy as exc:
            raise InvalidPolicy(f"{where}: {exc}") from None
        for kind in ("x509", "jwt"):
            if f"{kind}_default_ttl" in doc and f"{kind}_max_ttl" not in doc:
                maximum = getattr(defaults, f"{kind}_max_ttl")
                with contextlib.suppress(InvalidTTL):
                    if parse_duration(doc[f"{kind}_default_ttl"]) > maximum:
                        raise InvalidPolicy(
                            f"{where}.{kind}_default_ttl exceeds the default {kind}_max_ttl "
                            f"{format_duration(maximum)}; set {kind}_max_ttl too"
                        )
        ttls: dict[str, dt.timedelta] = {}
        for name in ("x509_max_ttl", "x509_default_ttl", "jwt_max_ttl", "jwt_default_ttl"):
            if name not in doc:
                default = getattr(defaults, name)
                if name.endswith("_default_ttl"):
                    # an omitted default never exceeds the maximum the rule sets
                    default = min(default, ttls[name.replace("_default_", "_max_")])
                ttls[name] = default
                continue
            try:
                ttls[name] = parse_duration(doc[name])
            except InvalidTTL as exc:
                raise InvalidPolicy(f"{where}.{name}: {exc}") from None
        key_types = doc.get("key_types", sorted(defaults.key_types))
        if not isinstance(key_types, list | tuple) or not all(
            isinstance(k, str) for k in key_types
        ):
            raise InvalidPolicy(f"{where}.key_types must be a list of strings")
        if len(set(key_types)) != len(key_types):
            raise InvalidPolicy(f"{where}.key_types lists a key type twice")
        if "dns_names" in doc and "dns_names_allowed" in doc:
            raise InvalidPolicy(
                f"{where}: give dns_names (patterns) or the old dns_names_allowed, not both"
            )
        if "dns_names_allowed" in doc:
            dns_allowed = doc["dns_names_allowed"]
            if not isinstance(dns_allowed, bool):
                raise InvalidPolicy(
                    f"{where}.dns_names_allowed must be true or false (better: dns_names = "
                    "['*.your.domain'])"
                )
            dns_names: Any = [_ANY_DNS_NAME] if dns_allowed else []
        else:
            dns_names = doc.get("dns_names", [])
            if not isinstance(dns_names, list | tuple):
                raise InvalidPolicy(
                    f"{where}.dns_names must be a list of patterns like ['*.web.internal']"
                )
        try:
            return cls(
                pattern=pattern,
                x509_default_ttl=ttls["x509_default_ttl"],
                x509_max_ttl=ttls["x509_max_ttl"],
                jwt_default_ttl=ttls["jwt_default_ttl"],
                jwt_max_ttl=ttls["jwt_max_ttl"],
                key_types=frozenset(key_types),
                dns_names=tuple(dns_names),
            )
        except InvalidPolicy as exc:
            raise InvalidPolicy(f"{where}: {exc}") from None

    def to_document(self) -> dict[str, Any]:
        return {
            "pattern": str(self.pattern),
            "x509_default_ttl": format_duration(self.x509_default_ttl),
            "x509_max_ttl": format_duration(self.x509_max_ttl),
            "jwt_default_ttl": format_duration(self.jwt_default_ttl),
            "jwt_max_ttl": format_duration(self.jwt_max_ttl),
            "key_types": sorted(self.key_types),
            "dns_names": list(self.dns_names),
        }


def _resolve_ttl(
    kind: str,
    spiffe_id: SpiffeId,
    rule: PolicyRule,
    requested: dt.timedelta | None,
    default: dt.timedelta,
    maximum: dt.timedelta,
) -> dt.timedelta:
    if requested is None:
        return min(default, maximum, HARD_MAX_TTL)
    if not isinstance(requested, dt.timedelta):
        raise InvalidTTL(f"requested {kind} TTL must be a duration")
    if requested <= dt.timedelta(0):
        raise InvalidTTL(
            f"requested {kind} TTL {format_duration(requested)} must be positive "
            "(omit it to get the policy default)"
        )
    if requested > HARD_MAX_TTL:
        raise PolicyViolation(
            f"requested {kind} TTL {format_duration(requested)} exceeds the hard ceiling of "
            f"{format_duration(HARD_MAX_TTL)} for any SVID"
        )
    if requested > maximum:
        raise PolicyViolation(
            f"requested TTL {format_duration(requested)} exceeds the maximum of "
            f"{format_duration(maximum)} for {rule.pattern} ({kind} SVID for {spiffe_id})"
        )
    return requested


@dataclasses.dataclass(frozen=True, slots=True)
class CAPolicy:
    """An ordered rule set; the first rule matching a SPIFFE ID decides. Immutable."""

    rules: tuple[PolicyRule, ...]
    version: int = 1

    def __post_init__(self) -> None:
        rules = tuple(self.rules)
        if not all(isinstance(r, PolicyRule) for r in rules):
            raise InvalidPolicy("CA policy rules must be PolicyRule objects")
        seen: set[str] = set()
        for rule in rules:
            key = str(rule.pattern)
            if key in seen:
                raise InvalidPolicy(
                    f"pattern {key} appears twice; the second rule could never match"
                )
            seen.add(key)
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            raise InvalidPolicy("CA policy version must be a positive integer")
        object.__setattr__(self, "rules", rules)

    @classmethod
    def default(
        cls, trust_domain: TrustDomain | str, *, x509_max_ttl: dt.timedelta = HARD_MAX_TTL
    ) -> CAPolicy:
        """One rule for the whole trust domain: X.509 1h/24h, JWT 5m/1h, EC and RSA keys.

        `x509_max_ttl` lowers the X.509 maximum (never above 24 h), e.g. to what the issuing
        CA's rotation schedule can honour; the default TTL is lowered with it if needed."""
        td = TrustDomain.of(trust_domain)
        defaults = RuleDefaults.capped(x509_max_ttl)
        return cls(
            rules=(
                PolicyRule(
                    pattern=SpiffeIdPattern(td.name, ("**",)),
                    x509_default_ttl=defaults.x509_default_ttl,
                    x509_max_ttl=defaults.x509_max_ttl,
                    jwt_default_ttl=defaults.jwt_default_ttl,
                    jwt_max_ttl=defaults.jwt_max_ttl,
                    key_types=defaults.key_types,
                ),
            )
        )

    @classmethod
    def from_document(
        cls, doc: Mapping[str, Any], defaults: RuleDefaults | None = None
    ) -> CAPolicy:
        """Build from a JSON/TOML-shaped dict; `InvalidPolicy` names the offending key. Keys a
        rule omits take `defaults` (`RuleDefaults()`); `to_document` writes them all out."""
        if not isinstance(doc, Mapping):
            raise InvalidPolicy("CA policy document must be a table/object with 'rules'")
        unknown = set(doc) - _DOCUMENT_KEYS
        if unknown:
            raise InvalidPolicy(
                f"CA policy: unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
                "allowed: rules, version"
            )
        if "rules" not in doc:
            raise InvalidPolicy("CA policy: missing key 'rules'")
        rules = doc["rules"]
        if not isinstance(rules, list | tuple):
            raise InvalidPolicy("CA policy: 'rules' must be a list")
        version = doc.get("version", 1)
        return cls(
            rules=tuple(
                PolicyRule.from_document(rule, f"rules[{index}]", defaults)
                for index, rule in enumerate(rules)
            ),
            version=version,
        )

    def to_document(self) -> dict[str, Any]:
        """The canonical document; `from_document(to_document())` round-trips."""
        return {"version": self.version, "rules": [r.to_document() for r in self.rules]}

    def rule_for(self, spiffe_id: SpiffeId) -> PolicyRule:
        """The first matching rule; `PolicyViolation` if none matches."""
        for rule in self.rules:
            if rule.pattern.matches(spiffe_id):
                return rule
        raise PolicyViolation(f"no CA policy rule allows issuing {spiffe_id}")

    def resolve_x509(
        self, spiffe_id: SpiffeId, requested_ttl: dt.timedelta | None, key_type: str
    ) -> dt.timedelta:
        """The X509-SVID TTL to issue: the rule's default if `requested_ttl` is None.

        Raises `PolicyViolation` (no rule, key type not allowed, TTL over the rule's maximum or
        the hard ceiling) or `InvalidTTL` (zero or negative TTL).
        """
        rule = self.rule_for(spiffe_id)
        if key_type not in rule.key_types:
            raise PolicyViolation(
                f"key type {key_type} is not allowed for {spiffe_id} by rule {rule.pattern}; "
                f"allowed: {', '.join(sorted(rule.key_types))}"
            )
        return _resolve_ttl(
            "X509", spiffe_id, rule, requested_ttl, rule.x509_default_ttl, rule.x509_max_ttl
        )

    def resolve_jwt(self, spiffe_id: SpiffeId, requested_ttl: dt.timedelta | None) -> dt.timedelta:
        """The JWT-SVID TTL to issue; same refusals as `resolve_x509` minus the key type."""
        rule = self.rule_for(spiffe_id)
        return _resolve_ttl(
            "JWT", spiffe_id, rule, requested_ttl, rule.jwt_default_ttl, rule.jwt_max_ttl
        )

    def check_dns_names(
        self, spiffe_id: SpiffeId, dns_names: Iterable[str], *, reserved: Iterable[str] = ()
    ) -> None:
        """`PolicyViolation` unless every requested DNS name matches a `dns_names` pattern of
        the rule for `spiffe_id`. A name in `reserved` (the broker's own server names; a
        wildcard covering one counts) or under `spiffe.invalid` is refused whatever the rule
        says: such a certificate could pose as the broker."""
        names = [n.lower().rstrip(".") if isinstance(n, str) else n for n in dns_names]
        if not names:
            return
        reserved = tuple(reserved)
        for name in names:
            if not isinstance(name, str):
                raise PolicyViolation("DNS names must be strings")
            if is_reserved_dns_name(name, reserved):
                raise PolicyViolation(
                    f"DNS name {name[:80]!r} is one of the broker's own server names; it is "
                    "never issued to anything but the broker"
                )
        rule = self.rule_for(spiffe_id)
        for name in names:
            if not rule.allows_dns_name(name):
                allowed = ", ".join(rule.dns_names) or "none"
                raise PolicyViolation(
                    f"DNS name {name[:80]!r} is not allowed for {spiffe_id} by rule "
                    f"{rule.pattern} (its dns_names patterns: {allowed})"
                )

    def max_x509_ttl(self) -> dt.timedelta:
        """The longest X509-SVID TTL any rule allows (0 with no rules); for rotation checks."""
        return max((r.x509_max_ttl for r in self.rules), default=dt.timedelta(0))

    def max_jwt_ttl(self) -> dt.timedelta:
        """The longest JWT-SVID TTL any rule allows (0 with no rules)."""
        return max((r.jwt_max_ttl for r in self.rules), default=dt.timedelta(0))
