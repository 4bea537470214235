"""The engine behind :class:`conveyor.Pipeline`: channels, stage workers, the device link.

Data path: feeder -> channel -> stage workers -> channel -> ... -> last stage -> run.
Thread stages run the function in the worker thread. Process stages and the inference
stage have one parent thread per in-flight item, which only moves data to and from a
child process (the GIL is held for microseconds per item), so CPU-bound user code in a
stage never sits between the device and its next request.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .._errors import (
    ConveyorError,
    InputError,
    ServerGone,
    StageError,
    WorkerDiedError,
    WorkerStartError,
    describe_exception,
)
from ._channel import Aborted, Channel
from ._run import CANCEL, DROP, ERR, OK, Run
from ._stats import DeviceStats, StageStats, Tracer
from ._wire import PeerClosed, Unpicklable
from ._workers import ProcWorker, pickle_function

if TYPE_CHECKING:
    from .._device._worker import DeviceWorker

__all__ = ["Core", "Item", "StageDef"]

log = logging.getLogger("conveyor.pipeline")


@dataclass
class StageDef:
    """A stage as :func:`conveyor.stage` or :func:`conveyor.infer` describes it."""

    kind: str  # "thread" | "process" | "infer"
    name: str
    workers: int
    fn: Callable[[Any], Any] | None = None
    background: bool = False
    model: str = ""
    device: str = "cpu"
    server: str | None = None
    deadline: float | None = None
    priority: int = 0
    dequantize: bool = False
    with_context: bool = False
    realtime: int = 0


class Item:
    __slots__ = ("index", "run", "t0", "value")

    def __init__(self, run: Run, index: int, value: Any) -> None:
        self.run = run
        self.index = index
        self.value = value
        self.t0 = time.monotonic_ns()


class _Failed(Exception):
    def __init__(self, exc: BaseException, tb: str) -> None:
        self.exc = exc
        self.tb = tb


def _pair_inputs(value: Any, stage: str) -> Any:
    """The inputs of an ``(inputs, context)`` item of a ``with_context`` stage."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return value[0]
    raise InputError(
        f"stage {stage!r} has with_context=True: each item must be an (inputs, context) "
        f"pair, got {_describe_value(value)}")


def _describe_value(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of shape {list(value.shape)} and dtype {value.dtype}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__}"


def _cancel_all(pending: Any) -> None:
    """Cancel the items of a process worker's (item, start) queue and empty it."""
    for it, _ in pending:
        it.run.deliver(it.index, CANCEL)
    pending.clear()


class _DeviceLink:
    """The inference stage's way to a device: a private device worker, or a server."""

    def __init__(self, d: StageDef, inflight: int) -> None:
        from .._device._client import DeviceClient

        self.defn = d
        self._lock = threading.Lock()
        self._inflight = inflight
        self.worker: DeviceWorker | None = None
        self.stats = DeviceStats((d.server and f"server:{d.server}") or d.device)
        self.gen = 0
        self.closing = False
        if d.server is not None:
            self.client = DeviceClient(path=d.server, reconnect=True, name=f"pipeline:{d.name}",
                                       reader=True)
        else:
            self.worker = self._spawn()
            self.client = self.worker.client
        try:
            self.model = self.client.model_info(d.model).name if d.server is None else d.model
            self._note_scheduling()
        except BaseException:
            # Nothing else holds this link yet: its worker would hold the device for ever.
            self.close()
            raise

    def _spawn(self) -> DeviceWorker:
        from .._device._worker import DeviceWorker

        d = self.defn
        return DeviceWorker(d.device, [d.model], max_inflight=self._inflight + 2,
                            realtime=d.realtime)

    def _note_scheduling(self) -> None:
        devices = self.client.welcome.get("devices") or [{}]
        self.stats.scheduling = str(devices[0].get("scheduling", "normal"))
        choice = (devices[0].get("choices") or {}).get(self.model) or {}
        self.stats.runs_on = str(choice.get("device") or devices[0].get("spec")
                                 or self.stats.spec)

    def _restart(self, gen: int) -> None:
        with self._lock:
            if gen != self.gen or self.closing:
                return
            old = self.worker
            assert old is not None
            try:  # a worker that died has usually not been reaped yet: say how it ended
                old.process.proc.wait(timeout=0.2)
            except Exception:
                pass
            log.warning("device worker pid %d for %s %s; restarting it", old.pid,
                        self.defn.device, old.process.describe_exit())
            old.process.kill()
            old.client.close()
            self.worker = self._spawn()
            self.client = self.worker.client
            self._note_scheduling()
            self.gen += 1
            self.stats.restarts += 1

    def submit(self, value: Any) -> tuple[Any, int]:
        """Queue one inference without waiting: returns (future, link generation).

        Blocks only while the client has its whole credit in flight. Raises ServerGone
        (the worker is gone: restart and submit again), InputError, ModelNotFoundError.
        """
        d = self.defn
        with self._lock:
            client, gen = self.client, self.gen
        fut = client.submit(d.model, value, deadline=d.deadline, priority=d.priority,
                            dequantize=d.dequantize)
        return fut, gen

    def restart(self, gen: int) -> bool:
        """Replace a dead private worker (once per generation). False for a server link,
        while closing, or if the new worker fails to start (that is logged)."""
        if self.worker is None or self.closing:
            return False
        try:
            self._restart(gen)
        except ConveyorError:
            log.exception("could not restart the device worker for %s", self.defn.device)
            return False
        return True

    def close(self) -> None:
        self.closing = True
        with self._lock:
            if self.worker is not None:
                self.worker.close()
            else:
                self.client.close()


