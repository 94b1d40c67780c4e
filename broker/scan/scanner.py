"""The scanner: managed values by keyed fingerprint, unmanaged ones by detect-secrets.

Candidates are the runs of a line between delimiters, at three granularities (fine: split on
quotes, spaces and punctuation that never occurs in generated values; coarse: split on
quotes and spaces only; the whole stripped line), filtered by the lengths of the managed values
before anything is hashed. Only a candidate whose length equals a managed value's length is
HMACed, so the cost is one regex pass plus a few HMACs per line.

A `Hit` names the location, line and reference; it never carries the value. Unmanaged
findings carry the detect-secrets type and the SHA-1 detect-secrets uses for baselines.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from .fingerprints import FingerprintSet
from .sources import Blob, Skip

__all__ = ["Finding", "Hit", "ScanReport", "Scanner", "load_baseline"]

_FINE_DELIMS: Final = rb"\s\"'`,;=:(){}\[\]<>|@&?\\"
_COARSE_DELIMS: Final = rb"\s\"'`"


def _patterns(lengths: frozenset[int]) -> tuple[re.Pattern[bytes], ...]:
    """Token patterns that only match whole tokens of a managed value's length range, so the
    regex engine (not Python) skips everything else."""
    if not lengths:
        return ()
    low, high = min(lengths), max(lengths)
    out = []
    for delims in (_FINE_DELIMS, _COARSE_DELIMS):
        token = rb"[^" + delims + rb"]"
        out.append(
            re.compile(
                rb"(?<!"
                + token
                + rb")"
                + token
                + b"{%d,%d}" % (low, high)
                + rb"(?!"
                + token
                + rb")"
            )
        )
    # Whole lines (a value with spaces or quotes in it), leading and trailing blanks aside.
    out.append(re.compile(rb"(?m)^[ \t]*([^\r\n]{%d,%d})\r?$" % (low, high + 64)))
    return tuple(out)


# detect-secrets is line based and slow on minified lines: longer lines are not given to it.
_DETECT_MAX_LINE: Final = 1000


@dataclass(frozen=True)
class Hit:
    location: str
    line: int
    reference: str
    version: int


@dataclass(frozen=True)
class Finding:
    """An unmanaged secret-looking string (detect-secrets)."""

    location: str
    line: int
    kind: str
    hashed_secret: str = field(repr=False)


@dataclass
class ScanReport:
    hits: list[Hit] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    blobs: int = 0
    bytes: int = 0


def load_baseline(path: Path) -> frozenset[str]:
    """The hashed secrets of a detect-secrets baseline (known false positives)."""
    try:
        doc: Any = json.loads(path.read_text(encoding="utf-8"))
        results = doc["results"]
        return frozenset(str(item["hashed_secret"]) for items in results.values() for item in items)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        from broker.errors import InvalidArgument

        raise InvalidArgument(f"{path} is not a detect-secrets baseline") from None


class _DetectSecrets:
    """detect-secrets, when installed (a dev dependency); its default plugins and filters."""

    def __init__(self, baseline: frozenset[str]) -> None:
        # The line-based pass of `scan_file` (no eager search), with the same filters; a
        # private function of the pinned detect-secrets 1.5.0, used so that blobs from git
        # history and image layers are treated exactly like files.
        from detect_secrets.core.scan import _is_filtered_out, _process_line_based_plugins
        from detect_secrets.settings import default_settings

        self._settings = default_settings()
        self._settings.__enter__()
        self._filtered = _is_filtered_out
        self._lines = _process_line_based_plugins
        self._baseline = baseline

    def close(self) -> None:
        self._settings.__exit__(None, None, None)

    def scan(self, location: str, lines: list[tuple[int, bytes]]) -> Iterator[Finding]:
        if self._filtered(required_filter_parameters=["filename"], filename=location):
            return
        text = [
            (number, "" if len(raw) > _DETECT_MAX_LINE else raw.decode("utf-8", "replace"))
            for number, raw in lines
        ]
        for secret in self._lines(lines=text, filename=location):
            if secret.secret_hash in self._baseline:
                continue
            yield Finding(location, secret.line_number, secret.type, secret.secret_hash)


class Scanner:
    """One scan: a fingerprint set (may be empty: detect-secrets only) and, optionally,
    detect-secrets. Not thread-safe; use one per thread."""

    def __init__(
        self,
        fingerprints: FingerprintSet,
        *,
        detect_secrets: bool = True,
        baseline: frozenset[str] = frozenset(),
        exclude: Sequence[re.Pattern[str]] = (),
    ) -> None:
        """`exclude`: locations where detect-secrets findings are not reported (searched with
        `re.search`); the baseline file itself is never given to detect-secrets."""
        self._exclude = tuple(exclude)
        self._fps = fingerprints
        self._lengths = fingerprints.lengths
        self._patterns = _patterns(self._lengths)
        self._detect: _DetectSecrets | None = None
        self.detect_secrets_missing = False
        if detect_secrets:
            try:
                self._detect = _DetectSecrets(baseline)
            except ImportError:
                self.detect_secrets_missing = True

    def close(self) -> None:
        if self._detect is not None:
            self._detect.close()
            self._detect = None

    def __enter__(self) -> Scanner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def scan_blob(self, blob: Blob) -> tuple[list[Hit], list[Finding]]:
        data = blob.data
        hits: list[Hit] = []
        seen: set[tuple[int, str, int]] = set()
        lengths = self._lengths
        for pattern in self._patterns:
            whole_line = pattern.groups == 1
            for m in pattern.finditer(data):
                token = m.group(1).strip() if whole_line else m.group()
                if len(token) not in lengths:
                    continue
                fp = self._fps.match(token)
                if fp is None:
                    continue
                line = self._line(blob, data.count(b"\n", 0, m.start()))
                key = (line, fp.reference, fp.version)
                if key not in seen:
                    seen.add(key)
                    hits.append(Hit(blob.location, line, fp.reference, fp.version))
        findings: list[Finding] = []
        if self._detect is not None and self._unmanaged_wanted(blob.location):
            numbered = [(self._line(blob, i), raw) for i, raw in enumerate(data.split(b"\n"))]
            findings = list(self._detect.scan(blob.location, numbered))
        return hits, findings

    def _unmanaged_wanted(self, location: str) -> bool:
        if location.rsplit("/", 1)[-1] == ".secrets.baseline":
            return False
        bare = location.removeprefix("./")
        return not any(p.search(bare) for p in self._exclude)

    @staticmethod
    def _line(blob: Blob, index: int) -> int:
        if blob.line_numbers is not None and index < len(blob.line_numbers):
            return blob.line_numbers[index]
        return index + 1

    def run(self, items: Iterable[Blob | Skip], report: ScanReport | None = None) -> ScanReport:
        report = report if report is not None else ScanReport()
        for item in items:
            if isinstance(item, Skip):
                report.skips.append(item)
                continue
            report.blobs += 1
            report.bytes += len(item.data)
            hits, findings = self.scan_blob(item)
            report.hits.extend(hits)
            report.findings.extend(findings)
        return report
