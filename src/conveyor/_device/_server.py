"""The device server: owns devices, runs the scheduler, serves clients on Unix sockets.

The same class is the private device worker of a pipeline (one pre-connected socket) and
``conveyor serve`` (a listening socket, many clients): one scheduler, two faces.

Threads: the caller of :meth:`DeviceServer.serve_forever` runs the I/O loop (accepts,
reads and checks messages, queues requests, answers control messages and expired
deadlines); one thread per device takes requests from the scheduler, copies inputs in,
invokes, copies outputs out and sends the reply. Nothing else runs in this process, so
the device never waits for a GIL held by user code.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._version import __version__
from .._errors import ConveyorError, DeviceError, ProtocolError
from .._shm import Segment
from ..backends import Device, Runner
from ._catalog import ModelInfo
from ._protocol import (
    INFER,
    RESULT,
    SEGMENT,
    Frame,
    FrameReader,
    MsgType,
    Status,
    encode,
    json_body,
)
from ._scheduler import ClientState, DeviceState, Request, Scheduler

__all__ = ["DeviceServer"]

log = logging.getLogger("conveyor.server")

MAX_SEGMENTS = 16
MAX_SEGMENT_BYTES = 1 << 30
SEND_TIMEOUT = 5.0
HANDSHAKE_TIMEOUT = 10.0


def _percentiles(values: Sequence[int]) -> tuple[float, float]:
    if not values:
        return 0.0, 0.0
    arr = np.fromiter(values, dtype=np.float64)
    p50, p99 = np.percentile(arr, [50, 99])
    return float(p50) / 1e6, float(p99) / 1e6


class _Conn:
    """One client connection."""

    def __init__(self, sock: socket.socket, client: ClientState, trusted: bool) -> None:
        self.sock = sock
        self.reader = FrameReader(sock)
        self.client = client
        self.trusted = trusted
        self.welcomed = False
        self.segments: dict[int, Segment] = {}
        self.send_lock = threading.Lock()
        self.alive = True
        self.opened = time.monotonic()

    def send(self, data: bytes) -> bool:
        """Send a whole message; on failure mark the connection dead (the I/O loop closes it)."""
        with self.send_lock:
            if not self.alive:
                return False
            try:
                self.sock.sendall(data)
                return True
            except OSError:
                self.alive = False
                return False


class _Dev:
    """A device, its loaded models and its accounting."""

    def __init__(self, index: int, device: Device, runners: dict[int, Runner]) -> None:
        self.index = index
        self.device = device
        self.runners = runners
        self.state = DeviceState(index, frozenset(runners))
        self.busy_ns = 0
        self.items = 0
        self.errors = 0
        self.recent: deque[tuple[int, int]] = deque(maxlen=50_000)  # (end_ns, compute_ns)
        self.latency: deque[int] = deque(maxlen=4096)
        self.thread: threading.Thread | None = None


class DeviceServer:
    """Serve inference on ``devices`` for ``models`` to clients on Unix sockets.

    Args:
        devices: opened devices; every model is loaded on each.
        models: bundled names or paths.
        max_queue: requests waiting in total before new ones get BUSY.
        max_inflight: requests one client may have queued or running (its credit).
        allowed_uids, allowed_gids: peers (checked with SO_PEERCRED) allowed besides the
            server's own user.

    Raises:
        ModelError, DeviceError: a model could not be loaded.
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
    ) -> None:
        if not devices:
            raise ValueError("a device server needs at least one device")
        if not models:
            raise ValueError("a device server needs at least one model")
        self.scheduler = Scheduler(max_queue=max_queue, group_slack_ns=group_slack_ns)
        self.max_inflight = max_inflight
        self.allowed_uids = {os.getuid(), *allowed_uids}
        self.allowed_gids = set(allowed_gids)
        self.models: dict[int, ModelInfo] = {}
        self.devices: list[_Dev] = []
        for index, device in enumerate(devices):
            runners: dict[int, Runner] = {}
            for model_id, model in enumerate(models):
                runner = device.load(model)
                runners[model_id] = runner
                if model_id not in self.models:
                    self.models[model_id] = ModelInfo(
                        model_id, runner.model, runner.inputs, runner.outputs
                    )
            self.devices.append(_Dev(index, device, runners))
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._conns: dict[int, _Conn] = {}
        self._listeners: list[socket.socket] = []
        self._lock = threading.Lock()
        self._next_client = 1
        self._stopping = False
        self._drain = True
        self._exit_when_no_clients = False
        self.started = time.monotonic()
        self.started_ns = time.monotonic_ns()
        self.counts: dict[str, int] = {s.name.lower(): 0 for s in Status}
        self.queue_ns_sum = 0
        self.compute_ns_sum = 0
        self.rejected_connections = 0
        self.protocol_errors = 0
        self.socket_path: str | None = None

    # --- set-up -------------------------------------------------------------------------

    def add_listener(self, sock: socket.socket) -> None:
        """Accept clients on a listening Unix socket."""
        sock.setblocking(False)
        self._listeners.append(sock)
        self._sel.register(sock, selectors.EVENT_READ, ("listen", sock))

    def add_connection(self, sock: socket.socket, *, trusted: bool = True) -> None:
        """Serve one already-connected socket (a pipeline's private link)."""
        self._register(sock, trusted=trusted, pid=os.getppid(), uid=os.getuid())

    def _register(self, sock: socket.socket, *, trusted: bool, pid: int, uid: int) -> _Conn:
        with self._lock:
            cid = self._next_client
            self._next_client += 1
        sock.settimeout(SEND_TIMEOUT)
        conn = _Conn(sock, ClientState(cid, pid=pid, uid=uid), trusted)
        self._conns[sock.fileno()] = conn
        self._sel.register(sock, selectors.EVENT_READ, ("conn", conn))
        return conn

    def start_devices(self) -> None:
        """Start one thread per device (done by :meth:`serve_forever` if not yet)."""
        for dev in self.devices:
            if dev.thread is None:
                dev.thread = threading.Thread(
                    target=self._device_loop, args=(dev,), name=f"device-{dev.index}", daemon=True
                )
                dev.thread.start()

    # --- the I/O loop -------------------------------------------------------------------

    def serve_forever(self, *, exit_when_no_clients: bool = False) -> None:
        """Run the I/O loop until :meth:`shutdown` (or, with ``exit_when_no_clients``,
        until the last connection closes). Blocks the calling thread.
        """
        self._exit_when_no_clients = exit_when_no_clients
        self.start_devices()
        try:
            while True:
                if self._stopping and self._stop_ready():
                    break
                if exit_when_no_clients and not self._conns and not self._listeners:
                    break
                timeout = None
                deadline = self.scheduler.next_deadline_ns()
                if deadline is not None:
                    timeout = max(0.0, (deadline - time.monotonic_ns()) / 1e9)
                for key, _ in self._sel.select(timeout):
                    kind, obj = key.data
                    if kind == "wake":
                        try:
                            os.read(self._wake_r, 4096)
                        except BlockingIOError:
                            pass
                    elif kind == "listen":
                        self._accept(obj)
                    else:
                        self._on_readable(obj)
                for req in self.scheduler.expire():
                    self._answer(req, Status.DEADLINE_EXCEEDED, 0, 0, 0, -1, "deadline exceeded")
                for conn in [c for c in self._conns.values() if not c.alive]:
                    self._close_conn(conn, "connection broke")
        finally:
            self._finish()

    def _stop_ready(self) -> bool:
        if not self._drain:
            return True
        return self.scheduler.queued == 0 and not any(
            c.client.running for c in self._conns.values()
        )

    def shutdown(self, *, drain: bool = True) -> None:
        """Ask the I/O loop to stop; safe from any thread and from signal handlers.

        With ``drain``, queued and running requests finish first; new requests get
        SHUTTING_DOWN. Without, the loop stops at once.
        """
        self._drain = self._drain and drain
        self._stopping = True
        self.scheduler.close()
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def _finish(self) -> None:
        self.scheduler.close()
        for sock in self._listeners:
            self._sel.unregister(sock)
            sock.close()
        self._listeners.clear()
        for conn in list(self._conns.values()):
            self._close_conn(conn, "server stopping")
        for dev in self.devices:
            if dev.thread is not None:
                dev.thread.join(timeout=2.0)
        self._sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        for dev in self.devices:
            for runner in dev.runners.values():
                runner.close()
            dev.device.close()

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if self._stopping:
            sock.close()
            return
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", creds)
        if not self._permitted(pid, uid, gid):
            self.rejected_connections += 1
            log.warning("refused connection from pid %d: uid %d gid %d not allowed", pid, uid, gid)
            try:
                sock.settimeout(1.0)
                sock.sendall(
                    encode(MsgType.ERROR, f"permission denied for uid {uid}".encode())
                )
            except OSError:
                pass
            sock.close()
            return
        self._register(sock, trusted=False, pid=pid, uid=uid)

    def _permitted(self, pid: int, uid: int, gid: int) -> bool:
        if uid in self.allowed_uids:
            return True
        groups = {gid}
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("Groups:"):
                    groups.update(int(g) for g in line.split()[1:])
        except (OSError, ValueError):
            pass
        return bool(groups & self.allowed_gids)

    def _on_readable(self, conn: _Conn) -> None:
        try:
            conn.reader.feed_from_socket()
            while True:
                frame = conn.reader.next_frame()
                if frame is None:
                    break
                self._handle(conn, frame)
            if conn.reader.eof:
                self._close_conn(conn, None)
        except ProtocolError as exc:
            self.protocol_errors += 1
            log.warning(
                "closing connection of client %d (pid %d): %s", conn.client.id, conn.client.pid, exc
            )
            conn.send(encode(MsgType.ERROR, str(exc).encode()))
            self._close_conn(conn, str(exc))
        except OSError as exc:
            self._close_conn(conn, f"socket error: {exc}")

    def _handle(self, conn: _Conn, frame: Frame) -> None:
        kind = frame.type
        if not conn.welcomed:
            if kind is not MsgType.HELLO:
                raise ProtocolError(f"expected HELLO first, got {kind.name}")
            self._hello(conn, frame)
            return
        if kind is MsgType.INFER:
            self._infer(conn, frame)
        elif kind is MsgType.SEGMENT:
            self._segment(conn, frame)
        elif kind is MsgType.STATUS:
            conn.send(encode(MsgType.STATUS_REPLY, json_body(self.status()), frame.req_id))
        elif kind is MsgType.BYE:
            self._close_conn(conn, None)
        else:
            raise ProtocolError(f"unexpected message {kind.name} from a client")

    def _hello(self, conn: _Conn, frame: Frame) -> None:
        data = frame.json()
        if not isinstance(data, dict):
            raise ProtocolError("HELLO body must be a JSON object")
        conn.client.name = str(data.get("name", ""))[:64]
        if conn.trusted and isinstance(data.get("pid"), int):
            conn.client.pid = int(data["pid"])
        conn.welcomed = True
        self.scheduler.add_client(conn.client)
        welcome = {
            "client_id": conn.client.id,
            "server_pid": os.getpid(),
            "version": __version__,
            "max_inflight": self.max_inflight,
            "models": [m.to_json() for m in self.models.values()],
            "devices": [self._describe(d) for d in self.devices],
        }
        conn.send(encode(MsgType.WELCOME, json_body(welcome)))

    def _segment(self, conn: _Conn, frame: Frame) -> None:
        assert frame.fd is not None
        if len(frame.body) != SEGMENT.size:
            os.close(frame.fd)
            raise ProtocolError(f"SEGMENT body must be {SEGMENT.size} bytes")
        seg_id, size = SEGMENT.unpack(frame.body)
        total = sum(s.size for s in conn.segments.values()) + size
        if len(conn.segments) >= MAX_SEGMENTS or total > MAX_SEGMENT_BYTES or seg_id in conn.segments:
            os.close(frame.fd)
            raise ProtocolError(f"segment {seg_id} refused: duplicate id or over the limits")
        try:
            conn.segments[seg_id] = Segment.attach(frame.fd, size)
        except ValueError as exc:
            raise ProtocolError(f"bad segment: {exc}") from exc

    def _infer(self, conn: _Conn, frame: Frame) -> None:
        if len(frame.body) != INFER.size:
            raise ProtocolError(f"INFER body must be {INFER.size} bytes, got {len(frame.body)}")
        model_id, seg_id, offset, deadline_ns, priority = INFER.unpack(frame.body)
        info = self.models.get(model_id)
        seg = conn.segments.get(seg_id)
        if info is None:
            self._reply(conn, frame.req_id, Status.UNKNOWN_MODEL, text=f"no model {model_id}")
            return
        if seg is None or offset + info.slot_size > seg.size:
            self._reply(conn, frame.req_id, Status.BAD_REQUEST, text="slot outside the segments")
            return
        if conn.client.outstanding >= self.max_inflight:
            conn.client.busy += 1
            self._reply(conn, frame.req_id, Status.BUSY, text="client over its in-flight credit")
            return
        req = Request(
            conn.client, frame.req_id, model_id, offset, seg, deadline_ns, priority, conn=conn
        )
        status = self.scheduler.submit(req)
        if status is not None:
            self._reply(conn, frame.req_id, status, text=status.name.lower().replace("_", " "))

    def _close_conn(self, conn: _Conn, why: str | None) -> None:
        fd = conn.sock.fileno()
        if fd in self._conns:
            del self._conns[fd]
            self._sel.unregister(conn.sock)
        with conn.send_lock:
            conn.alive = False
        conn.sock.close()
        conn.reader.close()
        self.scheduler.remove_client(conn.client)
        if why:
            log.info("client %d (pid %d) closed: %s", conn.client.id, conn.client.pid, why)
        # Segments are unmapped when the last request using them is gone (garbage collected).
        conn.segments.clear()
        if self._exit_when_no_clients and not self._conns:
            self._stopping = True
            self._drain = False
            self.scheduler.close()

    # --- replies ------------------------------------------------------------------------

    def _reply(
        self,
        conn: _Conn,
        req_id: int,
        status: Status,
        queue_ns: int = 0,
        compute_ns: int = 0,
        start_ns: int = 0,
        device: int = 0xFFFF,
        text: str = "",
    ) -> None:
        self.counts[status.name.lower()] += 1
        body = RESULT.pack(status, device & 0xFFFF, queue_ns, compute_ns, start_ns)
        conn.send(encode(MsgType.RESULT, body + text.encode()[:4096], req_id))

    def _answer(
        self, req: Request, status: Status, queue_ns: int, compute_ns: int, start_ns: int,
        device: int, text: str = "",
    ) -> None:
        self._reply(req.conn, req.req_id, status, queue_ns, compute_ns, start_ns, device, text)

    # --- the device threads -------------------------------------------------------------

    def _device_loop(self, dev: _Dev) -> None:
        sched = self.scheduler
        while True:
            req, expired = sched.next(dev.state)
            for r in expired:
                self._answer(r, Status.DEADLINE_EXCEEDED, 0, 0, 0, dev.index, "deadline exceeded")
            if req is None:
                if not expired:
                    break
                continue
            conn = req.conn
            if not conn.alive:
                sched.done(req, 0, ok=False)
                continue
            info = self.models[req.model_id]
            seg: Segment = req.segment
            start = time.monotonic_ns()
            queue_ns = start - req.enqueued_ns
            try:
                arrays = [
                    seg.array(req.offset + off, spec.shape, spec.dtype)
                    for off, spec in zip(info.in_offsets, info.inputs)
                ]
                outs = dev.runners[req.model_id].run(arrays)
                end = time.monotonic_ns()
                for out, off, spec in zip(outs, info.out_offsets, info.outputs):
                    np.copyto(seg.array(req.offset + off, spec.shape, spec.dtype), out)
                del arrays
            except DeviceError as exc:
                end = time.monotonic_ns()
                self._device_failed(dev, req, exc)
                if dev.state.failed:
                    return
                continue
            except (ConveyorError, ValueError, RuntimeError) as exc:
                end = time.monotonic_ns()
                sched.done(req, end - start, ok=False)
                dev.errors += 1
                self._answer(req, Status.DEVICE_ERROR, queue_ns, end - start, start, dev.index,
                             f"{type(exc).__name__}: {exc}")
                continue
            compute = end - start
            dev.busy_ns += compute
            dev.items += 1
            dev.recent.append((end, compute))
            dev.latency.append(end - req.enqueued_ns)
            self.queue_ns_sum += queue_ns
            self.compute_ns_sum += compute
            sched.done(req, compute, ok=True)
            self._answer(req, Status.OK, queue_ns, compute, start, dev.index)
            if self._stopping:
                self._wake()

    def _device_failed(self, dev: _Dev, req: Request, exc: Exception) -> None:
        dev.errors += 1
        others = [d for d in self.devices if d is not dev and not d.state.failed
                  and req.model_id in d.state.models]
        if others:
            dev.state.failed = f"{type(exc).__name__}: {exc}"
            log.error("device %d (%s) failed and was taken out: %s", dev.index,
                      dev.device.spec, exc)
        if others and not req.retried:
            self.scheduler.requeue(req)
            return
        self.scheduler.done(req, 0, ok=False)
        self._answer(req, Status.DEVICE_ERROR, 0, 0, 0, dev.index, f"{type(exc).__name__}: {exc}")

    # --- status -------------------------------------------------------------------------

    def _describe(self, dev: _Dev) -> dict[str, Any]:
        return {**dev.device.describe(), "index": dev.index,
                "models": [self.models[m].name for m in sorted(dev.runners)]}

    def status(self) -> dict[str, Any]:
        """A JSON-ready snapshot: server, devices, models, clients, totals."""
        now_ns = time.monotonic_ns()
        window_ns = 5_000_000_000
        devices = []
        for dev in self.devices:
            recent = [(e, c) for e, c in list(dev.recent) if e >= now_ns - window_ns]
            span = min(window_ns, now_ns - self.started_ns) or 1
            p50, p99 = _percentiles(list(dev.latency))
            devices.append({
                **self._describe(dev),
                "state": "failed" if dev.state.failed else "ok",
                "failure": dev.state.failed,
                "current_model": (self.models[dev.state.current_model].name
                                  if dev.state.current_model is not None else None),
                "items": dev.items,
                "errors": dev.errors,
                "model_switches": dev.state.switches,
                "busy_s": dev.busy_ns / 1e9,
                "duty_cycle": sum(c for _, c in recent) / span,
                "duty_cycle_total": dev.busy_ns / max(now_ns - self.started_ns, 1),
                "items_per_s": len(recent) / (span / 1e9),
                "p50_ms": p50,
                "p99_ms": p99,
            })
        clients = [{
            "id": c.id, "pid": c.pid, "uid": c.uid, "name": c.name, "queued": c.queued,
            "running": c.running, "completed": c.completed, "failed": c.failed,
            "busy": c.busy, "deadline_exceeded": c.expired, "device_s": c.device_ns / 1e9,
        } for c in self.scheduler.clients()]
        return {
            "server": {
                "pid": os.getpid(), "version": __version__, "socket": self.socket_path,
                "uptime_s": time.monotonic() - self.started, "max_queue": self.scheduler.max_queue,
                "max_inflight": self.max_inflight, "stopping": self._stopping,
            },
            "devices": devices,
            "models": [m.to_json() for m in self.models.values()],
            "clients": clients,
            "totals": {
                "requests": dict(self.counts), "queue_depth": self.scheduler.queued,
                "queue_s_sum": self.queue_ns_sum / 1e9, "compute_s_sum": self.compute_ns_sum / 1e9,
                "rejected_connections": self.rejected_connections,
                "protocol_errors": self.protocol_errors,
            },
        }
