"""The device client: the one way to reach a device worker or a device server.

A pipeline's inference stage and any program using ``conveyor.connect`` go through this
class. Inputs are checked and converted here, written into this client's memfd arena,
and only a 36-byte request crosses the socket.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .. import _errors
from .._errors import (
    Busy,
    ConveyorError,
    DeadlineExceeded,
    DeviceError,
    InputError,
    ModelNotFoundError,
    ProtocolError,
    ServerError,
    ServerGone,
)
from .._shm import Segment
from .._tensors import Inputs, dequantize, prepare_inputs
from ._catalog import ModelInfo
from ._protocol import (
    INFER,
    PROTOCOL_VERSION,
    RESULT,
    SEGMENT,
    FrameReader,
    MsgType,
    Status,
    encode,
    json_body,
)

__all__ = ["DeviceClient", "InferFuture", "Timing", "connect", "default_socket_path"]

Outputs = list[npt.NDArray[Any]]


def default_socket_path() -> Path:
    """``$XDG_RUNTIME_DIR/conveyor.sock``, else ``/tmp/conveyor-<uid>/conveyor.sock``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "conveyor.sock"
    return Path(f"/tmp/conveyor-{os.getuid()}") / "conveyor.sock"


class Timing:
    """Where a request spent its time, as the server measured it (CLOCK_MONOTONIC ns)."""

    __slots__ = ("compute_ns", "device", "queue_ns", "start_ns")

    def __init__(self, device: int, queue_ns: int, compute_ns: int, start_ns: int) -> None:
        self.device = device
        self.queue_ns = queue_ns
        self.compute_ns = compute_ns
        self.start_ns = start_ns


class InferFuture(Future[Outputs]):
    """A Future of one inference's outputs; ``timing`` is set once it is done."""

    timing: Timing | None = None


_STATUS_ERRORS: dict[int, type[ConveyorError]] = {
    Status.BUSY: Busy,
    Status.DEADLINE_EXCEEDED: DeadlineExceeded,
    Status.INPUT_ERROR: InputError,
    Status.DEVICE_ERROR: DeviceError,
    Status.UNKNOWN_MODEL: ModelNotFoundError,
    Status.BAD_REQUEST: ProtocolError,
    Status.SHUTTING_DOWN: ServerGone,
}


def error_from_name(name: str, message: str) -> ConveyorError:
    """Rebuild a conveyor error from its class name (a fixed table: nothing is evaluated)."""
    cls = getattr(_errors, name, None) if name in _errors.__all__ else None
    if isinstance(cls, type) and issubclass(cls, ConveyorError) and name != "StageError":
        return cls(message)
    return ServerError(f"{name}: {message}")


class _Pending:
    __slots__ = ("dequantize", "future", "info", "slot")

    def __init__(self, future: InferFuture, info: ModelInfo, slot: int, deq: bool) -> None:
        self.future = future
        self.info = info
        self.slot = slot
        self.dequantize = deq


