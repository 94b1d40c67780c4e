"""`secret://` references wherever configuration lives: environment variables, `.env` files and
string values of TOML/JSON/YAML documents.

A configuration value is a reference when the whole string starts with `secret://` (text that
merely mentions one is left alone). Each reference is checked for syntax before anything is
fetched, and resolved through a `TextSource` (the SDK's `SecretResolver`, with its <= 5 min
cache, or the local dev vault). A reference that cannot be resolved raises `UnresolvedReference`
naming the reference and where it was found, never an empty string, never the value.

Environment conventions:
- `NAME=secret://svc/env/name`: NAME gets the value;
- `NAME_SECRET_REF=secret://svc/env/name`: NAME gets the value (the `_SECRET_REF` variable is
  kept as it is), so a deployment can say where a value comes from without shadowing it.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, Protocol

from broker.errors import InvalidArgument

__all__ = [
    "REF_SUFFIX",
    "SCHEME",
    "BadReference",
    "LiveConfig",
    "TextSource",
    "UnresolvedReference",
    "check_reference",
    "is_reference",
    "load_document",
    "parse_dotenv",
    "references_in",
    "resolve_config",
    "resolve_environ",
]

SCHEME: Final = "secret://"
REF_SUFFIX: Final = "_SECRET_REF"
_ENV_NAME: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class BadReference(ValueError):
    """A reference whose syntax is wrong (says what and where)."""


class UnresolvedReference(LookupError):
    """A reference that could not be resolved (names it, and why; never the value)."""

    def __init__(self, reference: str, where: str, why: str) -> None:
        super().__init__(f"{where}: cannot resolve {reference}: {why}")
        self.reference = reference
        self.where = where


class TextSource(Protocol):
    def get_text(self, reference: str) -> str:
        """The value as text; raises any exception when it cannot (wrapped by the caller)."""
        ...


def is_reference(value: object) -> bool:
    return isinstance(value, str) and value.startswith(SCHEME)


def check_reference(reference: str, where: str = "reference") -> str:
    """The reference if its syntax is right; `BadReference` otherwise."""
    from broker.secrets import SecretRef

    try:
        return SecretRef.parse(reference).text
    except InvalidArgument as exc:
        raise BadReference(
            f"{where}: {reference[:200]!r} is not a valid reference: {exc}"
        ) from None


def _resolve(source: TextSource, reference: str, where: str) -> str:
    check_reference(reference, where)
    try:
        return source.get_text(reference)
    except UnicodeDecodeError:
        raise UnresolvedReference(reference, where, "the value is not UTF-8 text") from None
    except Exception as exc:
        raise UnresolvedReference(reference, where, str(exc) or type(exc).__name__) from None


def references_in(document: Any, where: str = "") -> dict[str, str]:
    """{location: reference} of every reference in a nested document (dicts, lists, tuples),
    syntax-checked; locations read like `db.password` or `hosts[2]`."""
    found: dict[str, str] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                walk(value, f"{path}.{key}" if path else str(key))
        elif isinstance(node, list | tuple):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")
        elif is_reference(node):
            found[path] = check_reference(node, path)

    walk(document, where)
    return found


def resolve_config(document: Mapping[str, Any], source: TextSource) -> dict[str, Any]:
    """A copy of `document` with every reference replaced by its value (as text). Every
    reference is syntax-checked before any is fetched; raises `BadReference` or
    `UnresolvedReference`. The input is not modified."""
    references_in(document)

    def copy(node: Any, path: str) -> Any:
        if isinstance(node, Mapping):
            return {k: copy(v, f"{path}.{k}" if path else str(k)) for k, v in node.items()}
        if isinstance(node, list):
            return [copy(v, f"{path}[{i}]") for i, v in enumerate(node)]
        if isinstance(node, tuple):
            return tuple(copy(v, f"{path}[{i}]") for i, v in enumerate(node))
        if is_reference(node):
            return _resolve(source, node, path)
        return node

    result: dict[str, Any] = copy(document, "")
    return result


class LiveConfig:
    """A configuration document whose references stay fresh: `current()` resolves again through
    the source, whose cache (the SDK's, <= 5 min) decides when the broker is asked."""

    def __init__(self, document: Mapping[str, Any], source: TextSource) -> None:
        references_in(document)  # refuse bad syntax at once
        self._document = document
        self._source = source

    def current(self) -> dict[str, Any]:
        return resolve_config(self._document, self._source)


def resolve_environ(environ: Mapping[str, str], source: TextSource) -> dict[str, str]:
    """The variables to set: {NAME: value} for each `NAME=secret://...` and each
    `NAME_SECRET_REF=secret://...`. Other variables are not returned."""
    wanted: dict[str, tuple[str, str]] = {}
    for name, value in environ.items():
        if not is_reference(value):
            continue
        target = name[: -len(REF_SUFFIX)] if name.endswith(REF_SUFFIX) else name
        if not target or not _ENV_NAME.fullmatch(target):
            raise BadReference(f"${name}: {target!r} is not a variable name")
        wanted[target] = (value, f"${name}")
    for reference, where in wanted.values():
        check_reference(reference, where)
    return {t: _resolve(source, ref, where) for t, (ref, where) in wanted.items()}


_DOTENV_LINE: Final = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$")


def parse_dotenv(text: str, where: str = ".env") -> dict[str, str]:
    """`KEY=VALUE` lines (optional `export`, '#' comments, single or double quotes). Raises
    `BadReference` on a line that is none of these, naming the line (not its content, which
    might hold a value)."""
    out: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _DOTENV_LINE.match(line)
        if m is None:
            raise BadReference(f"{where}:{number}: not a NAME=VALUE line")
        name, value = m.group(1), m.group(2)
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        out[name] = value
    return out


def _yaml(text: str) -> Any:
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:
        raise BadReference("YAML documents need PyYAML (pip install pyyaml)") from None
    return yaml.safe_load(text)


_LOADERS: Final[dict[str, Callable[[str], Any]]] = {
    ".toml": tomllib.loads,
    ".json": json.loads,
    ".yaml": _yaml,
    ".yml": _yaml,
}


def load_document(path: Path) -> dict[str, Any]:
    """A TOML, JSON or YAML document (by suffix) as a mapping; raises `BadReference` (an
    unreadable or malformed document, or one that is not a mapping)."""
    loader = _LOADERS.get(path.suffix.lower())
    if loader is None:
        raise BadReference(f"{path}: use a .toml, .json, .yaml or .yml document")
    try:
        document = loader(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise BadReference(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadReference(f"{path}: malformed: {str(exc).splitlines()[0][:200]}") from None
    except Exception as exc:
        raise BadReference(f"{path}: malformed: {type(exc).__name__}") from None
    if not isinstance(document, dict):
        raise BadReference(f"{path}: the document is not a mapping")
    return document
