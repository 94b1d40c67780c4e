"""Statement templates: SQL with `{{name}}`, `{{password}}` and `{{expiration}}` placeholders.

A template is parsed once (when a role is added) into statements made of raw SQL text and
placeholders; values are never pasted into SQL text: the engine quotes each one for the context
the author wrote it in:

- bare `{{name}}` is an identifier; bare `{{password}}` / `{{expiration}}` are string literals;
- `"{{x}}"` (and MySQL's `` `{{x}}` ``) is an identifier, `'{{x}}'` a string literal -- the
  quotes the author wrote (as in Vault/OpenBao templates) are replaced by proper quoting.

Statements are split on `;` outside quotes, dollar quotes and comments, before any value is
substituted, so no value can add a statement. A placeholder inside a longer quoted string
(`'x{{password}}'`) or an unknown placeholder is refused with `InvalidArgument`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from broker.errors import InvalidArgument

__all__ = ["VARIABLES", "Placeholder", "Template"]

VARIABLES: Final = frozenset({"name", "password", "expiration"})
_PLACEHOLDER: Final = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_DOLLAR_TAG: Final = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")
_MAX_TEMPLATE: Final = 64 * 1024


@dataclass(frozen=True)
class Placeholder:
    variable: str  # "name", "password" or "expiration"
    kind: str  # "identifier" or "literal"


Part = str | Placeholder


@dataclass(frozen=True)
class Template:
    """A parsed template: a tuple of statements, each a tuple of raw SQL and placeholders."""

    source: str
    statements: tuple[tuple[Part, ...], ...]

    @classmethod
    def parse(cls, source: str, dialect: str, *, what: str = "statements") -> Template:
        """Parse `source` for `dialect` ("postgresql" or "mysql"); raises InvalidArgument."""
        if len(source) > _MAX_TEMPLATE:
            raise InvalidArgument(f"{what}: longer than {_MAX_TEMPLATE} characters")
        if "\0" in source:
            raise InvalidArgument(f"{what}: contains a NUL character")
        statements = _split(source, dialect, what)
        if not statements:
            raise InvalidArgument(f"{what}: no SQL statement found")
        return cls(source, statements)

    def variables(self) -> set[str]:
        return {p.variable for s in self.statements for p in s if isinstance(p, Placeholder)}

    def render(
        self,
        values: Mapping[str, str],
        identifier: Callable[[str], str],
        literal: Callable[[str], str],
    ) -> list[str]:
        """The statements with every placeholder replaced by its quoted value."""
        out = []
        for statement in self.statements:
            text = []
            for part in statement:
                if isinstance(part, str):
                    text.append(part)
                    continue
                value = values[part.variable]
                text.append(identifier(value) if part.kind == "identifier" else literal(value))
            out.append("".join(text).strip())
        return out


def _placeholder(match: re.Match[str], what: str) -> str:
    variable = match[1]
    if variable not in VARIABLES:
        raise InvalidArgument(
            f"{what}: unknown placeholder {{{{{variable}}}}} "
            f"(known: {', '.join('{{' + v + '}}' for v in sorted(VARIABLES))})"
        )
    return variable


def _split(source: str, dialect: str, what: str) -> tuple[tuple[Part, ...], ...]:
    backslash = dialect == "mysql"  # MySQL strings use backslash escapes by default
    quotes = "'\"`" if dialect == "mysql" else "'\""
    statements: list[tuple[Part, ...]] = []
    parts: list[Part] = []
    raw: list[str] = []
    i, n = 0, len(source)

    def flush_raw() -> None:
        if raw:
            parts.append("".join(raw))
            raw.clear()

    def end_statement() -> None:
        flush_raw()
        if any(isinstance(p, Placeholder) or p.strip() for p in parts):
            statements.append(tuple(parts))
        parts.clear()

    while i < n:
        ch = source[i]
        if source.startswith("{{", i):
            match = _PLACEHOLDER.match(source, i)
            if match is None:
                raise InvalidArgument(f"{what}: malformed placeholder at offset {i}")
            variable = _placeholder(match, what)
            flush_raw()
            kind = "identifier" if variable == "name" else "literal"
            parts.append(Placeholder(variable, kind))
            i = match.end()
        elif ch in quotes:
            match = _PLACEHOLDER.match(source, i + 1)
            if match is not None and source.startswith(ch, match.end()):
                variable = _placeholder(match, what)
                flush_raw()
                parts.append(Placeholder(variable, "literal" if ch == "'" else "identifier"))
                i = match.end() + 1
                continue
            end = _quoted_end(source, i, ch, backslash and ch != "`")
            if end < 0:
                raise InvalidArgument(f"{what}: unterminated {ch} quote at offset {i}")
            if "{{" in source[i:end]:
                raise InvalidArgument(
                    f"{what}: a placeholder must stand alone, not inside a quoted string "
                    f"(offset {i}); write '{{{{password}}}}' or {{{{password}}}}"
                )
            raw.append(source[i:end])
            i = end
        elif ch == "$" and dialect == "postgresql" and (tag := _DOLLAR_TAG.match(source, i)):
            close = source.find(tag[0], tag.end())
            if close < 0:
                raise InvalidArgument(f"{what}: unterminated dollar quote at offset {i}")
            end = close + len(tag[0])
            if "{{" in source[i:end]:
                raise InvalidArgument(
                    f"{what}: a placeholder must stand alone, not inside a dollar-quoted body"
                )
            raw.append(source[i:end])
            i = end
        elif source.startswith("--", i) or (dialect == "mysql" and ch == "#"):
            end = source.find("\n", i)
            i = n if end < 0 else end  # comments are dropped
        elif source.startswith("/*", i):
            end = source.find("*/", i + 2)
            if end < 0:
                raise InvalidArgument(f"{what}: unterminated comment at offset {i}")
            i = end + 2
            raw.append(" ")
        elif ch == ";":
            end_statement()
            i += 1
        else:
            raw.append(ch)
            i += 1
    end_statement()
    return tuple(statements)


def _quoted_end(source: str, start: int, quote: str, backslash: bool) -> int:
    """Index just past the closing `quote` of the string starting at `start`, or -1."""
    i, n = start + 1, len(source)
    while i < n:
        ch = source[i]
        if backslash and ch == "\\":
            i += 2
            continue
        if ch == quote:
            if i + 1 < n and source[i + 1] == quote:  # doubled quote
                i += 2
                continue
            return i + 1
        i += 1
    return -1
