"""The device server: owns devices, runs the scheduler, serves clients on Unix sockets.

The same class is the private device worker of a pipeline (one pre-connected socket) and
``conveyor serve`` (a listening socket, many clients): one scheduler, two faces.

Threads: one per device, plus the caller of :meth:`DeviceServer.serve_forever`. A device
thread takes requests from the scheduler and runs them on the clients' shared-memory
tensors in place, then sends the reply. The I/O (accepting, reading and checking
messages, queuing requests, answering control messages and expired deadlines) is done by
one thread at a time: an idle device thread when there is one, else the serve_forever
thread (see :mod:`conveyor._device._iorole`). Nothing else runs in this process, so the
devices never wait for a GIL held by user code. No socket write ever blocks (see
:mod:`conveyor._device._conn`), so one stuck client cannot stall the others.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import select
import socket
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._errors import ConveyorError, DeviceError, InvalidModelError, ModelError, ProtocolError
from .._models import file_digest
from .._runtime._sched import check_realtime, set_realtime
from .._tensors import MAX_RANK
from .._version import __version__
from ..backends import Device, Runner
from ._catalog import ModelInfo
from ._conn import MAX_SEGMENT_BYTES, Conn
from ._iorole import MAIN, READABLE, IORole, Poller
from ._protocol import (
    INFER,
    MAX_BODY,
    MAX_INFLIGHT,
    PROTOCOL_VERSION,
    SEGMENT,
    Frame,
    MsgType,
    OutOfDescriptors,
    Status,
    descriptor_limit,
    encode,
    encode_result,
    json_body,
)
from ._scheduler import RUNNING, ClientState, DeviceState, Request, Scheduler
from ._stats import WINDOW_S, ServerStats

__all__ = ["DeviceServer"]


def _open_spare() -> int:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1

log = logging.getLogger("conveyor.server")

#: Seconds a new connection has to say HELLO.
HANDSHAKE_TIMEOUT = 10.0
_NO_DEVICE = 0xFFFF
#: How long a device may run one request while holding the I/O role before the
#: serve_forever thread takes the I/O over (see :mod:`conveyor._device._iorole`).
IO_GRACE_S = 0.02
#: Messages taken from one connection in one round of I/O before the others have their
#: turn: a client that floods the socket (requests over its credit, each answered Busy)
#: must not hold the I/O thread while the others' requests wait to be read.
FRAMES_PER_TURN = 64
#: A connection ended by a protocol error: how long its requests may still run (their
#: replies, then the ERROR, go to it) before it is closed anyway.
ENDING_S = 10.0
#: Draining for SIGTERM: how long, once every request has run, replies may wait for
#: clients that read them slowly before the server exits anyway.
DRAIN_FLUSH_S = 5.0
#: Draining: how long the server waits with requests running and none finishing before
#: it exits without them (a hung device's run never ends, nor do the requests queued
#: behind it).
DRAIN_RUN_S = 10.0
#: The most bytes the models' JSON may take in a WELCOME (a message's body holds at most
#: MAX_BODY): the rest is room for the devices there, and for the clients in a status reply.
MAX_MODELS_JSON = MAX_BODY // 2
_TEXT = {s: s.name.lower().replace("_", " ") for s in Status}


_WAKE = object()  # stands for the wake-up eventfd in the poller


class _Dev:
    """A device, its loaded models and its thread."""

    def __init__(self, index: int, device: Device, runners: dict[int, Runner]) -> None:
        self.index = index
        self.device = device
        self.runners = runners
        self.state = DeviceState(index, frozenset(runners))
        self.thread: threading.Thread | None = None
        self.scheduling = "normal"  # the device thread's CPU policy (see set_realtime)
        self.scheduled = threading.Event()  # set once the thread has set its policy


class _Churn:
    """At most ``per_s`` log lines of a kind a second (10,000 connections made 20,000
    connect and disconnect lines; a user not let in, connecting in a loop, 7,000 refusal
    lines a second); the rest are counted, and the count said with the next one."""

    def __init__(self, per_s: int = 20, what: str = "connect and disconnect",
                 level: int = logging.INFO) -> None:
        self.per_s = per_s
        self.what = what
        self.level = level  # the lines', so that the count shows where they do
        self._second = 0
        self._lines = 0
        self._held = 0

    def allow(self) -> bool:
        now = int(time.monotonic())
        if now != self._second:
            if self._held:
                log.log(self.level, "%d %s lines were not logged (more than %d a second)",
                        self._held, self.what, self.per_s)
            self._second, self._lines, self._held = now, 0, 0
        if self._lines < self.per_s:
            self._lines += 1
            return True
        self._held += 1
        return False


def _digests(paths: set[Path]) -> tuple[str, ...]:
    """The digests of the files a model came from that can still be read, sorted."""
    out = set()
    for path in paths:
        try:
            out.add(file_digest(path))
        except OSError:
            pass
    return tuple(sorted(out))


class DeviceServer:
    """Serve inference on ``devices`` for ``models`` to clients on Unix sockets.

    Each model is loaded on every device that can load it; the server refuses to start
    only if some model loads on no device. The server owns ``devices`` from here on and
    closes them when it stops (or when this constructor fails).

    Args:
        devices: opened devices.
        models: bundled names or paths.
        max_queue: requests waiting in total before new ones get BUSY.
        max_inflight: requests one client may have queued or running (its credit).
        allowed_uids, allowed_gids: peers (checked with SO_PEERCRED) allowed besides the
            server's own user.
        group_slack_ns, group_limit: the model-grouping bounds (see the scheduler).
        max_clients: connections served at once; more are refused.
        realtime: a SCHED_FIFO priority (1-99) for the device threads, 0 for none (see
            :func:`conveyor._runtime._sched.set_realtime`). Refused without the
            privilege: the server then runs at normal priority, logs a warning and says
            so in :meth:`status` (``devices[i]["scheduling"]``).

    Raises:
        ModelError, DeviceError: a model could not be loaded on any device, two models
            have one name (files of one stem in two folders), or a model's tensors take
            more than a client may share (1 GiB a request).
        ValueError: no devices, no models, a model given twice, or ``realtime`` out of
            range.
    """

    def __init__(
        self,
        devices: Sequence[Device],
        models: Sequence[str | Path],
        *,
        max_queue: int = 256,
        max_inflight: int = 32,
        allowed_uids: Sequence[int] = (),
        allowed_gids: Sequence[int] = (),
        group_slack_ns: int = 2_000_000,
        group_limit: int = 8,
        max_clients: int = 256,
        realtime: int = 0,
    ) -> None:
        self.realtime = check_realtime(realtime)
        if not devices:
            raise ValueError("a device server needs at least one device")
        if not models:
            raise ValueError("a device server needs at least one model")
        if max_queue < 1 or max_inflight < 1 or max_clients < 1:
            raise ValueError("max_queue, max_inflight and max_clients must be at least 1")
        if max_inflight > MAX_INFLIGHT:
            raise ValueError(f"max_inflight must be at most {MAX_INFLIGHT}, got {max_inflight}")
        self.scheduler = Scheduler(max_queue, group_slack_ns, group_limit)
        self.max_inflight = max_inflight
        self.max_clients = max_clients
        self.allowed_uids = {os.getuid(), *allowed_uids}
        self.allowed_gids = set(allowed_gids)
        self.models: dict[int, ModelInfo] = {}
        self.devices: list[_Dev] = []
        try:
            self._load(devices, models)
        except BaseException:
            for dev in self.devices:
                for runner in dev.runners.values():
                    runner.close()
            for device in devices:
                device.close()
            raise
        for dev in self.devices:
            self.scheduler.add_device(dev.state)
        self._sel = Poller()
        # Wakes the role holder's poll (an eventfd: a counter, so writes never fill up).
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._sel.register(self._wake_fd, _WAKE)
        self._conns: dict[int, Conn] = {}
        self._listeners: list[socket.socket] = []
        self._trouble: deque[Conn] = deque()
        # Connections whose last read holds messages not handled yet (they used their
        # turn): served again next round, before their socket is read again.
        self._backlog: dict[int, Conn] = {}
        self._ending: dict[int, Conn] = {}  # ended by a protocol error, not closed yet
        self._round = 0
        # Requests a device ran and handed over for accounting and the reply: (request,
        # device, start ns, end ns); see _run.
        self._replies: deque[tuple[Request, int, int, int]] = deque()
        # A device handed the I/O thread a reply and will wake it before its next run
        # (see _run); the I/O thread clears it when it sends the replies anyway.
        self._wake_due = False
        self._handshakes: dict[int, Conn] = {}
        self._next_client = 1
        self._stop_level = 0  # 0 running, 1 draining, 2 stopping at once (set by signals)
        self._stop_seen = 0
        self._flush_until = 0.0  # draining: when replies not read by then are given up
        self._runs_until = 0.0  # draining: when runs not done by then are given up
        self._drain_done = -1  # draining: the scheduler's finished count seen last
        self._gave_up = False  # draining: runs given up as hung
        self._failures: dict[int, str] = {}  # device index -> why its last failed run did
        self._churn = _Churn()
        self._refusals = _Churn(what="refused connection", level=logging.WARNING)
        self._exit_when_no_clients = False
        self._accept_paused_until = 0.0
        # A descriptor kept in reserve: out of them, the server lets it go to accept the
        # waiting connections and tell each why it cannot be served (else they wait).
        self._spare_fd = _open_spare()
        self._served = False
        self._role = IORole(self.scheduler, IO_GRACE_S)
        self.started = time.monotonic()
        self.started_ns = time.monotonic_ns()
        self.stats = ServerStats(len(self.devices), list(self.models), self.started_ns)
        self.socket_path: str | None = None

    def _load(self, devices: Sequence[Device], models: Sequence[str | Path]) -> None:
        errors: dict[int, ConveyorError] = {}
        names: dict[str, Path] = {}  # name -> the file it came from
        files: dict[int, set[Path]] = {}  # model id -> the files behind it (see digests)
        for index, device in enumerate(devices):
            runners: dict[int, Runner] = {}
            self.devices.append(_Dev(index, device, runners))
            for model_id, model in enumerate(models):
                try:
                    runner = device.load(model)
                except (ModelError, DeviceError) as exc:
                    log.warning("device %d (%s) cannot load %s: %s", index, device.spec, model,
                                exc)
                    errors.setdefault(model_id, exc)
                    continue
                info = self.models.get(model_id)
                if info is None:
                    first = names.get(runner.model)
                    if first is not None:
                        runner.close()
                        if first == runner.path:
                            raise ValueError(f"model {runner.model!r} given twice")
                        raise ModelError(
                            f"two models are named {runner.model!r} ({first} and "
                            f"{runner.path}): clients choose a model by its name, the "
                            f"file's stem; rename one of the files")
                    names[runner.model] = runner.path
                    info = ModelInfo(model_id, runner.model, runner.inputs, runner.outputs)
                    deep = [t for t in (*info.inputs, *info.outputs) if len(t.shape) > MAX_RANK]
                    if deep:
                        runner.close()
                        raise InvalidModelError(
                            f"{runner.path}: tensor {deep[0].name!r} has {len(deep[0].shape)} "
                            f"dimensions, more than the {MAX_RANK} a client and a device "
                            f"worker or server can exchange")
                    if info.slot_size > MAX_SEGMENT_BYTES:
                        runner.close()
                        raise ModelError(
                            f"{runner.path}: its tensors take {info.slot_size} bytes a "
                            f"request, more than the {MAX_SEGMENT_BYTES} a client may share "
                            f"with a device worker or server")
                    self.models[model_id] = info
                elif (runner.inputs, runner.outputs) != (info.inputs, info.outputs):
                    log.warning("device %d (%s) loads %s with other tensors; not used there",
                                index, device.spec, model)
                    runner.close()
                    continue
                runners[model_id] = runner
                given = Path(model)
                files.setdefault(model_id, set()).update(
                    (runner.path, given) if given.is_file() else (runner.path,))
            self.devices[-1].state = DeviceState(index, frozenset(runners))
        for model_id in range(len(models)):
            if model_id not in self.models:
                raise errors[model_id]
        self.models = {
            model_id: dataclasses.replace(info, digests=_digests(files[model_id]))
            for model_id, info in sorted(self.models.items())
        }
        # Every client's WELCOME (and every status reply) describes the models: one that
        # would not fit in a message made every handshake fail, for every model.
        described = {info.name: len(json_body(info.to_json())) for info in self.models.values()}
        if sum(described.values()) > MAX_MODELS_JSON:
            largest = max(described, key=described.__getitem__)
            raise InvalidModelError(
                f"the models' descriptions take {sum(described.values())} bytes, more than "
                f"the {MAX_MODELS_JSON} a client's handshake may hold ({largest!r}: "
                f"{described[largest]} bytes; are its tensor names that long?)")

    # --- set-up -------------------------------------------------------------------------

    def add_listener(self, sock: socket.socket) -> None:
        """Accept clients on a listening Unix socket (made non-blocking)."""
        sock.setblocking(False)
        self._listeners.append(sock)
        self._sel.register(sock.fileno(), sock)

    def add_connection(self, sock: socket.socket, *, trusted: bool = True) -> None:
        """Serve one already-connected socket (a pipeline's private link)."""
        self._register(sock, trusted=trusted, pid=os.getppid(), uid=os.getuid())

    def _register(self, sock: socket.socket, *, trusted: bool, pid: int, uid: int) -> Conn:
        cid = self._next_client
        self._next_client += 1
        conn = Conn(sock, ClientState(cid, pid=pid, uid=uid), trusted, self._on_trouble)
        self._conns[conn.fileno] = conn
        self._handshakes[conn.fileno] = conn
        self._sel.register(conn.fileno, conn)
        return conn

    def start_devices(self) -> None:
        """Start one thread per device (done by :meth:`serve_forever` if not yet)."""
        for dev in self.devices:
            if dev.thread is None:
                dev.thread = threading.Thread(
                    target=self._device_loop, args=(dev,), name=f"conveyor-device-{dev.index}",
                    daemon=True,
                )
                dev.thread.start()
                # Before any client is welcomed, so that the WELCOME and status() tell
                # the policy in force (see _device_loop).
                dev.scheduled.wait(5.0)

    # --- the I/O loop -------------------------------------------------------------------

    def serve_forever(self, *, exit_when_no_clients: bool = False) -> None:
        """Run the server until :meth:`shutdown` (or, with ``exit_when_no_clients``,
        until the last connection closes), then stop the devices and close everything.

        Blocks the calling thread, which does the I/O whenever no idle device thread does
        (see :meth:`_device_step`). Cancellation: :meth:`shutdown` or :meth:`request_stop`
        from any thread or a signal handler; KeyboardInterrupt stops at once.
        """
        if self._served:
            raise RuntimeError("serve_forever can run only once")
        self._served = True
        self._exit_when_no_clients = exit_when_no_clients
        self.start_devices()
        try:
            while self._role.main_turn():
                try:
                    self._io_round()
                    while self._role.main_keeps():
                        self._io_round()
                finally:
                    self._role.release(MAIN)
        finally:
            self._finish()

    def _io_round(self) -> None:
        """One round of I/O by the thread holding the I/O role: service, then poll."""
        role = self._role
        if role.exiting:
            return
        self._service()
        if self._should_exit():
            role.exit()
            return
        if role.holder == MAIN and role.handover:
            return
        self._round += 1
        self._poll(0.0 if self._backlog else self._poll_timeout())
        for conn in list(self._backlog.values()):
            if conn.turn != self._round:  # not served by the poll just now
                self._on_readable(conn)

    def _poll_timeout(self) -> float | None:
        ends = []
        deadline = self.scheduler.next_deadline_ns()
        if deadline is not None:
            ends.append(deadline / 1e9)
        if self._handshakes:
            ends.append(min(c.opened for c in self._handshakes.values()) + HANDSHAKE_TIMEOUT)
        if self._accept_paused_until:
            ends.append(self._accept_paused_until)
        if self._ending:
            ends.append(time.monotonic() + 0.05)  # to see when their requests are done
        if self._flush_until:
            ends.append(self._flush_until)
        if self._runs_until and self.scheduler.running:  # past it, with none running: done
            ends.append(self._runs_until)
        if not ends:
            return None
        return max(0.0, min(ends) - time.monotonic())

    def _poll(self, timeout: float | None) -> None:
        for obj, mask in self._sel.poll(timeout):
            if type(obj) is Conn:
                if mask & READABLE:
                    self._on_readable(obj)
                if mask & select.POLLOUT and obj.fileno in self._conns:
                    self._on_writable(obj)
            elif obj is _WAKE:
                try:
                    os.eventfd_read(self._wake_fd)
                except BlockingIOError:
                    pass
            elif isinstance(obj, socket.socket):
                self._accept(obj)

    def _service(self) -> None:
        """Work between polls: replies handed over by devices, stop requests, connections
        in trouble, deadlines, timeouts."""
        self._wake_due = False  # first: a reply handed over from here on wakes us again
        self._finish_handed_over()
        if self._stop_level != self._stop_seen:
            self._begin_stop()
        while self._trouble:
            conn = self._trouble.popleft()
            if self._conns.get(conn.fileno) is not conn:
                continue
            if not conn.alive:
                self._close_conn(conn, "connection broke or stopped reading its replies")
            elif conn.has_outbox and not conn.writing:
                conn.writing = True
                self._sel.modify(conn.fileno, write=True, read=conn.ending is None)
        for req in self.scheduler.expire():
            self._reply_request(req, Status.DEADLINE_EXCEEDED)
        if self._ending:
            self._end_connections()
        if self._handshakes:
            limit = time.monotonic() - HANDSHAKE_TIMEOUT
            for conn in [c for c in self._handshakes.values() if c.opened < limit]:
                self._close_conn(conn, f"no HELLO within {HANDSHAKE_TIMEOUT:g} s")
        if self._accept_paused_until and time.monotonic() >= self._accept_paused_until:
            self._accept_paused_until = 0.0
            for sock in self._listeners:
                self._sel.register(sock.fileno(), sock)

    def _should_exit(self) -> bool:
        if self._stop_seen == 2:
            return True
        if self._stop_seen == 1:
            sched = self.scheduler
            if sched.running:
                # A run that never ends (a hung device) must not hold the stop for ever,
                # nor the requests queued behind it: the drain gives up when none has
                # finished for DRAIN_RUN_S.
                now = time.monotonic()
                if sched.finished != self._drain_done:
                    self._drain_done = sched.finished
                    self._runs_until = now + DRAIN_RUN_S
                if now < self._runs_until:
                    return False
                log.warning("stopping with %d request(s) running and %d queued: none "
                            "finished in the last %g s (a hung device?)", sched.running,
                            sched.queued, DRAIN_RUN_S)
                self._gave_up = True
                return True
            if sched.queued:
                return False  # an idle device takes them
            # The replies still waiting for their clients to read them leave first, for a
            # while: a client that reads slowly gets every result it was promised.
            if not any(c.has_outbox and c.alive for c in self._conns.values()):
                return True
            if not self._flush_until:
                self._flush_until = time.monotonic() + DRAIN_FLUSH_S
            return time.monotonic() >= self._flush_until
        return self._exit_when_no_clients and not self._conns and not self._listeners

    def request_stop(self, *, drain: bool = True) -> None:
        """Ask the I/O loop to stop. Safe from any thread and from signal handlers: it only
        sets a flag and writes one byte to a pipe.

        With ``drain``, queued and running requests finish and are answered first, while
        new requests get SHUTTING_DOWN. Without, the loop stops at once (in-flight
        requests are lost: their clients see the connection close).
        """
        self._stop_level = max(self._stop_level, 1 if drain else 2)
        self._wake()

    def shutdown(self, *, drain: bool = True) -> None:
        """Same as :meth:`request_stop`."""
        self.request_stop(drain=drain)

    @property
    def stopping(self) -> bool:
        return self._stop_level > 0

    def _begin_stop(self) -> None:
        level = self._stop_level
        if self._stop_seen == 0:
            if level == 1:
                # Requests a client sent before the stop, still unread in its socket, are
                # in flight as far as it knows (its submit() returned): they drain too.
                for conn in list(self._conns.values()):
                    if conn.ending is not None:  # read no more (and not a hang-up)
                        continue
                    for _ in range(64):  # bounded: a client that goes on sending is cut off
                        if not self._on_readable(conn):
                            break
            log.info("stopping: %d queued and %d running requests to finish",
                     self.scheduler.queued, self.scheduler.running)
            self.scheduler.close()
            for sock in self._listeners:
                if not self._accept_paused_until:
                    self._sel.unregister(sock.fileno())
                sock.close()
            self._listeners.clear()
        if level == 2:
            if self._stop_seen == 1:
                log.info("stopping at once")
            for req in self.scheduler.abort():
                self._reply_request(req, Status.SHUTTING_DOWN)
        self._stop_seen = level

    def _wake(self) -> None:
        try:
            os.eventfd_write(self._wake_fd, 1)
        except OSError:  # full (a wake is pending anyway) or closed (stopped)
            pass

    def _on_trouble(self, conn: Conn) -> None:
        self._trouble.append(conn)
        self._wake()

    def _finish(self) -> None:
        # Drained: every run ended (not stopped at once, nor given up on a hung one).
        drained = self._stop_seen < 2 and not self._gave_up
        self._finish_handed_over()  # their clients get the results before the close
        sched = self.scheduler
        for req in sched.abort():
            self._reply_request(req, Status.SHUTTING_DOWN)
        self._role.exit()
        self._wake()
        self._role.reclaim(2.0)  # from a device thread in the middle of an I/O round
        for sock in self._listeners:
            sock.close()
        self._listeners.clear()
        if self._spare_fd >= 0:
            os.close(self._spare_fd)
            self._spare_fd = -1
        for conn in list(self._conns.values()):
            if conn.has_outbox and not conn.flush():
                self._close_conn(conn, "replies it had not read by the end were dropped")
            self._close_conn(conn, None)
        for dev in self.devices:
            if dev.thread is not None:
                dev.thread.join(timeout=5.0 if drained else 0.2)
        # Runs that ended meanwhile: account for them, so that their clients' memory is
        # released (the replies go nowhere: the connections are closed).
        self._finish_handed_over()
        self._sel.close()
        if self.devices_idle():  # a stuck device thread might still write to it
            os.close(self._wake_fd)
        for dev in self.devices:
            if dev.thread is not None and dev.thread.is_alive():
                log.warning("device %d is still running a request; not closing it", dev.index)
                continue
            for runner in dev.runners.values():
                runner.close()
            dev.device.close()

    def close(self) -> None:
        """Release everything of a server that never served (serve_forever cleans up after
        itself). Idempotent."""
        if self._served:
            return
        self._served = True
        self._stop_seen = 2
        self._finish()

    def devices_idle(self) -> bool:
        """True when every device thread has ended (after :meth:`serve_forever` returned)."""
        return not any(d.thread is not None and d.thread.is_alive() for d in self.devices)

    # --- connections --------------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(64):
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # Out of descriptors: stop accepting for a moment instead of spinning.
                log.warning("cannot accept a connection: %s", exc)
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    self._refuse_waiting(listener)
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._accept_paused_until = time.monotonic() + 0.1
                    for s in self._listeners:
                        self._sel.unregister(s.fileno())
                return
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                    struct.calcsize("3i"))
            pid, uid, gid = struct.unpack("3i", creds)
            why = None
            error = "ServerError"
            if not self._permitted(pid, uid, gid):
                why = (f"permission denied: uid {uid} (gid {gid}) is not allowed by this "
                       f"server; its owner can let it in with `conveyor serve --allow-user "
                       f"{uid}` or `--group GROUP` (a group of that user's)")
                error = "PermissionDenied"
            elif len(self._conns) >= self.max_clients:
                why = f"too many connections (at most {self.max_clients})"
            if why is not None:
                self.stats.count("rejected_connections")
                if self._refusals.allow():
                    log.warning("refused connection from pid %d (uid %d): %s", pid, uid, why)
                self._refuse(sock, why, error)
                continue
            self._register(sock, trusted=False, pid=pid, uid=uid)

    def _refuse_waiting(self, listener: socket.socket) -> None:
        """Out of descriptors: with the one in reserve, accept the connections waiting
        and tell each that the server is out of them, rather than leave them waiting."""
        why = (f"the server is out of file descriptors (it may have "
               f"{descriptor_limit()}; see ulimit -n); try again later")
        for _ in range(256):
            if self._spare_fd < 0:
                return
            os.close(self._spare_fd)
            self._spare_fd = -1
            try:
                sock, _ = listener.accept()
            except OSError:
                sock = None
            if sock is not None:
                self.stats.count("rejected_connections")
                self._refuse(sock, why, "OutOfDescriptors")
            self._spare_fd = _open_spare()
            if sock is None:
                return

    @staticmethod
    def _refuse(sock: socket.socket, why: str, error: str = "ServerError") -> None:
        try:
            sock.setblocking(False)
            sock.send(encode(MsgType.ERROR, json_body({"error": error, "message": why})))
        except OSError:
            pass
        sock.close()

    def _permitted(self, pid: int, uid: int, gid: int) -> bool:
        if uid in self.allowed_uids:
            return True
        if not self.allowed_gids:
            return False
        groups = {gid}
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("Groups:"):
                    groups.update(int(g) for g in line.split()[1:])
        except (OSError, ValueError):
            pass
        return bool(groups & self.allowed_gids)

    def _on_readable(self, conn: Conn) -> bool:
        """Read what ``conn`` sent and act on it, at most :data:`FRAMES_PER_TURN` messages
        (the rest wait in the backlog for the next round); True if it is still open and
        bytes came or messages wait."""
        if self._conns.get(conn.fileno) is not conn:
            return False
        if conn.ending is not None:  # not read any more: this is a hang-up or an error
            self._close_conn(conn, "it hung up before its error was sent")
            return False
        reader = conn.reader
        conn.turn = self._round
        try:
            if self._backlog.pop(conn.fileno, None) is None:
                reader.feed_from_socket()
            budget = FRAMES_PER_TURN
            while conn.alive:
                if not budget:
                    self._backlog[conn.fileno] = conn
                    break
                budget -= 1
                infer = reader.next_infer()
                if infer is not None:
                    self._infer(conn, *infer)
                    continue
                frame = reader.next_frame()
                if frame is None:
                    break
                self._handle(conn, frame)
                if frame.type is MsgType.STATUS:
                    budget = 0  # one a turn: a snapshot costs what dozens of requests do
            if reader.eof and conn.fileno not in self._backlog:
                # A peer that only closed its writing end cannot be waited for: what it
                # has not read yet is dropped, and said so.
                self._close_conn(conn, "it closed its end with replies unread, dropped"
                                 if conn.has_outbox and not conn.flush() else None)
                return False
            return self._conns.get(conn.fileno) is conn
        except (BlockingIOError, InterruptedError):
            return False
        except OutOfDescriptors as exc:  # this server's shortage, not the client's fault
            log.warning("closing the connection of client %d (pid %d): %s", conn.client.id,
                        conn.client.pid, exc.strerror)
            self._end_conn(conn, "OutOfDescriptors", f"the server is {exc.strerror}")
        except ProtocolError as exc:
            self.stats.count("protocol_errors")
            log.warning("closing the connection of client %d (pid %d): protocol error: %s",
                        conn.client.id, conn.client.pid, exc)
            self._end_conn(conn, "ProtocolError", str(exc))
        except OSError as exc:
            self._close_conn(conn, f"socket error: {exc}")
        except Exception:
            log.exception("internal error serving client %d (pid %d); closing its connection",
                          conn.client.id, conn.client.pid)
            self._close_conn(conn, None)
        return False

    def _end_conn(self, conn: Conn, error: str, message: str) -> None:
        """End ``conn`` after a protocol error: read nothing more from it; what it asked
        before is answered (nothing accepted is lost), then the ERROR, then it is closed."""
        if self._conns.get(conn.fileno) is not conn or conn.ending is not None:
            return
        conn.ending = encode(MsgType.ERROR, json_body({"error": error, "message": message}))
        conn.ending_since = time.monotonic()
        self._backlog.pop(conn.fileno, None)
        self._handshakes.pop(conn.fileno, None)
        self._ending[conn.fileno] = conn
        conn.writing = conn.has_outbox
        self._sel.modify(conn.fileno, read=False, write=conn.writing)
        self._end_connections()

    def _end_connections(self) -> None:
        """Send each ending connection its ERROR once its requests are answered, and
        close it once that is sent (or it stopped reading, or took too long)."""
        now = time.monotonic()
        for conn in list(self._ending.values()):
            if self._conns.get(conn.fileno) is not conn:
                del self._ending[conn.fileno]
                continue
            if conn.ending and (conn.client.outstanding == 0 or not conn.alive
                                or now - conn.ending_since > ENDING_S):
                conn.send(conn.ending)
                conn.ending = b""  # sent (or given up on: closed below)
            if conn.ending == b"" and (not conn.alive or not conn.has_outbox or conn.flush()
                                       or now - conn.ending_since > ENDING_S):
                del self._ending[conn.fileno]
                self._close_conn(conn, None)

    def _on_writable(self, conn: Conn) -> None:
        if conn.flush():
            if not conn.alive:
                self._close_conn(conn, "connection broke")
                return
            conn.writing = False
            self._sel.modify(conn.fileno, write=False, read=conn.ending is None)
            if conn.ending is not None:
                self._end_connections()

    def _handle(self, conn: Conn, frame: Frame) -> None:
        kind = frame.type
        if kind is MsgType.INFER:
            if len(frame.body) != INFER.size:
                raise ProtocolError(f"INFER body must be {INFER.size} bytes, "
                                    f"got {len(frame.body)}")
            self._infer(conn, frame.req_id, *INFER.unpack(frame.body))
        elif not conn.welcomed:
            if kind is not MsgType.HELLO:
                if frame.fd is not None:
                    os.close(frame.fd)
                raise ProtocolError(f"expected HELLO first, got {kind.name}")
            self._hello(conn, frame)
        elif kind is MsgType.SEGMENT:
            assert frame.fd is not None
            if conn.monitor or len(frame.body) != SEGMENT.size:
                os.close(frame.fd)
                raise ProtocolError("bad SEGMENT message")
            if not conn.reader.want_fds:
                os.close(frame.fd)
                raise ProtocolError("SEGMENT after INFER: segments come before the first "
                                    "request")
            seg_id, size = SEGMENT.unpack(frame.body)
            conn.add_segment(seg_id, frame.fd, size)
        elif kind is MsgType.STATUS:
            conn.send(encode(MsgType.STATUS_REPLY, json_body(self.status()), frame.req_id))
        elif kind is MsgType.BYE:
            self._close_conn(conn, None)
        else:
            raise ProtocolError(f"unexpected message {kind.name} from a client")

    def _hello(self, conn: Conn, frame: Frame) -> None:
        data = frame.json()
        if not isinstance(data, dict):
            raise ProtocolError("HELLO body must be a JSON object")
        version = data.get("version", PROTOCOL_VERSION)
        if version != PROTOCOL_VERSION:
            raise ProtocolError(f"client speaks protocol {version!r}, server {PROTOCOL_VERSION}")
        name = data.get("name", "")
        if not isinstance(name, str):
            raise ProtocolError(f"HELLO name must be a string, got {type(name).__name__}")
        # Shown by conveyor status/top and in the log, maybe to another user: no escape
        # sequences, no line breaks.
        conn.client.name = "".join(c if c.isprintable() else "?" for c in name[:64])
        conn.monitor = data.get("monitor") is True
        if conn.monitor:  # a monitor sends no segments
            conn.reader.end_fds("bad SEGMENT message: a monitoring connection sends none")
        if conn.trusted and isinstance(data.get("pid"), int):
            conn.client.pid = int(data["pid"])
        conn.welcomed = True
        del self._handshakes[conn.fileno]
        if not conn.monitor:
            self.scheduler.add_client(conn.client)
            if self._churn.allow():
                log.info("client %d connected: pid %d uid %d %s", conn.client.id,
                         conn.client.pid, conn.client.uid, conn.client.name)
        welcome = {
            "client_id": conn.client.id,
            "server_pid": os.getpid(),
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "max_inflight": self.max_inflight,
            "models": [m.to_json() for m in self.models.values()],
            "devices": [self._describe(d) for d in self.devices],
        }
        conn.send(encode(MsgType.WELCOME, json_body(welcome)))

    def _infer(self, conn: Conn, req_id: int, model_id: int, seg_id: int, offset: int,
               deadline_ns: int, priority: int) -> None:
        if not conn.welcomed or conn.monitor:
            raise ProtocolError("INFER before HELLO" if not conn.welcomed
                                else "INFER from a monitoring connection")
        if conn.reader.want_fds:
            # Segments come before the first request; from here on plain receives (and a
            # descriptor no SEGMENT took is refused now).
            conn.reader.end_fds()
        info = self.models.get(model_id)
        if info is None:
            conn.client.failed += 1
            self._reply(conn, req_id, Status.UNKNOWN_MODEL, None,
                        text=f"no model with id {model_id}")
            return
        ins, outs = conn.views(info, seg_id, offset)
        client = conn.client
        if client.queued + client.running >= self.max_inflight:
            client.busy += 1
            self._reply(conn, req_id, Status.BUSY, model_id,
                        text=f"over the client's credit of {self.max_inflight} requests")
            return
        status = self.scheduler.submit(
            Request(client, req_id, model_id, ins, outs, deadline_ns, priority, conn))
        if status is not None:
            self._reply(conn, req_id, status, model_id)

    def _close_conn(self, conn: Conn, why: str | None) -> None:
        if self._conns.get(conn.fileno) is not conn:
            return
        del self._conns[conn.fileno]
        self._handshakes.pop(conn.fileno, None)
        self._backlog.pop(conn.fileno, None)
        self._ending.pop(conn.fileno, None)
        self._sel.unregister(conn.fileno)
        conn.mark_dead()
        conn.sock.close()
        conn.reader.close()
        if conn.welcomed and not conn.monitor:
            self.scheduler.remove_client(conn.client)
            if why or self._churn.allow():
                log.info("client %d (pid %d) disconnected%s", conn.client.id,
                         conn.client.pid, f": {why}" if why else "")
        elif why:
            log.info("connection of pid %d closed: %s", conn.client.pid, why)
        if conn.client.running == 0:
            conn.release()
        if self._exit_when_no_clients and not self._conns:
            self._stop_level = max(self._stop_level, 2)

    # --- replies ------------------------------------------------------------------------

    def _reply(self, conn: Conn, req_id: int, status: Status, model_id: int | None,
               device: int = _NO_DEVICE, text: str = "") -> None:
        self.stats.failed(model_id, status)
        conn.send(encode_result(req_id, status, device, 0, 0, 0, text or _TEXT[status]))

    def _reply_request(self, req: Request, status: Status, device: int = _NO_DEVICE,
                       text: str = "") -> None:
        self._reply(req.conn, req.req_id, status, req.model_id, device, text)

    # --- the device threads -------------------------------------------------------------

    def _device_loop(self, dev: _Dev) -> None:
        if self.realtime:
            dev.scheduling = set_realtime(self.realtime)
            if not dev.scheduling.startswith("fifo"):
                log.warning("device %d (%s) runs at %s", dev.index, dev.device.spec,
                            dev.scheduling)
        dev.scheduled.set()
        try:
            while self._device_step(dev):
                pass
        finally:
            self._role.release(dev.index)
            if self._stop_level:
                self._wake()
            self._wake_if_due()

    def _device_step(self, dev: _Dev) -> bool:
        """Run one request (answering expired ones), or do one round of I/O while idle (see
        :mod:`conveyor._device._iorole`); False when the device is done (drained, stopped
        or taken out). A function of its own so that no reference to a finished request,
        and so to its client's memory, survives while the device waits for the next one.
        """
        work = self._role.device_next(dev.state, self._wake, self._wake_if_due)
        if work is None:
            return False
        req, expired, io = work
        if io:
            try:
                self._io_round()
            except BaseException:
                self._role.release(dev.index)
                raise
            return True
        for r in expired:
            self._reply_request(r, Status.DEADLINE_EXCEEDED, dev.index)
        if req is None:
            return True
        try:
            self._run(dev, req)
        except BaseException as exc:  # a bug here must not leave a request unanswered
            log.exception("device %d failed unexpectedly", dev.index)
            if req.state == RUNNING:
                self._device_failed(dev, req, exc)
        self._role.device_ran(dev.index)
        return dev.state.failed is None

    def _wake_if_due(self) -> None:
        """Wake the I/O thread for a reply handed over to it, if not done yet."""
        if self._wake_due:
            self._wake_due = False
            self._wake()

    def _run(self, dev: _Dev, req: Request) -> None:
        # A reply handed over after the last run: wake the I/O thread now that this
        # thread is about to let go of the GIL, so that it does not wake only to wait
        # for it.
        self._wake_if_due()
        conn = req.conn
        if not conn.alive:
            self.scheduler.done(req, 0, ok=False)
            if conn.client.running == 0:
                conn.release()
            return
        start = time.monotonic_ns()
        try:
            dev.runners[req.model_id].run_into(req.inputs, req.outputs)
        except DeviceError as exc:
            self._device_failed(dev, req, exc)
            return
        except (ConveyorError, ValueError, RuntimeError, TypeError) as exc:
            spent = time.monotonic_ns() - start
            self.scheduler.done(req, spent, ok=False)
            self.stats.failed(req.model_id, Status.DEVICE_ERROR, dev.index, spent)
            conn.send(encode_result(req.req_id, Status.DEVICE_ERROR, dev.index, 0, spent, start,
                                    f"{type(exc).__name__}: {exc}"))
            return
        end = time.monotonic_ns()
        if self._role.holder == MAIN and self.scheduler.queued:
            # The device runs again at once: let the I/O thread account for this request
            # and reply, off the device's path. Waking the client from here would also
            # let the kernel run it on this CPU, in this thread's place (a "sync"
            # wake-up), delaying the next run. The I/O thread is woken when this one
            # starts that run, or before it waits if there is none for it.
            self._replies.append((req, dev.index, start, end))
            self._wake_due = True
        else:
            self._finish_ok(req, dev.index, start, end)
        if self._stop_level:
            self._wake()

    def _finish_handed_over(self) -> None:
        """Account for and answer the requests devices handed over (see :meth:`_run`)."""
        while self._replies:
            self._finish_ok(*self._replies.popleft())

    def _finish_ok(self, req: Request, device: int, start: int, end: int) -> None:
        """Account for a request that ran on ``device`` from ``start`` to ``end`` (ns), then
        answer it."""
        compute = end - start
        queue = start - req.enqueued_ns
        # Accounted before the reply, so a client that asks for the status next sees it.
        self.scheduler.done(req, compute, ok=True)
        self.stats.ok(device, req.model_id, queue, compute, end, end - req.enqueued_ns)
        for state in req.failed_on:  # run here after failing there: those devices failed
            if state.index != device:
                self._take_out(self.devices[state.index])
        conn = req.conn
        conn.send(encode_result(req.req_id, Status.OK, device, queue, compute, start))
        if not conn.alive and conn.client.running == 0:
            conn.release()

    def _device_failed(self, dev: _Dev, req: Request, exc: BaseException) -> None:
        why = f"{type(exc).__name__}: {exc}"
        # Failing a second time on one device (the others that have its model did not
        # take it while it kept away from this one: hung, or failed), it is not retried
        # again: each try failed, and the devices stay in service.
        again = dev.state in req.failed_on
        failed = req.failed_on if again else (*req.failed_on, dev.state)
        others = [] if again else [d for d in self.devices if d.state not in failed
                                   and d.state.failed is None and req.model_id in d.runners]
        self._failures[dev.index] = why
        if others:
            # Tried on another device before this one is blamed: failing on every one,
            # the request itself is at fault (its data: one bad request took a device
            # out for each try); running on one, it shows the others failed (_finish_ok).
            log.warning("device %d (%s) failed request %d of client %d (%s); trying it on "
                        "another device", dev.index, dev.device.spec, req.req_id,
                        req.client.id, why)
            self.stats.device_error(dev.index)  # the device's error, not the request's
            if not self.scheduler.requeue(req, failed) and req.client.running == 0:
                req.conn.release()  # its client has gone: nothing of it runs any more
            self._wake()  # a device holding the I/O role waits in poll, not for work
            return
        if again:
            log.warning("request %d of client %d failed again on device %d (%s), and no "
                        "other device took it meanwhile: answered DeviceError (the devices "
                        "stay in service): %s", req.req_id, req.client.id, dev.index,
                        dev.device.spec, why)
        elif len(failed) > 1:
            log.warning("request %d of client %d failed on every device that has its model "
                        "(%d), taken as its own fault (they stay in service): %s",
                        req.req_id, req.client.id, len(failed), why)
        else:
            # Kept in service: taken out, it would fail every later request too, where
            # its failure may pass (counted in its errors meanwhile).
            log.error("device %d (%s) failed a request (no other device in service has its "
                      "model, so it stays in): %s", dev.index, dev.device.spec, why)
        self.scheduler.done(req, 0, ok=False)
        self.stats.failed(req.model_id, Status.DEVICE_ERROR, dev.index)
        req.conn.send(encode_result(req.req_id, Status.DEVICE_ERROR, dev.index, 0, 0, 0, why))
        if not req.conn.alive and req.client.running == 0:
            req.conn.release()

    def _take_out(self, dev: _Dev) -> None:
        """Take ``dev`` out of service: a request it failed ran on another device. Not the
        last device in service for one of its models: that would fail all of them."""
        if dev.state.failed is not None:
            return
        why = self._failures.get(dev.index, "failed")
        orphans = self.scheduler.take_out(dev.state, why, keep_last=True)
        if orphans is None:
            log.warning("device %d (%s) failed a request that another device then ran, but "
                        "it stays in service: it is the last one for one of its models "
                        "(%s)", dev.index, dev.device.spec, why)
            return
        log.error("device %d (%s) failed a request that another device then ran: taken out "
                  "of service: %s", dev.index, dev.device.spec, why)
        for r in orphans:
            self._reply_request(r, Status.DEVICE_ERROR, dev.index,
                                f"no device left that has model {self.models[r.model_id].name}")

    # --- status -------------------------------------------------------------------------

    def _describe(self, dev: _Dev) -> dict[str, Any]:
        return {**dev.device.describe(), "index": dev.index,
                "models": [self.models[m].name for m in sorted(dev.runners)],
                "scheduling": dev.scheduling}

    def status(self) -> dict[str, Any]:
        """A JSON-ready snapshot: server, devices, models, clients, totals. Thread-safe.

        Rates, duty cycles and latency percentiles cover the last few seconds
        (``window_s``); counters and ``*_s`` sums cover the server's life.
        ``totals.requests`` counts by status every request answered, those that named
        no model the server has (a raw-protocol peer's) too; ``totals.modelless`` counts
        those alone.
        """
        now_ns = time.monotonic_ns()
        counted = self.stats.snapshot([dev.index for dev in self.devices],
                                      [info.id for info in self.models.values()], now_ns)
        devices = []
        for dev, counts in zip(self.devices, counted["devices"], strict=True):
            state = dev.state
            devices.append({
                **self._describe(dev),
                "state": "failed" if state.failed else "ok",
                "failure": state.failed,
                "current_model": (self.models[state.current_model].name
                                  if state.current_model is not None else None),
                "model_switches": state.switches,
                **counts,
            })
        models = []
        for info, counts in zip(self.models.values(), counted["models"], strict=True):
            models.append({
                **info.to_json(),
                "devices": [d.index for d in self.devices
                            if info.id in d.runners and d.state.failed is None],
                **counts,
            })
        now = time.monotonic()
        # Runs that ended but whose accounting and reply the I/O thread has still to do
        # are not running any more.
        ended = Counter(req.client.id for req, *_ in list(self._replies))
        clients = [{
            "id": c.id, "pid": c.pid, "uid": c.uid, "name": c.name, "queued": c.queued,
            "running": max(c.running - ended[c.id], 0), "completed": c.completed,
            "failed": c.failed, "busy": c.busy, "deadline_exceeded": c.expired,
            "device_s": c.device_ns / 1e9, "connected_s": now - c.connected_at,
            "requests_per_s": c.rate(now_ns),
        } for c in sorted(self.scheduler.clients(), key=lambda c: c.id)]
        requests = dict(counted["modelless"])  # requests naming no model this server has
        for m in models:
            for k, v in m["requests"].items():
                requests[k] = requests.get(k, 0) + v
        conns = list(self._conns.values())
        return {
            "server": {
                "pid": os.getpid(), "version": __version__, "protocol": PROTOCOL_VERSION,
                "socket": self.socket_path, "uptime_s": now - self.started,
                "max_queue": self.scheduler.max_queue, "max_inflight": self.max_inflight,
                "max_clients": self.max_clients, "stopping": self.stopping, "window_s": WINDOW_S,
            },
            "devices": devices,
            "models": models,
            "clients": clients,
            "totals": {
                "requests": requests,
                "errors": sum(v for k, v in requests.items() if k != "ok"),
                "queue_depth": self.scheduler.queued,
                "running": max(self.scheduler.running - sum(ended.values()), 0),
                "clients": len(clients),
                "monitors": sum(1 for c in conns if c.monitor),
                "items_per_s": sum(d["items_per_s"] for d in devices),
                "requests_per_s": sum(d["items_per_s"] for d in devices),
                "queue_s_sum": sum(m["queue"]["sum_s"] for m in models),
                "compute_s_sum": sum(m["compute"]["sum_s"] for m in models),
                "rejected_connections": counted["rejected_connections"],
                "protocol_errors": counted["protocol_errors"],
                "modelless": counted["modelless"],
            },
        }