class Core:
    """Owns every channel, thread and process of one pipeline."""

    def __init__(
        self,
        stages: list[StageDef],
        *,
        maxsize: int,
        live: bool,
        trace: Tracer | None,
        inflight: int,
    ) -> None:
        self.defs = stages
        self.maxsize = maxsize
        self.live = live
        self.tracer = trace
        self.inflight = inflight
        self.closing = False
        self.started_ns = time.monotonic_ns()
        self.closed_ns = 0
        # The first channel is filled by the feeder alone: it wakes the feeder once it is
        # half empty, not at every item taken (one wake-up per item costs CPU the stages need).
        self.channels: list[Channel[Item]] = [
            Channel(maxsize, drop_oldest=(live and i == 0),
                    refill_at=maxsize // 2 if i == 0 and not live else None)
            for i in range(len(stages))
        ]
        names: dict[str, int] = {}
        self.stats: list[StageStats] = []
        for d in stages:
            n = names.get(d.name, 0)
            names[d.name] = n + 1
            label = d.name if n == 0 else f"{d.name}#{n + 1}"
            d.name = label
            workers = inflight if d.kind == "infer" else d.workers
            self.stats.append(StageStats(label, d.kind, workers))
        self.threads: list[threading.Thread] = []
        self.procs: dict[int, list[ProcWorker | None]] = {}
        self.links: dict[int, _DeviceLink] = {}
        self._lock = threading.Lock()
        self._credit = [inflight] * len(stages)
        self._credit_cv = threading.Condition()

    # --- start and stop -------------------------------------------------------------

    def start(self) -> None:
        """Start every worker; on any failure stop what started and raise."""
        try:
            starters: list[threading.Thread] = []
            errors: list[BaseException] = []

            def guarded(fn: Callable[[], None]) -> Callable[[], None]:
                def run() -> None:
                    try:
                        fn()
                    except BaseException as exc:
                        errors.append(exc)
                return run

            for si, d in enumerate(self.defs):
                if d.kind == "process":
                    assert d.fn is not None
                    blob = pickle_function(d.fn, d.name)
                    self.procs[si] = [None] * d.workers
                    for w in range(d.workers):
                        starters.append(threading.Thread(
                            target=guarded(functools.partial(self._spawn_proc, si, w, blob,
                                                             d.name)), daemon=True))
                elif d.kind == "infer":
                    starters.append(threading.Thread(
                        target=guarded(functools.partial(self._open_link, si, d)), daemon=True))
            for t in starters:
                t.start()
            for t in starters:
                t.join()
            if errors:
                raise errors[0]
            for si, d in enumerate(self.defs):
                # An inference stage has a thread of its own only as the first stage;
                # later ones are entered by the stage before (see _forward).
                count = (1 if si == 0 else 0) if d.kind == "infer" else d.workers
                for w in range(count):
                    t = threading.Thread(target=self._worker_loop, args=(si, w),
                                         name=f"conveyor-{d.name}-{w}", daemon=True)
                    self.threads.append(t)
                    t.start()
        except BaseException:
            self.close()
            raise

    def _spawn_proc(self, si: int, w: int, blob: bytes, name: str) -> None:
        self.procs[si][w] = ProcWorker(blob, name, background=self.defs[si].background)

    def _open_link(self, si: int, d: StageDef) -> None:
        self.links[si] = _DeviceLink(d, self.inflight)

    def close(self) -> None:
        """Stop everything: wake blocked threads, end child processes, join. Idempotent."""
        with self._lock:
            if self.closing:
                return
            self.closing = True
        with self._credit_cv:
            self._credit_cv.notify_all()
        for ch in self.channels:
            for item in ch.abort():
                item.run.deliver(item.index, CANCEL)
        stoppers = []
        for workers in self.procs.values():
            for pw in workers:
                if pw is not None:
                    stoppers.append(threading.Thread(target=pw.close, daemon=True))
        for link in self.links.values():
            stoppers.append(threading.Thread(target=link.close, daemon=True))
        for t in stoppers:
            t.start()
        # Workers get 0.5 s to exit before SIGKILL; a thread stuck in a stage function
        # cannot be stopped at all, so it is waited for only until close() has used 0.8 s.
        deadline = time.monotonic() + 0.8
        for t in stoppers:
            t.join(max(0.0, deadline - time.monotonic()))
        for t in self.threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
        self.closed_ns = time.monotonic_ns()
        if self.tracer is not None:
            self.tracer.write()

    # --- admission ------------------------------------------------------------------

    def admit(self, run: Run, index: int, value: Any) -> None:
        """Put one item into the first channel (blocks while full, unless live)."""
        item = Item(run, index, value)
        if self.live:
            dropped = self.channels[0].put(item)
            if dropped is not None:
                self._drop(dropped)
        else:
            self.channels[0].put(item, cancelled=lambda: run.cancelled)

    def admit_live(self, run: Run, index: int, value: Any) -> None:
        """Live mode: admit one item now, never waiting (see :meth:`_admit_live_full`)."""
        if run.acquire(block=False):
            self.admit(run, index, value)
        else:
            self._admit_live_full(run, index, value)

    def _admit_live_full(self, run: Run, index: int, value: Any) -> None:
        """Live mode, no token free: drop the oldest item of this run still waiting and
        admit the new one in its place, or drop the new one if none is waiting."""
        run.force_admit()
        victim = self.channels[0].pop_oldest_if(lambda it: it.run is run)
        if victim is None:
            with self.stats[0].lock:
                self.stats[0].dropped += 1
            run.deliver(index, DROP)
            return
        self._drop(victim)
        self.admit(run, index, value)

    def _drop(self, item: Item) -> None:
        with self.stats[0].lock:
            self.stats[0].dropped += 1
        item.run.deliver(item.index, DROP)

    def feed(self, run: Run, source: Iterable[Any] | Iterator[Any]) -> None:
        """Feeder thread body: pull from ``source`` lazily and admit each item.

        Blocks on ``next(source)`` and, outside live mode, on a free token and room in
        the first channel. Ends when the source ends or fails, or the run is cancelled.
        """
        index = 0
        it: Iterator[Any] | None = None
        try:
            it = iter(source)
            while not run.cancelled and not self.closing:
                if self.live:
                    got = run.acquire(block=False)
                elif run.acquire():
                    got = True
                else:
                    break
                try:
                    value = next(it)
                except StopIteration:
                    if got:
                        run.release_token()
                    break
                except Exception as exc:
                    if not got:
                        run.force_admit()
                    self._source_failed(run, index, exc)
                    index += 1
                    break
                if got:
                    self.admit(run, index, value)
                else:
                    self._admit_live_full(run, index, value)
                index += 1
        except Aborted:
            pass
        except Exception as exc:  # iter(source) itself failed
            run.force_admit()
            self._source_failed(run, index, exc)
            index += 1
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    pass
            run.finish(index)

    def _source_failed(self, run: Run, index: int, exc: BaseException) -> None:
        err = StageError("source", index, f"the input iterator raised {describe_exception(exc)}",
                         "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        err.__cause__ = exc
        run.deliver_last(index, ERR, err)

    # --- stage workers --------------------------------------------------------------

    def _call(self, si: int, w: int, item: Item, track: int) -> Any:
        """Run a thread stage's function on one item (in this worker thread)."""
        d = self.defs[si]
        assert d.fn is not None
        start = time.monotonic_ns()
        try:
            return d.fn(item.value)
        except BaseException as exc:
            # SystemExit or KeyboardInterrupt raised by the function itself (signals reach
            # only the main thread) fails the item, as a worker process exiting would: the
            # thread must live on, or every item after it would wait forever.
            raise _Failed(exc, traceback.format_exc()) from None
        finally:
            if self.tracer is not None:
                self.tracer.span(track, d.name, start, time.monotonic_ns(), item=item.index)

    def _replace_proc(self, si: int, w: int, count: bool = True) -> None:
        d = self.defs[si]
        old = self.procs[si][w]
        if old is not None:
            old.close(kill=True)
        if count:
            with self.stats[si].lock:
                self.stats[si].restarts += 1
        assert d.fn is not None
        self.procs[si][w] = None
        if self.closing:
            return
        try:
            new = ProcWorker(pickle_function(d.fn, d.name), d.name, background=d.background)
        except WorkerStartError:
            log.exception("could not replace a worker of stage %r", d.name)
            return
        with self._lock:
            # close() may have run while the new worker started: then it is ours to stop.
            if not self.closing:
                self.procs[si][w] = new
                return
        new.close(kill=True)

    # --- the inference stage: submit without waiting, finish in the reply callback ----

    def _take_credit(self, si: int) -> bool:
        with self._credit_cv:
            while self._credit[si] <= 0:
                if self.closing:
                    return False
                self._credit_cv.wait()
            if self.closing:
                return False
            self._credit[si] -= 1
            return True

    def _give_credit(self, si: int) -> None:
        with self._credit_cv:
            self._credit[si] += 1
            self._credit_cv.notify()

    def _take(self, si: int, block: bool = True) -> Item | None:
        """The next item for stage ``si`` whose run is still wanted, counted as in; None
        with ``block`` False when nothing waits. Raises Aborted when the pipeline closes."""
        inq = self.channels[si]
        while True:
            item = inq.get() if block else inq.try_get()
            if item is None:
                return None
            if self._count_in(si, item):
                return item

    def _count_in(self, si: int, item: Item) -> bool:
        """Count ``item`` into stage ``si``; False (and cancelled) if its run has gone."""
        if item.run.cancelled:
            item.run.deliver(item.index, CANCEL)
            return False
        with self.stats[si].lock:
            self.stats[si].items_in += 1
        return True

    def _infer_loop(self, si: int) -> None:
        """One thread per inference stage: take items and submit them, keeping up to
        ``inflight`` requests at the device. Results are finished in the client's reply
        callback (:meth:`_infer_done`), so no thread waits per request."""
        while True:
            try:
                item = self._take(si)
            except Aborted:
                return
            assert item is not None
            if not self._enter_infer(si, item):
                return
            del item

    def _enter_infer(self, si: int, item: Item) -> bool:
        """Wait for the stage's device credit and submit ``item``; False (and the item
        cancelled) when the pipeline closes meanwhile."""
        if not self._take_credit(si):
            item.run.deliver(item.index, CANCEL)
            return False
        self._infer_submit(si, item, time.monotonic_ns(), 0)
        return True

    def _infer_submit(self, si: int, item: Item, start: int, attempt: int) -> None:
        d = self.defs[si]
        link = self.links[si]
        try:
            value = _pair_inputs(item.value, d.name) if d.with_context else item.value
            fut, gen = link.submit(value)
        except ServerGone as exc:
            if attempt == 0 and link.restart(link.gen):
                self._infer_submit(si, item, start, 1)
                return
            self._infer_failed(si, item, start, exc)
            return
        except Exception as exc:  # InputError and the like: this item fails, not the thread
            self._infer_failed(si, item, start, exc)
            return
        fut.add_done_callback(functools.partial(self._infer_done, si, item, start, gen, attempt))

    def _infer_failed(self, si: int, item: Item, start: int, exc: BaseException) -> None:
        self._give_credit(si)
        if self.closing:
            item.run.deliver(item.index, CANCEL)
            return
        self._stage_failed(si, item, start, exc, "".join(
            traceback.format_exception(type(exc), exc, exc.__traceback__)))

    def _infer_done(self, si: int, item: Item, start: int, gen: int, attempt: int,
                    fut: Any) -> None:
        """Reply callback (runs in the client's reader thread)."""
        link = self.links[si]
        exc = fut.exception()
        if exc is not None:
            if isinstance(exc, ServerGone) and attempt == 0 and not self.closing \
                    and link.restart(gen):
                self._infer_submit(si, item, start, 1)
                return
            self._infer_failed(si, item, start, exc)
            return
        self._give_credit(si)
        d = self.defs[si]
        outs = fut.result()
        timing = fut.timing
        if timing is not None:
            link.stats.record(timing.start_ns, timing.compute_ns)
            if self.tracer is not None:
                track = self.tracer.track(self._device_track(si))
                self.tracer.span(track, link.model, timing.start_ns,
                                 timing.start_ns + timing.compute_ns, item=item.index)
        self.stats[si].record(True, time.monotonic_ns() - start)
        item.value = (outs, item.value[1]) if d.with_context else outs
        self._forward(si + 1, item)

    def _device_track(self, si: int) -> str:
        """The trace track of stage ``si``'s device: ``device SPEC``, and the stage's name
        too when the pipeline has more than one inference stage (each has its worker)."""
        name = f"device {self.links[si].stats.spec}"
        return name if len(self.links) == 1 else f"{name}: {self.defs[si].name}"

    # --- process stages: one parent thread per worker, two tasks in flight ---------

    def _proc_loop(self, si: int, w: int, track: int) -> None:
        """Feed worker ``w`` of process stage ``si``, keeping its next task queued in its
        socket so that it never waits for the parent between items."""
        from collections import deque

        d = self.defs[si]
        st = self.stats[si]
        pending: deque[tuple[Item, int]] = deque()
        while True:
            if not self._proc_top_up(si, w, pending, block=True):
                return
            if not pending:
                continue
            item, start = pending[0]
            pw = self.procs[si][w]
            assert pw is not None
            try:
                ok, value, tb, t0, t1 = pw.receive(item.index)
            except WorkerDiedError as exc:
                if self.closing:
                    _cancel_all(pending)
                    return
                pending.popleft()
                with st.lock:
                    st.restarts += 1
                self._stage_failed(si, item, start, exc, "")
                del item
                # The worker held only the first item; the rest never started: resend them.
                self._replace_proc(si, w, count=False)
                if not self._proc_resend(si, w, pending):
                    return
                continue
            pending.popleft()
            if self.tracer is not None:
                self.tracer.span(track, d.name, t0, t1, item=item.index)
            # Queue the worker's next task before handing this result on: the next stage
            # may block (device credit, a full channel) and the worker must not wait.
            if not self._proc_top_up(si, w, pending, block=False):
                item.run.deliver(item.index, CANCEL)
                return
            # The item's time in the stage is the worker's own time on it: the task
            # queued behind another in the worker's socket has not started yet.
            busy = t1 - t0 if t1 > t0 > 0 else time.monotonic_ns() - start
            if ok:
                st.record(True, busy)
                item.value = value
                self._forward(si + 1, item)
            else:
                self._stage_failed(si, item, start, value, tb, busy)
            # Hold nothing while waiting for the next result: an item keeps its run (and
            # a submit() run its pipeline) alive.
            del item, value

    def _proc_resend(self, si: int, w: int, pending: Any) -> bool:
        """Send the tasks in ``pending`` again, to a replacement worker."""
        retry = list(pending)
        pending.clear()
        return all(self._proc_send(si, w, it, pending, t) for it, t in retry)

    def _proc_top_up(self, si: int, w: int, pending: Any, block: bool) -> bool:
        """Send worker ``w`` tasks until two are outstanding. With ``block``, wait for an
        item while the worker has none. False when the pipeline is closing (what was
        pending is then cancelled)."""
        while len(pending) < 2:
            try:
                item = self._take(si, block=block and not pending)
            except Aborted:
                _cancel_all(pending)
                return False
            if item is None:
                return True
            if not self._proc_send(si, w, item, pending):
                _cancel_all(pending)
                return False
        return True

    def _proc_send(self, si: int, w: int, item: Item, pending: Any,
                   start: int | None = None) -> bool:
        """Send ``item`` to worker ``w``; False when the pipeline is closing."""
        pw = self.procs[si][w]
        if pw is None or (not pending and not pw.alive):
            if pw is not None:  # it died (killed, crashed) while idle: that costs no item
                log.warning("worker pid %d of stage %r died while idle (%s); replacing it",
                            pw.pid, self.defs[si].name, pw.process.describe_exit())
            self._replace_proc(si, w)
            pw = self.procs[si][w]
        try:
            if pw is None:
                raise WorkerStartError(f"stage {self.defs[si].name!r} has no worker")
            pw.send(item.index, item.value)
        except Unpicklable as exc:  # this item fails; the worker never saw it
            cause = exc.__cause__ or exc
            self._stage_failed(si, item, start or time.monotonic_ns(), cause,
                               f"the item could not be sent to a worker process: {exc}\n")
            return True
        except (OSError, PeerClosed, WorkerStartError) as exc:
            if self.closing:
                item.run.deliver(item.index, CANCEL)
                return False
            if isinstance(exc, WorkerStartError):
                self._stage_failed(si, item, start or time.monotonic_ns(), exc, "")
                return True
            # The worker is gone; receive() on the earlier tasks reports it. Queue this one
            # to be resent to the replacement.
        pending.append((item, start if start is not None else time.monotonic_ns()))
        return True

    def _stage_failed(self, si: int, item: Item, start: int, exc: BaseException,
                      tb: str, busy_ns: int | None = None) -> None:
        self.stats[si].record(False, time.monotonic_ns() - start if busy_ns is None else busy_ns)
        err = StageError(self.defs[si].name, item.index, describe_exception(exc), tb)
        err.__cause__ = exc
        item.run.deliver(item.index, ERR, err)

    def _forward(self, si: int, item: Item) -> None:
        """Hand ``item`` on to stage ``si`` (past the last: to its run).

        An inference stage after another stage is entered directly, in the calling
        thread: it waits for the device's credit and submits, with no channel and no
        thread switch between the two stages.
        """
        run = item.run
        if si >= len(self.defs):
            run.deliver(item.index, OK, item.value)
            return
        if self.defs[si].kind == "infer":
            if self._count_in(si, item):
                self._enter_infer(si, item)
            return
        try:
            self.channels[si].put(item, cancelled=lambda: run.cancelled)
        except Aborted:
            run.deliver(item.index, CANCEL)

    def _worker_loop(self, si: int, w: int) -> None:
        d = self.defs[si]
        if d.kind == "infer":
            self._infer_loop(si)
            return
        st = self.stats[si]
        track = 0
        if self.tracer is not None:
            suffix = ""
            if d.kind == "process" and self.procs[si][w] is not None:
                suffix = f" (pid {self.procs[si][w].pid})"  # type: ignore[union-attr]
            track = self.tracer.track(f"{d.name} #{w}{suffix}")
        if d.kind == "process":
            self._proc_loop(si, w, track)
            return
        while True:
            try:
                item = self._take(si)
            except Aborted:
                return
            assert item is not None
            start = time.monotonic_ns()
            try:
                item.value = self._call(si, w, item, track)
            except _Failed as f:
                self._stage_failed(si, item, start, f.exc, f.tb)
            else:
                st.record(True, time.monotonic_ns() - start)
                self._forward(si + 1, item)
            del item  # see _proc_loop

    # --- observation ----------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        now = self.closed_ns or time.monotonic_ns()  # a closed pipeline's figures stay put
        elapsed = (now - self.started_ns) / 1e9
        stages = {}
        for si, st in enumerate(self.stats):
            stages[st.name] = st.snapshot(len(self.channels[si]), elapsed)
            if si in self.links:  # an inference stage's worker is its device worker
                stages[st.name]["restarts"] = self.links[si].stats.restarts
        devices = {self.defs[si].name: self.links[si].stats.snapshot(now, self.started_ns)
                   for si in sorted(self.links)}  # in stage order: the first is "device"
        return {"elapsed_s": elapsed, "stages": stages, "devices": devices}
