"""End-to-end fixtures: `broker serve --dev` as a subprocess on a free port, and a runner for
CLI commands against it (each command is its own subprocess, as a user would run it)."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

READY_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
COMMAND_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class BrokerProcess:
    """One `broker serve --dev` subprocess. `start()` returns once it printed its
    "listening" line; `stop()` sends SIGTERM and requires a clean exit within 10 s."""

    def __init__(
        self,
        data_dir: Path,
        log_dir: Path,
        serve_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        *,
        prefix: list[str] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        """`serve_args` replaces `--dev --data-dir DIR` (e.g. `--config FILE`); `--listen` on
        a free port is always added. `prefix` goes in front of the command and `host` is the
        address it listens on (a broker on a host of its own: tests/fixtures/netns.py)."""
        self.data_dir = data_dir
        self.log_dir = log_dir
        self.serve_args = serve_args or ["--dev", "--data-dir", str(data_dir)]
        self.env = env or {}
        self.prefix = prefix or []
        self.host = host
        self.port = 0
        self.listening_line = ""
        self._process: subprocess.Popen[str] | None = None
        self._stderr: IO[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._starts = 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stderr_text(self) -> str:
        path = self.log_dir / f"serve-{self._starts}.stderr"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> None:
        assert self._process is None, "already running"
        self._starts += 1
        self.port = free_port()
        self._lines = queue.Queue()
        self._stderr = open(self.log_dir / f"serve-{self._starts}.stderr", "w")  # noqa: SIM115
        self._process = subprocess.Popen(
            [
                *self.prefix,
                sys.executable,
                "-m",
                "broker.cli",
                "serve",
                *self.serve_args,
                "--listen",
                self.address,
            ],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            stdin=subprocess.DEVNULL,
            text=True,
            env=_child_env(self.env),
            cwd=self.log_dir,
        )
        stdout = self._process.stdout
        assert stdout is not None
        threading.Thread(target=self._pump, args=(stdout,), daemon=True).start()
        try:
            line = self._lines.get(timeout=READY_TIMEOUT)
        except queue.Empty:
            self._kill()
            pytest.fail(
                f"broker did not print its listening line within {READY_TIMEOUT:.0f} s; "
                f"stderr:\n{self.stderr_text()}"
            )
        if line is None or "listening" not in line:
            self._kill()
            pytest.fail(
                f"broker exited or printed {line!r} before listening; stderr:\n{self.stderr_text()}"
            )
        self.listening_line = line

    def _pump(self, stdout: IO[str]) -> None:
        for line in stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def _kill(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait(timeout=STOP_TIMEOUT)
            self._close()

    def _close(self) -> None:
        if self._process is not None and self._process.stdout is not None:
            self._process.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
        self._process = None
        self._stderr = None

    def stop(self) -> int:
        """SIGTERM; return the exit status (fails the test if it takes over 10 s)."""
        process = self._process
        assert process is not None, "not running"
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._kill()
            pytest.fail(f"broker did not exit within {STOP_TIMEOUT:.0f} s of SIGTERM")
        self._close()
        return code

    def wait_exit(self, timeout: float = COMMAND_TIMEOUT) -> int:
        """Wait for the process to end on its own (e.g. a test-only self-SIGKILL); return
        its exit status (negative: the signal)."""
        process = self._process
        assert process is not None, "not running"
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill()
            pytest.fail(f"broker did not exit within {timeout:.0f} s")
        self._close()
        return code

    def ensure_stopped(self) -> None:
        if self._process is not None:
            self._kill()


@dataclass(frozen=True)
class CliResult:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        return self.stderr.splitlines()

    def json(self) -> Any:
        assert self.returncode == 0, self.describe()
        return json.loads(self.stdout)

    def describe(self) -> str:
        return (
            f"broker {' '.join(self.args)[:300]} -> {self.returncode}\n"
            f"stdout: {self.stdout[:2000]}\nstderr: {self.stderr[:2000]}"
        )


@dataclass
class BrokerCli:
    """Runs `broker ...` as a subprocess with BROKER_ADDR and BROKER_DATA_DIR pointing at the
    test broker."""

    server: BrokerProcess
    workdir: Path

    def run(self, *args: str, env: dict[str, str] | None = None) -> CliResult:
        base = {"BROKER_ADDR": self.server.address, "BROKER_DATA_DIR": str(self.server.data_dir)}
        completed = subprocess.run(
            [sys.executable, "-m", "broker.cli", *args],
            capture_output=True,
            text=True,
            env=_child_env({**base, **(env or {})}),
            cwd=self.workdir,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        return CliResult(tuple(args), completed.returncode, completed.stdout, completed.stderr)

    def ok(self, *args: str, env: dict[str, str] | None = None) -> CliResult:
        result = self.run(*args, env=env)
        assert result.returncode == 0, result.describe()
        return result


@pytest.fixture(scope="module")
def broker_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    root = tmp_path_factory.mktemp("broker")
    server = BrokerProcess(root / "data", root)
    server.start()
    try:
        yield server
        assert server.stop() == 0, f"broker exited uncleanly; stderr:\n{server.stderr_text()}"
    finally:
        server.ensure_stopped()


@pytest.fixture
def broker_cli(broker_server: BrokerProcess, tmp_path: Path) -> BrokerCli:
    return BrokerCli(broker_server, tmp_path)
