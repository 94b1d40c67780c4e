"""Writing files that may hold keys: atomically, and never readable by others, not even for a
moment."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["write_private_file"]


def write_private_file(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` atomically. The file is created with `mode` from the start
    (O_CREAT|O_EXCL on a fresh temporary name, fsync, then rename), so a key is never readable
    by others and an existing looser file is replaced, not reused. The directory must exist."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
