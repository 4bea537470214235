"""The designs in one process, one function each: the device alone, the four designs that
tutorials teach, and conveyor's pipeline.

Each is the best honest version of its design: bounded queues, one thread on the device,
as many CPU workers as cores, post-processing in the consuming thread (as conveyor's
scenario does it). Each opens the device once, warms up on a few items outside the
measured window, and closes the device before returning, so the next design can open it
(a simulated or real Edge TPU belongs to one process at a time).
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..backends import open_device
from ._measure import DeviceClock, Result, Span, Timeline, cpu_seconds
from ._workload import Workload, finish, prepare

__all__ = [
    "Setup",
    "asyncio_design",
    "conveyor_design",
    "device_alone",
    "sequential",
    "threads",
    "threads_queues",
]

Progress = Callable[[int], None]
#: Progress is reported every this many items (a tqdm update is cheap, not free).
PROGRESS_EVERY = 32


@dataclass
class Setup:
    """What every design gets.

    Attributes:
        device: the device spec (``cpu``, ``sim-edgetpu``...).
        work: the per-item workload.
        items: items in the measured window.
        workers: CPU workers where a design has several (default: the usable cores).
        warmup: items run before the window (caches, worker start-up).
        progress: called with a count of items just completed.
        trace: where conveyor's scenario writes its Chrome trace (None: a temporary file).
    """

    device: str
    work: Workload
    items: int
    workers: int
    warmup: int = 16
    progress: Progress = field(default=lambda n: None)
    trace: Path | None = None


class _Done:
    """Completion bookkeeping for the thread that sees results: latencies and progress."""

    def __init__(self, setup: Setup) -> None:
        self.t_in = [0] * setup.items
        self.latencies: list[int] = []
        self._progress = setup.progress
        self._pending = 0

    def done(self, index: int) -> None:
        self.latencies.append(time.monotonic_ns() - self.t_in[index])
        self._pending += 1
        if self._pending >= PROGRESS_EVERY:
            self._progress(self._pending)
            self._pending = 0

    def flush(self) -> None:
        if self._pending:
            self._progress(self._pending)
            self._pending = 0


class _Device:
    """The device opened in this process for one design; closed on exit."""

    def __init__(self, setup: Setup, timeline: Timeline) -> None:
        self._stack = ExitStack()
        self.device = open_device(setup.device)
        self._stack.callback(self.device.close)
        try:
            self.runner = self.device.load(setup.work.model)
        except BaseException:
            self._stack.close()
            raise
        self._stack.callback(self.runner.close)
        self.clock = DeviceClock(self.device, self.runner, timeline.track("device"))

    def __enter__(self) -> DeviceClock:
        return self.clock

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


def _warm(setup: Setup, clock: DeviceClock) -> None:
    """Run a few items through every step in this thread, then forget their spans."""
    for i in range(setup.warmup):
        finish(setup.work, i, clock.run(prepare(setup.work, i)))
    clock.spans.clear()


def _result(name: str, setup: Setup, done: _Done, start: int, cpu0: float,
            timeline: Timeline, notes: str) -> Result:
    end = time.monotonic_ns()
    cpu = cpu_seconds() - cpu0
    done.flush()
    return Result(name, len(done.latencies), start, end, done.latencies, cpu, timeline, notes)


# --- the device alone -----------------------------------------------------------------


def device_alone(setup: Setup, runs: int | None = None) -> Result:
    """The physical bound: the model run back to back on one input, nothing else."""
    timeline = Timeline()
    runs = runs or max(100, setup.items // 4)
    with _Device(setup, timeline) as clock:
        tensor = prepare(setup.work, 0)
        for _ in range(5):
            clock.run(tensor)
        clock.spans.clear()
        lat: list[int] = []
        cpu0 = cpu_seconds()
        start = time.monotonic_ns()
        for _ in range(runs):
            t = time.monotonic_ns()
            clock.run(tensor)
            lat.append(time.monotonic_ns() - t)
        end = time.monotonic_ns()
        cpu = cpu_seconds() - cpu0
    return Result("device_alone", runs, start, end, lat, cpu, timeline,
                  "the model back to back on one input, one thread")


# --- tutorial designs -----------------------------------------------------------------


def sequential(setup: Setup) -> Result:
    """One loop: prepare, run, finish, one item after another."""
    timeline = Timeline()
    work = setup.work
    done = _Done(setup)
    cpu_track = timeline.track("main")
    with _Device(setup, timeline) as clock:
        _warm(setup, clock)
        cpu0 = cpu_seconds()
        start = time.monotonic_ns()
        for i in range(setup.items):
            t0 = done.t_in[i] = time.monotonic_ns()
            x = prepare(work, i)
            t1 = time.monotonic_ns()
            outs = clock.run(x)
            t2 = time.monotonic_ns()
            finish(work, i, outs)
            cpu_track += ((t0, t1), (t2, time.monotonic_ns()))
            done.done(i)
        return _result("sequential", setup, done, start, cpu0, timeline, "one loop")


def asyncio_design(setup: Setup, depth: int = 4) -> Result:
    """Coroutines in one event loop: each prepares an item in the loop, awaits the device
    in a one-thread executor (``loop.run_in_executor``), and finishes it in the loop.

    ``depth`` coroutines run at once, so the device works on one item while the loop
    prepares the next.
    """
    timeline = Timeline()
    work = setup.work
    done = _Done(setup)
    cpu_track = timeline.track("event loop")

    async def worker(source: Iterator[int], clock: DeviceClock,
                     executor: ThreadPoolExecutor) -> None:
        loop = asyncio.get_running_loop()
        for i in source:
            t0 = done.t_in[i] = time.monotonic_ns()
            x = prepare(work, i)
            t1 = time.monotonic_ns()
            outs = await loop.run_in_executor(executor, clock.run, x)
            t2 = time.monotonic_ns()
            finish(work, i, outs)
            cpu_track.extend(((t0, t1), (t2, time.monotonic_ns())))
            done.done(i)

    async def main(clock: DeviceClock) -> None:
        with ThreadPoolExecutor(1, thread_name_prefix="device") as executor:
            source = iter(range(setup.items))
            await asyncio.gather(*(worker(source, clock, executor) for _ in range(depth)))

    with _Device(setup, timeline) as clock:
        _warm(setup, clock)
        cpu0 = cpu_seconds()
        start = time.monotonic_ns()
        asyncio.run(main(clock))
        return _result("asyncio", setup, done, start, cpu0, timeline,
                       f"{depth} coroutines, device via run_in_executor (1 thread)")


_END = None


def _device_thread(clock: DeviceClock, inq: queue.Queue[Any], outq: queue.Queue[Any],
                   producers: int) -> None:
    """Run the model on each item from ``inq``; pass one end marker on after ``producers``."""
    ended = 0
    while ended < producers:
        item = inq.get()
        if item is _END:
            ended += 1
            continue
        i, x = item
        outq.put((i, clock.run(x)))
    outq.put(_END)


def _consume(setup: Setup, done: _Done, outq: queue.Queue[Any], track: list[Span]) -> None:
    """The calling thread: finish each result until the end marker."""
    while (item := outq.get()) is not _END:
        i, outs = item
        t = time.monotonic_ns()
        finish(setup.work, i, outs)
        track.append((t, time.monotonic_ns()))
        done.done(i)


def threads(setup: Setup) -> Result:
    """A CPU thread prepares items, a device thread runs them, the caller finishes them;
    hand-offs through queues of size 2."""
    timeline = Timeline()
    work = setup.work
    done = _Done(setup)
    inq: queue.Queue[Any] = queue.Queue(2)
    outq: queue.Queue[Any] = queue.Queue(2)
    cpu_track = timeline.track("cpu thread")

    def produce() -> None:
        for i in range(setup.items):
            t0 = done.t_in[i] = time.monotonic_ns()
            x = prepare(work, i)
            cpu_track.append((t0, time.monotonic_ns()))
            inq.put((i, x))
        inq.put(_END)

    with _Device(setup, timeline) as clock:
        _warm(setup, clock)
        cpu0 = cpu_seconds()
        start = time.monotonic_ns()
        ts = [threading.Thread(target=produce, name="bench-cpu"),
              threading.Thread(target=_device_thread, args=(clock, inq, outq, 1),
                               name="bench-device")]
        for t in ts:
            t.start()
        _consume(setup, done, outq, timeline.track("main"))
        for t in ts:
            t.join()
        return _result("threads", setup, done, start, cpu0, timeline,
                       "1 CPU thread + 1 device thread, queues of 2")


def threads_queues(setup: Setup) -> Result:
    """``workers`` CPU threads prepare items into a bounded queue; one device thread runs
    them into another; the caller finishes them."""
    timeline = Timeline()
    work = setup.work
    done = _Done(setup)
    n = setup.workers
    inq: queue.Queue[Any] = queue.Queue(2 * n)
    outq: queue.Queue[Any] = queue.Queue(2 * n)
    source = iter(range(setup.items))
    source_lock = threading.Lock()

    def produce(track: list[Span]) -> None:
        while True:
            with source_lock:
                i = next(source, -1)
            if i < 0:
                break
            t0 = done.t_in[i] = time.monotonic_ns()
            x = prepare(work, i)
            track.append((t0, time.monotonic_ns()))
            inq.put((i, x))
        inq.put(_END)

    with _Device(setup, timeline) as clock:
        _warm(setup, clock)
        cpu0 = cpu_seconds()
        start = time.monotonic_ns()
        ts = [threading.Thread(target=produce, args=(timeline.track(f"cpu thread {w}"),),
                               name=f"bench-cpu-{w}") for w in range(n)]
        ts.append(threading.Thread(target=_device_thread, args=(clock, inq, outq, n),
                                   name="bench-device"))
        for t in ts:
            t.start()
        _consume(setup, done, outq, timeline.track("main"))
        for t in ts:
            t.join()
        return _result("threads_queues", setup, done, start, cpu0, timeline,
                       f"{n} CPU threads + 1 device thread, queues of {2 * n}")


# --- conveyor -------------------------------------------------------------------------


def _read_trace(path: Path, t0_ns: int) -> Timeline:
    """The device track and the pre-processing worker tracks of a conveyor trace file."""
    data = json.loads(path.read_text())
    names: dict[int, str] = {}
    spans: dict[int, list[Span]] = {}
    for ev in data["traceEvents"]:
        if ev.get("ph") == "M" and ev.get("name") == "thread_name":
            names[ev["tid"]] = ev["args"]["name"]
        elif ev.get("ph") == "X":
            start = t0_ns + int(ev["ts"] * 1e3)
            spans.setdefault(ev["tid"], []).append((start, start + int(ev["dur"] * 1e3)))
    timeline = Timeline()
    for tid in sorted(names):
        name = names[tid]
        label = "device" if name.startswith("device") else name.split(" (pid")[0]
        timeline.add(label, spans.get(tid, []))
    return timeline


def conveyor_design(setup: Setup, name: str = "conveyor",
                    pre_workers: int | None = None) -> Result:
    """conveyor's pipeline: a process stage of ``workers`` prepares items, the inference
    stage runs them in the device worker process, the caller finishes them in order."""
    from .._pipeline import Pipeline, infer, stage

    work = setup.work
    n = pre_workers or setup.workers
    done = _Done(setup)
    main_track: list[Span] = []
    with ExitStack() as stack:
        if setup.trace is not None:
            trace = setup.trace
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="conveyor-bench-"))
            trace = Path(tmp) / "trace.json"
        before = time.monotonic_ns()
        pipe = Pipeline(
            stage(partial(prepare, work), workers=n, kind="process", name="preprocess"),
            infer(work.model, device=setup.device),
            maxsize=8,
            trace=trace,
        )
        # The trace's clock starts when the pipeline is made: within these two readings.
        t0 = (before + time.monotonic_ns()) // 2
        with pipe:
            for _ in pipe.map(range(setup.warmup)):
                pass

            def source() -> Iterator[int]:
                for i in range(setup.items):
                    done.t_in[i] = time.monotonic_ns()
                    yield i

            cpu0 = cpu_seconds()
            start = time.monotonic_ns()
            for i, outs in enumerate(pipe.map(source())):
                t = time.monotonic_ns()
                finish(work, i, outs)
                main_track.append((t, time.monotonic_ns()))
                done.done(i)
            result = _result(name, setup, done, start, cpu0, Timeline(),
                             f"{n} pre-processing processes + device worker process, "
                             f"finish in the caller")
        result.timeline = _read_trace(trace, t0)
    result.timeline.add("main", main_track)
    return result


def tensor_nbytes(x: npt.NDArray[Any]) -> int:
    """Bytes of one model input (for the report)."""
    return int(np.asarray(x).nbytes)


def usable_cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
