"""`broker secrets`, `broker exec`: usage errors are refused locally (exit 2, one line on
stderr) before any connection is made."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.cli import CliContext, ConnectionSettings, run

REF = "secret://payments/prod/stripe/api-key"
PUT = ["secrets", "put", REF, "--owner", "payments", "--classification", "internal"]


class NoClient:
    def __call__(self, settings: ConnectionSettings) -> object:
        raise AssertionError("no client may be built for a usage error")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ([*PUT, "--rotation-period", "30d"], "--value-file F or --generate"),
        ([*PUT, "--rotation-period", "30d", "--generate", "--value-file", "x"], "not both"),
        ([*PUT, "--rotation-period", "30d", "--value-file", "x", "--length", "20"], "--length"),
        ([*PUT, "--rotation-period", "soon", "--generate"], "duration"),
        (["secrets", "put", REF, "--generate", "--owner", "p", "--classification", "top"], "top"),
        (["secrets", "rotate", REF, "--env", "prod", "--ticket", "T-1"], "--justification"),
        (["secrets", "revoke", REF], "--justification"),
        (["secrets", "get", REF, "--version", "0"], "--version"),
        (["exec", "--env", "1X=secret://a/b/c", "--", "true"], "NAME=secret://"),
        (["exec", "--env", "X=https://a/b/c", "--", "true"], "secret://"),
        (["exec", "--env", f"X={REF}"], "COMMAND"),
        (["secrets", "sync", "--write-dir", "d", "--file", "k=nope"], "NAME=secret://"),
    ],
)
def test_usage_errors_exit_2_without_a_connection(
    args: list[str], fragment: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "x").write_bytes(b"value-bytes-123")
    code = run(
        ["--data-dir", str(tmp_path), *[a if a != "x" else str(tmp_path / "x") for a in args]],
        CliContext(connect=NoClient()),  # type: ignore[arg-type]
    )
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("broker: ")
    assert fragment in lines[0]
    assert captured.out == ""
