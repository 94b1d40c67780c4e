"""The developer's local dev vault (`broker dev pull|run|ls|clear|gc`): expiring dev secrets
sealed under a key on the developer's own SoftHSM2 token. Client side only: it talks to the
broker through the SDK and never touches the server's storage."""

from __future__ import annotations

from .keys import VaultKeyError, VaultKeyGone
from .pull import DEV_PULL_PURPOSE, MAX_TTL, PullRefused, PullReport, check_pull, pull
from .vault import DevVault, Entry, PulledValue, VaultCorrupted, VaultError, VaultSource

__all__ = [
    "DEV_PULL_PURPOSE",
    "MAX_TTL",
    "DevVault",
    "Entry",
    "PullRefused",
    "PullReport",
    "PulledValue",
    "VaultCorrupted",
    "VaultError",
    "VaultKeyError",
    "VaultKeyGone",
    "VaultSource",
    "check_pull",
    "pull",
]
