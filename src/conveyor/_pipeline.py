"""Pipeline, stage() and infer(): composition and the sync, asyncio and futures faces."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import gc
import inspect
import os
import sys
import threading
import warnings
import weakref
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import Any, Literal

from ._errors import ConveyorError, DeviceBusyError, PipelineClosedError, StageError
from ._runtime._channel import Aborted
from ._runtime._core import Core, StageDef
from ._runtime._proc import worker_bootstrap
from ._runtime._run import CANCEL, DROP, ERR, OK, SIGNAL_CHECK_S, Run
from ._runtime._sched import check_realtime
from ._runtime._stats import Tracer

__all__ = ["Pipeline", "infer", "stage"]

#: Started pipelines not yet closed: closed at interpreter exit (see _close_at_exit).
_OPEN: weakref.WeakSet[Pipeline] = weakref.WeakSet()


#: The interpreter is exiting (set by _close_at_exit): a map() or amap() that the close
#: of its pipeline ends then, in a daemon thread, raises SystemExit, which ends the thread
#: without a word (a PipelineClosedError was printed at every exit), and does not look
#: like an input that ended either.
_exiting = False


def _close_at_exit() -> None:
    """Close the pipelines a program left open (a global ``pipe`` never closed, say)
    while threads can still start: the interpreter's own clean-up would find them
    later, in ``__del__``, when starting a thread no longer returns."""
    global _exiting
    _exiting = True
    for pipe in list(_OPEN):
        pipe._unclosed()


atexit.register(_close_at_exit)

OnError = Literal["raise", "skip", "return"]


def _notify_cancel(fut: Future[Any]) -> None:
    """A submit() Future's done-callback: a Future cancelled (by its caller, or by live
    mode) tells the waiters of ``wait()`` and ``as_completed()``, which only
    ``set_running_or_notify_cancel`` reaches, as an executor does before it would run it."""
    if fut.cancelled():
        with contextlib.suppress(RuntimeError):  # told already
            fut.set_running_or_notify_cancel()


def _call_if_alive(method: weakref.WeakMethod[Any], index: int, kind: str,
                   value: Any) -> None:
    fn = method()
    if fn is not None:
        fn(index, kind, value)


def _check_count(what: str, value: object) -> None:
    """Raise unless ``value`` is an int of at least 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{what} must be at least 1, got {value}")


def stage(
    fn: Callable[[Any], Any],
    *,
    workers: int = 1,
    kind: Literal["thread", "process"] = "thread",
    name: str | None = None,
    background: bool = False,
) -> StageDef:
    """A CPU stage: ``fn`` applied to every item by ``workers`` threads or processes.

    ``kind="process"`` runs ``fn`` in worker processes, away from the GIL of the caller
    and of the device link: use it for CPU-bound Python. The function must be picklable
    (defined at the top level of an importable module); numpy arrays in its argument and
    result travel through shared memory. A script that uses process stages must guard its
    entry point with ``if __name__ == "__main__":``, as with multiprocessing.

    ``background=True`` (process stages only) runs the workers at the lowest CPU priority
    (Linux ``SCHED_IDLE``): the device worker and the pipeline's own threads take a core
    from them the moment they wake, so the device never waits for a core behind the CPU
    work feeding it. On a 2-core machine with both cores busy preparing, that wait was
    about 0.2 ms per device run (see BENCHMARKS.md). The workers then get only the CPU
    that no other program wants: leave it off when other CPU-bound programs share the
    machine. Where the OS has no such policy it has no effect. Thread stages cannot have
    it: a thread at idle priority holding the GIL would stall every other thread.
    """
    if kind not in ("thread", "process"):
        raise ValueError(f"kind must be 'thread' or 'process', got {kind!r}")
    if background and kind != "process":
        raise ValueError("background=True needs kind='process' (a thread at idle priority "
                         "would hold the GIL while the others wait)")
    _check_count("workers", workers)
    if not callable(fn):
        raise TypeError(f"stage() needs a callable, got {fn!r}")
    if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            type(fn).__call__):  # a callable object's async __call__
        raise TypeError(f"stage() needs a plain function, and {fn!r} is a coroutine "
                        "function: its calls return coroutines that nothing would await")
    label = name or getattr(fn, "__name__", None) or type(fn).__name__
    return StageDef(kind=kind, name=label, workers=workers, fn=fn, background=background)


