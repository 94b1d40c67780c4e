"""`broker.cli.inputs.policy_document_json`: what `ca policy set` / `policy set` send."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from broker.cli.inputs import policy_document_json
from broker.cli.refusals import Refusal

DOCUMENT = {"version": 1, "rules": [{"pattern": "spiffe://example.org/**"}]}


def test_the_output_of_policy_get_is_unwrapped_to_its_document() -> None:
    got = {
        "version": 7,
        "author": "spiffe://example.org/broker/operator/dev",
        "updated_at": "2026-12-03T19:00:00Z",
        "document": DOCUMENT,
    }
    sent = policy_document_json(Path("p.json"), json.dumps(got).encode())
    assert json.loads(sent) == DOCUMENT


def test_a_plain_document_is_sent_as_it_is() -> None:
    sent = policy_document_json(Path("p.json"), json.dumps(DOCUMENT).encode())
    assert json.loads(sent) == DOCUMENT
    toml = b'[[rules]]\npattern = "spiffe://example.org/**"\n'
    assert json.loads(policy_document_json(Path("p.toml"), toml)) == {
        "rules": [{"pattern": "spiffe://example.org/**"}]
    }


@pytest.mark.parametrize(
    "doc",
    [
        # anything besides get's four keys, or a document that is no table, is not unwrapped:
        # the broker then refuses it naming the unknown key
        {"document": DOCUMENT, "rules": []},
        {"version": 1, "document": "text"},
    ],
)
def test_only_exactly_the_get_output_is_unwrapped(doc: dict[str, object]) -> None:
    assert json.loads(policy_document_json(Path("p.json"), json.dumps(doc).encode())) == doc


def test_a_file_that_is_no_object_is_refused() -> None:
    with pytest.raises(Refusal, match="must hold an object"):
        policy_document_json(Path("p.json"), b"[]")
