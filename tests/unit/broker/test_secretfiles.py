"""File delivery: 0600 files, rewritten on a new version, removed on refusal, kept while the
broker is unreachable."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from broker.api.client.sdk import FetchedSecret, SecretRefused, SecretUnavailable
from broker.errors import InvalidArgument
from broker.secretfiles import SecretFiles

REF = "secret://payments/prod/stripe/api-key"


class Source:
    def __init__(self) -> None:
        self.secret = FetchedSecret(b"first-value-0001", 1)
        self.error: Exception | None = None

    def fetch(self, reference: str) -> FetchedSecret:
        if self.error is not None:
            raise self.error
        return self.secret


def test_files_follow_rotation_refusal_and_outages(tmp_path: Path) -> None:
    source = Source()
    directory = tmp_path / "run" / "secrets"
    files = SecretFiles(source, directory, {"api-key": REF})
    [r] = files.sync()
    path = directory / "api-key"
    assert (r.outcome, r.version) == ("written", 1)
    assert path.read_bytes() == b"first-value-0001"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert [r.outcome for r in files.sync()] == ["unchanged"]

    source.secret = FetchedSecret(b"second-value-002", 2)
    assert [(r.outcome, r.version) for r in files.sync()] == [("written", 2)]
    assert path.read_bytes() == b"second-value-002"

    source.error = SecretUnavailable("UNAVAILABLE: connection refused")
    [r] = files.sync()
    assert r.outcome == "kept" and "UNAVAILABLE" in r.error
    assert path.read_bytes() == b"second-value-002"

    source.error = SecretRefused("FAILED_PRECONDITION", "the secret was revoked")
    [r] = files.sync()
    assert r.outcome == "removed" and "revoked" in r.error
    assert not path.exists()
    assert [p.name for p in directory.iterdir()] == []  # no temporary files left either


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", ".hidden", "x" * 129])
def test_file_names_cannot_leave_the_directory(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidArgument):
        SecretFiles(Source(), tmp_path, {name: REF})
    assert list(tmp_path.iterdir()) == []
