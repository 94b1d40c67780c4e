"""Statement templates: split before substitution, every value quoted for its context."""

from __future__ import annotations

import pytest

from broker.database.mysql import quote_ident as my_ident
from broker.database.postgres import quote_ident, quote_literal
from broker.database.template import Placeholder, Template
from broker.errors import InvalidArgument

VALUES = {"name": 'v_a"b', "password": "p'w\\;--", "expiration": "2026-01-01 00:00:00+00"}


def render(text: str, dialect: str = "postgresql") -> list[str]:
    return Template.parse(text, dialect).render(VALUES, quote_ident, quote_literal)


def test_bare_and_quoted_placeholders_are_quoted_for_their_context() -> None:
    assert render("CREATE ROLE {{name}} PASSWORD {{password}} VALID UNTIL {{expiration}}") == [
        "CREATE ROLE \"v_a\"\"b\" PASSWORD E'p''w\\\\;--' VALID UNTIL '2026-01-01 00:00:00+00'"
    ]
    # Vault-style quotes are replaced by proper quoting, not doubled
    assert render("CREATE ROLE \"{{name}}\" PASSWORD '{{password}}'") == [
        "CREATE ROLE \"v_a\"\"b\" PASSWORD E'p''w\\\\;--'"
    ]
    # '{{name}}' is a string literal (e.g. comparing with pg_roles.rolname)
    assert render("SELECT 1 FROM pg_roles WHERE rolname = '{{name}}'") == [
        "SELECT 1 FROM pg_roles WHERE rolname = 'v_a\"b'"
    ]


def test_values_cannot_add_statements() -> None:
    statements = render("CREATE ROLE {{name}} PASSWORD {{password}}; GRANT x TO {{name}};")
    assert len(statements) == 2  # the ';' inside the password is not a separator


def test_split_respects_quotes_dollar_quotes_and_comments() -> None:
    text = (
        "-- a comment; with a semicolon\n"
        "CREATE FUNCTION f() RETURNS int AS $body$ SELECT 1; $body$ LANGUAGE sql;\n"
        "COMMENT ON ROLE {{name}} IS 'a;b';\n"
        "/* x; y */ SELECT 2"
    )
    parsed = Template.parse(text, "postgresql")
    assert len(parsed.statements) == 3
    assert parsed.statements[1][-1] == " IS 'a;b'"


def test_mysql_backticks_and_backslash_strings() -> None:
    parsed = Template.parse("CREATE USER `{{name}}`@'%' IDENTIFIED BY 'it\\'s;';", "mysql")
    assert parsed.statements[0][1] == Placeholder("name", "identifier")
    rendered = parsed.render(VALUES, my_ident, quote_literal)
    assert rendered == ["CREATE USER `v_a\"b`@'%' IDENTIFIED BY 'it\\'s;'"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("CREATE ROLE {{name}} PASSWORD 'x{{password}}'", "stand alone"),
        ("CREATE ROLE {{user}}", "unknown placeholder"),
        ("CREATE ROLE {{name}", "malformed placeholder"),
        ("CREATE ROLE {{name}} PASSWORD 'open", "unterminated"),
        ("CREATE FUNCTION f() AS $$ {{password}} $$", "dollar-quoted"),
        ("  ;  ; -- nothing\n", "no SQL statement"),
        ("SELECT 1\0", "NUL"),
    ],
)
def test_bad_templates_are_refused(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        Template.parse(text, "postgresql")


def test_quote_literal_matches_postgresql() -> None:
    assert quote_literal("plain") == "'plain'"
    assert quote_literal("it's") == "'it''s'"
    assert quote_literal("back\\slash'") == "E'back\\\\slash'''"
    assert quote_ident('a"b') == '"a""b"'
    assert my_ident("a`b") == "`a``b`"
