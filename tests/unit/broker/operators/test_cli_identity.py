"""Which identity a client command presents: the `broker login` under $BROKER_HOME when there
is one and neither --cert nor --data-dir was given; otherwise exactly as before (the operator
identity `serve --dev` writes under DATA_DIR, or --cert/--key/--bundle)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from broker.cli import CliContext, ConnectionSettings, cli
from tests.unit.broker.cli.fakes import FakeClients
from tests.unit.broker.cli.test_cli import FakeClient


def _write(directory: Path, tag: str, bundle_dir: Path | None = None) -> None:
    directory.mkdir(parents=True)
    (directory / "svid.pem").write_bytes(f"{tag} cert".encode())
    (directory / "key.pem").write_bytes(f"{tag} key".encode())
    ((bundle_dir or directory) / "bundle.pem").write_bytes(f"{tag} bundle".encode())


@pytest.fixture
def homes(tmp_path: Path) -> tuple[Path, Path]:
    home, data = tmp_path / "home", tmp_path / "data"
    _write(home / "operator", "login")
    _write(data / "operator", "dev", bundle_dir=data)
    return home, data


def _presented(args: list[str], env: dict[str, str]) -> ConnectionSettings:
    seen: list[ConnectionSettings] = []

    def factory(settings: ConnectionSettings) -> FakeClient:
        seen.append(settings)
        return FakeClient(settings)

    result = CliRunner().invoke(
        cli, args, obj=CliContext(connect=lambda s: FakeClients(ca=factory(s))), env=env
    )
    assert result.exit_code == 0, result.output
    return seen[0]


def test_the_login_is_used_when_there_is_one(homes: tuple[Path, Path]) -> None:
    home, _ = homes
    creds = _presented(["ca", "status"], {"BROKER_HOME": str(home)}).credentials
    assert (creds.cert_chain, creds.private_key) == (b"login cert", b"login key")
    assert creds.root_certificates == b"login bundle"


def test_data_dir_and_cert_keep_their_meaning(homes: tuple[Path, Path]) -> None:
    home, data = homes
    env = {"BROKER_HOME": str(home)}
    creds = _presented(["--data-dir", str(data), "ca", "status"], env).credentials
    assert (creds.cert_chain, creds.private_key) == (b"dev cert", b"dev key")
    env_dir = {"BROKER_HOME": str(home), "BROKER_DATA_DIR": str(data)}
    assert _presented(["ca", "status"], env_dir).credentials.cert_chain == b"dev cert"
    other = home / "other.pem"
    other.write_bytes(b"explicit cert")
    creds = _presented(
        ["--cert", str(other), "--data-dir", str(data), "ca", "status"], env
    ).credentials
    assert (creds.cert_chain, creds.private_key) == (b"explicit cert", b"dev key")


def test_without_a_login_the_dev_identity_is_used(tmp_path: Path, homes: tuple[Path, Path]) -> None:
    _, data = homes
    env = {"BROKER_HOME": str(tmp_path / "nobody"), "BROKER_DATA_DIR": str(data)}
    assert _presented(["ca", "status"], env).credentials.cert_chain == b"dev cert"


def test_login_status_without_a_login_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["login", "status"], obj=CliContext(), env={"BROKER_HOME": str(tmp_path)}
    )
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"broker: not logged in (no {tmp_path / 'operator' / 'svid.pem'}); run 'broker login'"
    ]
