"""The developer workflow against a real `broker serve --dev`: `broker dev pull` into a dev
vault sealed under a key on the developer's own SoftHSM2 token (created under $BROKER_HOME),
`broker dev run` resolving references from the environment and a .env template, `ls`, `gc`
and expiry cleanup (a fake clock), prod refusal (client and broker), the TTL cap, revoked
secrets dropped on the next pull, and a corrupted / foreign vault or a vault whose key is gone
refused in one line. No value is ever printed, and none is on disk in plaintext."""

from __future__ import annotations

import datetime as dt
import json
import secrets as random
import shutil
import sys
from pathlib import Path

import pytest

from broker.devvault import DevVault
from ca.clock import FakeClock
from tests.e2e.conftest import BrokerCli

pytestmark = pytest.mark.e2e

DEV_REF = "secret://payments/dev/stripe/api-key"
HOOK_REF = "secret://payments/dev/webhook/token"
PROD_REF = "secret://payments/prod/stripe/api-key"
SHOW = "import os, sys; sys.stdout.write(os.environ['API_KEY'] + '|' + os.environ['HOOK'])"


def _put(cli: BrokerCli, tmp: Path, ref: str) -> str:
    value = f"sk_{random.token_hex(16)}"
    (tmp / "v").write_text(value)
    cli.ok(
        "secrets", "put", ref, "--value-file", str(tmp / "v"), "--owner", "payments",
        "--classification", "confidential", "--rotation-period", "90d",
    )  # fmt: skip
    (tmp / "v").unlink()
    return value


def _files_hold(root: Path, value: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and value.encode() in p.read_bytes()]


@pytest.mark.parametrize("key_store", ["softhsm", "file"])
def test_pull_run_ls_expiry_and_revocation(
    broker_cli: BrokerCli, tmp_path: Path, key_store: str
) -> None:
    home = tmp_path / "home"
    env = {"BROKER_HOME": str(home)}
    if key_store == "file":
        env["BROKER_DEV_VAULT_KEY"] = "file"
    suffix = random.token_hex(3)
    dev_ref, hook_ref = f"{DEV_REF}-{suffix}", f"{HOOK_REF}-{suffix}"
    api_key = _put(broker_cli, tmp_path, dev_ref)
    hook = _put(broker_cli, tmp_path, hook_ref)
    prod = _put(broker_cli, tmp_path, f"{PROD_REF}-{suffix}")

    pulled = broker_cli.ok("dev", "pull", "--env", "dev", "--output", "json", env=env).json()
    assert pulled["stored"] >= 2
    listed = broker_cli.ok("dev", "ls", "--output", "json", env=env).json()
    refs = {e["reference"] for e in listed}
    assert {dev_ref, hook_ref} <= refs and not any("/prod/" in r for r in refs)
    vault_dir = home / "dev-vault"
    assert (vault_dir / "hsm" / "tokens").is_dir() == (key_store == "softhsm")
    for value in (api_key, hook, prod):
        assert _files_hold(home, value) == []
    assert (vault_dir / "vault.json").stat().st_mode & 0o777 == 0o600
    events = broker_cli.ok("audit", "tail", "-n", "30", "--output", "json").json()
    pulls = [
        e["event"] for e in events if e["event"].get("details", {}).get("purpose") == "dev-pull"
    ]
    assert pulls and all(p["who"].endswith("/broker/operator/dev") for p in pulls)

    template = tmp_path / ".env.example"
    template.write_text(f"# dev settings\nexport HOOK={hook_ref}\nDEBUG=1\n")
    run = broker_cli.ok(
        "dev", "run", "--env-file", str(template), "--", sys.executable, "-c", SHOW,
        env={**env, "API_KEY_SECRET_REF": dev_ref},
    )  # fmt: skip
    assert run.stdout == f"{api_key}|{hook}"

    # Revoked at the broker: dropped on the next pull.
    broker_cli.ok("secrets", "revoke", hook_ref, "--justification", "leaked")
    again = broker_cli.ok("dev", "pull", "--env", "dev", "--output", "json", env=env).json()
    assert hook_ref in again["dropped"]
    gone = broker_cli.run(
        "dev", "run", "--", sys.executable, "-c", SHOW, env={**env, "HOOK": hook_ref,
                                                              "API_KEY": dev_ref},
    )  # fmt: skip
    assert gone.returncode == 1 and len(gone.stderr_lines) == 1
    assert hook_ref in gone.stderr and "not in the dev vault" in gone.stderr

    # Expiry: nine hours later (a fake clock) everything is destroyed.
    later = FakeClock(dt.datetime.now(dt.UTC) + dt.timedelta(hours=9))
    destroyed = DevVault(vault_dir, clock=later).gc()
    assert dev_ref in destroyed
    document = json.loads((vault_dir / "vault.json").read_text())
    assert document["entries"] == {}
    assert broker_cli.ok("dev", "ls", "--output", "json", env=env).json() == []
    assert broker_cli.ok("dev", "gc", env=env).stdout.startswith("destroyed 0")
    cleared = broker_cli.ok("dev", "clear", env=env)
    assert "cleared" in cleared.stdout and not (vault_dir / "vault.json").exists()
    assert not (vault_dir / "hsm").exists()


