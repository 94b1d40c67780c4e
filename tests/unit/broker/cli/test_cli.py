"""The `broker` CLI against a fake client: argument handling, files written, output shapes and
one-line refusals. The real client and server are exercised in tests/e2e."""

from __future__ import annotations

import base64
import json
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from broker.api.client.audit import AuditEntry, AuditVerification
from broker.api.client.base import ClientError
from broker.api.client.ca import (
    X509SVID,
    Authority,
    Bundle,
    CAPolicyDocument,
    CAStatusReport,
    MintedJWTSVID,
    RotateResult,
)
from broker.cli import CliContext, ConnectionSettings, cli, run
from tests.unit.broker.cli.fakes import FakeClients

EXPIRES = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
LEAF, INTERMEDIATE, ROOT = b"leaf-der", b"intermediate-der", b"root-der"
KEY_DER = b"pkcs8-key-der"


def _authority(kind: str, id_: str, generation: int, state: str) -> Authority:
    return Authority(
        id=id_,
        kind=kind,
        generation=generation,
        state=state,
        not_before=datetime(2026, 1, 1, tzinfo=UTC),
        not_after=EXPIRES,
        activated_at=datetime(2026, 1, 1, tzinfo=UTC) if state == "active" else None,
        retired_at=None,
        key_uri=f"software:{id_}",
        jwt_kid=f"kid-{id_}",
        subject=f"CN={id_}",
        serial="0a",
        fingerprint_sha256="ab" * 32,
    )


STATUS = CAStatusReport(
    trust_domain="broker.local",
    key_backend="software (dev)",
    storage="sqlite",
    bundle_sequence=3,
    policy_version=2,
    authorities=[
        _authority("root", "root-1", 1, "active"),
        _authority("issuing", "issuing-1", 1, "retired"),
        _authority("issuing", "issuing-2", 2, "active"),
    ],
)


@dataclass
class FakeClient:
    """Records every call; `fail` makes each call raise that error."""

    settings: ConnectionSettings
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    fail: ClientError | None = None
    closed: bool = False
    intact: bool = True
    checkpoint_json: str = ""

    def _record(self, name: str, **kwargs: Any) -> None:
        self.calls.append((name, kwargs))
        if self.fail is not None:
            raise self.fail

    def mint_x509(
        self,
        spiffe_id: str,
        ttl_seconds: int | None = None,
        csr: bytes | None = None,
        dns_names: Sequence[str] = (),
        key_type: str = "",
    ) -> X509SVID:
        self._record(
            "mint_x509",
            spiffe_id=spiffe_id,
            ttl_seconds=ttl_seconds,
            csr=csr,
            dns_names=list(dns_names),
        )
        return X509SVID(
            spiffe_id=spiffe_id,
            cert_chain=[LEAF, INTERMEDIATE],
            private_key=None if csr else KEY_DER,
            bundle=[ROOT],
            expires_at=EXPIRES,
            serial="1f",
        )

    def mint_jwt(
        self, spiffe_id: str, audience: Sequence[str], ttl_seconds: int | None = None
    ) -> MintedJWTSVID:
        self._record(
            "mint_jwt", spiffe_id=spiffe_id, audience=list(audience), ttl_seconds=ttl_seconds
        )
        return MintedJWTSVID(spiffe_id=spiffe_id, token="header.payload.sig", expires_at=EXPIRES)

    def bundle(self) -> Bundle:
        self._record("bundle")
        return Bundle("broker.local", b'{"keys": []}', "-----BEGIN CERTIFICATE-----\n", 3)

    def status(self) -> CAStatusReport:
        self._record("status")
        return STATUS

    def rotate(
        self,
        force: bool = False,
        *,
        root: bool = False,
        compromised: bool = False,
        activate_after_seconds: int | None = None,
        agent_grace_seconds: int | None = None,
    ) -> RotateResult:
        if root:
            grace = {} if agent_grace_seconds is None else {"agent_grace": agent_grace_seconds}
            self._record(
                "rotate",
                root=True,
                compromised=compromised,
                activate_after_seconds=activate_after_seconds,
                **grace,
            )
            return RotateResult(
                actions=["prepared root root-2"],
                status=CAStatusReport(
                    **{**STATUS.__dict__, "root_phase": "publishing", "root_phase_until": EXPIRES}
                ),
            )
        self._record("rotate", force=force)
        return RotateResult(actions=["prepared issuing-3", "activated issuing-3"], status=STATUS)

    def get_policy(self) -> CAPolicyDocument:
        self._record("get_policy")
        return CAPolicyDocument(
            2, '{"rules":[{"pattern":"*","x509_max_ttl":"1h"}]}', "spiffe://op", EXPIRES
        )

    def set_policy(self, document_json: str) -> int:
        self._record("set_policy", document_json=document_json)
        return 3

    def audit_verify(self, checkpoint_json: str = "") -> AuditVerification:
        self._record("audit_verify", checkpoint_json=checkpoint_json)
        if self.intact:
            notes = ("checkpoint of T (entry 9) is in the ledger",) if checkpoint_json else ()
            return AuditVerification(True, 42, 0, "", notes)
        return AuditVerification(False, 42, 7, "MAC mismatch\non entry 7")

    def audit_checkpoint(self, fresh: bool = False) -> str:
        self._record("audit_checkpoint", fresh=fresh)
        return self.checkpoint_json

    def audit_tail(self, limit: int = 20) -> list[AuditEntry]:
        self._record("audit_tail", limit=limit)
        event = {
            "who": "spiffe://broker.local/operator",
            "what": "svid.mint",
            "decision": "allow",
            "outcome": "OK",
            "when": "2026-01-01T00:00:00+00:00",
        }
        return [AuditEntry(seq=5, event=event, event_json=json.dumps(event), entry_hash="ff")]

    def close(self) -> None:
        self.closed = True


