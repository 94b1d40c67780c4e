"""Optional sampling profile of the broker during its measured runs (py-spy, if installed).

Sampling perturbs the process measured: runs with a profile attached are marked in the report
and their figures should not be compared with runs without one.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

__all__ = ["Profiler", "py_spy_binary", "summarize_collapsed"]


def py_spy_binary() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    if local.exists():
        return str(local)
    return shutil.which("py-spy")


class Profiler:
    """`py-spy record` on one pid for a bounded time, collapsed stacks into a file."""

    def __init__(self, pid: int, out: Path, seconds: float, rate: int = 200) -> None:
        binary = py_spy_binary()
        if binary is None:
            raise RuntimeError("py-spy is not installed (`.venv/bin/pip install py-spy`)")
        self.out = out
        self.proc = subprocess.Popen(
            [
                binary,
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(max(1, int(seconds + 0.999))),
                "--rate",
                str(rate),
                "--format",
                "raw",
                "--nonblocking",
                "--threads",
                "--output",
                str(out),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def finish(self, timeout: float = 60.0) -> str:
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        if not self.out.exists():
            return f"py-spy wrote no profile: {err.strip()[-500:]}"
        return summarize_collapsed(self.out.read_text())


_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _frame_name(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m.group("file")
    for marker in ("site-packages/", "/work/main/", "lib/python3."):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{m.group('func')} ({path})"


def summarize_collapsed(text: str, top: int = 25) -> str:
    """Top functions by self and by total (inclusive) samples from py-spy's collapsed stacks."""
    self_c: Counter[str] = Counter()
    total_c: Counter[str] = Counter()
    samples = 0
    for line in text.splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = [_frame_name(f) for f in stack.split(";")]
        # The first frame may be the thread name ("process 12:"/"thread (0x...)") with --threads.
        if frames and (frames[0].startswith(("process ", "thread "))):
            frames = frames[1:]
        if not frames:
            continue
        samples += count
        self_c[frames[-1]] += count
        for f in set(frames):
            total_c[f] += count
    if not samples:
        return "no samples"
    lines = [f"samples: {samples}", "", f"top {top} by self time:"]
    lines += [f"  {c / samples:6.1%}  {f}" for f, c in self_c.most_common(top)]
    lines += ["", f"top {top} by total (inclusive) time:"]
    lines += [f"  {c / samples:6.1%}  {f}" for f, c in total_c.most_common(top)]
    return "\n".join(lines)