class DeviceClient:
    """A connection to a device worker or server.

    Use :func:`conveyor.connect` for a server; a pipeline makes its own over a socket pair.
    Thread-safe: any number of threads may call :meth:`infer` and :meth:`submit`.

    Args:
        sock: a connected stream Unix socket, or None to connect to ``path``.
        path: the server's socket path (also used to reconnect).
        reconnect: after the server goes away, the next call connects again.
        timeout: seconds to wait for the handshake.

    Raises:
        ServerGone: no server answers at ``path``.
        ProtocolError: the peer does not speak this protocol (version mismatch included).
    """

    def __init__(
        self,
        sock: socket.socket | None = None,
        *,
        path: str | os.PathLike[str] | None = None,
        reconnect: bool = False,
        timeout: float = 10.0,
        name: str = "",
    ) -> None:
        self.path = None if path is None else Path(path)
        self.reconnect = reconnect
        self.timeout = timeout
        self.name = name or f"pid{os.getpid()}"
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._slots_cv = threading.Condition(self._lock)
        self._ids = itertools.count(1)
        self._closed = False
        self._gen = 0
        self._sock: socket.socket | None = None
        self._pending: dict[int, _Pending] = {}
        self._status_waiters: dict[int, Future[Any]] = {}
        self._reader: threading.Thread | None = None
        self._arena: Segment | None = None
        self._free: list[int] = []
        self.models: dict[str, ModelInfo] = {}
        self.welcome: dict[str, Any] = {}
        self._connect(sock)

    # --- connection -----------------------------------------------------------------

    def _connect(self, sock: socket.socket | None) -> None:
        if sock is None:
            if self.path is None:
                raise ServerGone("no socket and no path to connect to")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(self.timeout)
                sock.connect(str(self.path))
            except OSError as exc:
                sock.close()
                raise ServerGone(
                    f"no conveyor server at {self.path}: {exc.strerror or exc}; "
                    f"start one with `conveyor serve --socket {self.path}`"
                ) from exc
        sock.settimeout(self.timeout)
        reader = FrameReader(sock)
        try:
            hello = {"version": PROTOCOL_VERSION, "pid": os.getpid(), "name": self.name}
            sock.sendall(encode(MsgType.HELLO, json_body(hello)))
            frame = reader.read_frame()
            if frame.type is MsgType.ERROR:
                data = frame.body.decode("utf-8", "replace")
                if data.startswith("{"):
                    err = frame.json()
                    raise error_from_name(str(err.get("error")), str(err.get("message")))
                raise ServerError(f"the server refused the connection: {data}")
            if frame.type is not MsgType.WELCOME:
                raise ProtocolError(f"expected WELCOME, got {frame.type.name}")
            welcome = frame.json()
            models = {m["name"]: ModelInfo.from_json(m) for m in welcome["models"]}
            inflight = int(welcome["max_inflight"])
            slot = max(m.slot_size for m in models.values())
            arena = Segment.create(slot * inflight, name="conveyor-client")
            socket.send_fds(sock, [encode(MsgType.SEGMENT, SEGMENT.pack(0, arena.size))],
                            [arena.fd])
            arena.close_fd()
        except ConveyorError:
            sock.close()
            raise
        except socket.timeout as exc:
            sock.close()
            raise ServerGone(f"the device server did not answer within {self.timeout} s") from exc
        except (OSError, KeyError, TypeError, ValueError) as exc:
            sock.close()
            raise ProtocolError(f"bad handshake with the device server: {exc}") from exc
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)
        with self._lock:
            self._gen += 1
            self._sock = sock
            self.welcome = welcome
            self.models = models
            self._slot_size = slot
            self._arena = arena
            self._free = list(range(inflight))
            self._reader = threading.Thread(
                target=self._read_loop, args=(sock, reader, self._gen),
                name="conveyor-client-reader", daemon=True,
            )
            self._reader.start()

    def _ensure(self) -> socket.socket:
        with self._lock:
            if self._closed:
                raise ServerGone("the client is closed")
            sock = self._sock
        if sock is None:
            if not self.reconnect:
                raise ServerGone("the device server went away (connect with reconnect=True "
                                 "to reconnect automatically)")
            self._connect(None)
            with self._lock:
                sock = self._sock
            assert sock is not None
        return sock

    def _read_loop(self, sock: socket.socket, reader: FrameReader, gen: int) -> None:
        why: ConveyorError = ServerGone("the device server closed the connection")
        try:
            while True:
                frame = reader.read_frame()
                if frame.type is MsgType.RESULT:
                    self._on_result(frame.req_id, frame.body)
                elif frame.type is MsgType.STATUS_REPLY:
                    with self._lock:
                        fut = self._status_waiters.pop(frame.req_id, None)
                    if fut is not None:
                        fut.set_result(frame.json())
                elif frame.type is MsgType.ERROR:
                    why = ServerGone(
                        "the device server closed the connection: "
                        + frame.body.decode("utf-8", "replace"))
                    break
                else:
                    why = ProtocolError(f"unexpected {frame.type.name} from the server")
                    break
        except ServerGone as exc:
            why = exc
        except ProtocolError as exc:
            why = exc
        finally:
            reader.close()
            self._lost(gen, why)

    def _lost(self, gen: int, why: ConveyorError) -> None:
        with self._lock:
            if gen != self._gen:
                return
            sock, self._sock = self._sock, None
            pending, self._pending = self._pending, {}
            waiters, self._status_waiters = self._status_waiters, {}
            self._free = []
            self._slots_cv.notify_all()
        if sock is not None:
            sock.close()
        for p in pending.values():
            p.future.set_exception(why)
        for f in waiters.values():
            f.set_exception(why)

    def _on_result(self, req_id: int, body: bytes) -> None:
        status, device, queue_ns, compute_ns, start_ns = RESULT.unpack_from(body)
        with self._lock:
            p = self._pending.pop(req_id, None)
            arena = self._arena
        if p is None or arena is None:
            return
        fut, info = p.future, p.info
        fut.timing = Timing(device, queue_ns, compute_ns, start_ns)
        try:
            if status == Status.OK:
                base = p.slot * self._slot_size
                outs: Outputs = []
                for off, spec in zip(info.out_offsets, info.outputs):
                    arr = arena.array(base + off, spec.shape, spec.dtype).copy()
                    outs.append(dequantize(arr, spec) if p.dequantize and spec.quantized else arr)
                self._release(p.slot)
                fut.set_result(outs)
            else:
                self._release(p.slot)
                text = body[RESULT.size:].decode("utf-8", "replace")
                cls = _STATUS_ERRORS.get(status, ServerError)
                fut.set_exception(cls(f"{info.name}: {text or Status(status).name}"))
        except Exception as exc:  # never let the reader thread die on one bad reply
            if not fut.done():
                fut.set_exception(ServerError(f"bad reply: {exc}"))

    def _release(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)
            self._slots_cv.notify()

    # --- the API --------------------------------------------------------------------

    def submit(
        self,
        model: str,
        inputs: Inputs,
        *,
        deadline: float | None = None,
        priority: int = 0,
        dequantize: bool = False,
    ) -> InferFuture:
        """Queue one inference and return a Future of its outputs (a list in model order).

        ``deadline`` is in seconds from now: if the request cannot start on the device by
        then it fails with DeadlineExceeded without running. Blocks while this client has
        its full credit of requests in flight (flow control), at most until the deadline.

        Raises (at once): ModelNotFoundError, InputError, ServerGone.
        The Future raises: Busy, DeadlineExceeded, DeviceError, ServerGone.
        """
        info = self.models.get(model)
        if info is None:
            stem = Path(model).stem
            info = self.models.get(stem)
            if info is None:
                self._ensure()
                info = self.models.get(model) or self.models.get(stem)
        if info is None:
            raise ModelNotFoundError(
                f"the device server does not serve {model!r}; it serves {sorted(self.models)}"
            )
        arrays = prepare_inputs(info.inputs, inputs, info.name)
        deadline_ns = 0
        if deadline is not None:
            deadline_ns = time.monotonic_ns() + int(deadline * 1e9)
        sock = self._ensure()
        fut = InferFuture()
        with self._lock:
            while not self._free:
                if self._sock is None or self._closed:
                    raise ServerGone("the device server went away")
                wait = None if not deadline_ns else (deadline_ns - time.monotonic_ns()) / 1e9
                if wait is not None and wait <= 0:
                    fut.set_exception(DeadlineExceeded(f"{info.name}: no free slot before the deadline"))
                    return fut
                self._slots_cv.wait(wait)
            slot = self._free.pop()
            arena = self._arena
            gen = self._gen
        assert arena is not None
        base = slot * self._slot_size
        for arr, off, spec in zip(arrays, info.in_offsets, info.inputs):
            np.copyto(arena.array(base + off, spec.shape, spec.dtype), arr)
        req_id = next(self._ids)
        with self._lock:
            if gen != self._gen:
                raise ServerGone("the device server went away")
            self._pending[req_id] = _Pending(fut, info, slot, dequantize)
        msg = encode(MsgType.INFER, INFER.pack(info.id, 0, base, deadline_ns, priority), req_id)
        try:
            with self._send_lock:
                sock.sendall(msg)
        except OSError as exc:
            self._lost(gen, ServerGone(f"the device server went away: {exc}"))
        return fut

    def infer(
        self,
        model: str,
        inputs: Inputs,
        *,
        deadline: float | None = None,
        priority: int = 0,
        dequantize: bool = False,
    ) -> Outputs:
        """Run one inference and wait for its outputs (a list of arrays in model order).

        Blocks until the result arrives. Raises ModelNotFoundError, InputError, Busy,
        DeadlineExceeded, DeviceError or ServerGone. See :meth:`submit`.
        """
        return self.submit(
            model, inputs, deadline=deadline, priority=priority, dequantize=dequantize
        ).result()

    async def ainfer(
        self,
        model: str,
        inputs: Inputs,
        *,
        deadline: float | None = None,
        priority: int = 0,
        dequantize: bool = False,
    ) -> Outputs:
        """The asyncio form of :meth:`infer`. Cancelling the await abandons the result."""
        fut = await asyncio.to_thread(
            self.submit, model, inputs, deadline=deadline, priority=priority,
            dequantize=dequantize,
        ) if self._would_block() else self.submit(
            model, inputs, deadline=deadline, priority=priority, dequantize=dequantize)
        return await asyncio.wrap_future(fut)

    def _would_block(self) -> bool:
        with self._lock:
            return not self._free

    def status(self, timeout: float = 10.0) -> dict[str, Any]:
        """The server's status snapshot (see ``conveyor status --json``)."""
        sock = self._ensure()
        fut: Future[Any] = Future()
        req_id = next(self._ids)
        with self._lock:
            self._status_waiters[req_id] = fut
        with self._send_lock:
            sock.sendall(encode(MsgType.STATUS, b"", req_id))
        result: dict[str, Any] = fut.result(timeout)
        return result

    def model_info(self, model: str) -> ModelInfo:
        """The specs of a served model."""
        try:
            return self.models[model]
        except KeyError:
            raise ModelNotFoundError(
                f"the device server does not serve {model!r}; it serves {sorted(self.models)}"
            ) from None

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def close(self) -> None:
        """Say goodbye and close; pending requests fail with ServerGone."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sock = self._sock
            reader = self._reader
        if sock is not None:
            try:
                with self._send_lock:
                    sock.sendall(encode(MsgType.BYE))
            except OSError:
                pass
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if reader is not None and reader is not threading.current_thread():
            reader.join(timeout=2.0)
        self._lost(self._gen, ServerGone("the client was closed"))
        if self._arena is not None:
            self._arena.close()

    def __enter__(self) -> DeviceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(
    path: str | os.PathLike[str] | None = None,
    *,
    reconnect: bool = False,
    timeout: float = 10.0,
    name: str = "",
) -> DeviceClient:
    """Connect to a ``conveyor serve`` device server.

    ``path`` defaults to :func:`default_socket_path` (``$XDG_RUNTIME_DIR/conveyor.sock``
    or ``/tmp/conveyor-<uid>/conveyor.sock``). With ``reconnect=True`` a call made after
    the server went away connects again (it fails with ServerGone while none is there).

    Raises:
        ServerGone: nothing is listening at ``path``.
        ServerError: the server refused this user.
        ProtocolError: the peer speaks another protocol version.
    """
    return DeviceClient(
        path=default_socket_path() if path is None else path,
        reconnect=reconnect, timeout=timeout, name=name,
    )