def infer(
    model: str | os.PathLike[str],
    *,
    device: str = "cpu",
    server: str | os.PathLike[str] | None = None,
    deadline: float | None = None,
    priority: int = 0,
    dequantize: bool = False,
    with_context: bool = False,
    name: str | None = None,
    realtime: bool | int = False,
) -> StageDef:
    """The inference stage: run ``model`` (bundled name or path) on a device.

    The device is driven by its own worker process, reached through shared memory and
    a Unix socket. With ``server=PATH`` (or ``device="server:PATH"``) the stage uses a
    shared device through ``conveyor serve`` instead, with no other change; a model the
    server does not serve fails the pipeline's start with ModelNotFoundError. Inference
    stages of one pipeline that name the same Edge TPU (real or simulated, or ``auto``)
    share one device worker that loads all their models: the device serves one process.

    Each item is a numpy array (single-input model), a list in model order, or a dict by
    input name; the stage yields the model's outputs as a **list of arrays in model
    order**. With ``with_context=True`` each item is a pair ``(inputs, context)`` and
    the stage yields ``(outputs, context)``, the context passed through untouched (for
    what post-processing needs to know about the frame). ``dequantize=True`` turns
    quantised outputs into float32. ``deadline`` (s)
    and ``priority`` apply to every request (see :meth:`DeviceClient.submit`).

    ``realtime=True`` (or a priority, 1-99) runs the device worker's device thread under
    Linux ``SCHED_FIFO``: it takes a core the moment its run ends, instead of waiting for
    the Python work on the other cores to yield one. On a 2-core machine this raised the
    simulated Edge TPU's duty cycle from 0.91 to 0.96 (BENCHMARKS.md). It needs
    CAP_SYS_NICE or an ``RLIMIT_RTPRIO`` (``ulimit -r``) of at least the priority; without,
    the worker runs at normal priority, logs a warning, and ``stats()["device"]
    ["scheduling"]`` says why (it is ``"fifo:N"`` when in force). For a server
    (``server=``), start the server with ``conveyor serve --realtime`` instead.

    Raises:
        TypeError: ``model`` is neither a name nor a path.
        ValueError: ``realtime`` out of range, or given with ``server``; InputError (a
            ValueError) for a ``deadline`` that is not a number or a ``priority`` that is
            not a 32-bit int.
    """
    from ._device._client import check_deadline, check_priority

    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a bundled model's name or a file path, got "
                        f"{type(model).__name__}")
    check_deadline(deadline)
    priority = check_priority(priority)
    spec = str(device)
    if server is not None and not os.fspath(server):
        raise ValueError("server= is an empty path (None for a device worker of the "
                         "pipeline's own; device='server:' for the default socket)")
    if spec.startswith("server:"):
        server = spec[len("server:"):] or None
        if server is None:
            from ._device._client import default_socket_path

            server = default_socket_path()
    level = check_realtime(realtime)
    if level and server is not None:
        raise ValueError("realtime= applies to a pipeline's own device worker; a server's "
                         "device threads get it from `conveyor serve --realtime`")
    return StageDef(
        kind="infer", name=name or os.path.basename(str(model)).removesuffix(".tflite"),
        workers=1, model=str(model), device=spec,
        server=None if server is None else str(server),
        deadline=deadline, priority=priority, dequantize=dequantize,
        with_context=with_context, realtime=level,
    )


_ITEM, _END, _ERR = 0, 1, 2


