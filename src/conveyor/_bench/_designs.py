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
import contextlib
import json
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from .._runtime._sched import realtime_thread, set_realtime
from ..backends import open_device
from ._measure import DeviceClock, Result, Span, Timeline, cpu_seconds
from ._workload import Workload, finish, lower_priority, prepare, prepare_in_worker

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
        trace: keep conveyor's Chrome trace on its Result (``trace``) to be written there.
        run_ns: for a simulated device, its modelled time per run: spans that other
            processes report are cut to it, as :class:`DeviceClock` does here (what a
            process reports also counts its own late wake-up after the run).
        exclude: processes (with their children) whose CPU time is not the design's.
        background: conveyor's preparing processes run at idle priority
            (``stage(..., background=True)``).
        realtime: the SCHED_FIFO priority of every design's device thread (0: none); see
            :func:`conveyor._runtime._sched.set_realtime`. ``sequential`` has no device
            thread of its own and runs at normal priority.
    """

    device: str
    work: Workload
    items: int
    workers: int
    warmup: int = 16
    progress: Progress = field(default=lambda n: None)
    trace: Path | None = None
    run_ns: int | None = None
    exclude: tuple[int, ...] = ()
    background: bool = True
    realtime: int = 0

    def cap(self, spans: list[Span]) -> list[Span]:
        """``spans`` cut to :attr:`run_ns` where it is known."""
        if self.run_ns is None:
            return spans
        return [(s, min(e, s + self.run_ns)) for s, e in spans]


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
        self.clock = DeviceClock(self.device, self.runner, timeline)

    def __enter__(self) -> DeviceClock:
        return self.clock

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


def _warm(setup: Setup, clock: DeviceClock) -> None:
    """Run a few items through every step in this thread, then forget their spans."""
    for i in range(setup.warmup):
        finish(setup.work, i, clock.run(prepare(setup.work, i)))
    clock.forget()


def _result(
    name: str, setup: Setup, done: _Done, start: int, cpu0: float, timeline: Timeline, notes: str
) -> Result:
    end = time.monotonic_ns()
    cpu = cpu_seconds(setup.exclude) - cpu0
    done.flush()
    return Result(name, len(done.latencies), start, end, done.latencies, cpu, timeline, notes)


# --- the device alone -----------------------------------------------------------------


def device_alone(setup: Setup, runs: int | None = None) -> Result:
    """The physical bound: the model run back to back on one input, nothing else.

    For a simulated device this also sets ``setup.run_ns`` (see :class:`Setup`).
    """
    timeline = Timeline()
    runs = runs or max(100, setup.items // 4)
    with realtime_thread(setup.realtime), _Device(setup, timeline) as clock:
        tensor = prepare(setup.work, 0)
        for _ in range(5):
            clock.run(tensor)
        clock.forget()
        lat: list[int] = []
        cpu0 = cpu_seconds(setup.exclude)
        start = time.monotonic_ns()
        for _ in range(runs):
            t = time.monotonic_ns()
            clock.run(tensor)
            lat.append(time.monotonic_ns() - t)
        end = time.monotonic_ns()
        cpu = cpu_seconds(setup.exclude) - cpu0
        if clock.simulated:
            durations = sorted(e - s for s, e in clock.spans)
            setup.run_ns = durations[len(durations) // 2]
    return Result(
        "device_alone",
        runs,
        start,
        end,
        lat,
        cpu,
        timeline,
        "the model back to back on one input, one thread",
    )


# --- tutorial designs -----------------------------------------------------------------


def sequential(setup: Setup) -> Result:
    """One loop: prepare, run, finish, one item after another."""
    timeline = Timeline()
    work = setup.work
    done = _Done(setup)
    cpu_track = timeline.track("loop: prepare, finish")  # one thread does both
    with _Device(setup, timeline) as clock:
        _warm(setup, clock)
        cpu0 = cpu_seconds(setup.exclude)
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
    cpu_track = timeline.track("event loop: prepare, finish")

    async def worker(
        source: Iterator[int], clock: DeviceClock, executor: ThreadPoolExecutor
    ) -> None:
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

    tasks: list[asyncio.Task[None]] = []

    async def main(clock: DeviceClock) -> None:
        with ThreadPoolExecutor(1, thread_name_prefix="device", initializer=set_realtime,
                                initargs=(setup.realtime,)) as executor:
            source = iter(range(setup.items))
            tasks.extend(asyncio.ensure_future(worker(source, clock, executor))
                         for _ in range(depth))
            await asyncio.gather(*tasks)

    with _Device(setup, timeline) as clock:
        _warm(setup, clock)
        cpu0 = cpu_seconds(setup.exclude)
        start = time.monotonic_ns()
        _run_loop(main(clock), tasks)
        return _result(
            "asyncio",
            setup,
            done,
            start,
            cpu0,
            timeline,
            f"{depth} coroutines, device via run_in_executor (1 thread)",
        )


def _run_loop(main: Coroutine[Any, Any, None], tasks: list[asyncio.Task[None]]) -> None:
    """``asyncio.run(main)``, where ``main`` starts ``tasks``. The bench's SIGTERM raises
    KeyboardInterrupt inside whichever task runs, which asyncio then logged as "Task
    exception was never retrieved", with its traceback: here every task's end is
    collected before the interrupt goes on."""
    loop = asyncio.new_event_loop()
    try:
        top = loop.create_task(main)
        try:
            loop.run_until_complete(top)
        except BaseException:
            left = [t for t in (top, *tasks) if not t.done()]
            for t in left:
                t.cancel()
            with contextlib.suppress(BaseException):
                loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
            for t in (top, *tasks):
                if t.done() and not t.cancelled():
                    t.exception()  # retrieved: it is the one being raised
            raise
    finally:
        loop.close()


_END = None


class _Handoff:
    """CPU threads -> bounded queue -> one device thread -> bounded queue -> the caller.

    On an error (or Ctrl-C) anywhere, ``failed`` is set: producers stop at their next item,
    the device thread and the caller keep draining until every end marker has passed, so
    no thread stays blocked on a full queue; the first error is raised by :meth:`run`.
    """

    def __init__(
        self, setup: Setup, clock: DeviceClock, timeline: Timeline, producers: int, size: int
    ) -> None:
        self.setup = setup
        self.clock = clock
        self.timeline = timeline
        self.producers = producers
        self.inq: queue.Queue[Any] = queue.Queue(size)
        self.outq: queue.Queue[Any] = queue.Queue(size)
        self.failed = threading.Event()
        self.errors: list[BaseException] = []
        self._source = iter(range(setup.items))
        self._source_lock = threading.Lock()

    def _fail(self, exc: BaseException) -> None:
        self.errors.append(exc)
        self.failed.set()

    def _produce(self, done: _Done, track: list[Span]) -> None:
        work = self.setup.work
        lower_priority(work.nice)
        try:
            while not self.failed.is_set():
                with self._source_lock:
                    i = next(self._source, -1)
                if i < 0:
                    break
                t0 = done.t_in[i] = time.monotonic_ns()
                x = prepare(work, i)
                track.append((t0, time.monotonic_ns()))
                self.inq.put((i, x))
        except BaseException as exc:
            self._fail(exc)
        finally:
            self.inq.put(_END)

    def _device(self) -> None:
        set_realtime(self.setup.realtime)  # this thread ends with the design
        ended = 0
        while ended < self.producers:
            item = self.inq.get()
            if item is _END:
                ended += 1
            elif not self.failed.is_set():
                try:
                    i, x = item
                    self.outq.put((i, self.clock.run(x)))
                except BaseException as exc:
                    self._fail(exc)
        self.outq.put(_END)

    def run(self, done: _Done) -> None:
        """Start the threads, finish every result in this thread, join; blocks till the end."""
        threads = [
            threading.Thread(
                target=self._produce,
                args=(done, self.timeline.track(f"cpu thread {w}")),
                name=f"bench-cpu-{w}",
                daemon=True,  # joined below; daemon only so a second Ctrl-C can still exit
            )
            for w in range(self.producers)
        ]
        threads.append(threading.Thread(target=self._device, name="bench-device", daemon=True))
        for thread in threads:
            thread.start()
        track = self.timeline.track("main")
        try:
            while (item := self.outq.get()) is not _END:
                if self.failed.is_set():
                    continue
                i, outs = item
                began = time.monotonic_ns()
                finish(self.setup.work, i, outs)
                track.append((began, time.monotonic_ns()))
                done.done(i)
        except BaseException as exc:
            self._fail(exc)
            while self.outq.get() is not _END:
                pass
        finally:
            for thread in threads:
                thread.join()
        if self.errors:
            raise self.errors[0]


def _thread_design(setup: Setup, name: str, producers: int) -> Result:
    timeline = Timeline()
    done = _Done(setup)
    size = 2 * producers
    with _Device(setup, timeline) as clock:
        _warm(setup, clock)
        cpu0 = cpu_seconds(setup.exclude)
        start = time.monotonic_ns()
        _Handoff(setup, clock, timeline, producers, size).run(done)
        cpu_threads = f"{producers} CPU thread{'s' if producers > 1 else ''}"
        return _result(
            name,
            setup,
            done,
            start,
            cpu0,
            timeline,
            f"{cpu_threads} + 1 device thread, queues of {size}",
        )


def threads(setup: Setup) -> Result:
    """A CPU thread prepares items, a device thread runs them, the caller finishes them;
    they hand items on through queues of 2."""
    return _thread_design(setup, "threads", 1)


def threads_queues(setup: Setup) -> Result:
    """``setup.workers`` CPU threads prepare items into a bounded queue (2 per worker); one
    device thread runs them into another; the caller finishes them."""
    return _thread_design(setup, "threads_queues", setup.workers)


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
    timeline.track("device")
    for tid in sorted(names):
        name = names[tid]
        if name.startswith("device"):
            timeline.add("device", spans.get(tid, []))
        elif spans.get(tid):  # the inference stage's threads record no spans of their own
            timeline.add(name.split(" (pid")[0], spans[tid])
    return timeline


def _measured_part(path: Path, start_us: float) -> bytes:
    """A conveyor trace file without the warm-up: its spans that begin before ``start_us``
    (the measured window's start, on the trace's clock) are left out."""
    data = json.loads(path.read_text())
    data["traceEvents"] = [
        ev for ev in data["traceEvents"] if ev.get("ph") != "X" or ev["ts"] >= start_us
    ]
    return json.dumps(data).encode()


def conveyor_design(
    setup: Setup,
    name: str = "conveyor",
    pre_workers: int | None = None,
    inflight: int = 3,
    maxsize: int = 8,
) -> Result:
    """conveyor's pipeline: a process stage of ``workers`` prepares items, the inference
    stage runs them in the device worker process, the caller finishes them in order."""
    from .._pipeline import Pipeline, infer, stage

    work = setup.work
    n = pre_workers or setup.workers
    done = _Done(setup)
    main_track: list[Span] = []
    with ExitStack() as stack:
        # Recorded in a file of the bench's own, which it reads back for the timeline;
        # the caller writes it where --trace says (a pipe there was read from, and hung).
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="conveyor-bench-"))
        trace = Path(tmp) / "trace.json"
        before = time.monotonic_ns()
        pipe = Pipeline(
            stage(partial(prepare_in_worker, work), workers=n, kind="process", name="preprocess",
                  background=setup.background),
            infer(work.model, device=setup.device, realtime=setup.realtime),
            maxsize=maxsize,
            inflight=inflight,
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

            cpu0 = cpu_seconds(setup.exclude)
            start = time.monotonic_ns()
            for i, outs in enumerate(pipe.map(source())):
                t = time.monotonic_ns()
                finish(work, i, outs)
                main_track.append((t, time.monotonic_ns()))
                done.done(i)
            result = _result(
                name,
                setup,
                done,
                start,
                cpu0,
                Timeline(),
                f"{n} pre-processing processes{' (background)' if setup.background else ''}"
                " + device worker process, finish in the caller",
            )
        result.timeline = _read_trace(trace, t0)
        if setup.trace is not None:
            result.trace = _measured_part(trace, (start - t0) / 1e3)
    device = result.timeline.track("device")
    inside = sum(1 for s, e in device if before <= s and e <= result.end_ns)
    if device and inside < 0.9 * len(device):
        raise RuntimeError(
            "the conveyor trace's times do not line up with this run: has the trace "
            "format's time origin changed?"
        )
    result.timeline.add("device calls", device)
    device[:] = setup.cap(device)
    result.timeline.add("main", main_track)
    return result


def usable_cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
