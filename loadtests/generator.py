"""A closed-loop load generator spread over several worker processes.

Shape of one run (one target, one concurrency level):

1. The parent starts `processes` worker processes (spawned, so nothing is inherited from the
   parent's threads) and gives each its share of the `concurrency` virtual users. A worker with
   no user is not started.
2. Each worker opens its client (long-lived channels / keep-alive connections), then says ready.
3. When every worker is ready the parent sets one start time on the shared monotonic clock.
   From it, each user sends its next request as soon as the previous one answered (closed loop),
   cycling through the pre-built request payloads.
4. Requests *started* during the first `warmup` seconds are not counted. Requests started in the
   next `duration` seconds are: successes go into an HDR histogram (µs), failures are counted by
   kind. Requests still in flight at the end are awaited (bounded by the client timeout) and
   counted too, so slow answers are never dropped from the tail.
5. Each worker returns its encoded histogram, counts and its own CPU time over the window; the
   parent merges them and reads the servers' CPU time over the same window from /proc.

Every loop here is bounded by time (the window plus the client timeout) and by count
(`max_requests`).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import queue
import signal
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from loadtests import hist, procs

__all__ = [
    "AsyncClient",
    "ClientSpec",
    "LoadOutcome",
    "SyncClient",
    "WorkerFailed",
    "run_load",
    "split_users",
]

MAX_ERROR_SAMPLES = 5


class AsyncClient(Protocol):
    async def open(self) -> None: ...
    async def call(self, index: int) -> None: ...  # raises on any failure
    def classify(self, exc: BaseException) -> str: ...
    async def close(self) -> None: ...


class SyncClient(Protocol):
    def open(self) -> None: ...
    def call(self, index: int) -> None: ...
    def classify(self, exc: BaseException) -> str: ...
    def close(self) -> None: ...


class ClientSpec(Protocol):
    """Picklable description of a client; `make()` runs inside the worker process."""

    @property
    def mode(self) -> str:
        """`async`: one event loop drives all users; `threads`: one thread per user."""
        ...

    @property
    def payload_count(self) -> int: ...

    def make(self) -> AsyncClient | SyncClient: ...


class WorkerFailed(RuntimeError):
    pass


@dataclass
class LoadOutcome:
    ok: int
    errors: dict[str, int]
    error_samples: list[str]
    histogram: str
    client_cpu_s: float
    server_cpu_s: float | None
    processes: int
    worker_notes: list[dict[str, Any]] = field(default_factory=list)
    server_threads: list[dict[str, Any]] = field(default_factory=list)


def split_users(concurrency: int, processes: int) -> list[int]:
    """Users per worker, as even as possible, dropping workers that would get none."""
    processes = max(1, min(processes, concurrency))
    base, extra = divmod(concurrency, processes)
    return [base + (1 if i < extra else 0) for i in range(processes)]


@dataclass
class _Tally:
    hist: Any = field(default_factory=hist.new_histogram)
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    samples: list[str] = field(default_factory=list)

    def failure(self, kind: str, exc: BaseException) -> None:
        self.errors[kind] += 1
        if len(self.samples) < MAX_ERROR_SAMPLES:
            self.samples.append(f"{kind}: {str(exc)[:300]}")


@dataclass(frozen=True)
class _Schedule:
    warmup: float
    duration: float
    max_requests_per_user: int
    ready_timeout: float


def _result(tally: _Tally, cpu: float, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "ok": tally.ok,
        "errors": dict(tally.errors),
        "samples": tally.samples,
        "histogram": hist.encode(tally.hist),
        "cpu_s": cpu,
        "notes": extra,
    }


async def _async_worker(
    spec: ClientSpec,
    first_user: int,
    users: int,
    stride: int,
    sched: _Schedule,
    out: Any,
    index: int,
    go: Any,
    start_at: Any,
) -> dict[str, Any]:
    client = spec.make()
    await client.open()  # type: ignore[misc]
    out.put(("ready", index, None))
    loop = asyncio.get_running_loop()
    if not await loop.run_in_executor(None, go.wait, sched.ready_timeout):
        raise WorkerFailed("no start signal")
    t_start = start_at.value
    t_warm = t_start + sched.warmup
    t_end = t_warm + sched.duration
    tally = _Tally()
    cpu: dict[str, float] = {}

    async def user(u: int) -> None:
        n = first_user + u
        for _ in range(sched.max_requests_per_user):
            now = time.monotonic()
            if now >= t_end:
                return
            measured = now >= t_warm
            t0 = time.perf_counter_ns()
            try:
                await client.call(n % spec.payload_count)  # type: ignore[misc]
            except Exception as exc:
                if measured:
                    tally.failure(client.classify(exc), exc)
                await asyncio.sleep(0.005)  # no hot loop against a failing server
            else:
                if measured:
                    hist.record_us(tally.hist, (time.perf_counter_ns() - t0) // 1000)
                    tally.ok += 1
            n += stride

    async def cpu_window() -> None:
        await asyncio.sleep(max(0.0, t_warm - time.monotonic()))
        cpu["start"] = time.process_time()
        await asyncio.sleep(max(0.0, t_end - time.monotonic()))
        cpu["end"] = time.process_time()

    await asyncio.sleep(max(0.0, t_start - time.monotonic()))
    await asyncio.gather(cpu_window(), *(user(u) for u in range(users)))
    await client.close()  # type: ignore[misc]
    return _result(tally, cpu["end"] - cpu["start"], {"mode": "async", "users": users})


def _thread_worker(
    spec: ClientSpec,
    first_user: int,
    users: int,
    stride: int,
    sched: _Schedule,
    out: Any,
    index: int,
    go: Any,
    start_at: Any,
) -> dict[str, Any]:
    client = spec.make()
    client.open()
    out.put(("ready", index, None))
    if not go.wait(sched.ready_timeout):
        raise WorkerFailed("no start signal")
    t_start = start_at.value
    t_warm = t_start + sched.warmup
    t_end = t_warm + sched.duration
    tallies = [_Tally() for _ in range(users)]

    def user(u: int) -> None:
        tally = tallies[u]
        n = first_user + u
        time.sleep(max(0.0, t_start - time.monotonic()))
        for _ in range(sched.max_requests_per_user):
            now = time.monotonic()
            if now >= t_end:
                return
            measured = now >= t_warm
            t0 = time.perf_counter_ns()
            try:
                client.call(n % spec.payload_count)
            except Exception as exc:
                if measured:
                    tally.failure(client.classify(exc), exc)
                time.sleep(0.005)
            else:
                if measured:
                    hist.record_us(tally.hist, (time.perf_counter_ns() - t0) // 1000)
                    tally.ok += 1
            n += stride

    threads = [threading.Thread(target=user, args=(u,), daemon=True) for u in range(users)]
    for t in threads:
        t.start()
    time.sleep(max(0.0, t_warm - time.monotonic()))
    cpu0 = time.process_time()
    time.sleep(max(0.0, t_end - time.monotonic()))
    cpu1 = time.process_time()
    for t in threads:
        t.join(sched.duration + 60)
    client.close()
    total = _Tally()
    for tally in tallies:
        total.hist.add(tally.hist)
        total.ok += tally.ok
        total.errors.update(tally.errors)
        total.samples.extend(tally.samples[: MAX_ERROR_SAMPLES - len(total.samples)])
    return _result(total, cpu1 - cpu0, {"mode": "threads", "users": users})


def _worker_main(
    index: int,
    spec: ClientSpec,
    first_user: int,
    users: int,
    stride: int,
    sched: _Schedule,
    out: Any,
    go: Any,
    start_at: Any,
    use_uvloop: bool,
) -> None:
    # The parent handles Ctrl-C and ends the workers; a worker must not die half-way on its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        args = (spec, first_user, users, stride, sched, out, index, go, start_at)
        if spec.mode == "threads":
            result = _thread_worker(*args)
        else:
            if use_uvloop:
                try:
                    import uvloop
                except ImportError:
                    use_uvloop = False
            if use_uvloop:
                result = uvloop.run(_async_worker(*args))
            else:
                result = asyncio.run(_async_worker(*args))
            result["notes"]["uvloop"] = use_uvloop
        out.put(("result", index, result))
    except BaseException as exc:
        out.put(("error", index, f"{exc!r}\n{traceback.format_exc()}"))


def run_load(
    spec: ClientSpec,
    *,
    concurrency: int,
    processes: int,
    warmup: float,
    duration: float,
    request_timeout: float,
    server_pids: Sequence[int] = (),
    max_requests: int = 10_000_000,
    use_uvloop: bool = True,
    ready_timeout: float = 120.0,
    on_window_start: Callable[[], None] | None = None,
) -> LoadOutcome:
    """Drive `spec` at `concurrency` users spread over up to `processes` workers.

    `server_pids[0]` is a server process whose tree's CPU time is measured over the window
    (with a per-thread breakdown of that process); `on_window_start` runs when the measured
    window opens (e.g. to attach a profiler).
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    shares = split_users(concurrency, processes)
    sched = _Schedule(
        warmup=warmup,
        duration=duration,
        max_requests_per_user=max(1, max_requests // concurrency),
        ready_timeout=ready_timeout,
    )
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    go = ctx.Event()
    start_at = ctx.Value("d", 0.0)
    workers = []
    first = 0
    try:
        for i, users in enumerate(shares):
            w = ctx.Process(
                target=_worker_main,
                args=(i, spec, first, users, concurrency, sched, out, go, start_at, use_uvloop),
                name=f"loadgen-{i}",
                daemon=True,
            )
            w.start()
            workers.append(w)
            first += users

        ready: set[int] = set()
        results: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + ready_timeout
        while len(ready) < len(workers):
            kind, idx, payload = _get(out, deadline, workers)
            if kind == "error":
                raise WorkerFailed(f"load worker {idx} failed while starting: {payload}")
            if kind == "ready":
                ready.add(idx)

        pids = procs.process_tree(server_pids[0]) if server_pids else []
        pids += list(server_pids[1:])
        t_start = time.monotonic() + 0.2
        start_at.value = t_start
        go.set()
        t_warm = t_start + warmup
        t_end = t_warm + duration
        time.sleep(max(0.0, t_warm - time.monotonic()))
        srv0 = procs.cpu_seconds(pids) if pids else None
        threads0 = procs.thread_cpu(server_pids[0]) if server_pids else {}
        if on_window_start is not None:
            on_window_start()
        time.sleep(max(0.0, t_end - time.monotonic()))
        srv1 = procs.cpu_seconds(pids) if pids else None
        threads1 = procs.thread_cpu(server_pids[0]) if server_pids else {}

        deadline = time.monotonic() + request_timeout + 30.0
        while len(results) < len(workers):
            kind, idx, payload = _get(out, deadline, workers)
            if kind == "error":
                raise WorkerFailed(f"load worker {idx} failed: {payload}")
            if kind == "result":
                results[idx] = payload
        for w in workers:
            w.join(10)
    finally:
        for w in workers:
            if w.is_alive():
                w.terminate()
                w.join(5)
            if w.is_alive():
                w.kill()
                w.join(5)
        out.close()
        out.join_thread()

    merged = hist.merge(r["histogram"] for r in results.values())
    errors: Counter[str] = Counter()
    samples: list[str] = []
    for r in results.values():
        errors.update(r["errors"])
        samples.extend(r["samples"])
    return LoadOutcome(
        ok=sum(r["ok"] for r in results.values()),
        errors=dict(errors),
        error_samples=samples[:MAX_ERROR_SAMPLES],
        histogram=hist.encode(merged),
        client_cpu_s=sum(r["cpu_s"] for r in results.values()),
        server_cpu_s=None if srv0 is None or srv1 is None else srv1 - srv0,
        processes=len(workers),
        worker_notes=[results[i]["notes"] for i in sorted(results)],
        server_threads=procs.busiest_threads(threads0, threads1, duration),
    )


def _get(out: Any, deadline: float, workers: list[Any]) -> tuple[str, int, Any]:
    """Next message from the workers, failing if the deadline passes or a worker died."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise WorkerFailed("load workers did not answer in time")
        try:
            return out.get(timeout=min(remaining, 1.0))  # type: ignore[no-any-return]
        except queue.Empty:
            dead = [w for w in workers if w.exitcode not in (None, 0)]
            if dead:
                with contextlib.suppress(queue.Empty):
                    return out.get(timeout=1.0)  # type: ignore[no-any-return]
                raise WorkerFailed(
                    f"load worker {dead[0].name} died with exit code {dead[0].exitcode}"
                ) from None
