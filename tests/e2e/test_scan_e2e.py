"""`broker scan` against a real `broker serve --dev`: a managed value found in a file, in git
history (a real repository whose later commit removed it) and in an OCI image layer (a layout
tarball assembled here), never printed; zero managed hits on this repository's own tree; bad
input (malformed image, bad git range, binary and huge files, symlinks out of the tree)
reported, never a crash."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import secrets as random
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.e2e.conftest import BrokerCli

pytestmark = pytest.mark.e2e

REF = "secret://payments/dev/scan/api-key"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def leaked(broker_server: object, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A managed value (stored at REF) for the tests to leak."""
    from tests.e2e.conftest import BrokerCli as Cli

    tmp = tmp_path_factory.mktemp("value")
    value = f"pw{random.token_hex(12)}"  # looks like an ordinary password to a pattern scanner
    (tmp / "v").write_text(value)
    cli = Cli(broker_server, tmp)  # type: ignore[arg-type]
    cli.ok(
        "secrets", "put", REF, "--value-file", str(tmp / "v"), "--owner", "payments",
        "--classification", "confidential", "--rotation-period", "90d",
    )  # fmt: skip
    return value


def _scan(cli: BrokerCli, *args: str) -> tuple[int, str, str]:
    result = cli.run("scan", "--no-detect-secrets", *args)
    return result.returncode, result.stdout, result.stderr


def test_a_leaked_value_in_a_file_is_found_by_reference(
    broker_cli: BrokerCli, leaked: str, tmp_path: Path
) -> None:
    tree = tmp_path / "tree"
    (tree / "config").mkdir(parents=True)
    (tree / "config" / "app.toml").write_text(f'[stripe]\nurl = "x"\napi_key = "{leaked}"\n')
    (tree / "clean.txt").write_text("nothing to see\n")
    code, out, err = _scan(broker_cli, str(tree))
    assert code == 1, err
    assert f"{tree}/config/app.toml:3: managed secret {REF} (version 1)" in out
    assert "broker secrets rotate" in out
    assert leaked not in out + err


def test_a_value_buried_in_git_history_is_found(
    broker_cli: BrokerCli, leaked: str, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args: str) -> None:
        subprocess.run(
            ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com",
             "-c", "commit.gpgsign=false", *args],
            check=True, capture_output=True,
        )  # fmt: skip

    git("init", "-q", "-b", "main")
    (repo / "README").write_text("hello\n")
    git("add", ".")
    git("commit", "-qm", "first")
    (repo / "settings.env").write_text(f"A=1\nB=2\nSTRIPE_KEY={leaked}\n")
    git("add", ".")
    git("commit", "-qm", "oops")
    (repo / "settings.env").write_text("A=1\nB=2\nSTRIPE_KEY=secret://payments/dev/scan/api-key\n")
    git("commit", "-qam", "remove the key")
    for _ in range(3):
        (repo / "README").write_text((repo / "README").read_text() + "more\n")
        git("commit", "-qam", "later work")

    # The working tree is clean now ...
    assert _scan(broker_cli, str(repo))[0] == 0
    # ... but the history is not.
    code, out, err = _scan(broker_cli, "--git", "ALL", "--repo", str(repo))
    assert code == 1, err
    oops = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD~4"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert f"{oops[:12]}:settings.env:3: managed secret {REF}" in out
    assert leaked not in out + err
    # Only what the branch added since: nothing.
    assert _scan(broker_cli, "--git", "HEAD~3..HEAD", "--repo", str(repo))[0] == 0

    bad = _scan(broker_cli, "--git", "--upload-pack=evil", "--repo", str(repo))
    assert bad[0] == 2 and len(bad[2].strip().splitlines()) == 1
    missing = _scan(broker_cli, "--git", "nosuchbranch..HEAD", "--repo", str(repo))
    assert missing[0] == 2 and "failed" in missing[2]


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _oci_image(path: Path, layers: list[bytes]) -> None:
    """An OCI image layout tarball: oci-layout, index.json, manifest, config, layer blobs."""
    blobs: dict[str, bytes] = {}

    def add(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        blobs[f"blobs/sha256/{digest}"] = data
        return f"sha256:{digest}"

    config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
    layer_descs = [
        {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": add(layer),
         "size": len(layer)}
        for layer in layers
    ]  # fmt: skip
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": add(config),
                   "size": len(config)},
        "layers": layer_descs,
    }).encode()  # fmt: skip
    index = {
        "schemaVersion": 2,
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": add(manifest),
             "size": len(manifest)}
        ],
    }  # fmt: skip
    path.write_bytes(
        _tar({"oci-layout": b'{"imageLayoutVersion": "1.0.0"}', "index.json":
              json.dumps(index).encode(), **blobs})
    )  # fmt: skip


