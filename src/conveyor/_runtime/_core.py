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
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .._errors import (
    ConveyorError,
    DeviceSpecError,
    InputError,
    ServerGone,
    StageError,
    WorkerDiedError,
    WorkerStartError,
    describe_exception,
)
from ._channel import Aborted, Channel
from ._proc import Spawning
from ._run import CANCEL, DROP, ERR, OK, SIGNAL_CHECK_S, Run
from ._stats import DeviceStats, StageStats, Tracer
from ._wire import NotSent, PeerClosed
from ._workers import ProcWorker, pickle_function

if TYPE_CHECKING:
    from .._device._client import DeviceClient
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


def _auto_takes_tpu(model: Any) -> bool:
    """Whether an ``auto`` device would run ``model`` on an Edge TPU that is present: it
    has an Edge TPU build and the runtime loads (else, or for an ONNX file, it runs it
    elsewhere: see backends/auto.py)."""
    from .._models import resolve_model
    from ..backends.edgetpu import edgetpu_pair, find_edgetpu_library

    try:
        path = resolve_model(model)
        if path.suffix.lower() == ".onnx" or edgetpu_pair(path)[1] is None:
            return False
    except (ConveyorError, OSError):
        return False  # the worker reports it
    return find_edgetpu_library().found


def _distinct_models(models: Iterable[str]) -> list[str]:
    """``models`` without repeats: one model named twice (by name and by path, say) is
    loaded once; a name that does not resolve is kept for the worker to report."""
    from .._models import resolve_model

    seen: dict[Any, str] = {}
    for m in models:
        try:
            key: Any = resolve_model(m).resolve()
        except ConveyorError:
            key = m
        seen.setdefault(key, m)
    return list(seen.values())


def _close_all(clients: list[DeviceClient]) -> None:
    for client in clients:
        client.close()


#: How often (seconds) an idle process stage's thread checks that its worker lives.
IDLE_CHECK_S = 1.0


class _Retries:
    """An inference stage's items whose requests a device worker's death cut short, to
    be run again one at a time (see Core._queue_retry): ``running`` until all have run;
    the stage's new items wait meanwhile (``cv`` is notified when that ends)."""

    def __init__(self) -> None:
        self.cv = threading.Condition()
        self.queue: deque[tuple[Item, int]] = deque()  # (item, start)
        self.running = False


class _Worker:
    """A private device worker, shared by the inference stages that name one exclusive
    device (an Edge TPU serves one process: a second worker could not open it).

    Replaced as a whole when it dies: ``gen`` counts the replacements, so that the
    stages whose requests failed together restart it once.
    """

    def __init__(self, device: str, models: list[str], inflight: int, realtime: int,
                 connections: int, spawning: Spawning | None = None) -> None:
        self.device = device
        self._spawning = spawning
        self._models = models
        self._inflight = inflight
        self._realtime = realtime
        self._connections = connections
        self.lock = threading.Lock()
        self.gen = 0
        self.closing = False
        self.track = f"device {device}"  # its trace track (see Core.start)
        self._replacing = 0  # the pid of the dead worker being replaced (see restart)
        # How the workers of past generations ended ("killed by SIGFPE", ...), by gen.
        self.ends: dict[int, str] = {}
        self.worker = self._spawn()

    @property
    def clients(self) -> list[DeviceClient]:
        """The worker's clients, one per stage that shares it (see DeviceWorker)."""
        return self.worker.clients

    @property
    def pid(self) -> int:
        """The worker process's pid (it changes when the worker is replaced)."""
        return self.worker.pid

    def _spawn(self) -> DeviceWorker:
        from .._device._worker import DeviceWorker

        return DeviceWorker(self.device, self._models, max_inflight=self._inflight + 2,
                            realtime=self._realtime, connections=self._connections,
                            spawning=self._spawning)

    def restart(self, gen: int) -> bool:
        """Replace the dead worker of generation ``gen`` (once: a later call for the same
        generation finds it replaced). False while closing."""
        with self.lock:
            if self.closing:
                return False
            if gen != self.gen:
                return True
            old = self.worker
            try:  # a worker that died has usually not been reaped yet: say how it ended
                old.process.proc.wait(timeout=0.2)
            except Exception:
                pass
            if self._replacing != old.pid:
                log.warning("device worker pid %d for %s %s; restarting it", old.pid,
                            self.device, old.process.describe_exit())
                self._replacing = old.pid
            else:  # its replacement failed to start (the error named it): once more
                log.warning("starting a device worker for %s again", self.device)
            old.process.kill()
            self.ends[self.gen] = f"pid {old.pid} {old.process.describe_exit()}"
            if len(self.ends) > 8:
                del self.ends[min(self.ends)]
            self.worker = self._spawn()
            self.gen += 1
        # Not under the lock: closing a client fails its pending requests, and their
        # stage (another one sharing this worker) comes back to restart() at once, which
        # then finds the worker replaced; under the lock, that thread waited for itself.
        # Nor in this thread: a client's close() waits for its reader, which may be
        # forwarding a reply into a full channel that only this thread's stage empties.
        threading.Thread(target=_close_all, args=(old.clients,), daemon=True,
                         name="conveyor-close-old-worker").start()
        return True

    def close(self) -> None:
        with self.lock:
            if not self.closing:
                self.closing = True
                self.worker.close()


