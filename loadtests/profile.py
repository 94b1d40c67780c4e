"""Optional sampling profile of the broker during its measured runs (py-spy, if installed).

py-spy pauses the process for each sample (blocking mode: whole stacks, no torn samples), which
slows it: runs with a profile attached are marked in the report and their figures should not be
compared with runs without one. Samples are wall-clock samples of non-idle threads: time a
thread spends inside C (gRPC core, SoftHSM2, sqlite) without Python frames of its own shows as
self time of the nearest Python frame (for the event-loop thread: `Runner.run`).
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

    def __init__(self, pid: int, out: Path, seconds: float, rate: int = 100) -> None:
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


def _parse(text: str) -> list[tuple[str, list[str], int]]:
    rows = []
    for line in text.splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        frames = stack.split(";")
        thread = "all"
        # With --threads the first frame names the thread: "thread (0x1234): MainThread".
        if frames and frames[0].startswith(("thread ", "process ")):
            thread = frames[0].split(":", 1)[-1].strip() or frames[0]
            frames = frames[1:]
        if frames:
            rows.append((thread, [_frame_name(f) for f in frames], int(count_s)))
    return rows


def _top(rows: list[tuple[str, list[str], int]], top: int) -> list[str]:
    self_c: Counter[str] = Counter()
    total_c: Counter[str] = Counter()
    samples = 0
    for _, frames, count in rows:
        samples += count
        self_c[frames[-1]] += count
        for f in set(frames):
            total_c[f] += count
    lines = [f"  by self time ({samples} samples):"]
    lines += [f"    {c / samples:6.1%}  {f}" for f, c in self_c.most_common(top)]
    # Frames on every sample (the entry point's call chain) tell nothing: leave them out.
    inclusive = [(f, c) for f, c in total_c.most_common() if c < samples][:top]
    lines += ["  by total (inclusive) time, below the frames common to every sample:"]
    lines += [f"    {c / samples:6.1%}  {f}" for f, c in inclusive]
    return lines


def summarize_collapsed(text: str, top: int = 25) -> str:
    """Samples per thread, then the top functions by self and by total (inclusive) samples,
    for the busiest thread and for all threads together, from py-spy's collapsed stacks."""
    rows = _parse(text)
    if not rows:
        return "no samples"
    per_thread: Counter[str] = Counter()
    for thread, _, count in rows:
        per_thread[thread] += count
    samples = sum(per_thread.values())
    lines = [f"samples: {samples} (non-idle threads)", "samples per thread:"]
    lines += [f"  {c / samples:6.1%}  {t}" for t, c in per_thread.most_common()]
    busiest = per_thread.most_common(1)[0][0]
    if len(per_thread) > 1:
        lines += ["", f"busiest thread: {busiest}"]
        lines += _top([r for r in rows if r[0] == busiest], top)
    lines += ["", "all threads:"]
    lines += _top(rows, top)
    return "\n".join(lines)