def test_a_value_in_an_image_layer_is_found(
    broker_cli: BrokerCli, leaked: str, tmp_path: Path
) -> None:
    base = gzip.compress(_tar({"etc/os-release": b"ID=test\n", "bin/sh": b"\x7fELF\x00\x00"}))
    app = gzip.compress(_tar({"app/.env": f"DEBUG=1\nTOKEN={leaked}\n".encode()}))
    cleanup = _tar({"app/.wh..env": b""})  # a later layer "deletes" it: still in the image
    image = tmp_path / "app.tar"
    _oci_image(image, [base, app, cleanup])
    code, out, err = _scan(broker_cli, "--image", str(image))
    assert code == 1, err
    digest = hashlib.sha256(app).hexdigest()[:12]
    assert f"app.tar@{digest}:/app/.env:2: managed secret {REF}" in out
    assert "bin/sh: binary" in err
    assert leaked not in out + err


def test_malformed_images_are_refused_in_one_line(broker_cli: BrokerCli, tmp_path: Path) -> None:
    cases = {
        "not-a-tar.tar": b"this is not a tar file at all" * 40,
        "no-index.tar": _tar({"hello": b"x"}),
        "bad-json.tar": _tar({"index.json": b"{not json"}),
        "bad-digest.tar": _tar({"index.json": b'{"manifests": [{"digest": "sha256:../../x"}]}'}),
        "missing-blob.tar": _tar(
            {"index.json": json.dumps({"manifests": [{"digest": "sha256:" + "a" * 64}]}).encode()}
        ),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        code, out, err = _scan(broker_cli, "--image", str(tmp_path / name))
        assert code == 2, (name, out, err)
        assert err.startswith("broker: ") and len(err.strip().splitlines()) == 1, (name, err)
        assert "Traceback" not in err


def test_binary_huge_and_escaping_files_are_reported_not_scanned(
    broker_cli: BrokerCli, leaked: str, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(leaked)
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "blob.bin").write_bytes(b"\x00\x01" + leaked.encode())
    (tree / "huge.log").write_bytes(b"x" * 5000 + b"\n" + leaked.encode())
    (tree / "escape").symlink_to(outside / "secret.txt")
    (tree / "escape-dir").symlink_to(outside)
    (tree / "loop").symlink_to(tree / "loop")
    code, out, err = _scan(broker_cli, str(tree), "--max-size", "4096")
    assert code == 0, out + err
    assert "blob.bin: binary" in err
    assert "huge.log: larger than 4096 bytes" in err
    assert "escape: symlink out of the scanned tree" in err
    assert "escape-dir: symlink out of the scanned tree" in err
    assert leaked not in out + err


def test_no_false_positives_on_this_repository(broker_cli: BrokerCli, leaked: str) -> None:
    code, out, err = _scan(broker_cli, str(REPO), "--output", "json")
    assert code == 0, out[:2000] + err
    report = json.loads(out)
    assert report["hits"] == [] and report["scanned"]["blobs"] > 100


def test_a_workload_may_not_take_fingerprints(
    broker_cli: BrokerCli, leaked: str, tmp_path: Path
) -> None:
    """Fingerprints let their holder test guesses offline: a workload (even the owning
    service) is refused, and the refusal hands out nothing."""
    status = broker_cli.ok("ca", "status", "--output", "json").json()
    out = tmp_path / "svid"
    spiffe_id = f"spiffe://{status['trust_domain']}/default/dev/payments"
    broker_cli.ok("svid", "mint", "--spiffe-id", spiffe_id, "--out", str(out))
    env = {"BROKER_CERT": str(out / "svid.pem"), "BROKER_KEY": str(out / "key.pem")}
    (tmp_path / "f.txt").write_text(leaked)
    result = broker_cli.run("scan", "--no-detect-secrets", str(tmp_path / "f.txt"), env=env)
    assert result.returncode == 1 and "permission denied" in result.stderr
    assert len(result.stderr_lines) == 1 and leaked not in result.stdout + result.stderr
    assert result.stdout == ""


def test_rotated_values_match_within_the_rollback_window_and_revoked_ones_do_not(
    broker_cli: BrokerCli, tmp_path: Path
) -> None:
    ref = f"secret://billing/dev/scan/token-{random.token_hex(3)}"
    first = f"tok{random.token_hex(10)}"
    (tmp_path / "v").write_text(first)
    broker_cli.ok(
        "secrets", "put", ref, "--value-file", str(tmp_path / "v"), "--owner", "billing",
        "--classification", "internal", "--rotation-period", "30d",
    )  # fmt: skip
    (tmp_path / "v").unlink()
    leak = tmp_path / "leak.txt"
    leak.write_text(f"token: {first}\n")
    broker_cli.ok("secrets", "rotate", ref, "--env", "dev", "--ticket", "T-1",
                  "--justification", "test")  # fmt: skip
    code, out, _ = _scan(broker_cli, "--prefix", "secret://billing/", str(leak))
    assert code == 1 and f"{leak}:1: managed secret {ref} (version 1)" in out
    broker_cli.ok("secrets", "revoke", ref, "--justification", "leaked")
    assert _scan(broker_cli, "--prefix", "secret://billing/", str(leak))[0] == 0

    events = broker_cli.ok("audit", "tail", "-n", "20", "--output", "json").json()
    scans = [e["event"] for e in events if e["event"]["what"] == "secrets.scan"]
    assert scans and scans[-1]["outcome"] == "OK" and "scan_id" in scans[-1]["details"]
    assert first not in json.dumps(events)
