"""`broker scan`: managed secret values found by keyed fingerprint (never by value) in files,
git history and OCI image tarballs, plus detect-secrets for unmanaged ones. Client side except
`FingerprintIssuer`, the domain call behind the broker's Scan service."""

from __future__ import annotations

from .fingerprints import (
    SCAN_KEY_LABEL,
    Fingerprint,
    FingerprintIssuer,
    FingerprintSet,
    ScanKeySet,
    fingerprint,
)
from .scanner import Finding, Hit, Scanner, ScanReport, load_baseline
from .sources import Blob, MalformedImage, Skip, git_history, image_layers, walk_paths

__all__ = [
    "SCAN_KEY_LABEL",
    "Blob",
    "Finding",
    "Fingerprint",
    "FingerprintIssuer",
    "FingerprintSet",
    "Hit",
    "MalformedImage",
    "ScanKeySet",
    "ScanReport",
    "Scanner",
    "Skip",
    "fingerprint",
    "git_history",
    "image_layers",
    "load_baseline",
    "walk_paths",
]