class _FromAsync:
    """An async iterable read from the feeder thread as an iterator.

    One task on ``loop`` iterates the source (in the context of the task that made this:
    its contextvars, and one task for a source's ``asyncio.timeout``) and hands each item
    over one at a time, awaiting room; the feeder thread takes them with ``next()``. No
    executor thread waits for anything. :meth:`cancel` (the run is over) ends both sides.
    """

    def __init__(self, source: AsyncIterable[Any], loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._cond = threading.Condition()
        self._handed: deque[tuple[int, Any]] = deque()
        self._room: asyncio.Future[None] | None = None  # the pump's wait for the taker
        self._cancelled = False
        self._task = loop.create_task(self._pump(source))

    async def _pump(self, source: AsyncIterable[Any]) -> None:
        try:
            it = aiter(source)
            async for value in it:
                while True:
                    with self._cond:
                        if not self._handed:
                            self._handed.append((_ITEM, value))
                            self._cond.notify()
                            break
                        self._room = room = self._loop.create_future()
                    try:
                        await room
                    except BaseException:
                        # Cancelled here, between two items: the source is closed now, as
                        # a plain `async for` that is cancelled closes it. Left to itself,
                        # it stayed open (a camera held) until a garbage collection: this
                        # frame, kept by the task's error, kept it.
                        aclose = getattr(it, "aclose", None)
                        if aclose is not None:
                            with contextlib.suppress(Exception):
                                await aclose()
                        raise
            end: tuple[int, Any] = (_END, None)
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            # Python 3.11+ says whether this task is being cancelled; on 3.10, a cancel
            # not asked by cancel() is taken as the source's own (the loop's cancel of
            # every task at its end comes when nobody reads the outcome any more).
            cancelling = getattr(task, "cancelling", None)
            if not (self._cancelled or (cancelling is not None and cancelling())):
                end = (_ERR, exc)  # the source's own, not a cancel of this task
            else:
                with self._cond:
                    self._handed.append((_END, None))
                    self._cond.notify()
                raise
        except BaseException as exc:  # SystemExit too: the source's, not the loop's
            end = (_ERR, exc)
        with self._cond:
            self._handed.append(end)
            self._cond.notify()

    def __iter__(self) -> _FromAsync:
        return self

    def __next__(self) -> Any:
        with self._cond:
            while not self._handed:
                if self._cancelled or self._loop.is_closed():
                    raise StopIteration
                self._cond.wait(SIGNAL_CHECK_S)
            kind, value = self._handed[0]
            if kind == _ITEM:
                self._handed.popleft()
            room, self._room = self._room, None
        if room is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed
                self._loop.call_soon_threadsafe(_wake, room)
        if kind == _END:
            raise StopIteration
        if kind == _ERR:
            raise value
        return value

    def cancel(self) -> None:
        """From the loop: stop the source's task and the taker."""
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()
        self._task.cancel()


class _ItemFuture(Future[Any]):
    """submit()'s Future: in a forked child, waiting for an outcome that only the
    parent's threads can bring raises RuntimeError (it waited for ever, or timed out)."""

    def __init__(self) -> None:
        super().__init__()
        self._pid = os.getpid()

    def _refuse_forked(self) -> None:
        if os.getpid() != self._pid and not self.done():
            raise RuntimeError(
                f"this Future belongs to a pipeline of process {self._pid}; a forked child "
                f"cannot wait for it (the parent's threads bring its outcome)")

    def result(self, timeout: float | None = None) -> Any:
        self._refuse_forked()
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._refuse_forked()
        return super().exception(timeout)


def _wake(room: asyncio.Future[None]) -> None:
    if not room.done():
        room.set_result(None)


class Pipeline:
    """Stages run concurrently, joined by bounded channels.

    Args:
        *stages: made by :func:`stage` and :func:`infer`, in order.
        maxsize: the bound of every channel between stages (default 8).
        ordered: results in input order (default), or as they complete.
        on_error: ``"raise"`` (a failed item raises :class:`StageError` where it would
            have been yielded, ending the run), ``"skip"`` (dropped and counted), or
            ``"return"`` (the StageError is yielded in the item's place). It applies to
            ``map`` and ``amap``; a ``submit()`` Future always raises its item's error.
        drop: ``"oldest"`` for live mode: the source never blocks; when
            ``max_in_flight`` items are in flight, the oldest one still waiting for the
            first stage is dropped (counted in ``stats()``), or, if none waits because
            the caller is behind, the oldest result it has not taken (with
            ``on_error="return"`` an error too, since it is taken as a result; with
            "raise" and "skip" errors are kept).
        max_in_flight: items one run may have admitted and not yet consumed. Default:
            enough to fill every channel and worker; in live mode, one per stage plus one.
        inflight: requests an inference stage keeps on the device at once (default 3):
            while one runs, the next waits on the device side.
        trace: a path: record a Chrome trace (one track per worker and per device) and
            write it there when the pipeline closes. A path that cannot be written raises
            its ``OSError`` when the pipeline starts.

    Use it as a context manager; leaving the ``with`` (or :meth:`close`) ends every
    thread and process within about a second. A pipeline collected without being closed
    is closed then, with a ResourceWarning.
    """

    def __init__(
        self,
        *stages: StageDef,
        maxsize: int = 8,
        ordered: bool = True,
        on_error: OnError = "raise",
        drop: Literal["oldest"] | None = None,
        max_in_flight: int | None = None,
        inflight: int = 3,
        trace: str | os.PathLike[str] | None = None,
    ) -> None:
        if not stages:
            raise ValueError("a pipeline needs at least one stage")
        for s in stages:
            if not isinstance(s, StageDef):
                raise TypeError(f"pipeline stages are made by stage() or infer(), got {s!r}")
        if on_error not in ("raise", "skip", "return"):
            raise ValueError(f"on_error must be 'raise', 'skip' or 'return', got {on_error!r}")
        if drop not in (None, "oldest"):
            raise ValueError(f"drop must be None or 'oldest', got {drop!r}")
        _check_count("maxsize", maxsize)
        if max_in_flight is not None:
            _check_count("max_in_flight", max_in_flight)
        _check_count("inflight", inflight)
        self.maxsize = maxsize
        self.ordered = ordered
        self.on_error = on_error
        self.live = drop == "oldest"
        n = len(stages)
        workers = sum(3 if s.kind == "infer" else s.workers for s in stages)
        if max_in_flight is None:
            max_in_flight = n + 1 if self.live else maxsize * n + workers
        self.max_in_flight = max_in_flight
        self._defs = [StageDef(**vars(s)) for s in stages]
        if trace is not None and not os.fspath(trace):
            raise ValueError("trace must be a file's path (or None for no trace), got ''")
        self._tracer = Tracer(trace) if trace is not None else None
        self._inflight = inflight
        self._core: Core | None = None
        self._final: Core | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._close_done = threading.Event()  # set when the first close() has finished
        # close() from another thread while start() runs (under the lock close() waits
        # for): the core being started, whose workers still in their start-up close()
        # ends at once, so that it never waits out a minute's handshake.
        self._close_asked = False
        self._starting: Core | None = None
        self._pid: int | None = None  # the process that started it
        self._closer: threading.Thread | None = None
        self._submit_run: Run | None = None
        self._futures: dict[int, Future[Any]] = {}
        self._submit_index = 0
        self._runs: list[Run] = []
        self._past = [0, 0]  # items admitted and dropped by runs no longer in _runs
        self.skipped = 0

    # --- life cycle -----------------------------------------------------------------

    def start(self) -> Pipeline:
        """Start workers and the device worker (done by ``with`` or the first use).

        Raises the typed error of whatever failed to start (model not found, device
        missing, worker start-up) after stopping everything that had started, or the
        ``OSError`` of a ``trace`` path that cannot be written.
        """
        if worker_bootstrap():
            raise RuntimeError(
                "a pipeline was started while a stage worker process imported your main "
                "module to find its stage function: put the code that makes and runs "
                "pipelines under `if __name__ == \"__main__\":` (process stages import the "
                "main module, as multiprocessing does)")
        with self._lock:
            if self._closed:
                raise PipelineClosedError("the pipeline is closed")
            if self._core is None:
                try:
                    try:
                        core = self._start_core()
                    except DeviceBusyError:
                        # An unclosed pipeline of this program that only a reference cycle
                        # keeps (an exception's traceback, asyncio's tasks) may still hold
                        # the device: collecting it closes it (see __del__). Then once more.
                        before = len(_OPEN)
                        gc.collect()
                        if len(_OPEN) == before:
                            raise
                        core = self._start_core()
                except ConveyorError as exc:
                    if self._close_asked:  # close() cut the start short: say that
                        raise PipelineClosedError(
                            "the pipeline was closed while it started") from exc
                    raise
                self._core = core
                self._pid = os.getpid()
                _OPEN.add(self)
            return self

    def _start_core(self) -> Core:
        if self._tracer is not None:
            self._tracer.check()  # an unwritable path found out before any work is done
        core = Core(self._defs, maxsize=self.maxsize, live=self.live, trace=self._tracer,
                    inflight=self._inflight)
        self._starting = core  # before the look below: a close() from now on sees it
        try:
            if self._close_asked:
                core.abort_start()
            core.start()
        finally:
            self._starting = None
        return core

    def close(self) -> None:
        """End every thread and process; pending futures fail with PipelineClosedError.

        Blocks at most about a second. Idempotent: a second call (another thread's, or
        leaving the ``with`` after a ``close()`` from elsewhere) returns once the first
        has finished, so that ``stats()`` is final then.
        """
        if self._forked():
            # A forked child's copy: its workers and threads are the parent's, and
            # closing would end them for the parent. Only this copy is let go of, without
            # the lock, which a thread of the parent may have held at the fork.
            self._closed = True
            self._core = None
            _OPEN.discard(self)
            self._futures = {}
            return
        self._close_asked = True
        starting = self._starting
        if starting is not None:  # another thread is starting it, under the lock
            starting.abort_start()
        with self._lock:
            second = self._closed
            if not second:
                self._closed = True
                self._closer = threading.current_thread()
                core, self._core = self._core, None
                self._final = core
                _OPEN.discard(self)
                runs = list(self._runs)
                futures, self._futures = self._futures, {}
        if second:
            if self._closer is not threading.current_thread():
                # Not under the lock, which the first close() needs to finish. Bounded:
                # a callback of a Future the first one fails (it runs in the closing
                # thread, or in one that it joins) must not hang.
                self._close_done.wait(2.0)
            return
        try:
            for run in runs:
                run.cancel()
            if core is not None:
                for ch in core.channels:
                    ch.wake()
                core.close()
        finally:
            try:
                for fut in futures.values():
                    if not fut.done():
                        fut.set_exception(PipelineClosedError("the pipeline was closed"))
            finally:
                self._close_done.set()  # a second close() returns with the futures failed

    def __enter__(self) -> Pipeline:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Pipeline:
        """``async with``: starts the pipeline in a thread, so the event loop runs on
        while workers and the device worker start. Cancelled meanwhile, it closes what
        the start made before the cancellation goes on."""
        starting = asyncio.ensure_future(asyncio.to_thread(self.start))
        try:
            await asyncio.shield(starting)
        except asyncio.CancelledError:
            # The start goes on in its thread; close() ends it (start() raises
            # PipelineClosedError, close()'s doing: taken here, or asyncio reports it as
            # never retrieved) and what it started. Nothing is left running when the
            # cancel goes on.
            starting.add_done_callback(lambda t: t.cancelled() or t.exception())
            closing = asyncio.ensure_future(asyncio.to_thread(self.close))
            while not closing.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(closing)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """:meth:`close` in a thread: the event loop runs on meanwhile (close() may take
        up to about a second, waiting for workers and a stuck thread stage). Cancelling
        the await does not stop the close."""
        await asyncio.shield(asyncio.ensure_future(asyncio.to_thread(self.close)))

    def __del__(self) -> None:
        if sys.is_finalizing():
            # Too late to close (no thread starts now); the workers see their lifeline
            # to this process end with it, and exit. Normally _close_at_exit came first.
            return
        self._unclosed()

    def _unclosed(self) -> None:
        if getattr(self, "_pid", None) is not None and self._forked():
            self.close()  # a forked child's copy: let go of it, with nothing to warn of
            return
        if not getattr(self, "_closed", True) and getattr(self, "_core", None) is not None:
            try:
                warnings.warn(f"unclosed {self!r}: use it in a with block or call close()",
                              ResourceWarning, stacklevel=3)
            finally:  # closed even where warnings are errors
                self.close()

    def _forked(self) -> bool:
        """Started, by another process: this is a forked child's copy."""
        return self._pid is not None and self._pid != os.getpid()

    def _refuse_forked(self) -> None:
        if self._forked():
            raise RuntimeError(
                f"this pipeline was started by process {self._pid}; a forked child cannot "
                f"use it (its threads, workers and device worker are the parent's): make a "
                f"new Pipeline in the child")

    def _ensure(self) -> Core:
        self._refuse_forked()
        core = self._core
        if core is None:
            self.start()
            core = self._core
        if core is None or self._closed:
            raise PipelineClosedError("the pipeline is closed")
        return core

    # --- faces ----------------------------------------------------------------------

    @staticmethod
    def _refuse_reentry(core: Core, face: str) -> None:
        """A stage of this pipeline waiting on the pipeline itself could wait for ever
        (for a worker that is itself, or for room its own item takes)."""
        if threading.current_thread() in core.threads:
            raise RuntimeError(f"{face}() called from inside a stage of the same pipeline; "
                               f"use a second pipeline for nested work")

    def _new_run(self, ordered: bool, notify: Callable[[], None] | None = None) -> Run:
        run = Run(ordered, self.max_in_flight, notify, drop_errors=self.on_error == "return")
        with self._lock:
            if self._closed:  # closed since the caller checked: close() never saw this run
                raise PipelineClosedError("the pipeline is closed")
            keep = []
            for r in self._runs:
                if r.complete or r.cancelled:
                    self._past[0] += r.admitted
                    self._past[1] += r.dropped
                else:
                    keep.append(r)
            keep.append(run)
            self._runs = keep
        return run

    def _cancel(self, run: Run, core: Core) -> None:
        run.cancel()
        for ch in core.channels:
            ch.wake()

    def _outcome(self, got: tuple[int, tuple[str, Any]]) -> tuple[bool, Any]:
        """(yield it?, value) for one outcome ``(index, (kind, value))`` of a run; raises
        for on_error='raise'."""
        kind, value = got[1]
        del got
        if kind == OK:
            return True, value
        if kind == ERR:
            assert isinstance(value, StageError)
            if value.stage == "source" or self.on_error == "raise":
                # No frame the traceback keeps may refer to the error: that cycle kept
                # the caller's generator and this pipeline (its workers, the device)
                # alive after the program dropped them, until a garbage collection.
                try:
                    raise value
                finally:
                    del value
            if self.on_error == "skip":
                self.skipped += 1
                return False, None
            return True, value
        return False, None  # DROP, CANCEL

    def map(self, inputs: Iterable[Any]) -> Iterator[Any]:
        """Feed ``inputs`` (consumed lazily, in a feeder thread) and yield results.

        Blocks while waiting for the next result; interruptible by Ctrl-C. Breaking out
        of the loop (or an exception) stops feeding and discards items in flight: an
        item waiting between stages is dropped at once; one that a stage already holds
        finishes that stage first (a process worker holds up to two: the one it runs
        and the next, queued so that it never waits), then is dropped.

        Raises:
            StageError: an item failed (``on_error="raise"``), or the input iterator
                raised (always; ``stage == "source"``).
        """
        core = self._ensure()
        self._refuse_reentry(core, "map")
        run = self._new_run(self.ordered)
        feeder = threading.Thread(target=core.feed, args=(run, inputs),
                                  name="conveyor-feeder", daemon=True)
        feeder.start()
        try:
            while True:
                got = run.take()
                if got is None:
                    if run.cancelled:
                        if _exiting:
                            raise SystemExit("the interpreter exited during map()")
                        raise PipelineClosedError("the pipeline was closed during map()")
                    return
                try:
                    keep, value = self._outcome(got)
                finally:
                    del got  # see _outcome
                if keep:
                    yield value
                    # A forked child resuming the parent's loop: it hung waiting for
                    # threads it does not have, or took an outcome that was the parent's.
                    self._refuse_forked()
        finally:
            if not self._forked():  # (the child's copy holds nothing to let go of)
                self._cancel(run, core)

    async def amap(self, inputs: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
        """The asyncio face of :meth:`map`: ``inputs`` may be an async iterable.

        Never blocks the event loop: a pipeline not yet started starts in a worker
        thread, and results arrive through ``call_soon_threadsafe``. Cancelling the
        consuming task (or leaving the ``async for``) cancels the run.
        """
        if self._core is None and not self._closed:
            await asyncio.to_thread(self.start)  # workers take a while to start
        core = self._ensure()
        self._refuse_reentry(core, "amap")
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()

        def notify() -> None:
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

        run = self._new_run(self.ordered, notify)
        # One feeder thread, whatever the source: an async one is read from it, each item
        # awaited on this loop. Feeding from a task took a thread of the loop's default
        # executor for each wait for room, held while the consumer lagged: with a few
        # streams, aclose() and the program's own to_thread calls queued behind them.
        source = _FromAsync(inputs, loop) if isinstance(inputs, AsyncIterable) else inputs
        threading.Thread(target=core.feed, args=(run, source), name="conveyor-feeder",
                         daemon=True).start()
        try:
            while True:
                got = run.take(block=False)
                if got is None:
                    if run.cancelled:
                        if _exiting:
                            raise SystemExit("the interpreter exited during amap()")
                        raise PipelineClosedError("the pipeline was closed during amap()")
                    if run.complete:
                        return
                    ready.clear()
                    got = run.take(block=False)
                    if got is None:
                        if run.complete or run.cancelled:
                            continue
                        await ready.wait()
                        continue
                try:
                    keep, value = self._outcome(got)
                finally:
                    del got  # see _outcome
                if keep:
                    yield value
                    self._refuse_forked()  # as in map()
        finally:
            if not self._forked():
                self._cancel(run, core)
            if isinstance(source, _FromAsync):
                source.cancel()

    def submit(self, item: Any) -> Future[Any]:
        """Put one item in and return a concurrent.futures.Future of its result.

        Blocks while the first channel is full (backpressure). The Future raises
        StageError if the item fails, PipelineClosedError if the pipeline closes first;
        in live mode (``drop="oldest"``) a dropped item's Future is cancelled.
        ``cancel()`` on the Future succeeds until the outcome is in, and wakes
        ``concurrent.futures.wait()`` and ``as_completed()`` as an executor's does; the
        item itself is not recalled (it runs, and its outcome is dropped).
        Submitted items are numbered in the order of ``submit()`` calls over the
        pipeline's life (0, 1, 2...): a StageError's ``.index`` is that number.
        """
        core = self._ensure()
        self._refuse_reentry(core, "submit")
        fut: Future[Any] = _ItemFuture()
        fut.add_done_callback(_notify_cancel)
        with self._lock:
            if self._closed:
                raise PipelineClosedError("the pipeline is closed")
            if self._submit_run is None:
                # Live mode bounds submitted items in flight as it bounds a run's.
                run = Run(False, self.max_in_flight if self.live else 1 << 62)
                # Weakly: the run lives on in worker threads, and must not keep an
                # unclosed pipeline from being collected (and so closed).
                resolve = weakref.WeakMethod(self._resolve)
                run.on_outcome = lambda i, kind, value: _call_if_alive(resolve, i, kind, value)
                self._submit_run = run
            run = self._submit_run
            index = self._submit_index
            self._submit_index += 1
            self._futures[index] = fut
        try:
            if core.live:
                core.admit_live(run, index, item)
            else:
                run.acquire()  # never waits: a submit() run has tokens to spare
                core.admit(run, index, item)
        except Aborted:  # closed while this call waited for room
            with self._lock:
                self._futures.pop(index, None)
            raise PipelineClosedError("the pipeline was closed during submit()") from None
        return fut

    def _resolve(self, index: int, kind: str, value: Any) -> None:
        with self._lock:
            fut = self._futures.pop(index, None)
        if fut is None or fut.done():
            return
        if kind == OK:
            fut.set_result(value)
        elif kind == ERR:
            fut.set_exception(value)
        elif kind == DROP:  # live mode dropped it: cancelled, as if the caller had
            fut.cancel()  # _notify_cancel wakes wait() and as_completed()
        elif kind == CANCEL:
            fut.set_exception(PipelineClosedError("the pipeline was closed"))

    # --- observation ----------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counts (final once closed), latency and queue depth per stage; device duty cycle.

        Every count covers the pipeline's whole life: all ``map``, ``amap`` and ``submit``
        calls so far (``items``: admitted, dropped in live mode, skipped by
        ``on_error="skip"``); ``elapsed_s`` is the time since it started.

        ``{"elapsed_s", "items": {...}, "stages": {name: {"in", "out", "errors",
        "dropped", "cancelled", "p50_ms", "p99_ms", "queue_depth", ...}}, "devices":
        {stage name: {"duty_cycle", "items_per_s", ...}}, "device": <the first device's
        entry>}``

        Per stage, once nothing is in it (after ``close()``), ``in == out + errors +
        cancelled``: ``cancelled`` counts items that entered the stage but were abandoned
        inside it, such as the tasks a process worker holds, or the requests at the
        device, when the pipeline closes. An item of a run cut short (a ``break``, an
        error with ``on_error="raise"``) that a stage already holds finishes that stage
        (``out``) and is dropped before the next. ``dropped`` (the first stage, live
        mode) counts items dropped before they entered; ``items["dropped"]`` counts those
        and the results dropped unread for a newer frame. Every input of a run is one
        output, one error, one drop or, for a run cut short, not reached.

        A stage's latency is an item's time in it (for a process stage, the worker's own
        time on it). A device's ``duty_cycle`` and ``items_per_s`` are over the
        pipeline's whole life, idle time included; ``duty_cycle_recent`` and
        ``items_per_s_recent`` over the last 5 seconds (what a live pipeline does now).
        Stages that share one device worker (two models on one Edge TPU) each count their
        own model's runs; their entries also give the whole device's ``device_busy_s``,
        ``device_duty_cycle`` and ``device_duty_cycle_recent``, and ``shared_with`` (the
        other stages' names).
        """
        core = self._core or self._final
        if core is None:
            return {"elapsed_s": 0.0, "items": {}, "stages": {}, "devices": {}, "device": None}
        snap = core.snapshot()
        with self._lock:
            runs = list(self._runs)
            admitted = self._past[0] + self._submit_index
            dropped = self._past[1] + (self._submit_run.dropped if self._submit_run else 0)
        snap["items"] = {
            "admitted": admitted + sum(r.admitted for r in runs),
            "dropped": dropped + sum(r.dropped for r in runs),
            "skipped": self.skipped,
        }
        snap["device"] = next(iter(snap["devices"].values()), None)
        return snap

    def __repr__(self) -> str:
        names = ", ".join(d.name for d in self._defs)
        state = "closed" if self._closed else ("running" if self._core else "not started")
        return f"<conveyor.Pipeline [{names}] {state}>"
