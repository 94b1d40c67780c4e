"""The production image (Dockerfile): built with podman on a Debian base this test makes itself
(debootstrap from the machine's Debian mirror, `podman import`; there is no registry to pull
from), then run: the broker starts inside it, an SVID is minted against it from the host, and
the built-in `broker health` probe (the image's HEALTHCHECK) answers.

The base root filesystem is cached across runs (BROKER_IMAGE_CACHE, default
~/.cache/credential-broker/image) and podman's own layer cache keeps rebuilds short.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3600)]

ROOT = Path(__file__).resolve().parents[2]
BASE_NAME = "localhost/broker-test-base:bookworm"
IMAGE = "localhost/credential-broker:test"
SUITE = "bookworm"
READY_SECONDS = 120.0
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def _containers_conf() -> Path:
    """podman settings for sandboxes like CI's: runc (crun refuses hybrid cgroup v1/v2
    hierarchies) and ulimits within this process's own hard limits (podman's defaults ask
    for more than an unprivileged-in-practice root may set)."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile = 65536 if nofile == resource.RLIM_INFINITY else min(nofile, 65536)
    conf = _cache_dir() / "containers.conf"
    conf.write_text(
        "[containers]\n"
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc=4096:4096"]\n\n'
        '[engine]\nruntime = "runc"\n'
    )
    return conf


def _run(*args: str, timeout: float = 1800, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CONTAINERS_CONF=str(_containers_conf()))
    completed = subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout, check=False, env=env
    )
    if check and completed.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {completed.returncode}\n"
            f"stdout:\n{completed.stdout[-4000:]}\nstderr:\n{completed.stderr[-4000:]}"
        )
    return completed