@dataclass
class Harness:
    data_dir: Path
    clients: list[FakeClient] = field(default_factory=list)
    fail: ClientError | None = None
    intact: bool = True
    checkpoint_json: str = ""

    def factory(self, settings: ConnectionSettings) -> FakeClient:
        client = FakeClient(
            settings, fail=self.fail, intact=self.intact, checkpoint_json=self.checkpoint_json
        )
        self.clients.append(client)
        return client

    @property
    def calls(self) -> list[tuple[str, dict[str, Any]]]:
        return [call for client in self.clients for call in client.calls]

    def invoke(self, *args: str, env: dict[str, str] | None = None) -> Result:
        runner = CliRunner()
        full_env = {"BROKER_DATA_DIR": str(self.data_dir), **(env or {})}
        return runner.invoke(
            cli,
            list(args),
            obj=CliContext(connect=lambda s: FakeClients(ca=self.factory(s))),
            env=full_env,
            catch_exceptions=False,
        )


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    data_dir = tmp_path / "data"
    (data_dir / "operator").mkdir(parents=True)
    (data_dir / "operator" / "svid.pem").write_bytes(b"operator cert")
    (data_dir / "operator" / "key.pem").write_bytes(b"operator key")
    (data_dir / "bundle.pem").write_bytes(b"bundle")
    return Harness(data_dir)


def _one_line_refusal(result: Result, exit_code: int = 1) -> str:
    assert result.exit_code == exit_code, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("broker: ")
    return lines[0]


def _pem_blocks(data: bytes) -> list[tuple[str, bytes]]:
    blocks = []
    text = data.decode()
    for chunk in text.split("-----END ")[:-1]:
        begin = chunk.index("-----BEGIN ")
        label = chunk[begin + 11 : chunk.index("-----", begin + 11)]
        body = chunk[chunk.index("\n", begin) + 1 :]
        blocks.append((label, base64.b64decode("".join(body.split()))))
    return blocks


# -- durations ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("ttl", "seconds"), [("1h", 3600), ("15m", 900), ("30s", 30), ("0s", 0)])
def test_ttl_is_sent_in_whole_seconds(
    harness: Harness, tmp_path: Path, ttl: str, seconds: int
) -> None:
    result = harness.invoke(
        "svid",
        "mint",
        "--spiffe-id",
        "spiffe://broker.local/a",
        "--ttl",
        ttl,
        "--out",
        str(tmp_path / "out"),
    )
    assert result.exit_code == 0, result.stderr
    assert harness.calls[0][1]["ttl_seconds"] == seconds


