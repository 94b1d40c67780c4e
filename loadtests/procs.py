"""Child servers the load test starts (broker, bao): start, wait until ready, measure, stop."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = [
    "ManagedProcess",
    "StartupError",
    "busiest_threads",
    "cpu_seconds",
    "free_port",
    "is_loopback",
    "process_tree",
    "thread_cpu",
]

_CLK_TCK = os.sysconf("SC_CLK_TCK")


class StartupError(RuntimeError):
    """A child server did not come up; the message carries the end of its output."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def is_loopback(host: str) -> bool:
    """Load may only target this machine's loopback addresses."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_stat(pid: int) -> tuple[int, float] | None:
    """(ppid, utime+stime seconds) of one process, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    ppid = int(fields[1])
    utime, stime = int(fields[11]), int(fields[12])
    return ppid, (utime + stime) / _CLK_TCK


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants that are alive now."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = _read_stat(int(entry))
        if st is not None:
            parents.setdefault(st[0], []).append(int(entry))
    out: list[int] = []
    todo = [root]
    while todo and len(out) < 10_000:
        pid = todo.pop()
        out.append(pid)
        todo.extend(parents.get(pid, []))
    return out


def cpu_seconds(pids: Sequence[int]) -> float:
    """User+system CPU time consumed so far by these processes (all their threads)."""
    total = 0.0
    for pid in pids:
        st = _read_stat(pid)
        if st is not None:
            total += st[1]
    return total


class ManagedProcess:
    """A child process in its own session, its output copied to a log file.

    `ready` is a regular expression searched in each stdout line; `wait_ready` returns the first
    matching line. `stop` sends SIGTERM to the whole session, then SIGKILL after `grace` seconds.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        ready: str | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._ready_re = re.compile(ready) if ready else None
        self._ready_line: str | None = None
        self._ready_event = threading.Event()
        self._tail: deque[str] = deque(maxlen=40)
        self._log = open(log_path, "a", buffering=1)  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
            text=True,
            bufsize=1,
        )
        self._reader = threading.Thread(target=self._pump, name=f"{name}-output", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._tail.append(line.rstrip("\n"))
            with contextlib.suppress(ValueError):  # log closed during stop
                self._log.write(line)
            if (
                self._ready_re is not None
                and not self._ready_event.is_set()
                and self._ready_re.search(line)
            ):
                self._ready_line = line.strip()
                self._ready_event.set()
        self._ready_event.set()  # EOF: wake a waiter so it can report the exit

    def tail(self) -> str:
        return "\n".join(self._tail)

    def wait_ready(self, timeout: float) -> str:
        if not self._ready_event.wait(timeout):
            raise StartupError(
                f"{self.name} printed no ready line within {timeout:.0f}s; "
                f"last output:\n{self.tail()}"
            )
        if self._ready_line is None:
            raise StartupError(
                f"{self.name} exited (status {self.proc.poll()}) before it was ready; "
                f"last output:\n{self.tail()}"
            )
        return self._ready_line

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise StartupError(
                f"{self.name} exited with status {self.proc.returncode}; "
                f"last output:\n{self.tail()}"
            )

    def stop(self, grace: float = 10.0) -> int | None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while self.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(5)
        # Anything left in the session (helpers the server started) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._reader.join(2)
        self._log.close()
        return self.proc.returncode


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds so far of each thread of `pid`: {tid: (thread name, seconds)}."""
    out: dict[int, tuple[str, float]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            raw = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        name = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / _CLK_TCK)
    return out


def busiest_threads(
    before: dict[int, tuple[str, float]],
    after: dict[int, tuple[str, float]],
    seconds: float,
    top: int = 6,
) -> list[dict[str, object]]:
    """The threads that used the most CPU between two `thread_cpu` snapshots."""
    rows = []
    for tid, (name, cpu) in after.items():
        used = cpu - before.get(tid, (name, 0.0))[1]
        if used > 0:
            rows.append(
                {
                    "tid": tid,
                    "name": name,
                    "cpu_s": round(used, 2),
                    "share_of_one_core": round(used / seconds, 3) if seconds > 0 else None,
                }
            )
    rows.sort(key=lambda r: -float(r["cpu_s"]))  # type: ignore[arg-type]
    return rows[:top]