def debian_mirror() -> str:
    """The machine's Debian mirror (apt's sources), for debootstrap."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for source in sources:
        try:
            text = source.read_text()
        except OSError:
            continue
        for url in re.findall(r"(?:URIs:|^deb)\s+(\S+)", text, flags=re.MULTILINE):
            if url.startswith("http") and not url.rstrip("/").endswith("-security"):
                return url
    return "http://deb.debian.org/debian"


def _cache_dir() -> Path:
    default = Path.home() / ".cache" / "credential-broker" / "image"
    path = Path(os.environ.get("BROKER_IMAGE_CACHE", str(default)))
    path.mkdir(parents=True, exist_ok=True)
    return path


def base_image() -> str:
    """The imported Debian base, by digest (as the Dockerfile wants its base pinned)."""
    if _run("podman", "image", "exists", BASE_NAME, check=False).returncode != 0:
        tarball = _cache_dir() / f"debian-{SUITE}-minbase.tar"
        if not tarball.exists():
            rootfs = _cache_dir() / f"rootfs-{uuid.uuid4().hex}"
            try:
                _run("debootstrap", "--variant=minbase", SUITE, str(rootfs), debian_mirror())
                partial = tarball.with_suffix(".partial")
                _run("tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(partial), ".")
                partial.rename(tarball)
            finally:
                shutil.rmtree(rootfs, ignore_errors=True)
        _run("podman", "import", str(tarball), BASE_NAME)
    digest = _run("podman", "image", "inspect", "--format", "{{.Digest}}", BASE_NAME).stdout
    assert digest.strip().startswith("sha256:"), digest
    return f"{BASE_NAME.rpartition(':')[0]}@{digest.strip()}"


@dataclass
class Container:
    name: str
    volume: str
    ports: dict[int, int]  # container port -> host port on 127.0.0.1

    def logs(self) -> str:
        done = _run("podman", "logs", self.name, check=False)
        return done.stdout + done.stderr

    def exec(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run("podman", "exec", self.name, *args, timeout=120, check=check)


@pytest.fixture(scope="module")
def image() -> str:
    for tool in ("podman", "debootstrap"):
        assert shutil.which(tool), f"{tool} is not installed (bash scripts/run setup installs it)"
    base = base_image()
    # docker format: OCI images drop the HEALTHCHECK.
    build = ["podman", "build", "--format", "docker", "--build-arg", f"BASE_IMAGE={base}"]
    if CA_BUNDLE.is_file():  # the build network's TLS proxy CA, if any, for pip (a build secret)
        build += ["--secret", f"id=ca,src={CA_BUNDLE}"]
    _run(*build, "-t", IMAGE, str(ROOT))
    return IMAGE


@pytest.fixture(scope="module")
def container(image: str) -> Iterator[Container]:
    name = f"broker-test-{uuid.uuid4().hex[:8]}"
    volume = f"{name}-data"
    _run("podman", "volume", "create", volume)
    run = _run(
        "podman", "run", "-d", "--name", name,
        "-v", f"{volume}:/var/lib/broker",
        "-p", "127.0.0.1::8443", "-p", "127.0.0.1::8444", "-p", "127.0.0.1::9464",
        "-e", "BROKER_SERVER_NAMES=broker.test.internal,localhost,127.0.0.1",
        image,
        check=False,
    )  # fmt: skip
    try:
        assert run.returncode == 0, run.stderr
        ports = {}
        for port in (8443, 8444, 9464):
            mapped = _run("podman", "port", name, f"{port}/tcp").stdout.strip()
            ports[port] = int(mapped.rpartition(":")[2])
        box = Container(name, volume, ports)
        deadline = time.monotonic() + READY_SECONDS
        while "broker listening on" not in box.logs():
            state = _run("podman", "inspect", "--format", "{{.State.Status}}", name).stdout
            assert state.strip() == "running", f"the broker exited:\n{box.logs()}"
            assert time.monotonic() < deadline, f"no listening line:\n{box.logs()}"
            time.sleep(0.5)  # waiting for another process, not timing the broker
        yield box
    finally:
        _run("podman", "rm", "-f", "-t", "5", name, check=False)
        _run("podman", "volume", "rm", "-f", volume, check=False)


def test_image_runs_the_broker_as_a_fixed_unprivileged_user(container: Container) -> None:
    ids = container.exec("id").stdout
    assert "uid=10001(broker) gid=10001(broker)" in ids
    assert "broker listening on 0.0.0.0:8443" in container.logs()
    # SoftHSM2 keeps the dev token in the data volume, owned by the broker user.
    listing = container.exec("find", "/var/lib/broker/hsm/tokens", "-maxdepth", "1").stdout
    assert len(listing.split()) >= 2, listing
    owner = container.exec("stat", "-c", "%u:%g", "/var/lib/broker/hsm/tokens").stdout
    assert owner.strip() == "10001:10001"


def test_serving_certificate_names_come_from_the_environment(container: Container) -> None:
    """BROKER_SERVER_NAMES reaches the serving certificate (read on the attestation port,
    which asks for no client certificate)."""
    pem = ssl.get_server_certificate(("127.0.0.1", container.ports[8444]))
    cert = x509.load_pem_x509_certificate(pem.encode())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"broker.test.internal", "localhost"} <= set(san.get_values_for_type(x509.DNSName))
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_health_probe_and_healthcheck(container: Container) -> None:
    probe = container.exec("broker", "health")
    assert probe.stdout.strip() == "SERVING"
    assert _run("podman", "healthcheck", "run", container.name, check=False).returncode == 0
    unknown = container.exec("broker", "health", "--service", "no.such.Service", check=False)
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("broker: ") and len(unknown.stderr.splitlines()) == 1


def test_mint_an_svid_from_the_host(container: Container, tmp_path: Path) -> None:
    # The operator identity and trust bundle the dev broker wrote into its volume, copied out.
    data = tmp_path / "data"
    data.mkdir()
    for item in ("operator", "bundle.pem"):
        _run("podman", "cp", f"{container.name}:/var/lib/broker/{item}", str(data / item))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env |= {"BROKER_ADDR": f"127.0.0.1:{container.ports[8443]}", "BROKER_DATA_DIR": str(data)}
    spiffe_id = "spiffe://broker.local/default/dev/web"
    out = tmp_path / "web"
    minted = subprocess.run(
        [sys.executable, "-m", "broker.cli", "svid", "mint", "--spiffe-id", spiffe_id,
         "--ttl", "10m", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert minted.returncode == 0, minted.stderr
    leaf = x509.load_pem_x509_certificate((out / "svid.pem").read_bytes())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [spiffe_id]
    health = subprocess.run(
        [sys.executable, "-m", "broker.cli", "health", "--output", "json"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert health.returncode == 0, health.stderr
    assert json.loads(health.stdout)["status"] == "SERVING"


def test_the_base_must_be_pinned_by_digest(image: str) -> None:
    """The image above was built on `NAME@sha256:<digest>`; a tag alone is refused before
    anything is installed, with a line saying what to pass."""
    pinned = base_image()
    name, _, digest = pinned.partition("@sha256:")
    assert len(digest) == 64 and all(c in "0123456789abcdef" for c in digest), pinned
    # podman resolves a local image by that digest (what FROM ${BASE_IMAGE} relies on)
    assert _run("podman", "image", "inspect", "--format", "{{.Id}}", pinned).stdout.strip()
    for unpinned in (BASE_NAME, f"{name}@sha256:{digest[:12]}"):
        build = _run(
            "podman", "build", "--format", "docker", "--build-arg", f"BASE_IMAGE={unpinned}",
            "-t", "localhost/credential-broker:unpinned", str(ROOT),
            check=False,
        )  # fmt: skip
        output = build.stdout + build.stderr
        assert build.returncode != 0, output[-2000:]
        if unpinned == BASE_NAME:  # a tag resolves, so the Dockerfile's own check refuses it
            assert f"BASE_IMAGE={unpinned} is not pinned by digest" in output, output[-2000:]
        assert _run("podman", "image", "exists", "localhost/credential-broker:unpinned",
                    check=False).returncode != 0  # fmt: skip


def test_image_holds_runtime_dependencies_only(image: str) -> None:
    script = (
        "import importlib.util as u, regopy, pkcs11;"
        "print([m for m in ('grpc_tools', 'loadtests', 'pytest', 'pip') if u.find_spec(m)])"
    )
    found = _run("podman", "run", "--rm", "--entrypoint", "python3", image, "-c", script)
    assert found.stdout.strip() == "[]"
    config = json.loads(_run("podman", "image", "inspect", image).stdout)[0]["Config"]
    assert set(config["ExposedPorts"]) == {"8443/tcp", "8444/tcp", "9464/tcp"}
    assert config["User"] == "10001:10001"