def test_prod_and_ttl_over_the_cap_are_refused(broker_cli: BrokerCli, tmp_path: Path) -> None:
    env = {"BROKER_HOME": str(tmp_path / "home"), "BROKER_DEV_VAULT_KEY": "file"}
    for args, words in (
        (("--env", "prod"), "never pulled"),
        (("--env", "production", "--service", "payments"), "never pulled"),
        (("--env", "dev", "--ttl", "9h"), "over the cap"),
        (("--env", "dev", "--ttl", "30d"), "over the cap"),
    ):
        result = broker_cli.run("dev", "pull", *args, env=env)
        assert result.returncode == 1, result.describe()
        assert len(result.stderr_lines) == 1 and words in result.stderr
        assert not (tmp_path / "home" / "dev-vault" / "vault.json").exists()


def test_the_broker_refuses_a_dev_pull_of_a_prod_secret(
    broker_cli: BrokerCli, tmp_path: Path
) -> None:
    """Even a client that skips its own check cannot pull prod: the broker refuses a read
    declared as a dev pull of a production secret (and the refusal is audited)."""
    ref = f"{PROD_REF}-direct-{random.token_hex(3)}"
    value = _put(broker_cli, tmp_path, ref)
    result = broker_cli.run(
        "secrets", "get", ref, "--purpose", "dev-pull", "--justification", "INC-1 testing"
    )
    assert result.returncode == 1 and "dev pull refused" in result.stderr
    assert value not in result.stdout + result.stderr


