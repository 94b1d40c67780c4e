"""The committed generated code must be exactly what grpcio-tools makes from protos/."""

from broker.api import codegen


def test_generated_code_is_fresh() -> None:
    rendered = codegen.render()
    committed = {p.name: p.read_text() for p in codegen.OUT.glob("*.py*")}
    stale = sorted(
        name
        for name in rendered.keys() | committed.keys()
        if rendered.get(name) != committed.get(name)
    )
    assert not stale, f"stale generated files {stale}: run python -m broker.api.codegen"


def test_generated_imports_stay_private() -> None:
    for name, text in codegen.render().items():
        assert "from broker.v1 import" not in text, name
