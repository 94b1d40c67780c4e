"""Backend URIs, key URIs and PIN sources.

Backends are chosen by URI:

- ``pkcs11:token=broker?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/run/pin``
  (RFC 7512 style: path attributes separated by ``;``, query attributes by ``&``, values
  percent-encoded). ``token`` is required; ``module-path`` defaults to SoftHSM2's module;
  ``max-sessions`` (1..256; default 2, or 8 for a remoting module) bounds the sessions and
  token threads per process;
  ``object`` may be present and is ignored when opening a backend (it names a key).
  ``pin-value`` is refused: PINs are never accepted inline.
- ``software:`` (keys in memory, gone on exit) and ``software:path=/dir`` (keys in files under
  ``/dir``, encrypted under the PIN; needs a PIN source).

Each scheme is an entry in a registry (scheme -> `BackendFactory`: parse, open); a backend's
module is imported only when a URI of its scheme is opened, so a machine without python-pkcs11
can still use ``software:`` and gets an error naming the package for ``pkcs11:``. Backends
never import this module (their shared checks live in `ca.keys.backend`).

A PIN source is ``file:/path`` (the file's bytes, trailing newline stripped) or ``env:NAME``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, unquote

from ca.errors import InvalidInput, KeyBackendError
from ca.keys.backend import DEFAULT_PKCS11_MODULE, KeyBackend, validate_label

__all__ = [
    "DEFAULT_PKCS11_MODULE",
    "BackendFactory",
    "PinSource",
    "Pkcs11Uri",
    "SoftwareUri",
    "backend_schemes",
    "key_uri",
    "open_backend",
    "parse_backend_uri",
    "validate_label",
]

_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# RFC 7512: characters that may stay unencoded in path (p-pchar) and query (q-pchar) values.
_PATH_SAFE = ":[]@!$'()*+,=&"
_QUERY_SAFE = ":[]@!$'()*+,=/?|"
_PKCS11_PATH_ATTRS = frozenset({"token", "object"})
_PKCS11_QUERY_ATTRS = frozenset({"module-path", "pin-source", "max-sessions"})
_SOFTWARE_PATH_ATTRS = frozenset({"path", "object"})
_SOFTWARE_QUERY_ATTRS = frozenset({"pin-source"})


@dataclasses.dataclass(frozen=True)
class PinSource:
    """Where a PIN comes from: a file (``file:/path``) or an environment variable (``env:NAME``).

    Holds only the location, never the PIN; `read()` fetches it when needed.
    """

    kind: Literal["file", "env"]
    location: str

    @classmethod
    def parse(cls, spec: str) -> PinSource:
        """Parse ``file:/path`` (also ``file:///path``) or ``env:NAME``."""
        if not isinstance(spec, str):
            raise InvalidInput("a PIN source must be a string like file:/path or env:NAME")
        scheme, sep, rest = spec.partition(":")
        if sep and scheme == "file":
            if rest.startswith("//"):
                host, slash, path = rest[2:].partition("/")
                if host not in ("", "localhost"):
                    raise InvalidInput(f"PIN source {spec!r}: only local files are supported")
                rest = slash + path
            if not rest:
                raise InvalidInput(f"PIN source {spec!r} names no file; use file:/path/to/pin")
            return cls("file", rest)
        if sep and scheme == "env":
            if _ENV_NAME_RE.fullmatch(rest) is None:
                raise InvalidInput(
                    f"PIN source {spec!r}: {rest!r} is not a valid environment variable name"
                )
            return cls("env", rest)
        raise InvalidInput(
            f"unsupported PIN source {spec!r}: use file:/path/to/pin or env:VARIABLE_NAME"
        )

    def read(self) -> bytes:
        """The PIN, with a trailing newline stripped. Missing or empty -> `InvalidInput`."""
        if self.kind == "file":
            path = Path(self.location)
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                raise InvalidInput(f"PIN file {path} does not exist") from None
            except IsADirectoryError:
                raise InvalidInput(f"PIN file {path} is a directory") from None
            except PermissionError:
                raise InvalidInput(f"PIN file {path} is not readable by this process") from None
            except OSError as exc:
                raise InvalidInput(f"PIN file {path} cannot be read: {exc.strerror}") from None
            where = f"PIN file {path}"
        else:
            value = os.environ.get(self.location)
            if value is None:
                raise InvalidInput(
                    f"environment variable {self.location} (the PIN source) is not set"
                )
            data = os.fsencode(value)
            where = f"environment variable {self.location}"
        pin = data.removesuffix(b"\n").removesuffix(b"\r")
        if not pin:
            raise InvalidInput(f"{where} is empty; it must hold the PIN")
        return pin

    def __str__(self) -> str:
        return f"{self.kind}:{self.location}"


@dataclasses.dataclass(frozen=True)
class Pkcs11Uri:
    """A parsed ``pkcs11:`` backend URI."""

    token: str
    module_path: str = DEFAULT_PKCS11_MODULE
    object: str | None = None
    pin_source: PinSource | None = None
    max_sessions: int | None = None  # None: the backend's default


@dataclasses.dataclass(frozen=True)
class SoftwareUri:
    """A parsed ``software:`` backend URI; ``path`` None means in memory."""

    path: Path | None = None
    object: str | None = None
    pin_source: PinSource | None = None


def _split_attrs(
    text: str, sep: str, allowed: frozenset[str], where: str, uri: str
) -> dict[str, str]:
    attrs: dict[str, str] = {}
    if not text:
        return attrs
    for part in text.split(sep):
        if not part:
            continue
        name, eq, value = part.partition("=")
        name = unquote(name)
        if name == "pin-value":
            raise InvalidInput("PINs are never accepted inline; use pin-source")
        if not eq:
            raise InvalidInput(f"backend URI {uri!r}: {where} attribute {name!r} has no value")
        if name not in allowed:
            raise InvalidInput(
                f"backend URI {uri!r}: unsupported {where} attribute {name!r} "
                f"(supported: {', '.join(sorted(allowed))})"
            )
        if name in attrs:
            raise InvalidInput(f"backend URI {uri!r}: attribute {name!r} given twice")
        attrs[name] = unquote(value, errors="strict")
    return attrs


def _parse_attrs(
    body: str, path_allowed: frozenset[str], query_allowed: frozenset[str], uri: str
) -> dict[str, str]:
    path, _, query = body.partition("?")
    try:
        attrs = _split_attrs(path, ";", path_allowed, "path", uri)
        query_attrs = _split_attrs(query, "&", query_allowed, "query", uri)
    except UnicodeDecodeError:
        raise InvalidInput(f"backend URI {uri!r} has invalid percent-encoding") from None
    for name, value in query_attrs.items():
        if name in attrs:
            raise InvalidInput(f"backend URI {uri!r}: attribute {name!r} given twice")
        attrs[name] = value
    return attrs


def _check_token_label(token: str, uri: str) -> str:
    if not token:
        raise InvalidInput(f"backend URI {uri!r}: token is empty")
    if len(token.encode("utf-8")) > 32:
        raise InvalidInput(
            f"backend URI {uri!r}: token label {token!r} is longer than PKCS#11's 32 bytes"
        )
    return token


def _parse_pkcs11(body: str, uri: str) -> Pkcs11Uri:
    attrs = _parse_attrs(body, _PKCS11_PATH_ATTRS, _PKCS11_QUERY_ATTRS, uri)
    if "token" not in attrs:
        raise InvalidInput(f"backend URI {uri!r} names no token; add token=LABEL")
    module_path = attrs.get("module-path", DEFAULT_PKCS11_MODULE)
    if not module_path:
        raise InvalidInput(f"backend URI {uri!r}: module-path is empty")
    obj = attrs.get("object")
    sessions = attrs.get("max-sessions")
    if sessions is not None and not (sessions.isdigit() and 1 <= int(sessions) <= 256):
        raise InvalidInput(f"backend URI {uri!r}: max-sessions must be a number 1..256")
    return Pkcs11Uri(
        token=_check_token_label(attrs["token"], uri),
        module_path=module_path,
        object=validate_label(obj) if obj is not None else None,
        pin_source=PinSource.parse(attrs["pin-source"]) if "pin-source" in attrs else None,
        max_sessions=int(sessions) if sessions is not None else None,
    )


def _parse_software(body: str, uri: str) -> SoftwareUri:
    attrs = _parse_attrs(body, _SOFTWARE_PATH_ATTRS, _SOFTWARE_QUERY_ATTRS, uri)
    path = attrs.get("path")
    if path is not None and not path:
        raise InvalidInput(f"backend URI {uri!r}: path is empty")
    obj = attrs.get("object")
    return SoftwareUri(
        path=Path(path) if path is not None else None,
        object=validate_label(obj) if obj is not None else None,
        pin_source=PinSource.parse(attrs["pin-source"]) if "pin-source" in attrs else None,
    )


def _missing_package(exc: ImportError, scheme: str, needs: str, package: str) -> Exception:
    """The error for a backend module that failed to import: names the missing package (a
    backend's optional dependency, imported as `needs`), or is the ImportError itself."""
    if exc.name is None or exc.name.split(".")[0] != needs:
        return exc
    return KeyBackendError(
        f"the {scheme} key backend needs the Python package {package}, which is not "
        f"installed (pip install {package})"
    )


def _open_pkcs11(parsed: Pkcs11Uri, source: PinSource | None) -> KeyBackend:
    if source is None:
        raise InvalidInput(
            f"the pkcs11 backend for token {parsed.token!r} needs a PIN: add "
            "pin-source=file:/path or pin-source=env:NAME"
        )
    # Imported here, when a pkcs11: URI is opened: python-pkcs11 is needed only then.
    try:
        from ca.keys.pkcs11 import Pkcs11Backend
    except ImportError as exc:
        raise _missing_package(exc, "pkcs11", "pkcs11", "python-pkcs11") from None
    if parsed.max_sessions is None:
        return Pkcs11Backend(parsed.token, source.read(), module_path=parsed.module_path)
    return Pkcs11Backend(
        parsed.token,
        source.read(),
        module_path=parsed.module_path,
        sessions=parsed.max_sessions,
    )


def _open_software(parsed: SoftwareUri, source: PinSource | None) -> KeyBackend:
    from ca.keys.software import SoftwareBackend

    if parsed.path is None:
        return SoftwareBackend()
    if source is None:
        raise InvalidInput(
            f"the software backend in {parsed.path} needs a PIN to encrypt its key files: add "
            "pin-source=file:/path or pin-source=env:NAME"
        )
    return SoftwareBackend(directory=parsed.path, pin=source.read())


@dataclasses.dataclass(frozen=True)
class BackendFactory:
    """One URI scheme: how to parse the rest of the URI and how to open the backend it names
    (with the PIN source, or None when none was given)."""

    parse: Callable[[str, str], Pkcs11Uri | SoftwareUri]
    open: Callable[[Any, PinSource | None], KeyBackend]


#: URI scheme -> backend factory. Backend modules are imported only when a URI of their scheme
#: is opened.
_SCHEMES: dict[str, BackendFactory] = {
    "pkcs11": BackendFactory(_parse_pkcs11, _open_pkcs11),
    "software": BackendFactory(_parse_software, _open_software),
}


def backend_schemes() -> tuple[str, ...]:
    """The URI schemes `open_backend` knows, sorted."""
    return tuple(sorted(_SCHEMES))


def parse_backend_uri(uri: str) -> Pkcs11Uri | SoftwareUri:
    """Parse a backend URI (see the module docstring). Bad input -> `InvalidInput`."""
    if not isinstance(uri, str):
        raise InvalidInput("a backend URI must be a string")
    scheme, sep, body = uri.partition(":")
    factory = _SCHEMES.get(scheme) if sep else None
    if factory is None:
        raise InvalidInput(
            f"unsupported key backend URI {uri!r}: use pkcs11:token=NAME?... or software:[path=DIR]"
        )
    return factory.parse(body, uri)


def key_uri(backend_uri: str, label: str) -> str:
    """A display URI for one key, e.g. ``pkcs11:token=broker;object=issuing-ca-3``.

    Secret-free and stable: module path and PIN source are left out.
    """
    parsed = parse_backend_uri(backend_uri)
    obj = quote(validate_label(label), safe=_PATH_SAFE)
    if isinstance(parsed, Pkcs11Uri):
        return f"pkcs11:token={quote(parsed.token, safe=_PATH_SAFE)};object={obj}"
    if parsed.path is None:
        return f"software:object={obj}"
    return f"software:path={quote(str(parsed.path), safe=_PATH_SAFE + '/')};object={obj}"


def _as_pin_source(value: PinSource | str | None) -> PinSource | None:
    if value is None or isinstance(value, PinSource):
        return value
    return PinSource.parse(value)


def open_backend(uri: str, pin_source: PinSource | str | None = None) -> KeyBackend:
    """Open the key backend a URI names.

    The PIN source may be in the URI (``pin-source=``) or passed here; giving two different
    ones is refused. The PIN is read once, at open.
    """
    parsed = parse_backend_uri(uri)
    explicit = _as_pin_source(pin_source)
    if explicit is not None and parsed.pin_source is not None and explicit != parsed.pin_source:
        raise InvalidInput(
            f"two different PIN sources given ({parsed.pin_source} in the URI and {explicit}); "
            "give one"
        )
    source = explicit or parsed.pin_source
    return _SCHEMES[uri.partition(":")[0]].open(parsed, source)