def test_corrupted_foreign_and_keyless_vaults_are_refused(
    broker_cli: BrokerCli, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    env = {"BROKER_HOME": str(home)}
    ref = f"{DEV_REF}-bad-{random.token_hex(3)}"
    value = _put(broker_cli, tmp_path, ref)
    broker_cli.ok("dev", "pull", "--env", "dev", "--service", "payments", env=env)
    vault_json = home / "dev-vault" / "vault.json"
    good = vault_json.read_bytes()
    run_args = ("dev", "run", "--", sys.executable, "-c", "print('ran')")
    run_env = {**env, "API_KEY": ref}
    assert broker_cli.ok(*run_args, env=run_env).stdout == "ran\n"

    def refused(words: str) -> None:
        result = broker_cli.run(*run_args, env=run_env)
        assert result.returncode == 1, result.describe()
        assert len(result.stderr_lines) == 1 and words in result.stderr, result.stderr
        assert value not in result.stdout + result.stderr and "ran" not in result.stdout

    vault_json.write_bytes(b"\x00garbage{")
    refused("corrupted")
    vault_json.write_text(json.dumps({"format": "something-else", "entries": {}}))
    refused("foreign or corrupted")
    # An entry edited (its expiry extended): the seal no longer opens.
    doc = json.loads(good)
    entry = doc["entries"][ref]
    entry["expires_at"] = (dt.datetime.now(dt.UTC) + dt.timedelta(days=30)).isoformat()
    vault_json.write_text(json.dumps(doc))
    refused("did not open")
    # Another developer's vault copied over this one (a foreign key check).
    other_home = tmp_path / "other"
    broker_cli.ok("dev", "pull", "--env", "dev", "--service", "payments",
                  env={"BROKER_HOME": str(other_home)})  # fmt: skip
    vault_json.write_bytes((other_home / "dev-vault" / "vault.json").read_bytes())
    refused("not sealed by this vault's key")
    # The key is gone (the token directory removed).
    vault_json.write_bytes(good)
    shutil.rmtree(home / "dev-vault" / "hsm")
    refused("gone")
    # Bad reference syntax is refused by name.
    bad = broker_cli.run(*run_args, env={**env, "API_KEY": "secret://payments/../x"})
    assert bad.returncode == 1 and "API_KEY" in bad.stderr and len(bad.stderr_lines) == 1
    assert "cleared" in broker_cli.ok("dev", "clear", env=env).stdout


def test_the_sdk_resolves_references_in_configuration(
    broker_cli: BrokerCli, tmp_path: Path
) -> None:
    """`resolve_config` on TOML, JSON and YAML documents and `resolve_environ` on an
    environment, through the real SDK (mTLS to the broker, its <= 5 min cache)."""
    from broker.api.client.base import BrokerClient, ClientCredentials
    from broker.api.client.sdk import SecretResolver
    from broker.api.client.secrets import BrokerSecretSource, SecretsClient
    from broker.secretrefs import BadReference, LiveConfig, UnresolvedReference, load_document

    suffix = random.token_hex(3)
    db_ref, api_ref = f"secret://payments/dev/db/password-{suffix}", f"{DEV_REF}-cfg-{suffix}"
    db, api = _put(broker_cli, tmp_path, db_ref), _put(broker_cli, tmp_path, api_ref)
    data = broker_cli.server.data_dir
    credentials = ClientCredentials(
        (data / "operator" / "svid.pem").read_bytes(),
        (data / "operator" / "key.pem").read_bytes(),
        (data / "bundle.pem").read_bytes(),
    )
    documents = {
        "app.toml": f'[db]\nhost = "db.local"\npassword = "{db_ref}"\n'
                    f'[stripe]\nkeys = ["{api_ref}", "pk_public"]\n',
        "app.json": json.dumps({"db": {"host": "db.local", "password": db_ref},
                                "stripe": {"keys": [api_ref, "pk_public"]}}),
        "app.yaml": f"db:\n  host: db.local\n  password: {db_ref}\n"
                    f"stripe:\n  keys:\n    - {api_ref}\n    - pk_public\n",
    }  # fmt: skip
    with BrokerClient(broker_cli.server.address, credentials) as client:
        resolver = SecretResolver(BrokerSecretSource(SecretsClient(client)))
        for name, text in documents.items():
            (tmp_path / name).write_text(text)
            document = load_document(tmp_path / name)
            resolved = resolver.resolve_config(document)
            assert resolved == {"db": {"host": "db.local", "password": db},
                                "stripe": {"keys": [api, "pk_public"]}}, name  # fmt: skip
            assert document["db"]["password"] == db_ref  # the input is not modified
        live = LiveConfig(load_document(tmp_path / "app.toml"), resolver)
        assert live.current()["db"]["password"] == db

        environ = {"DB_PASSWORD": db_ref, "STRIPE_SECRET_REF": api_ref, "HOME": "/x",
                   "NOTE": "see secret:// docs"}  # fmt: skip
        assert resolver.resolve_environ(environ) == {"DB_PASSWORD": db, "STRIPE": api}

        missing = f"secret://payments/dev/nothing-{suffix}"
        with pytest.raises(UnresolvedReference) as unresolved:
            resolver.resolve_config({"db": {"password": missing}})
        assert missing in str(unresolved.value) and "db.password" in str(unresolved.value)
        for bad in ("secret://payments", "secret://pay ments/dev/x", "secret://a/../b"):
            with pytest.raises(BadReference) as refused:
                resolver.resolve_config({"a": [{"b": bad}]})
            assert "a[0].b" in str(refused.value)
