"""`secret://` references in configuration: syntax checked before any fetch, unresolvable
references named, never an empty string."""

from __future__ import annotations

import pytest

from broker.secretrefs import (
    BadReference,
    UnresolvedReference,
    parse_dotenv,
    references_in,
    resolve_config,
    resolve_environ,
)

REF = "secret://payments/dev/stripe/api-key"


class Source:
    def __init__(self, values: dict[str, str]) -> None:
        self.values = values
        self.asked: list[str] = []

    def get_text(self, reference: str) -> str:
        self.asked.append(reference)
        return self.values[reference]


def test_values_are_filled_in_a_copy() -> None:
    doc = {"a": {"b": [REF, "plain", 3]}, "c": "text with secret:// inside"}
    out = resolve_config(doc, Source({REF: "v"}))
    assert out == {"a": {"b": ["v", "plain", 3]}, "c": "text with secret:// inside"}
    assert doc["a"]["b"][0] == REF


def test_bad_syntax_is_refused_before_anything_is_fetched() -> None:
    source = Source({REF: "v"})
    with pytest.raises(BadReference) as exc:
        resolve_config({"ok": REF, "x": {"y": "secret://only/two"}}, source)
    assert "x.y" in str(exc.value) and source.asked == []


def test_an_unresolvable_reference_names_itself_and_its_place() -> None:
    with pytest.raises(UnresolvedReference) as exc:
        resolve_config({"db": {"password": REF}}, Source({}))
    assert REF in str(exc.value) and "db.password" in str(exc.value)


def test_environment_conventions() -> None:
    env = {"API": REF, "STRIPE_SECRET_REF": REF, "PATH": "/bin"}
    assert resolve_environ(env, Source({REF: "v"})) == {"API": "v", "STRIPE": "v"}
    with pytest.raises(BadReference):
        resolve_environ({"_SECRET_REF": REF}, Source({REF: "v"}))


def test_dotenv_lines() -> None:
    text = f"# c\nexport A={REF}\nB='x y'\nC=\"q\"\nD=1 # note\n\n"
    assert parse_dotenv(text) == {"A": REF, "B": "x y", "C": "q", "D": "1"}
    with pytest.raises(BadReference) as exc:
        parse_dotenv("A=1\nthis is not a line with sk_live_value\n", "x.env")
    assert "x.env:2" in str(exc.value) and "sk_live" not in str(exc.value)


def test_references_are_listed_with_their_places() -> None:
    assert references_in({"a": [{"b": REF}]}) == {"a[0].b": REF}
