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
   Everything is also kept per operation (`spec.operation(index)`, when the spec has it: a
   mixed load names several), with the successes and failures of each second of the window
   (by the second the request started in), for throughput-over-time plots.

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
    "merge_operations",
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
    # per operation: ok, errors, samples, histogram (encoded), ok_per_s, errors_per_s
    operations: dict[str, dict[str, Any]] = field(default_factory=dict)


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
    ok_per_s: Counter[int] = field(default_factory=Counter)
    errors_per_s: Counter[int] = field(default_factory=Counter)
    # The successful requests' latencies of each second (report.html: p50/p99 over time).
    hist_per_s: dict[int, Any] = field(default_factory=dict)

    def failure(self, kind: str, exc: BaseException, second: int = 0) -> None:
        self.errors[kind] += 1
        self.errors_per_s[second] += 1
        if len(self.samples) < MAX_ERROR_SAMPLES:
            self.samples.append(f"{kind}: {str(exc)[:300]}")

    def success(self, micros: int, second: int = 0) -> None:
        hist.record_us(self.hist, micros)
        per_s = self.hist_per_s.get(second)
        if per_s is None:
            per_s = self.hist_per_s[second] = hist.new_histogram()
        hist.record_us(per_s, micros)
        self.ok += 1
        self.ok_per_s[second] += 1

    def add(self, other: _Tally) -> None:
        self.hist.add(other.hist)
        self.ok += other.ok
        self.errors.update(other.errors)
        self.ok_per_s.update(other.ok_per_s)
        self.errors_per_s.update(other.errors_per_s)
        for second, h in other.hist_per_s.items():
            mine = self.hist_per_s.get(second)
            if mine is None:
                mine = self.hist_per_s[second] = hist.new_histogram()
            mine.add(h)
        self.samples.extend(other.samples[: max(0, MAX_ERROR_SAMPLES - len(self.samples))])


class _Tallies:
    """One tally per operation name."""

    def __init__(self, spec: ClientSpec) -> None:
        op_of = getattr(spec, "operation", None)
        self.names = [op_of(i) if op_of else "" for i in range(spec.payload_count)]
        self.by_op: dict[str, _Tally] = {}

    def of(self, index: int) -> _Tally:
        name = self.names[index]
        tally = self.by_op.get(name)
        if tally is None:
            tally = self.by_op[name] = _Tally()
        return tally

    def add(self, other: _Tallies) -> None:
        for name, tally in other.by_op.items():
            self.by_op.setdefault(name, _Tally()).add(tally)

    def total(self) -> _Tally:
        out = _Tally()
        for tally in self.by_op.values():
            out.add(tally)
        return out


@dataclass(frozen=True)
class _Schedule:
    warmup: float
    duration: float
    max_requests_per_user: int
    ready_timeout: float
    # Open loop: each user sends every `user_interval` seconds (0: closed loop), starting at
    # offset (user number) / rate so that the users' sends interleave evenly.
    user_interval: float = 0.0
    rate: float = 0.0

    def first_send(self, t_start: float, user: int) -> float:
        return t_start + (user / self.rate if self.rate else 0.0)


def _tally_json(tally: _Tally) -> dict[str, Any]:
    return {
        "ok": tally.ok,
        "errors": dict(tally.errors),
        "samples": tally.samples,
        "histogram": hist.encode(tally.hist),
        "ok_per_s": dict(tally.ok_per_s),
        "errors_per_s": dict(tally.errors_per_s),
        "histogram_per_s": {s: hist.encode(h) for s, h in sorted(tally.hist_per_s.items())},
    }