class _DeviceLink:
    """An inference stage's way to a device: a private device worker (shared with the
    pipeline's other stages on that device when it is exclusive), or a server."""

    def __init__(self, d: StageDef, worker: _Worker | None, slot: int = 0) -> None:
        from .._device._client import DeviceClient

        self.defn = d
        self.worker = worker
        self._slot = slot  # which of the worker's connections is this stage's
        self.stats = DeviceStats((d.server and f"server:{d.server}") or d.device)
        self.closing = False
        self._gen = 0  # the generation this link last saw (restarts counted per stage)
        self._client: DeviceClient | None = None
        if d.server is not None:
            self._client = DeviceClient(path=d.server, reconnect=True,
                                        name=f"pipeline:{d.name}", reader=True)
        try:
            client = self.client
            # A model the server does not serve fails here, at start, not on every item.
            self.model = client.model_info(d.model).name
            self._note_scheduling()
        except BaseException:
            # Nothing else holds this link yet: its worker would hold the device for ever.
            self.close()
            raise

    @property
    def client(self) -> DeviceClient:
        if self.worker is not None:
            return self.worker.clients[self._slot]
        assert self._client is not None
        return self._client

    @property
    def gen(self) -> int:
        return 0 if self.worker is None else self.worker.gen

    @property
    def track(self) -> str:
        return f"device {self.stats.spec}" if self.worker is None else self.worker.track

    def _note_scheduling(self) -> None:
        devices = self.client.welcome.get("devices") or [{}]
        self.stats.scheduling = str(devices[0].get("scheduling", "normal"))
        choice = (devices[0].get("choices") or {}).get(self.model) or {}
        self.stats.runs_on = str(choice.get("device") or devices[0].get("spec")
                                 or self.stats.spec)

    def submit(self, value: Any) -> tuple[Any, int]:
        """Queue one inference without waiting: returns (future, worker generation).

        Blocks only while the client has its whole credit in flight. Raises ServerGone
        (the worker is gone: restart and submit again), InputError, ModelNotFoundError.
        """
        d = self.defn
        worker = self.worker
        if worker is None:
            client, gen = self.client, 0
        else:
            with worker.lock:
                client, gen = worker.clients[self._slot], worker.gen
        try:
            fut = client.submit(d.model, value, deadline=d.deadline, priority=d.priority,
                                dequantize=d.dequantize)
        except ServerGone as exc:
            exc.worker_gen = gen  # type: ignore[attr-defined]  # the worker that was gone
            raise
        return fut, gen

    def restart(self, gen: int) -> bool:
        """Replace a dead private worker (once per generation). False for a server link
        or while closing.

        Raises ConveyorError (logged too) if the new worker fails to start: the device
        taken by another process meanwhile, say. The next item tries again.
        """
        if self.worker is None or self.closing:
            return False
        try:
            if not self.worker.restart(gen):
                return False
            if self.worker.gen != self._gen:
                self._gen = self.worker.gen
                self._note_scheduling()
        except ConveyorError as exc:
            if not (self.closing or self.worker.closing):  # (else the close killed it)
                log.warning("could not restart the device worker for %s: %s",
                            self.defn.device, exc)
            raise
        return True

    def close(self) -> None:
        self.closing = True
        if self.worker is not None:
            self.worker.close()  # idempotent; shared workers are closed by each link
        elif self._client is not None:
            self._client.close()


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
        self._retries = [_Retries() for _ in stages]
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
        # Every stage gets a name of its own: "source" is the input iterator's (errors
        # name it), and a name given twice keeps it the first time, then gets "#2",
        # "#3"... past every name of the pipeline (a later stage named "a#2" keeps it).
        taken = {"source", *(d.name for d in stages)}
        kept: set[str] = set()
        self.stats: list[StageStats] = []
        for d in stages:
            label, n = d.name, 1
            if label in kept or label == "source":
                while label in taken:
                    n += 1
                    label = f"{d.name}#{n}"
                taken.add(label)
            else:
                kept.add(label)
            d.name = label
            workers = inflight if d.kind == "infer" else d.workers
            self.stats.append(StageStats(label, d.kind, workers))
        self.threads: list[threading.Thread] = []
        self.procs: dict[int, list[ProcWorker | None]] = {}
        self.links: dict[int, _DeviceLink] = {}
        self._lock = threading.Lock()
        # The item each thread-stage worker is running its function on, by (stage,
        # worker). One still there when close() has waited its time belongs to a thread
        # stuck in the function: close() counts it cancelled, and the thread drops it.
        # No lock: dict.pop is atomic, so whichever of the two pops an entry owns it.
        self._holding: dict[tuple[int, int], Item] = {}
        self._settled = False  # close() has counted the stuck ones: no more are taken
        self._no_worker: dict[int, str] = {}  # why a process stage's last replacement failed
        self._spawning = Spawning()  # worker processes still starting (see close)
        self._credit = [inflight] * len(stages)
        # One condition per stage on one lock: a credit given back must wake a waiter of
        # its own stage (a shared condition's notify() could wake another stage's waiter,
        # which sleeps on, and two inference stages then stalled for good).
        self._credit_lock = threading.Lock()
        self._credit_cvs = [threading.Condition(self._credit_lock) for _ in stages]

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
            for group in self._device_groups():
                starters.append(threading.Thread(
                    target=guarded(functools.partial(self._open_links, group)), daemon=True))
            started: list[threading.Thread] = []
            try:
                for t in starters:
                    t.start()  # may fail (out of threads): the started ones are waited for
                    started.append(t)
            finally:
                for t in started:
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
        worker = ProcWorker(blob, name, background=self.defs[si].background,
                            spawning=self._spawning)
        with self._lock:
            if not self.closing:
                self.procs[si][w] = worker
                return
        worker.close(kill=True)  # close() ran meanwhile: it could not see this one

    def _device_groups(self) -> list[list[int]]:
        """The inference stages by the device worker they use: stages that name the same
        exclusive device (an Edge TPU, real or simulated, or ``auto``, which may pick
        one) share one worker that loads all their models; any other stage has its own
        (two CPU workers run side by side); a stage of a server has none."""
        from ..backends import _discovery, parse_device
        from ..backends._spec import SIM_PROFILES

        groups: dict[Any, list[int]] = {}
        profiles: dict[Any, tuple[str, str]] = {}
        edgetpus: list[Any] | None = None
        held: dict[Any, str] = {}  # Edge TPUs named by an edgetpu stage: its name
        auto_stage = ""
        for si, d in enumerate(self.defs):
            if d.kind != "infer":
                continue
            key: Any = si
            if d.server is None:
                try:
                    spec = parse_device(d.device)
                except ConveyorError:
                    spec = None  # the worker reports it
                if spec is not None and spec.kind in ("edgetpu", "sim-edgetpu", "auto"):
                    # One device, however it is named: edgetpu = edgetpu:0, sim-edgetpu =
                    # sim-edgetpu:0 = sim-edgetpu:usb3 (the default profile).
                    key = (spec.kind, spec.bus, spec.index or 0)
                    if spec.kind == "edgetpu":
                        # edgetpu:N counts every bus, edgetpu:usb:N one: the first USB
                        # Edge TPU may be edgetpu, edgetpu:0 and edgetpu:usb:0 at once.
                        if edgetpus is None:
                            edgetpus = _discovery.discover_edgetpus()
                        found = _discovery.select_edgetpu(spec, edgetpus)
                        if found is not None:
                            key = ("edgetpu", found.bus, found.index)
                            held.setdefault(key, d.name)
                    if spec.kind == "auto" and not auto_stage and _auto_takes_tpu(d.model):
                        auto_stage = d.name
                    profile = spec.profile or SIM_PROFILES[0]
                    seen = profiles.setdefault(key, (profile, d.name))
                    if seen[0] != profile:
                        raise DeviceSpecError(
                            f"inference stages {seen[1]!r} and {d.name!r} name one simulated "
                            f"Edge TPU with two profiles ({d.device!r}: {profile}, the other "
                            f"{seen[0]}); a device has one: name it the same way in both")
            groups.setdefault(key, []).append(si)
        if auto_stage and held:
            # auto takes the first Edge TPU for a model with a build for it (the runtime
            # there): if an edgetpu stage names that device too, two workers would race for
            # it (one start in two failed with DeviceBusyError, the others ran the auto
            # stage on the CPU).
            first = _discovery.select_edgetpu(parse_device("edgetpu"), edgetpus or [])
            named = None if first is None else held.get(("edgetpu", first.bus, first.index))
            if first is not None and named is not None:
                raise DeviceSpecError(
                    f"inference stages {auto_stage!r} (device 'auto') and {named!r} (an "
                    f"Edge TPU) would both take Edge TPU {first.bus}:{first.index}: name "
                    "it the same way in both ('edgetpu' for both, or 'auto' for both), "
                    "or give the auto stage device='cpu'")
        return list(groups.values())

    def _open_links(self, group: list[int]) -> None:
        defs = [self.defs[si] for si in group]
        worker = None
        if defs[0].server is None:
            worker = _Worker(defs[0].device, _distinct_models(d.model for d in defs),
                             self.inflight, max(d.realtime for d in defs), len(defs),
                             self._spawning)
            # One trace track per device worker; two workers on one spec (CPU) apart.
            if sum(d.kind == "infer" and d.server is None and d.device == defs[0].device
                   for d in self.defs) > len(defs):
                worker.track += f": {defs[0].name}"
        for slot, (si, d) in enumerate(zip(group, defs)):
            self.links[si] = _DeviceLink(d, worker, slot)

    def abort_start(self) -> None:
        """From any thread, while :meth:`start` runs in another: end the worker processes
        still in their start-up handshake, so that the start fails at once."""
        self._spawning.abort()

    def close(self) -> None:
        """Stop everything: wake blocked threads, end child processes, join. Idempotent."""
        with self._lock:
            if self.closing:
                return
            self.closing = True
        # Workers still in their start-up handshake (up to a minute) are reachable by
        # nothing else yet: killed now, their starters go on at once.
        self.abort_start()
        with self._credit_lock:
            for cv in self._credit_cvs:
                cv.notify_all()
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
        self._settled = True  # before taking the entries: a thread that adds one later
        for key in list(self._holding):  # sees it and drops its item itself
            held = self._holding.pop(key, None)
            if held is not None:
                self._cancel(key[0], held)  # so stats() is final now, whatever the thread does
        self.closed_ns = time.monotonic_ns()
        if self.tracer is not None:
            self.tracer.write()

    # --- admission ------------------------------------------------------------------

    def admit(self, run: Run, index: int, value: Any) -> None:
        """Put one item into the first channel (blocks while full, unless live)."""
        item = Item(run, index, value)
        if self.live:
            # Only this run's own oldest frame makes room: another run's may be its last.
            dropped = self.channels[0].put(item, own=lambda it: it.run is run)
            if dropped is not None:
                self._drop(dropped.run, dropped.index)
        else:
            self.channels[0].put(item, cancelled=lambda: run.cancelled)

    def admit_live(self, run: Run, index: int, value: Any, hold: bool = False) -> bool:
        """Live mode: admit one item now, never waiting (see :meth:`_admit_live_full`).
        False only with ``hold``, when there was no room: the caller holds the item."""
        if run.acquire(block=False):
            self.admit(run, index, value)
            return True
        return self._admit_live_full(run, index, value, hold)

    def _admit_live_full(self, run: Run, index: int, value: Any, hold: bool) -> bool:
        """Live mode, no token free: drop the oldest item of this run still waiting and
        admit the new one in its place; else, when the caller is behind, the oldest
        result it has not taken (a stale frame); else (every item in flight is inside
        a stage) drop the new one, or with ``hold`` return False: a feeder holds it until
        the next item comes (then it is dropped) or the input ends (then it waits for
        room), so that the input's last item is never the one dropped."""
        run.force_admit()
        # Waiting anywhere: before a slow later stage too, where the oldest frames wait
        # (looked for in the first channel only, results came out ~4 stage times old).
        for si in range(len(self.channels) - 1, -1, -1):
            victim = self.channels[si].pop_oldest_if(lambda it: it.run is run)
            if victim is not None:
                self._drop(run, victim.index, si)
                self.admit(run, index, value)
                return True
        if run.drop_oldest_result():
            self.admit(run, index, value)
            return True
        if hold:
            run.release_token()  # not admitted after all
            return False
        self._drop(run, index)
        return True

    def live_next(self, run: Run, index: int, value: Any,
                  held: tuple[int, Any] | None) -> tuple[int, Any] | None:
        """A feeder's new item in live mode: the item it held is stale now (dropped);
        the new one is admitted, or returned to be held (see :meth:`_admit_live_full`)."""
        if held is not None:
            self._drop_held(run, held[0])
        return None if self.admit_live(run, index, value, hold=True) else (index, value)

    def live_retry(self, run: Run, held: tuple[int, Any] | None,
                   block: bool = False) -> tuple[int, Any] | None:
        """Admit the item a feeder holds if a token is free (waiting for one with
        ``block``); what it still holds. A cancelled run's held item is dropped."""
        if held is None:
            return None
        if run.acquire(block=block):
            self.admit(run, *held)
            return None
        if block or run.cancelled:
            self._drop_held(run, held[0])
            return None
        return held

    def live_let_go(self, run: Run, held: tuple[int, Any] | None) -> None:
        """The feeder stops (cancelled, closing, the input failed): drop what it holds."""
        if held is not None:
            self._drop_held(run, held[0])

    def _drop_held(self, run: Run, index: int) -> None:
        # A held item holds no token: it is admitted without one and dropped (the drop
        # gives one back), so that the run's tokens stay as they were. Dropped as it
        # was, it gave back a token it never took: a room more for good, each time.
        run.force_admit()
        self._drop(run, index)

    def _drop(self, run: Run, index: int, stage: int = 0) -> None:
        """Count item ``index`` dropped before ``stage`` took it, and deliver the drop."""
        with self.stats[stage].lock:
            self.stats[stage].dropped += 1
        run.deliver(index, DROP)

    def feed(self, run: Run, source: Iterable[Any] | Iterator[Any]) -> None:
        """Feeder thread body: pull from ``source`` lazily and admit each item.

        Blocks on ``next(source)`` and, outside live mode, on a free token and room in
        the first channel. Ends when the source ends or fails, or the run is cancelled.
        """
        index = 0
        it: Iterator[Any] | None = None
        held: tuple[int, Any] | None = None  # live mode: see _admit_live_full
        try:
            it = iter(source)
            while not run.cancelled and not self.closing:
                # Live mode looks for a free token once the item is there, not before
                # waiting for it: tokens free up meanwhile, and a stale look dropped
                # items (the last one of the input too) with room for them.
                if not self.live and not run.acquire():
                    break
                held = self.live_retry(run, held)
                try:
                    value = next(it)
                except StopIteration:
                    if not self.live:
                        run.release_token()
                    held = self.live_retry(run, held, block=True)
                    break
                except BaseException as exc:  # SystemExit too: a cut-short input, not an end
                    self.live_let_go(run, held)
                    held = None
                    if self.live and not run.acquire(block=False):
                        run.force_admit()
                    self._source_failed(run, index, exc)
                    index += 1
                    break
                if self.live:
                    held = self.live_next(run, index, value, held)
                else:
                    self.admit(run, index, value)
                index += 1
        except Aborted:
            pass
        except BaseException as exc:  # iter(source) itself failed
            run.force_admit()
            self._source_failed(run, index, exc)
            index += 1
        finally:
            self.live_let_go(run, held)
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
                self.tracer.span(track, d.name, start, time.monotonic_ns(), item.index)

    def _replace_if_dead(self, si: int, w: int, missing: bool = True) -> None:
        """Replace worker ``w`` of stage ``si`` if it died while idle (that costs no item),
        or, with ``missing``, if it is missing (its replacement failed to start: the idle
        check does not try again every second, an item does)."""
        pw = self.procs[si][w]
        if self.closing or (pw is not None and pw.alive) or (pw is None and not missing):
            return  # (closing: the close stops the workers)
        if pw is not None:
            log.warning("worker pid %d of stage %r died while idle (%s); replacing it",
                        pw.pid, self.defs[si].name, pw.process.describe_exit())
        self._replace_proc(si, w)

    def _replace_proc(self, si: int, w: int, count: bool = True) -> None:
        d = self.defs[si]
        old = self.procs[si][w]
        if old is not None:
            old.close(kill=True)
        self.procs[si][w] = None
        if self.closing:  # (a worker stopped by close() is no restart)
            return
        if count:
            with self.stats[si].lock:
                self.stats[si].restarts += 1
        assert d.fn is not None
        try:
            new = ProcWorker(pickle_function(d.fn, d.name), d.name, background=d.background,
                             spawning=self._spawning)
        except Exception as exc:  # a start-up failure, or out of descriptors or processes
            if self.closing:  # close() killed it in its start-up
                return
            log.warning("could not replace a worker of stage %r: %s", d.name, exc)
            self._no_worker[si] = f"{type(exc).__name__}: {exc}"
            return
        with self._lock:
            # close() may have run while the new worker started: then it is ours to stop.
            if not self.closing:
                self.procs[si][w] = new
                return
        new.close(kill=True)

    # --- the inference stage: submit without waiting, finish in the reply callback ----

    def _take_credit(self, si: int) -> bool:
        cv = self._credit_cvs[si]
        with cv:
            while self._credit[si] <= 0:
                if self.closing:
                    return False
                cv.wait()
            if self.closing:
                return False
            self._credit[si] -= 1
            return True

    def _give_credit(self, si: int) -> None:
        cv = self._credit_cvs[si]
        with cv:
            self._credit[si] += 1
            cv.notify()

    def _take(self, si: int, block: bool = True, within: float | None = None) -> Item | None:
        """The next item for stage ``si`` whose run is still wanted, counted as in; None
        with ``block`` False when nothing waits, or after ``within`` seconds with nothing.
        Raises Aborted when the pipeline closes."""
        inq = self.channels[si]
        while True:
            if not block:
                item = inq.try_get()
            else:
                item = inq.get() if within is None else inq.get_within(within)
            if item is None:
                return None
            if self._count_in(si, item):
                return item

    def _cancel(self, si: int, item: Item) -> None:
        """``item``, counted into stage ``si``, will not come out: its run or the pipeline
        ended first. Counted as cancelled there, so that in = out + errors + cancelled."""
        with self.stats[si].lock:
            self.stats[si].cancelled += 1
        item.run.deliver(item.index, CANCEL)

    def _cancel_all(self, si: int, pending: Any) -> None:
        """Cancel the items of a process worker's (item, start) queue and empty it."""
        for it, _ in pending:
            self._cancel(si, it)
        pending.clear()

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
            self._cancel(si, item)
            return False
        retries = self._retries[si]
        if retries.running:
            # Items cut short by a worker's death run again first, each alone (see
            # _queue_retry): a new item that crashes the worker would take them with it.
            with retries.cv:
                while retries.running and not self.closing:
                    retries.cv.wait(SIGNAL_CHECK_S)
        self._infer_submit(si, item, time.monotonic_ns(), 0)
        return True

    def _infer_submit(self, si: int, item: Item, start: int, attempt: int) -> None:
        d = self.defs[si]
        link = self.links[si]
        try:
            value = _pair_inputs(item.value, d.name) if d.with_context else item.value
            fut, gen = link.submit(value)
        except ServerGone as exc:
            # The generation of the worker that was gone: the current one may be its
            # replacement already, alive (restarting that failed its requests for nothing).
            if attempt == 0:
                self._retry(si, item, start, getattr(exc, "worker_gen", link.gen), exc)
            else:
                self._infer_failed(si, item, start, exc)
                self._next_retry(si)
            return
        except Exception as exc:  # InputError and the like: this item fails, not the thread
            self._infer_failed(si, item, start, exc)
            if attempt:
                self._next_retry(si)
            return
        fut.add_done_callback(functools.partial(self._infer_done, si, item, start, gen, attempt))

    def _retry(self, si: int, item: Item, start: int, gen: int, exc: ServerGone) -> None:
        """The device worker of generation ``gen`` went away with ``item``: restart it
        and submit the item once more, or fail the item with why that cannot be."""
        try:
            restarted = self.links[si].restart(gen)
        except ConveyorError as why:  # the item fails with the reason, not "gone"
            self._infer_failed(si, item, start, why)
            return
        if restarted:
            self._queue_retry(si, item, start)
        else:
            self._infer_failed(si, item, start, exc)

    def _queue_retry(self, si: int, item: Item, start: int) -> None:
        """Run ``item`` again on the new worker, one retried item of the stage at a time:
        the item that killed the worker (a model that crashes on some input) then kills
        its replacement alone, instead of taking the items retried beside it with it.
        (Per stage: a stage sharing the worker with this one may hold this one's replies
        up, by a full channel between them, so it must not wait for its retries.)"""
        retries = self._retries[si]
        with retries.cv:
            retries.queue.append((item, start))
            if retries.running:
                return
            retries.running = True
        del item
        self._next_retry(si)

    def _next_retry(self, si: int) -> None:
        """A retried item of stage ``si`` has its outcome: submit the next."""
        retries = self._retries[si]
        with retries.cv:
            if retries.queue and not self.closing:
                item, start = retries.queue.popleft()
                left = None
            else:
                left = list(retries.queue)
                retries.queue.clear()
                retries.running = False
                retries.cv.notify_all()
        if left is None:
            self._infer_submit(si, item, start, 1)
            return
        # Closing: the rest are cancelled, not sent (this may run in a callback of the
        # close of the worker's clients, under the worker's lock, which a send takes).
        for item, start in left:
            self._infer_failed(si, item, start, ServerGone("the pipeline is closing"))

    def _died_twice(self, si: int, gen: int, exc: ServerGone) -> BaseException:
        """The error of an item whose device worker died under it twice: it is taken for
        the cause, and the worker is replaced for the items after it."""
        link = self.links[si]
        worker = link.worker
        if worker is None:
            return exc
        try:
            link.restart(gen)
        except ConveyorError:
            pass  # logged; the next item tries again
        end = worker.ends.get(gen)
        if end is None:
            return exc
        err = WorkerDiedError(
            f"the device worker of stage {self.defs[si].name!r} ({self.defs[si].device}) "
            f"died while it ran this item, twice: the worker {end}; the item was not "
            f"tried again")
        err.__cause__ = exc
        return err

    def _infer_failed(self, si: int, item: Item, start: int, exc: BaseException) -> None:
        self._give_credit(si)
        if self.closing:
            self._cancel(si, item)
            return
        self._stage_failed(si, item, start, exc, "".join(
            traceback.format_exception(type(exc), exc, exc.__traceback__)))

    def _infer_done(self, si: int, item: Item, start: int, gen: int, attempt: int,
                    fut: Any) -> None:
        """Reply callback (runs in the client's reader thread)."""
        link = self.links[si]
        exc = fut.exception()
        if exc is not None:
            if isinstance(exc, ServerGone) and attempt == 0 and not self.closing:
                self._retry(si, item, start, gen, exc)
                return
            if isinstance(exc, ServerGone) and not self.closing:
                exc = self._died_twice(si, gen, exc)
            self._infer_failed(si, item, start, exc)
            if attempt:
                self._next_retry(si)
            return
        self._give_credit(si)
        d = self.defs[si]
        outs = fut.result()
        timing = fut.timing
        if timing is not None:
            link.stats.record(timing.start_ns, timing.compute_ns)
            if self.tracer is not None:
                track = self.tracer.track(link.track)
                self.tracer.span(track, link.model, timing.start_ns,
                                 timing.start_ns + timing.compute_ns, item.index)
        self.stats[si].record(True, time.monotonic_ns() - start)
        item.value = (outs, item.value[1]) if d.with_context else outs
        if attempt:  # before the hand-on, which may wait for room
            self._next_retry(si)
        self._forward(si + 1, item)


    # --- process stages: one parent thread per worker, two tasks in flight ---------

    def _proc_loop(self, si: int, w: int) -> None:
        """Feed worker ``w`` of process stage ``si``, keeping its next task queued in its
        socket so that it never waits for the parent between items."""
        d = self.defs[si]
        st = self.stats[si]
        pending: deque[tuple[Item, int]] = deque()
        while True:
            if not self._proc_top_up(si, w, pending, block=True):
                return
            if not pending:
                self._replace_if_dead(si, w, missing=False)
                continue
            item, start = pending[0]
            pw = self.procs[si][w]
            assert pw is not None
            try:
                ok, value, tb, t0, t1 = pw.receive(item.index)
            except WorkerDiedError as exc:
                if self.closing:
                    self._cancel_all(si, pending)
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
            if self.tracer is not None:  # a track per worker process: a replacement's own
                track = self.tracer.track(f"{d.name} #{w} (pid {pw.pid})")
                self.tracer.span(track, d.name, t0, t1, item.index)
            # Queue the worker's next task before handing this result on: the next stage
            # may block (device credit, a full channel) and the worker must not wait.
            if not self._proc_top_up(si, w, pending, block=False):
                self._cancel(si, item)
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
                # Idle, it looks up now and then: a worker that died meanwhile is replaced
                # then, not at the next item (what it started lived on till then).
                item = self._take(si, block=block and not pending, within=IDLE_CHECK_S)
            except Aborted:
                self._cancel_all(si, pending)
                return False
            if item is None:
                return True
            if not self._proc_send(si, w, item, pending):
                self._cancel_all(si, pending)
                return False
        return True

    def _proc_send(self, si: int, w: int, item: Item, pending: Any,
                   start: int | None = None) -> bool:
        """Send ``item`` to worker ``w``; False when the pipeline is closing."""
        if not pending or self.procs[si][w] is None:
            self._replace_if_dead(si, w)
        pw = self.procs[si][w]
        try:
            if pw is None:
                why = self._no_worker.get(si, "")
                raise WorkerStartError(f"stage {self.defs[si].name!r} has no worker"
                                       + (f" (replacing it failed: {why})" if why else ""))
            pw.send(item.index, item.value)
        except NotSent as exc:  # this item fails; the worker never saw it
            cause = exc.__cause__ or exc
            self._stage_failed(si, item, start or time.monotonic_ns(), cause,
                               f"the item could not be sent to a worker process: {exc}\n")
            return True
        except (OSError, PeerClosed, WorkerStartError) as exc:
            if self.closing:
                self._cancel(si, item)
                return False
            if isinstance(exc, WorkerStartError):
                self._stage_failed(si, item, start or time.monotonic_ns(), exc, "")
                return True
            # The worker is gone, or the send failed on this side (out of descriptors for
            # a segment) and the link is no longer in step: then the worker is stopped,
            # so that receive() on the first pending task reports it. Queue this one to
            # be resent to the replacement.
            if not isinstance(exc, PeerClosed):
                assert pw is not None
                pw.break_link(f"sending item {item.index} failed: {type(exc).__name__}: {exc}")
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
        if d.kind == "process":
            self._proc_loop(si, w)
            return
        track = 0 if self.tracer is None else self.tracer.track(f"{d.name} #{w}")
        while True:
            try:
                item = self._take(si)
            except Aborted:
                return
            assert item is not None
            start = time.monotonic_ns()
            key = (si, w)
            self._holding[key] = item
            if self._settled:  # taken just as close() finished: it will not run
                if self._holding.pop(key, None) is not None:
                    self._cancel(si, item)
                return
            failed: _Failed | None = None
            value: Any = None
            try:
                value = self._call(si, w, item, track)
            except _Failed as f:
                failed = f
            if self._holding.pop(key, None) is None:
                return  # close() gave up on this thread and counted the item cancelled
            if failed is not None:
                self._stage_failed(si, item, start, failed.exc, failed.tb)
            else:
                item.value = value
                st.record(True, time.monotonic_ns() - start)
                self._forward(si + 1, item)
            del item, value, failed  # see _proc_loop

    # --- observation ----------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        now = self.closed_ns or time.monotonic_ns()  # a closed pipeline's figures stay put
        elapsed = (now - self.started_ns) / 1e9
        stages = {}
        for si, st in enumerate(self.stats):
            stages[st.name] = st.snapshot(len(self.channels[si]), elapsed)
            if si in self.links:  # an inference stage's worker is its device worker
                link = self.links[si]
                if link.worker is not None:
                    link.stats.restarts = link.worker.gen
                stages[st.name]["restarts"] = link.stats.restarts
        devices = {self.defs[si].name: self.links[si].stats.snapshot(now, self.started_ns)
                   for si in sorted(self.links)}  # in stage order: the first is "device"
        # Stages that share one device worker (one Edge TPU): each entry counts its own
        # model's runs; the device's own figures are their sums.
        by_worker: dict[int, list[str]] = {}
        for si in sorted(self.links):
            worker = self.links[si].worker
            if worker is not None:
                by_worker.setdefault(id(worker), []).append(self.defs[si].name)
        for names in by_worker.values():
            if len(names) < 2:
                continue
            whole = {key: sum(devices[n][key] for n in names)
                     for key in ("busy_s", "duty_cycle", "duty_cycle_recent")}
            for name in names:
                devices[name]["shared_with"] = [n for n in names if n != name]
                devices[name]["device_busy_s"] = whole["busy_s"]
                devices[name]["device_duty_cycle"] = whole["duty_cycle"]
                devices[name]["device_duty_cycle_recent"] = whole["duty_cycle_recent"]
        return {"elapsed_s": elapsed, "stages": stages, "devices": devices}