def test_zero_ttl_is_sent_not_dropped(harness: Harness) -> None:
    result = harness.invoke(
        "jwt", "mint", "--spiffe-id", "spiffe://broker.local/a", "--audience", "a", "--ttl", "0s"
    )
    assert result.exit_code == 0, result.stderr
    assert harness.calls[0][1]["ttl_seconds"] == 0
    assert harness.calls[0][1]["ttl_seconds"] is not None


def test_absent_ttl_is_left_to_policy(harness: Harness, tmp_path: Path) -> None:
    result = harness.invoke(
        "svid", "mint", "--spiffe-id", "spiffe://broker.local/a", "--out", str(tmp_path / "out")
    )
    assert result.exit_code == 0, result.stderr
    assert harness.calls[0][1]["ttl_seconds"] is None


@pytest.mark.parametrize("ttl", ["-5m", "garbage", "1.5h", "500ms", "10"])
def test_bad_ttl_is_refused_locally_in_one_line(
    harness: Harness, capsys: pytest.CaptureFixture[str], ttl: str
) -> None:
    code = run(
        [
            "--data-dir",
            str(harness.data_dir),
            "jwt",
            "mint",
            "--spiffe-id",
            "spiffe://broker.local/a",
            "--audience",
            "x",
            f"--ttl={ttl}",
        ],
        CliContext(connect=lambda s: FakeClients(ca=harness.factory(s))),
    )
    captured = capsys.readouterr()
    assert code == 2
    assert harness.calls == []
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("broker: ") and "--ttl" in lines[0]


def test_negative_ttl_as_separate_argument_is_a_value_not_an_option(harness: Harness) -> None:
    result = harness.invoke(
        "jwt", "mint", "--spiffe-id", "spiffe://broker.local/a", "--audience", "x", "--ttl", "-5m"
    )
    assert result.exit_code == 2
    assert "negative" in result.stderr
    assert harness.calls == []


# -- svid mint files ---------------------------------------------------------------------------