def _result(tallies: _Tallies, cpu: float, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        **_tally_json(tallies.total()),
        "ops": {name: _tally_json(t) for name, t in tallies.by_op.items()},
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
    tallies = _Tallies(spec)
    cpu: dict[str, float] = {}

    async def user(u: int) -> None:
        n = first_user + u
        next_at = sched.first_send(t_start, n)
        for _ in range(sched.max_requests_per_user):
            now = time.monotonic()
            if sched.user_interval:
                # Open loop: wait for the intended send time; latency counts from it, so a
                # late send (the server was slow) is charged to the server, not dropped.
                if next_at > now:
                    await asyncio.sleep(next_at - now)
                now, next_at = next_at, next_at + sched.user_interval
            if now >= t_end:
                return
            measured = now >= t_warm
            second = int(now - t_warm)
            index = n % spec.payload_count
            t0 = time.perf_counter_ns() - int((time.monotonic() - now) * 1e9)
            try:
                await client.call(index)  # type: ignore[misc]
            except Exception as exc:
                if measured:
                    tallies.of(index).failure(client.classify(exc), exc, second)
                if not sched.user_interval:
                    await asyncio.sleep(0.005)  # no hot loop against a failing server
            else:
                if measured:
                    tallies.of(index).success((time.perf_counter_ns() - t0) // 1000, second)
            n += stride

    async def cpu_window() -> None:
        await asyncio.sleep(max(0.0, t_warm - time.monotonic()))
        cpu["start"] = time.process_time()
        await asyncio.sleep(max(0.0, t_end - time.monotonic()))
        cpu["end"] = time.process_time()

    await asyncio.sleep(max(0.0, t_start - time.monotonic()))
    await asyncio.gather(cpu_window(), *(user(u) for u in range(users)))
    await client.close()  # type: ignore[misc]
    return _result(tallies, cpu["end"] - cpu["start"], {"mode": "async", "users": users})


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
    tallies = [_Tallies(spec) for _ in range(users)]

    def user(u: int) -> None:
        mine = tallies[u]
        n = first_user + u
        time.sleep(max(0.0, t_start - time.monotonic()))
        next_at = sched.first_send(t_start, n)
        for _ in range(sched.max_requests_per_user):
            now = time.monotonic()
            if sched.user_interval:
                if next_at > now:
                    time.sleep(next_at - now)
                now, next_at = next_at, next_at + sched.user_interval
            if now >= t_end:
                return
            measured = now >= t_warm
            second = int(now - t_warm)
            index = n % spec.payload_count
            t0 = time.perf_counter_ns() - int((time.monotonic() - now) * 1e9)
            try:
                client.call(index)
            except Exception as exc:
                if measured:
                    mine.of(index).failure(client.classify(exc), exc, second)
                if not sched.user_interval:
                    time.sleep(0.005)
            else:
                if measured:
                    mine.of(index).success((time.perf_counter_ns() - t0) // 1000, second)
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
    total = _Tallies(spec)
    for mine in tallies:
        total.add(mine)
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
    rate: float | None = None,
) -> LoadOutcome:
    """Drive `spec` at `concurrency` users spread over up to `processes` workers.

    Closed loop by default (each user sends when its previous answer came). With `rate`
    (requests per second, all users together) the load is open loop: each user sends every
    concurrency / rate seconds whatever the answers, and latency counts from the intended
    send time (no coordinated omission); `concurrency` then bounds the requests in flight.

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
        user_interval=concurrency / rate if rate else 0.0,
        rate=rate or 0.0,
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
        operations=merge_operations([r.get("ops", {}) for r in results.values()]),
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


def merge_operations(parts: Sequence[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Add up the workers' per-operation tallies (histograms merged, per-second counts summed;
    second keys become ints again after pickling through JSON-like dicts)."""
    names = sorted({name for part in parts for name in part})
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        items = [part[name] for part in parts if name in part]
        errors: Counter[str] = Counter()
        ok_per_s: Counter[int] = Counter()
        errors_per_s: Counter[int] = Counter()
        samples: list[str] = []
        per_s: dict[int, list[str]] = {}
        for item in items:
            for second, encoded in item.get("histogram_per_s", {}).items():
                per_s.setdefault(int(second), []).append(encoded)
            errors.update(item["errors"])
            ok_per_s.update({int(k): v for k, v in item["ok_per_s"].items()})
            errors_per_s.update({int(k): v for k, v in item["errors_per_s"].items()})
            samples.extend(item["samples"])
        out[name] = {
            "ok": sum(item["ok"] for item in items),
            "errors": dict(errors),
            "samples": samples[:MAX_ERROR_SAMPLES],
            "histogram": hist.encode(hist.merge(item["histogram"] for item in items)),
            "ok_per_s": dict(sorted(ok_per_s.items())),
            "errors_per_s": dict(sorted(errors_per_s.items())),
            "histogram_per_s": {
                second: hist.encode(hist.merge(parts)) for second, parts in sorted(per_s.items())
            },
        }
    return out
