"""Where a scan reads from: files and directories, git history, OCI image tarballs.

Every source yields `Blob`s (a location and bytes, optionally with the line number of each line)
and `Skip`s (something not scanned, and why: binary, too large, symlink out of the tree,
unreadable, malformed). Nothing is ever silently ignored; nothing here prints a byte it read.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from broker.errors import InvalidArgument

__all__ = [
    "DEFAULT_MAX_BYTES",
    "Blob",
    "MalformedImage",
    "Skip",
    "git_history",
    "image_layers",
    "walk_paths",
]

DEFAULT_MAX_BYTES: Final = 16 * 1024 * 1024
_SNIFF: Final = 8192
# Directories that hold tools' state, not content anybody commits.
_SKIP_DIRS: Final = frozenset(
    {".git", ".venv", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", "node_modules"}
)


@dataclass(frozen=True)
class Blob:
    location: str
    data: bytes = field(repr=False)
    # The line number of each line of `data` (None: lines are numbered from 1).
    line_numbers: Sequence[int] | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Skip:
    location: str
    reason: str


def is_binary(data: bytes) -> bool:
    return b"\x00" in data[:_SNIFF]


def _checked(location: str, data: bytes, max_bytes: int) -> Blob | Skip:
    if len(data) > max_bytes:
        return Skip(location, f"larger than {max_bytes} bytes")
    if is_binary(data):
        return Skip(location, "binary")
    return Blob(location, data)


def _read_file(path: Path, location: str, max_bytes: int) -> Blob | Skip:
    try:
        size = path.stat().st_size
        if size > max_bytes:
            return Skip(location, f"larger than {max_bytes} bytes ({size})")
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        return Skip(location, f"unreadable: {exc.strerror or exc}")
    return _checked(location, data, max_bytes)


def _inside(root: Path, target: Path) -> bool:
    try:
        target.relative_to(root)
    except ValueError:
        return False
    return True


def walk_paths(
    paths: Sequence[Path],
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    skip_dirs: frozenset[str] = _SKIP_DIRS,
) -> Iterator[Blob | Skip]:
    """Regular files under `paths` (directories walked, sorted). Symlinks are never followed:
    one that leaves its scanned tree is reported; one inside it is skipped silently since its
    target is scanned where it lives."""
    for given in paths:
        if given.is_symlink() and not given.exists():
            yield Skip(str(given), "dangling symlink")
            continue
        if not given.exists():
            yield Skip(str(given), "no such file or directory")
            continue
        if given.is_file() and not given.is_symlink():
            yield _read_file(given, str(given), max_bytes)
            continue
        root = given.resolve()
        for dirpath, dirnames, filenames in os.walk(given, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs)
            base = Path(dirpath)
            for name in sorted(filenames) + [d for d in dirnames if (base / d).is_symlink()]:
                if name in skip_dirs:
                    continue  # e.g. the `.git` file of a worktree
                path = base / name
                location = str(path)
                if path.is_symlink():
                    try:
                        target = path.resolve(strict=False)
                    except (OSError, RuntimeError):
                        yield Skip(location, "symlink loop")
                        continue
                    if not _inside(root, target):
                        yield Skip(location, "symlink out of the scanned tree (not followed)")
                    elif not target.exists():
                        yield Skip(location, "dangling symlink")
                    continue
                if not path.is_file():
                    continue  # fifos, sockets, devices
                yield _read_file(path, location, max_bytes)


# -- git history -------------------------------------------------------------------------------

_HUNK = re.compile(rb"^@@ -\d+(?:,\d+)? \+(\d+)(?:,\d+)? @@")
_RANGE = re.compile(r"^[A-Za-z0-9_./~^@{}:-]+(?:\.\.\.?[A-Za-z0-9_./~^@{}:-]*)?$")


def _git(repo: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["git", "-C", str(repo), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def git_history(
    repo: Path, revision_range: str, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> Iterator[Blob | Skip]:
    """Every line added by each commit in `revision_range` (e.g. `main..HEAD`, `HEAD~50..`,
    `--all` as "ALL"), one blob per commit and file, located as `COMMIT:PATH`. A value added and
    removed later is still found in the commit that added it."""
    if revision_range != "ALL" and (
        not _RANGE.fullmatch(revision_range) or revision_range.startswith("-")
    ):
        raise InvalidArgument(f"--git {revision_range!r} is not a revision range (e.g. main..HEAD)")
    rev = ["--all"] if revision_range == "ALL" else [revision_range]
    proc = _git(
        repo, "log", "-p", "-U0", "--no-color", "--no-ext-diff", "--no-renames",
        "--format=commit %H", *rev, "--",
    )  # fmt: skip
    assert proc.stdout is not None
    commit = ""
    path = ""
    lines: list[bytes] = []
    numbers: list[int] = []
    next_line = 0

    def flush() -> Iterator[Blob | Skip]:
        if commit and path and lines:
            data = b"\n".join(lines)
            location = f"{commit[:12]}:{path}"
            if len(data) > max_bytes:
                yield Skip(location, f"added more than {max_bytes} bytes")
            else:
                yield Blob(location, data, tuple(numbers))
        lines.clear()
        numbers.clear()

    for raw in proc.stdout:
        line = raw.rstrip(b"\n")
        if line.startswith(b"commit ") and len(line) in (47, 71):  # SHA-1 or SHA-256
            yield from flush()
            commit, path = line[7:].decode("ascii"), ""
        elif line.startswith(b"diff --git "):
            yield from flush()
            path = ""
        elif line.startswith(b"+++ "):
            target = line[4:]
            path = "" if target == b"/dev/null" else target[2:].decode("utf-8", "replace")
        elif line.startswith(b"Binary files "):
            name = line.rsplit(b" and ", 1)[-1].removesuffix(b" differ")
            yield Skip(f"{commit[:12]}:{name[2:].decode('utf-8', 'replace')}", "binary")
        elif line.startswith(b"@@"):
            m = _HUNK.match(line)
            next_line = int(m.group(1)) if m else 0
        elif line.startswith(b"+") and path:
            lines.append(line[1:])
            numbers.append(next_line)
            next_line += 1
    yield from flush()
    proc.stdout.close()
    err = proc.stderr.read() if proc.stderr else b""
    if proc.wait() != 0:
        message = err.decode("utf-8", "replace").strip().splitlines()
        raise InvalidArgument(
            f"git log {revision_range} in {repo} failed: {message[0] if message else 'error'}"
        )


# -- OCI image tarballs ------------------------------------------------------------------------

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_MAX_JSON: Final = 4 * 1024 * 1024


class MalformedImage(InvalidArgument):
    """The file is not an OCI image layout (or docker-save) tarball."""


def _member_bytes(tar: tarfile.TarFile, name: str, limit: int) -> bytes:
    try:
        member = tar.getmember(name)
    except KeyError:
        raise MalformedImage(f"the image has no {name}") from None
    if not member.isfile():
        raise MalformedImage(f"{name} in the image is not a regular file")
    if member.size > limit:
        raise MalformedImage(f"{name} in the image is larger than {limit} bytes")
    f = tar.extractfile(member)
    if f is None:
        raise MalformedImage(f"{name} in the image cannot be read")
    return f.read()


def _json(tar: tarfile.TarFile, name: str) -> Any:
    try:
        return json.loads(_member_bytes(tar, name, _MAX_JSON))
    except (ValueError, UnicodeDecodeError):
        raise MalformedImage(f"{name} in the image is not JSON") from None


def _blob_name(digest: object) -> str:
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise MalformedImage(f"bad digest {str(digest)[:80]!r} in the image")
    return "blobs/sha256/" + digest.removeprefix("sha256:")


def _layer_names(tar: tarfile.TarFile) -> list[str]:
    names = set(tar.getnames())
    if "index.json" in names:
        index = _json(tar, "index.json")
        manifests = index.get("manifests") if isinstance(index, dict) else None
        if not isinstance(manifests, list) or not manifests:
            raise MalformedImage("index.json lists no manifests")
        layers: list[str] = []
        for entry in manifests:
            if not isinstance(entry, dict):
                raise MalformedImage("index.json has a malformed manifest entry")
            manifest = _json(tar, _blob_name(entry.get("digest")))
            found = manifest.get("layers") if isinstance(manifest, dict) else None
            if not isinstance(found, list):
                raise MalformedImage("a manifest in the image lists no layers")
            for layer in found:
                if not isinstance(layer, dict):
                    raise MalformedImage("a manifest in the image has a malformed layer")
                name = _blob_name(layer.get("digest"))
                if name not in layers:
                    layers.append(name)
        return layers
    if "manifest.json" in names:  # docker save
        manifest = _json(tar, "manifest.json")
        if not isinstance(manifest, list):
            raise MalformedImage("manifest.json is not a list")
        out: list[str] = []
        for entry in manifest:
            layers_field = entry.get("Layers") if isinstance(entry, dict) else None
            if not isinstance(layers_field, list) or not all(
                isinstance(x, str) for x in layers_field
            ):
                raise MalformedImage("manifest.json has a malformed Layers list")
            out.extend(x for x in layers_field if x not in out)
        return out
    raise MalformedImage("no index.json (OCI image layout) or manifest.json (docker save)")


def _open_layer(tar: tarfile.TarFile, name: str) -> IO[bytes]:
    try:
        member = tar.getmember(name)
    except KeyError:
        raise MalformedImage(f"the image has no layer blob {name}") from None
    f = tar.extractfile(member) if member.isfile() else None
    if f is None:
        raise MalformedImage(f"layer {name} in the image is not a regular file")
    head = f.read(2)
    f.seek(0)
    if head == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=f)  # type: ignore[return-value]
    return f


def image_layers(image: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Iterator[Blob | Skip]:
    """Every regular file of every layer of an OCI image layout tarball (or `docker save`
    output), located as `IMAGE@LAYER:/path`. Raises `MalformedImage` when the outer structure
    is broken; a layer that is not a tar is reported as a skip."""
    try:
        outer = tarfile.open(image, "r:")  # noqa: SIM115 (closed below)
    except (tarfile.TarError, OSError) as exc:
        raise MalformedImage(f"{image} is not a tar file: {exc}") from None
    with outer:
        for name in _layer_names(outer):
            short = name.rsplit("/", 1)[-1][:12]
            where = f"{image.name}@{short}"
            try:
                stream = _open_layer(outer, name)
                with tarfile.open(fileobj=stream, mode="r|") as layer:
                    for member in layer:
                        location = f"{where}:/{member.name.lstrip('./')}"
                        if not member.isfile():
                            continue
                        if member.size > max_bytes:
                            yield Skip(location, f"larger than {max_bytes} bytes ({member.size})")
                            continue
                        f = layer.extractfile(member)
                        if f is None:
                            continue
                        yield _checked(location, f.read(), max_bytes)
            except (tarfile.TarError, OSError, EOFError, gzip.BadGzipFile) as exc:
                yield Skip(where, f"layer is not a readable tar: {exc}")