def test_svid_mint_writes_chain_bundle_and_private_key(harness: Harness, tmp_path: Path) -> None:
    out = tmp_path / "new" / "out"
    result = harness.invoke(
        "svid", "mint", "--spiffe-id", "spiffe://broker.local/a", "--out", str(out)
    )
    assert result.exit_code == 0, result.stderr
    assert _pem_blocks((out / "svid.pem").read_bytes()) == [
        ("CERTIFICATE", LEAF),
        ("CERTIFICATE", INTERMEDIATE),
    ]
    assert _pem_blocks((out / "bundle.pem").read_bytes()) == [("CERTIFICATE", ROOT)]
    assert _pem_blocks((out / "key.pem").read_bytes()) == [("PRIVATE KEY", KEY_DER)]
    assert stat.S_IMODE((out / "key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE(out.stat().st_mode) & 0o077 == 0
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    lines = result.stdout.splitlines()
    assert sum(line.startswith("wrote ") for line in lines) == 3
    assert "2030-01-02T03:04:05Z" in lines[-1]


def test_key_is_0600_even_with_permissive_umask_and_existing_loose_file(
    harness: Harness, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "key.pem").write_bytes(b"old")
    (out / "key.pem").chmod(0o644)
    old_umask = os.umask(0)
    try:
        result = harness.invoke(
            "svid", "mint", "--spiffe-id", "spiffe://broker.local/a", "--out", str(out)
        )
    finally:
        os.umask(old_umask)
    assert result.exit_code == 0, result.stderr
    assert stat.S_IMODE((out / "key.pem").stat().st_mode) == 0o600
    assert (out / "key.pem").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")


def test_key_file_is_opened_with_0600_from_the_start(
    harness: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[tuple[str, int]] = []
    real_open = os.open

    def spy(path: Any, flags: int, mode: int = 0o777, *a: Any, **kw: Any) -> int:
        opened.append((os.fspath(path), mode))
        return real_open(path, flags, mode, *a, **kw)

    monkeypatch.setattr(os, "open", spy)
    result = harness.invoke(
        "svid", "mint", "--spiffe-id", "spiffe://broker.local/a", "--out", str(tmp_path / "out")
    )
    assert result.exit_code == 0, result.stderr
    key_opens = [mode for path, mode in opened if "key.pem" in path]
    assert key_opens == [0o600]


def test_svid_mint_with_csr_sends_it_and_writes_no_key(harness: Harness, tmp_path: Path) -> None:
    csr = tmp_path / "req.csr"
    csr.write_bytes(b"-----BEGIN CERTIFICATE REQUEST-----\nabc\n")
    out = tmp_path / "out"
    result = harness.invoke(
        "svid",
        "mint",
        "--spiffe-id",
        "spiffe://broker.local/a",
        "--csr",
        str(csr),
        "--dns",
        "a.example",
        "--dns",
        "b.example",
        "--out",
        str(out),
        "--output",
        "json",
    )
    assert result.exit_code == 0, result.stderr
    sent = harness.calls[0][1]
    assert sent["csr"] == csr.read_bytes()
    assert sent["dns_names"] == ["a.example", "b.example"]
    assert not (out / "key.pem").exists()
    document = json.loads(result.stdout)
    assert document == {
        "spiffe_id": "spiffe://broker.local/a",
        "serial": "1f",
        "expires_at": "2030-01-02T03:04:05Z",
        "files": [str(out / "svid.pem"), str(out / "bundle.pem")],
    }


def test_missing_csr_file_is_one_line_and_no_call(harness: Harness, tmp_path: Path) -> None:
    result = harness.invoke(
        "svid",
        "mint",
        "--spiffe-id",
        "spiffe://broker.local/a",
        "--csr",
        str(tmp_path / "nope.csr"),
        "--out",
        str(tmp_path / "o"),
    )
    line = _one_line_refusal(result)
    assert "nope.csr" in line
    assert harness.calls == []
    assert not (tmp_path / "o").exists()


def test_refused_mint_creates_no_directory(harness: Harness, tmp_path: Path) -> None:
    harness.fail = ClientError("INVALID_ARGUMENT", "bad id")
    result = harness.invoke("svid", "mint", "--spiffe-id", "x", "--out", str(tmp_path / "o"))
    _one_line_refusal(result)
    assert not (tmp_path / "o").exists()


# -- connection settings -----------------------------------------------------------------------


def test_connection_options_after_subcommand_win_over_group_and_env(
    harness: Harness, tmp_path: Path
) -> None:
    result = harness.invoke(
        "--server",
        "group:1",
        "svid",
        "mint",
        "--server",
        "sub:2",
        "--spiffe-id",
        "spiffe://broker.local/a",
        "--out",
        str(tmp_path / "o"),
        env={"BROKER_ADDR": "env:3"},
    )
    assert result.exit_code == 0, result.stderr
    assert harness.clients[0].settings.server == "sub:2"
    assert harness.clients[0].closed


def test_server_from_env_then_default(harness: Harness) -> None:
    assert harness.invoke("ca", "status", env={"BROKER_ADDR": "env:3"}).exit_code == 0
    assert harness.invoke("ca", "status").exit_code == 0
    assert [c.settings.server for c in harness.clients] == ["env:3", "127.0.0.1:8443"]


def test_tls_server_name_from_option_or_env(harness: Harness) -> None:
    assert harness.invoke("ca", "status").exit_code == 0
    assert harness.invoke("ca", "status", "--tls-server-name", "broker.internal").exit_code == 0
    env = {"BROKER_TLS_SERVER_NAME": "broker.env.internal"}
    assert harness.invoke("ca", "status", env=env).exit_code == 0
    assert [c.settings.server_name for c in harness.clients] == [
        None,
        "broker.internal",
        "broker.env.internal",
    ]


def test_credentials_default_to_the_operator_identity_in_data_dir(harness: Harness) -> None:
    assert harness.invoke("ca", "status", "--justification", "ticket-1").exit_code == 0
    settings = harness.clients[0].settings
    assert settings.credentials.cert_chain == b"operator cert"
    assert settings.credentials.private_key == b"operator key"
    assert settings.credentials.root_certificates == b"bundle"
    assert settings.justification == "ticket-1"


def test_explicit_cert_key_bundle_are_used(harness: Harness, tmp_path: Path) -> None:
    for name in ("c.pem", "k.pem", "b.pem"):
        (tmp_path / name).write_bytes(name.encode())
    result = harness.invoke(
        "ca",
        "status",
        "--cert",
        str(tmp_path / "c.pem"),
        "--key",
        str(tmp_path / "k.pem"),
        "--bundle",
        str(tmp_path / "b.pem"),
    )
    assert result.exit_code == 0, result.stderr
    credentials = harness.clients[0].settings.credentials
    assert (credentials.cert_chain, credentials.private_key, credentials.root_certificates) == (
        b"c.pem",
        b"k.pem",
        b"b.pem",
    )


@pytest.mark.parametrize(
    ("missing", "expected"),
    [
        (
            "operator/svid.pem",
            "no client certificate at {dir}/operator/svid.pem "
            "(start 'broker serve --dev' or pass --cert)",
        ),
        ("operator/key.pem", "no client key at {dir}/operator/key.pem"),
        ("bundle.pem", "no trust bundle at {dir}/bundle.pem"),
    ],
)
def test_missing_credential_file_is_one_line(harness: Harness, missing: str, expected: str) -> None:
    (harness.data_dir / missing).unlink()
    result = harness.invoke("ca", "status")
    line = _one_line_refusal(result)
    assert expected.format(dir=harness.data_dir) in line
    assert harness.clients == []


def test_default_data_dir_message_matches_the_contract(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BROKER_DATA_DIR", raising=False)
    monkeypatch.delenv("BROKER_CERT", raising=False)
    result = CliRunner().invoke(cli, ["ca", "status"], obj=CliContext())
    assert _one_line_refusal(result) == (
        "broker: no client certificate at .broker/operator/svid.pem "
        "(start 'broker serve --dev' or pass --cert)"
    )


# -- server errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "message", "expected"),
    [
        ("PERMISSION_DENIED", "policy says no", "broker: permission denied: policy says no"),
        (
            "INVALID_ARGUMENT",
            "ttl must be positive",
            "broker: invalid argument: ttl must be positive",
        ),
        (
            "UNAVAILABLE",
            "connection refused",
            "broker: cannot reach the broker at h:1: connection refused",
        ),
        (
            "FAILED_PRECONDITION",
            "line one\nline two",
            "broker: failed precondition: line one line two",
        ),
    ],
)
def test_client_errors_become_one_line(
    harness: Harness, code: str, message: str, expected: str
) -> None:
    harness.fail = ClientError(code, message)
    result = harness.invoke("ca", "status", "--server", "h:1")
    assert _one_line_refusal(result) == expected
    assert result.stdout == ""
    assert harness.clients[0].closed


def test_usage_errors_are_one_line_with_exit_2(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run(
        ["svid", "mint", "--out", "x"],
        CliContext(connect=lambda s: FakeClients(ca=harness.factory(s))),
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert "--spiffe-id" in err and err.startswith("broker: ")


def test_bare_group_prints_its_help_not_a_squashed_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run(["ca"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Usage: broker ca")
    assert "\n  status " in err


def test_serve_needs_exactly_one_of_dev_and_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["serve"]) == 2
    assert run(["serve", "--dev", "--config", "x.toml"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert (
        lines
        == ["broker: exactly one of --dev or --config is required (see 'broker serve --help')"] * 2
    )


def test_serve_passes_options_to_the_daemon(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import broker.daemon

    seen: list[broker.daemon.ServeOptions] = []
    monkeypatch.setattr(broker.daemon, "serve", seen.append)
    assert run(["serve", "--dev", "--data-dir", str(tmp_path), "--listen", "127.0.0.1:1"]) == 0
    assert run(["serve", "--config", "prod.toml"]) == 0
    assert seen[0] == broker.daemon.ServeOptions(dev=True, data_dir=tmp_path, listen="127.0.0.1:1")
    assert seen[1].dev is False and seen[1].config_file == Path("prod.toml")


def test_serve_configuration_error_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import broker.daemon
    from broker.errors import FailedPrecondition

    def refuse(options: object) -> None:
        raise FailedPrecondition("schema too new:\nupgrade the broker")

    monkeypatch.setattr(broker.daemon, "serve", refuse)
    assert run(["serve", "--dev"]) == 1
    assert capsys.readouterr().err == "broker: schema too new: upgrade the broker\n"


# -- outputs -----------------------------------------------------------------------------------


def test_jwt_mint_prints_only_the_token(harness: Harness) -> None:
    result = harness.invoke(
        "jwt",
        "mint",
        "--spiffe-id",
        "spiffe://broker.local/a",
        "--audience",
        "a",
        "--audience",
        "b",
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "header.payload.sig\n"
    assert harness.calls[0][1]["audience"] == ["a", "b"]
    json_result = harness.invoke(
        "jwt",
        "mint",
        "--spiffe-id",
        "spiffe://broker.local/a",
        "--audience",
        "a",
        "--output",
        "json",
    )
    assert json.loads(json_result.stdout) == {
        "spiffe_id": "spiffe://broker.local/a",
        "token": "header.payload.sig",
        "expires_at": "2030-01-02T03:04:05Z",
    }


def test_ca_status_json_has_root_and_issuing(harness: Harness) -> None:
    result = harness.invoke("--output", "json", "ca", "status")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["trust_domain"] == "broker.local"
    assert document["key_backend"] == "software (dev)"
    assert document["root"]["id"] == "root-1"
    assert [a["id"] for a in document["issuing"]] == ["issuing-1", "issuing-2"]
    assert len(document["authorities"]) == 3
    assert set(document["authorities"][0]) == {
        "id",
        "kind",
        "generation",
        "state",
        "not_before",
        "not_after",
        "activated_at",
        "retired_at",
        "key_uri",
        "jwt_kid",
        "subject",
        "serial",
        "fingerprint_sha256",
    }
    assert document["issuing"][0]["activated_at"] is None
    assert document["root"]["not_after"] == "2030-01-02T03:04:05Z"


def test_ca_status_text_is_a_table(harness: Harness) -> None:
    result = harness.invoke("ca", "status")
    assert result.exit_code == 0, result.stderr
    assert "broker.local" in result.stdout
    assert any(
        line.split()[:4] == ["issuing", "issuing-2", "2", "active"]
        for line in result.stdout.splitlines()
    )


def test_ca_bundle_formats(harness: Harness) -> None:
    assert harness.invoke("ca", "bundle").stdout == "-----BEGIN CERTIFICATE-----\n"
    assert json.loads(harness.invoke("ca", "bundle", "--format", "jwks").stdout) == {"keys": []}
    assert harness.invoke("ca", "bundle", "--format", "der").exit_code == 2


def test_ca_rotate_force_prints_actions(harness: Harness) -> None:
    result = harness.invoke("ca", "rotate", "--force")
    assert result.exit_code == 0, result.stderr
    assert harness.calls == [("rotate", {"force": True})]
    assert result.stdout.splitlines()[:2] == ["prepared issuing-3", "activated issuing-3"]
    document = json.loads(harness.invoke("ca", "rotate", "--output", "json").stdout)
    assert document["actions"] == ["prepared issuing-3", "activated issuing-3"]
    assert harness.calls[-1] == ("rotate", {"force": False})


def test_ca_rotate_root_sends_the_options_and_shows_the_phase(harness: Harness) -> None:
    result = harness.invoke("ca", "rotate", "--root", "--activate-after", "30s")
    assert result.exit_code == 0, result.stderr
    assert harness.calls == [
        ("rotate", {"root": True, "compromised": False, "activate_after_seconds": 30})
    ]
    assert result.stdout.splitlines()[:2] == [
        "prepared root root-2",
        "root rotation: publishing: the new root is in the bundle and signs nothing yet "
        "(activates at 2030-01-02T03:04:05Z)",
    ]
    harness.invoke("ca", "rotate", "--root", "--compromised")
    assert harness.calls[-1] == (
        "rotate",
        {"root": True, "compromised": True, "activate_after_seconds": None},
    )
    harness.invoke("ca", "rotate", "--root", "--compromised", "--agent-grace", "0s")
    assert harness.calls[-1][1]["agent_grace"] == 0
    document = json.loads(harness.invoke("ca", "rotate", "--root", "--output", "json").stdout)
    assert document["status"]["root_phase"] == "publishing"


@pytest.mark.parametrize(
    "argv",
    [
        ("--compromised",),
        ("--activate-after", "1m"),
        ("--root", "--force"),
        ("--root", "--compromised", "--activate-after", "1m"),
        ("--root", "--agent-grace", "1m"),
    ],
)
def test_ca_rotate_refuses_contradicting_options(harness: Harness, argv: tuple[str, ...]) -> None:
    result = harness.invoke("ca", "rotate", *argv)
    assert result.exit_code == 2
    assert harness.calls == []


def test_ca_status_shows_the_root_phase(harness: Harness) -> None:
    text = harness.invoke("ca", "status").stdout
    assert "root rotation" in text and "none in progress" in text


def test_policy_get_json_and_text(harness: Harness) -> None:
    document = json.loads(harness.invoke("ca", "policy", "get", "--output", "json").stdout)
    assert document == {
        "version": 2,
        "author": "spiffe://op",
        "updated_at": "2030-01-02T03:04:05Z",
        "document": {"rules": [{"pattern": "*", "x509_max_ttl": "1h"}]},
    }
    text = harness.invoke("ca", "policy", "get").stdout
    assert text.splitlines()[0].startswith("version 2, set by spiffe://op")
    assert json.loads(text.split("\n", 1)[1]) == document["document"]


POLICY_TOML = """
[[rules]]
pattern = "spiffe://broker.local/default/**"
x509_max_ttl = "1h"
jwt_max_ttl = "5m"
dns = true

[[rules]]
pattern = "spiffe://broker.local/ops/*"
x509_max_ttl = "24h"
"""

POLICY_DOCUMENT = {
    "rules": [
        {
            "pattern": "spiffe://broker.local/default/**",
            "x509_max_ttl": "1h",
            "jwt_max_ttl": "5m",
            "dns": True,
        },
        {"pattern": "spiffe://broker.local/ops/*", "x509_max_ttl": "24h"},
    ]
}


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("policy.toml", POLICY_TOML),
        ("policy.json", json.dumps(POLICY_DOCUMENT)),
        ("policy.txt", POLICY_TOML),
        ("policy", json.dumps(POLICY_DOCUMENT)),
    ],
)
def test_policy_set_converts_to_json(
    harness: Harness, tmp_path: Path, name: str, content: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    result = harness.invoke("ca", "policy", "set", str(path))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "policy version 3\n"
    assert json.loads(harness.calls[0][1]["document_json"]) == POLICY_DOCUMENT


def test_policy_set_keeps_toml_dates_as_strings(harness: Harness, tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('review_by = 2026-05-01\n[[rules]]\npattern = "*"\n')
    assert harness.invoke("ca", "policy", "set", str(path)).exit_code == 0
    assert json.loads(harness.calls[0][1]["document_json"])["review_by"] == "2026-05-01"


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("bad.toml", "[[rules]\npattern =", "not valid TOML"),
        ("bad.json", "{", "not valid JSON"),
        ("bad.txt", "{ nope", "neither JSON nor TOML"),
        ("list.json", "[1, 2]", "must hold an object"),
    ],
)
def test_bad_policy_file_is_one_line_and_not_sent(
    harness: Harness, tmp_path: Path, name: str, content: str, needle: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    line = _one_line_refusal(harness.invoke("ca", "policy", "set", str(path)))
    assert needle in line and name in line
    assert harness.calls == []


def test_audit_verify_intact_and_broken(harness: Harness) -> None:
    result = harness.invoke("audit", "verify")
    assert result.exit_code == 0
    assert result.stdout == "audit ledger intact: 42 entries\n"
    harness.intact = False
    broken = harness.invoke("audit", "verify")
    assert _one_line_refusal(broken) == (
        "broker: audit ledger broken at entry 7: MAC mismatch on entry 7"
    )


def _signed_checkpoint() -> str:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from broker.audit import Checkpoint

    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    unsigned = Checkpoint(1, 9, bytes(range(32)), "2026-01-01T00:00:00Z", "k", pem.decode(), b"")
    signature = key.sign(unsigned.payload(), ec.ECDSA(hashes.SHA256()))
    return Checkpoint(**{**unsigned.__dict__, "signature": signature}).to_json()


def test_audit_checkpoint_export_and_verify(harness: Harness, tmp_path: Path) -> None:
    harness.checkpoint_json = _signed_checkpoint()
    out = tmp_path / "cp.json"
    result = harness.invoke("audit", "checkpoint", "--new", "--out", str(out))
    assert result.exit_code == 0, result.stderr
    assert out.read_text() == harness.checkpoint_json
    assert harness.calls[-1] == ("audit_checkpoint", {"fresh": True})
    verified = harness.invoke("audit", "verify", "--checkpoint", str(out))
    assert verified.exit_code == 0, verified.stderr
    assert verified.stdout == (
        "audit ledger intact: 42 entries\n  note: checkpoint of T (entry 9) is in the ledger\n"
    )
    assert harness.calls[-1] == ("audit_verify", {"checkpoint_json": harness.checkpoint_json})


def test_audit_verify_refuses_a_forged_checkpoint_offline(harness: Harness, tmp_path: Path) -> None:
    doc = json.loads(_signed_checkpoint())
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps({**doc, "seq": 1}))  # an older entry: signature breaks
    calls = len(harness.calls)
    result = harness.invoke("audit", "verify", "--checkpoint", str(forged))
    assert result.exit_code == 1
    assert "signature does not verify" in _one_line_refusal(result)
    assert len(harness.calls) == calls  # refused before asking the broker


def test_audit_tail_json_and_limit(harness: Harness) -> None:
    result = harness.invoke("audit", "tail", "-n", "5", "--output", "json")
    assert result.exit_code == 0, result.stderr
    assert harness.calls == [("audit_tail", {"limit": 5})]
    entries = json.loads(result.stdout)
    assert entries[0]["seq"] == 5
    assert entries[0]["event"]["decision"] == "allow"
    text = harness.invoke("audit", "tail").stdout
    assert "svid.mint" in text and "allow" in text
    assert harness.invoke("audit", "tail", "-n", "0").exit_code == 2


def test_cli_module_does_not_import_grpc_directly() -> None:
    import broker.cli

    source = Path(broker.cli.__file__).read_text()
    assert "import grpc" not in source
    assert "_proto" not in source
    assert isinstance(broker.cli.cli, click.Group)


def test_a_token_error_is_reported_as_a_token_error_not_as_an_unreachable_broker() -> None:
    import grpc

    from broker.api.status import to_status
    from broker.cli import client_error_message
    from ca.errors import KeyBackendError

    code, message = to_status(
        KeyBackendError("pkcs11 token=broker: wrap with key 'kek.default.1' failed (X)"), "cid"
    )
    assert code is grpc.StatusCode.UNAVAILABLE
    line = client_error_message(ClientError("UNAVAILABLE", message), "127.0.0.1:8443")
    assert line.startswith("key backend error: pkcs11 token=broker: wrap with key")
    assert "cannot reach" not in line
    unreachable = client_error_message(ClientError("UNAVAILABLE", "connection refused"), "h:1")
    assert unreachable.startswith("cannot reach the broker at h:1")


def test_a_database_down_behind_the_broker_is_not_an_unreachable_broker() -> None:
    from broker.cli import client_error_message

    answered = ClientError(
        "UNAVAILABLE",
        "postgresql at db.internal:5432 is unavailable: connection refused",
        answered=True,
    )
    line = client_error_message(answered, "127.0.0.1:8443")
    assert line == (
        "unavailable (the broker at 127.0.0.1:8443 answered): postgresql at db.internal:5432 "
        "is unavailable: connection refused"
    )
