"""File delivery of secrets: each selected secret kept as one 0600 file in a directory (meant
for a tmpfs such as /run/<service>/secrets), rewritten when a new version appears and removed
when the broker refuses it (revoked, deleted, access withdrawn).

No grpc here: values come from a `broker.api.client.sdk.SecretSource`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from broker.api.client.sdk import SecretRefused, SecretSource, SecretUnavailable
from broker.errors import InvalidArgument
from broker.files import write_private_file

__all__ = ["FileSync", "SecretFiles"]

_FILE_NAME: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class FileSync:
    """What one `sync` did to one file: "written", "unchanged", "removed" (refused) or
    "kept" (broker unreachable: the last value stays); `error` says why for the last two."""

    name: str
    outcome: str
    version: int = 0
    error: str = ""


class SecretFiles:
    def __init__(self, source: SecretSource, directory: Path, files: Mapping[str, str]) -> None:
        """`files` maps a file name (no directories) to a secret reference."""
        for name in files:
            if not _FILE_NAME.fullmatch(name) or name in (".", ".."):
                raise InvalidArgument(
                    f"file name {name!r}: use letters, digits, '.', '_' and '-' (no directories)"
                )
        self._source = source
        self._directory = directory
        self._files = dict(files)
        self._written: dict[str, tuple[int, bytes]] = {}

    def sync(self) -> list[FileSync]:
        """Fetch every secret once and bring its file up to date. Never raises for one
        secret's failure: see each `FileSync`."""
        self._directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        results = []
        for name, reference in self._files.items():
            path = self._directory / name
            try:
                fetched = self._source.fetch(reference)
            except SecretRefused as exc:
                path.unlink(missing_ok=True)
                self._written.pop(name, None)
                results.append(FileSync(name, "removed", error=str(exc)))
                continue
            except SecretUnavailable as exc:
                results.append(FileSync(name, "kept", error=str(exc)))
                continue
            current = (fetched.version, fetched.value)
            if self._written.get(name) == current and path.exists():
                results.append(FileSync(name, "unchanged", fetched.version))
                continue
            write_private_file(path, fetched.value, 0o600)
            self._written[name] = current
            results.append(FileSync(name, "written", fetched.version))
        return results
