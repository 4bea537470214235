"""The device client: the one way to reach a device worker or a device server.

A pipeline's inference stage and any program using ``conveyor.connect`` go through this
class. Inputs are checked and converted here, written into this client's memfd arena,
and only a 48-byte request crosses the socket.

Who reads the socket: the thread that waits. A thread blocked in :meth:`infer` (or in
``InferFuture.result()``) takes the *reader role*, receives replies and hands other
threads theirs, so a synchronous call costs no thread switch in this process. Requests
nobody is waiting on yet (futures, asyncio) are read by a background thread, which takes
the role only while such requests exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import heapq
import itertools
import json
import math
import numbers
import operator
import os
import select
import socket
import stat
import sys
import threading
import time
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .._errors import (
    ConveyorError,
    DeadlineExceeded,
    InputError,
    ModelError,
    ModelNotFoundError,
    PermissionDenied,
    ProtocolError,
    ServerError,
    ServerGone,
)
from .._models import base_name, file_digest
from .._runtime._run import SIGNAL_CHECK_S, poll_ms
from .._shm import Segment
from .._tensors import Inputs, dequantize, prepare_inputs
from ._catalog import ModelInfo
from ._conn import MAX_SEGMENT_BYTES
from ._protocol import (
    MAX_INFLIGHT,
    PROTOCOL_VERSION,
    RESULT,
    SEGMENT,
    FrameReader,
    MsgType,
    Status,
    encode,
    encode_infer,
    json_body,
)
from ._requests import (
    STATUS_ERRORS,
    InferFuture,
    OutputPool,
    Outputs,
    Pending,
    Timing,
    error_from_name,
)

__all__ = [
    "DeviceClient",
    "InferFuture",
    "Timing",
    "connect",
    "default_socket_path",
    "error_from_name",
    "long_socket_path",
    "not_private",
    "private_tmp_dir",
    "query_status",
]

Views = tuple[list[npt.NDArray[Any]], list[npt.NDArray[Any]]]
_OK = int(Status.OK)
_STATUSES = frozenset(int(s) for s in Status)
_NS_MAX = 2**63 - 1
#: How long after its deadline a request may go unanswered before the client fails it
#: itself: at least this, or twice the longest run of its model seen on the connection
#: (a request that started just before its deadline is let finish).
GIVE_UP_GRACE_NS = 250_000_000
_GIVE_UP_POLL_S = GIVE_UP_GRACE_NS / 1e9


#: The longest path a Unix socket may have, in bytes (``sun_path`` less its NUL).
SOCKET_PATH_MAX = 107


def long_socket_path(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot name a Unix socket when it is too long; else None."""
    n = len(os.fsencode(path))
    if n <= SOCKET_PATH_MAX:
        return None
    return (f"the socket path {os.fspath(path)} is {n} bytes, more than the "
            f"{SOCKET_PATH_MAX} a Unix socket's path may have: use a shorter one")


def default_socket_path() -> Path:
    """``$XDG_RUNTIME_DIR/conveyor.sock``, else ``/tmp/conveyor-<uid>/conveyor.sock``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "conveyor.sock"
    return private_tmp_dir() / "conveyor.sock"


def private_tmp_dir() -> Path:
    """``/tmp/conveyor-<uid>``: the default socket's folder where there is no
    ``$XDG_RUNTIME_DIR``. Anyone may make it first: see :func:`not_private`."""
    return Path(f"/tmp/conveyor-{os.getuid()}")


def not_private(folder: Path) -> str | None:
    """Why ``folder`` (:func:`private_tmp_dir`, which exists) is not this user's own
    (another user made it, or a link to elsewhere, or others may write in it: a socket
    there may be another user's server, which would get this user's tensors); None if
    it is, or it cannot be looked at."""
    try:
        info = os.lstat(folder)
    except OSError:
        return None
    uid = os.getuid()
    if stat.S_ISLNK(info.st_mode):
        why = "is a symbolic link"
    elif not stat.S_ISDIR(info.st_mode):
        why = "is not a folder"
    elif info.st_uid != uid:
        why = f"belongs to uid {info.st_uid}"
    elif info.st_mode & 0o022:
        why = f"may be written by other users (mode {stat.S_IMODE(info.st_mode):o})"
    else:
        return None
    return (f"{folder} {why}, so it is not this user's (uid {uid}) private folder: a "
            f"socket in it may be another user's; remove it, or pass a socket path")


def check_deadline(deadline: float | None) -> float | None:
    """``deadline`` (seconds from now) as a float, or None for none (an infinite one
    included). Raises InputError for anything but a number or None, and for nan."""
    if deadline is None:
        return None
    if isinstance(deadline, bool) or not isinstance(deadline, numbers.Real):
        raise InputError(f"deadline must be a number of seconds or None, got {deadline!r}")
    value = float(deadline)
    if math.isnan(value):
        raise InputError("deadline must be a number of seconds or None, got nan")
    return None if value == math.inf else value


def deadline_to_ns(deadline: float | None) -> int:
    """A request's deadline in CLOCK_MONOTONIC ns (0: none), checked before it takes a
    slot; one past 2**63 ns is clamped there, one in the past (-inf too) is due now."""
    value = check_deadline(deadline)
    if value is None:
        return 0
    now = time.monotonic_ns()
    ns = value * 1e9  # a float: 1e300 s is no overflow here, as int() of it would be
    if ns >= _NS_MAX - now:
        return _NS_MAX
    if ns <= 0:  # -inf, and -1e300 s (-inf ns here): due now too
        return now or 1
    return now + int(ns) or 1


def check_priority(priority: int) -> int:
    if isinstance(priority, bool):
        raise InputError(f"priority must be an int, got {priority!r}")
    try:
        value = operator.index(priority)
    except TypeError:
        raise InputError(f"priority must be an int, got {priority!r}") from None
    if not -(2**31) <= value < 2**31:
        raise InputError(f"priority must fit in 32 bits, got {value}")
    return value




def _fit(info: ModelInfo, inputs: Inputs) -> list[npt.NDArray[Any]]:
    """``inputs`` as the arrays ``info``'s model takes (InputError if they cannot be)."""
    specs = info.inputs
    if (type(inputs) is np.ndarray and len(specs) == 1 and inputs.shape == specs[0].shape
            and inputs.dtype == specs[0].dtype):
        return [inputs]  # nothing to check or convert
    return prepare_inputs(specs, inputs, info.name)


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.stat().st_mode)
    except OSError:
        return True  # gone meanwhile, or not ours to look at: say what connect said


class _Link:
    """One connection: socket, reader and arena (replaced as a whole on reconnect)."""

    __slots__ = ("arena", "free", "gen", "lost", "poller", "pools", "reader", "slot_size",
                 "sock", "views")

    def __init__(self, gen: int, sock: socket.socket, reader: FrameReader,
                 arena: Segment | None, slot_size: int, slots: int) -> None:
        self.gen = gen
        self.sock = sock
        self.lost: ConveyorError | None = None  # why the connection ended
        self.reader = reader
        self.arena = arena
        self.slot_size = slot_size
        self.free = list(range(slots))
        self.views: dict[tuple[int, int], Views] = {}
        self.pools: dict[int, OutputPool] = {}  # by model id (the reader's only)
        self.poller: select.poll | None = None  # for reads with a timeout


class DeviceClient:
    """A connection to a device worker or server.

    Use :func:`conveyor.connect` for a server; a pipeline makes its own over a socket pair.
    Thread-safe: any number of threads may call :meth:`infer` and :meth:`submit`.

    Args:
        sock: a connected stream Unix socket, or None to connect to ``path``.
        path: the server's socket path (also used to reconnect).
        reconnect: after the server goes away, the next call connects again.
        timeout: seconds to wait for the connection and the handshake.
        name: shown by ``conveyor status``.
        monitor: only watch (``status()``): no shared memory, not counted as a client.
        reader: a thread of the client's own waits on the socket at all times and
            finishes every reply as it arrives. For a client used through futures
            (a pipeline's): a reply then costs one thread wake-up, where a reader that
            sleeps whenever nothing is in flight costs two (woken by the next submit,
            then by the reply). A call that waits (``infer``) gets its reply from that
            thread, one hop later than reading it itself.

    Raises:
        ServerGone: no server answers at ``path``.
        PermissionDenied: this user may not use the server (the socket's mode, or the
            server's check of its credentials).
        ServerError: the server refused the connection for another reason.
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
        monitor: bool = False,
        reader: bool = False,
    ) -> None:
        if (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                or not 0 < timeout < math.inf):
            raise ValueError(f"timeout must be a number of seconds above 0, got {timeout!r}")
        if path is not None and not os.fspath(path):
            # Path("") is ".": the error then named a folder nobody gave.
            raise ValueError("the server's socket path is empty (None for the default, "
                             f"{default_socket_path()})")
        if path is not None and (why := long_socket_path(path)) is not None:
            raise ValueError(why)  # (connect() said "no conveyor server" there)
        self.path = None if path is None else Path(path)
        self.reconnect = reconnect
        self.timeout = timeout
        # The server keeps 64 characters of it: a long one no longer fits a HELLO.
        self.name = str(name or f"pid{os.getpid()}")[:64]
        self.monitor = monitor
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._connect_lock = threading.Lock()
        self._handshaking: socket.socket | None = None  # a connection being made
        self._connecting: Future[None] | None = None  # ainfer's one attempt at a time
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._gen = 0
        self._closed = False
        self._pid = os.getpid()  # a forked child shares the connection: it may not use it
        self._link: _Link | None = None
        self._pending: dict[int, Pending] = {}
        # (give-up time, request id) of pending requests with a deadline, earliest first:
        # a server that hangs cannot hold a request past its deadline and a grace
        self._give_ups: list[tuple[int, int]] = []
        self._longest: dict[int, int] = {}  # model id -> its longest run seen (compute ns)
        self._deadlines = False  # a request with a deadline was sent: readers wake to check
        self._unwaited = 0
        self._slot_waiters = 0
        # ainfer() calls waiting for a free slot, oldest first: their loop and the future
        # that wakes them, by a number of their own
        self._async_waiters: OrderedDict[
            int, tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = OrderedDict()
        self._waiter_ids = itertools.count()
        self._reading = False
        self._sleepers = 0  # threads waiting on _cv for the reader role or an outcome
        self._tls = threading.local()  # .reading: this thread holds the reader role
        self._bg: threading.Thread | None = None
        self._dedicated = reader
        self._models: dict[str, ModelInfo] = {}
        # Paths already matched to a served model (see _lookup), with the catalogue
        # they were matched in: a reconnection brings a new one.
        self._by_path: dict[str, tuple[dict[str, ModelInfo], ModelInfo]] = {}
        self.welcome: dict[str, Any] = {}
        try:
            self._connect(sock)
        except BaseException:
            self._closed = True  # nothing to close, and nothing to warn of when collected
            raise
        if reader:
            with self._lock:
                self._start_background()

    # --- connection -----------------------------------------------------------------

    def _open(self, timeout: float) -> socket.socket:
        if self.path is None:
            raise ServerGone("no socket and no path to connect to")
        if self.path.parent == private_tmp_dir():
            why = not_private(self.path.parent)
            if why is not None:
                raise PermissionDenied(why)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        end = time.monotonic() + timeout
        pause = 0.002
        try:
            sock.settimeout(timeout)
            while True:
                try:
                    sock.connect(str(self.path))
                    break
                except BlockingIOError:
                    # Its queue of connections not yet accepted is full (a burst of them):
                    # a Unix socket does not wait for room, so wait here, within timeout.
                    if time.monotonic() + pause > end:
                        raise
                    time.sleep(pause)
                    pause = min(2 * pause, 0.05)
        except OSError as exc:
            sock.close()
            if isinstance(exc, BlockingIOError):
                raise ServerGone(
                    f"the conveyor server at {self.path} took no new connection within "
                    f"{timeout:g} s (its queue of them stayed full)") from exc
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise PermissionDenied(
                    f"permission denied: this user (uid {os.getuid()}) may not open the "
                    f"device server's socket {self.path}; the server's owner can let it in "
                    f"with `conveyor serve --group GROUP` (socket in a folder the group can "
                    f"enter) or `--allow-user {os.getuid()}`"
                ) from exc
            if exc.errno == errno.ECONNREFUSED and not _is_socket(self.path):
                raise ServerGone(  # the kernel refuses a plain file or folder so too
                    f"{self.path} is not a socket, so no conveyor server listens there; "
                    f"pass the path a server was started with (conveyor serve prints it)"
                ) from exc
            if exc.errno == errno.ECONNREFUSED:
                raise ServerGone(
                    f"the conveyor server at {self.path} does not take connections (it "
                    f"is stopping, or it ended without removing its socket): "
                    f"{exc.strerror or exc}; start one with `conveyor serve --socket "
                    f"{self.path}`"
                ) from exc
            raise ServerGone(
                f"no conveyor server at {self.path}: {exc.strerror or exc}; "
                f"start one with `conveyor serve --socket {self.path}`"
            ) from exc
        return sock

    def _connect(self, sock: socket.socket | None, timeout: float | None = None) -> None:
        """Connect (``sock``: one made already) and shake hands, within ``timeout``
        seconds (the client's own ``timeout`` if None)."""
        timeout = self.timeout if timeout is None else timeout
        if sock is None:
            sock = self._open(timeout)
        sock.settimeout(timeout)
        with self._lock:
            self._handshaking = sock  # close() shuts it down: the handshake ends at once
        try:
            self._handshake(sock, timeout)
        except ServerGone:
            if self._closed:  # close() shut the handshake down: not the server's doing
                raise ServerGone("the client was closed") from None
            raise
        finally:
            with self._lock:
                self._handshaking = None

    def _handshake(self, sock: socket.socket, timeout: float) -> None:
        reader = FrameReader(sock, fds=False)
        arena: Segment | None = None
        try:
            hello = {"version": PROTOCOL_VERSION, "pid": os.getpid(), "name": self.name,
                     "monitor": self.monitor}
            try:
                sock.sendall(encode(MsgType.HELLO, json_body(hello)))
            except OSError:
                pass  # a refusal arrives as ERROR before the close: read it below
            frame = reader.read_frame()
            if frame.type is MsgType.ERROR:
                text = frame.body.decode("utf-8", "replace")
                if text.startswith("{"):
                    err = frame.json()
                    raise error_from_name(str(err.get("error")), str(err.get("message")))
                raise ServerError(f"the server refused the connection: {text}")
            if frame.type is not MsgType.WELCOME:
                raise ProtocolError(f"expected WELCOME, got {frame.type.name}")
            welcome = frame.json()
            models = {m["name"]: ModelInfo.from_json(m) for m in welcome["models"]}
            inflight = int(welcome["max_inflight"])
            slot = max(m.slot_size for m in models.values())
            if not self.monitor:
                if not 0 < inflight <= MAX_INFLIGHT:
                    raise ValueError(f"max_inflight {inflight}")
                # The server maps at most MAX_SEGMENT_BYTES of a client's: with large
                # tensors, fewer requests in flight than the server's credit.
                inflight = min(inflight, MAX_SEGMENT_BYTES // slot)
                if not inflight:
                    raise ModelError(
                        f"a request's tensors take {slot} bytes, more than the "
                        f"{MAX_SEGMENT_BYTES} a client may share with the server")
                arena = Segment.create(slot * inflight, name="conveyor-client")
                socket.send_fds(sock, [encode(MsgType.SEGMENT, SEGMENT.pack(0, arena.size))],
                                [arena.fd])
                arena.close_fd()
        except TimeoutError as exc:
            sock.close()
            raise ServerGone(f"the device server did not answer within {timeout:.3g} s") from exc
        except ConveyorError:
            sock.close()
            if arena is not None:
                arena.close()
            raise
        except (OSError, KeyError, TypeError, ValueError) as exc:
            sock.close()
            if arena is not None:
                arena.close()
            if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE,
                                                          errno.ENOMEM):
                raise  # this process's own shortage (ulimit -n): its own error, as it is
            raise ProtocolError(f"bad handshake with the device server: {exc}") from exc
        sock.settimeout(None)
        with self._lock:
            if self._closed:  # close() came during the handshake: nothing is installed
                sock.close()
                if arena is not None:
                    arena.close()
                raise ServerGone("the client was closed")
            self._gen += 1
            self._link = _Link(self._gen, sock, reader, arena, slot,
                               0 if self.monitor else inflight)
            self.welcome = welcome
            self._models = models
            self._cv.notify_all()

    def _forked(self) -> bool:
        """This is a forked child's copy of the client (its connection is the parent's)."""
        return self._pid != os.getpid()

    def _refuse_forked(self) -> None:
        if self._forked():
            raise RuntimeError(
                f"this client was connected by process {self._pid}; a forked child cannot "
                f"use it (its connection and shared memory are the parent's): connect "
                f"again in the child")

    def _current(self, deadline_ns: int = 0) -> _Link:
        """The live link, connecting again first if allowed. Raises ServerGone, or
        DeadlineExceeded when ``deadline_ns`` (see :func:`deadline_to_ns`) passes first."""
        self._refuse_forked()
        link = self._link
        if link is not None:
            return link

        def left() -> float:
            """Seconds to the deadline (the client's timeout without one)."""
            if not deadline_ns:
                return self.timeout
            remaining = (deadline_ns - time.monotonic_ns()) / 1e9
            if remaining <= 0:
                raise DeadlineExceeded("not connected to the device server before the "
                                       "deadline (it went away, and connecting again "
                                       "takes longer)")
            return min(remaining, self.timeout)

        if not self._connect_lock.acquire(timeout=left() if deadline_ns else -1):
            left()  # raises: the deadline passed while another thread connected
        try:
            with self._lock:
                if self._closed:
                    raise ServerGone("the client is closed")
                link = self._link
            if link is not None:
                return link
            if not self.reconnect:
                raise ServerGone("the device server went away (connect with reconnect=True "
                                 "to reconnect automatically)")
            try:
                self._connect(None, left())
            except ServerGone:
                if deadline_ns and time.monotonic_ns() >= deadline_ns and not self._closed:
                    left()  # a handshake cut short by the deadline: DeadlineExceeded
                raise
            link = self._link
            if link is None:
                raise self._gone()
            return link
        finally:
            self._connect_lock.release()

    def _gone(self) -> ServerGone:
        """Why there is no connection to use: this client's close(), or the server's."""
        return ServerGone("the client was closed" if self._closed
                          else "the device server went away")

    def _lost(self, link: _Link, why: ConveyorError) -> None:
        """The connection ``link`` is finished: fail what waits on it."""
        with self._lock:
            if self._link is not link:
                return
            if self._closed:  # (the server's close answers our BYE: not its doing)
                why = ServerGone("the client was closed")
            self._link = None
            link.lost = why
            pending, self._pending = self._pending, {}
            self._give_ups.clear()
            for p in pending.values():
                p.gone = True
            self._unwaited = 0
            link.free.clear()
            self._cv.notify_all()
        try:
            link.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        link.sock.close()
        for p in pending.values():
            if not p.expired:
                p.finish(None, why)
        with self._lock:  # a waiter woken above, before its request was finished, waits on
            self._cv.notify_all()
        self._wake_async_waiters()
        link.views.clear()
        link.pools.clear()
        if link.arena is not None:
            link.arena.close()

    # --- reading ----------------------------------------------------------------------

    def _read_step(self, link: _Link, timeout: float | None) -> None:
        """Holding the reader role: wait for data (at most ``timeout``, and no later than
        the next request's give-up time), then deliver every complete message received
        (Futures' done-callbacks run here), and fail requests whose give-up time passed."""
        self._tls.reading = True
        try:
            if self._deadlines:
                # Not past the next give-up time, and never long: a reader already waiting
                # when a request with a nearer deadline is sent learns of it this way.
                first = self._first_give_up()
                due = _GIVE_UP_POLL_S
                if first:
                    due = min(max((first - time.monotonic_ns()) / 1e9, 0.0), due)
                timeout = due if timeout is None else min(timeout, due)
            self._read_messages(link, timeout)
            first = self._first_give_up()
            if first and first <= time.monotonic_ns():
                self._give_up()
        finally:
            self._tls.reading = False

    def _first_give_up(self) -> int:
        """The earliest give-up time of a request with a deadline (0: none)."""
        if not self._give_ups:  # the common case: no deadlines, no lock
            return 0
        with self._lock:
            return self._give_ups[0][0] if self._give_ups else 0

    def _give_up(self) -> None:
        """Fail the pending requests whose deadline (and grace) passed with no reply: the
        server hangs or is stopped. Each keeps its slot until the server does answer (it
        may still write the outputs there) or the connection ends."""
        now = time.monotonic_ns()
        late: list[Pending] = []
        with self._lock:
            while self._give_ups and self._give_ups[0][0] <= now:
                _, req_id = heapq.heappop(self._give_ups)
                p = self._pending.get(req_id)
                if p is not None and not p.expired and not p.finished:
                    p.expired = True
                    late.append(p)
        for p in late:
            name = p.info.name if p.info is not None else "request"
            p.finish(None, DeadlineExceeded(
                f"{name}: no answer from the device server by the deadline (is it hung or "
                f"stopped?); the request was abandoned"))
        if late:
            with self._lock:
                self._cv.notify_all()

    def _refuse_in_callback(self, what: str, advice: str = "Use submit() and another "
                            "callback, or hand the work to another thread") -> None:
        """A done-callback runs on the thread that reads replies: if it waited for a
        reply (or a slot a reply frees), nobody would read it."""
        if getattr(self._tls, "reading", False):
            raise RuntimeError(
                f"{what} from a Future's done-callback would wait for ever: callbacks run on "
                f"the thread that reads the replies. {advice}")

    def _read_messages(self, link: _Link, timeout: float | None) -> None:
        reader = link.reader
        try:
            if timeout is not None:
                poller = link.poller
                if poller is None:
                    poller = link.poller = select.poll()
                    poller.register(link.sock, select.POLLIN)
                if not poller.poll(poll_ms(timeout)):
                    return
            reader.feed_from_socket()
            while True:
                result = reader.next_result()
                if result is not None:
                    self._on_result(link, *result)
                    continue
                frame = reader.next_frame()
                if frame is None:
                    break
                if frame.type is MsgType.RESULT:
                    if len(frame.body) < RESULT.size:
                        raise ProtocolError(f"RESULT body of {len(frame.body)} bytes")
                    status, device, queue_ns, compute_ns, start_ns = RESULT.unpack_from(
                        frame.body)
                    self._on_result(link, frame.req_id, status, device, queue_ns, compute_ns,
                                    start_ns, frame.body[RESULT.size:])
                elif frame.type is MsgType.STATUS_REPLY:
                    self._on_status(frame.req_id, frame.json())
                elif frame.type is MsgType.ERROR:
                    text = frame.body.decode("utf-8", "replace")
                    with contextlib.suppress(ValueError, TypeError, AttributeError, KeyError):
                        said = json.loads(text)  # {"error": name, "message": why}
                        text = f"{said['message']} ({said['error']})"
                    raise ServerGone(f"the device server closed the connection: {text}")
                else:
                    raise ProtocolError(f"unexpected {frame.type.name} from the server")
            if reader.eof:
                raise ServerGone("the device server closed the connection")
        except (ServerGone, ProtocolError) as exc:
            self._lost(link, exc)
        except (OSError, ValueError) as exc:
            # ValueError: the socket was closed meanwhile by another thread that lost the
            # connection (its descriptor is -1); _lost() then does nothing more.
            self._lost(link, ServerGone(f"the connection to the device server broke: {exc}"))

    def _wait(self, p: Pending, timeout: float | None) -> None:
        """Block until request ``p`` has its outcome, reading the socket when no other
        thread does.

        Raises TimeoutError after ``timeout`` seconds; the request stays pending.
        """
        if not p.finished:
            self._refuse_in_callback("waiting for a reply")
            # (Before the lock, which a thread of the parent may have held at the fork.)
            self._refuse_forked()  # it hung, or read the reply the parent waits for
        end = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            if not p.waited and not p.gone:
                p.waited = True
                self._unwaited -= 1
            try:
                while not p.finished:
                    left = None if end is None else end - time.monotonic()
                    if left is not None and left <= 0:
                        raise FutureTimeout()
                    link = self._link
                    if link is None or self._reading:
                        self._sleepers += 1
                        try:
                            # bounded, as Run.take: a signal's handler runs meanwhile
                            self._cv.wait(SIGNAL_CHECK_S if left is None
                                          else min(left, SIGNAL_CHECK_S))
                        finally:
                            self._sleepers -= 1
                        continue
                    self._reading = True
                    self._cv.release()
                    try:
                        self._read_step(link, left)
                    finally:
                        self._cv.acquire()
                        self._reading = False
                        if self._sleepers:
                            self._cv.notify_all()
            except BaseException:
                if p.waited and not p.gone:
                    p.waited = False
                    self._unwaited += 1
                    self._cv.notify_all()
                raise

    def _background(self) -> bool:
        """Read replies nobody waits for yet (futures, asyncio); idle otherwise, unless
        the client was made with ``reader=True``: then it reads at all times. Returns
        False once the client is closed, True after :data:`IDLE_LET_GO_S` idle (see
        :func:`_read_in_background`)."""
        read = False
        while True:
            with self._cv:
                if read:  # give the role back (one lock round per step, not two)
                    self._reading = False
                    if self._sleepers:
                        self._cv.notify_all()
                while not self._closed and (
                    self._reading or self._link is None
                    or (self._unwaited <= 0 and not self._dedicated)
                ):
                    self._sleepers += 1
                    try:
                        if not self._cv.wait(IDLE_LET_GO_S):
                            return True
                    finally:
                        self._sleepers -= 1
                if self._closed:
                    return False
                link = self._link
                assert link is not None
                self._reading = read = True
            try:
                self._read_step(link, None)
            except BaseException:
                with self._cv:
                    self._reading = False
                    self._cv.notify_all()
                raise

    def _on_result(self, link: _Link, req_id: int, status: int, device: int, queue_ns: int,
                   compute_ns: int, start_ns: int, text: bytes = b"") -> None:
        p = self._pending.get(req_id)
        if p is None or p.info is None:
            return
        info = p.info
        outs: Outputs | None = None
        error: BaseException | None = None
        if status == _OK:
            try:  # copy the outputs out before the slot can be used again
                views = self._views(link, info, p.slot)[1]
                if p.dequantize and any(spec.quantized for spec in info.outputs):
                    outs = [dequantize(arr, spec) if spec.quantized else arr.copy()
                            for arr, spec in zip(views, info.outputs)]
                else:
                    pool = link.pools.get(info.id)
                    if pool is None:
                        pool = link.pools[info.id] = OutputPool(views)
                    outs = pool.fill(views)
            except Exception as exc:  # never let one bad reply stop the reader
                error = ServerError(f"bad reply: {exc}")
        else:
            why = text.decode("utf-8", "replace")
            cls = STATUS_ERRORS.get(status, ServerError)
            name = Status(status).name if status in _STATUSES else f"status {status}"
            error = cls(f"{info.name}: {why or name}")
        with self._lock:
            if self._pending.pop(req_id, None) is None:
                return  # lost meanwhile: already finished with ServerGone
            if status == _OK and compute_ns > self._longest.get(info.id, 0):
                self._longest[info.id] = compute_ns
            p.gone = True
            if not p.waited:
                self._unwaited -= 1
            if self._link is link:
                link.free.append(p.slot)
                if self._slot_waiters:
                    self._cv.notify_all()
            wake = bool(self._async_waiters)
        if wake:
            self._wake_async_waiters(one=True)  # one slot: the oldest waiter's
        if not p.expired:  # else the caller was already told DeadlineExceeded
            p.finish(outs, error, Timing(device, queue_ns, compute_ns, start_ns))

    def _on_status(self, req_id: int, data: Any) -> None:
        with self._lock:
            p = self._pending.pop(req_id, None)
            if p is not None:
                p.gone = True
                if not p.waited:
                    self._unwaited -= 1
        if p is not None:
            p.finish(data, None)

    def _views(self, link: _Link, info: ModelInfo, slot: int) -> Views:
        views = link.views.get((info.id, slot))
        if views is None:
            arena = link.arena
            assert arena is not None
            base = slot * link.slot_size
            views = (
                [arena.array(base + off, s.shape, s.dtype)
                 for off, s in zip(info.in_offsets, info.inputs)],
                [arena.array(base + off, s.shape, s.dtype)
                 for off, s in zip(info.out_offsets, info.outputs)],
            )
            link.views[(info.id, slot)] = views
        return views

    # --- the API --------------------------------------------------------------------

    def _lookup(self, model: str) -> ModelInfo:
        models = self._models
        info = models.get(model)
        if info is not None:
            return info
        known = self._by_path.get(model)
        if known is not None and known[0] is models:
            return known[1]
        # A path or file name names the model it holds: ``dir/name.tflite`` and an Edge
        # TPU build ``name_edgetpu.tflite`` are both served as ``name``, if the file here
        # is one the server has (else the server would run another model of that name).
        path = Path(model)
        info = models.get(path.stem) or models.get(base_name(path))
        where = ("this pipeline's device worker" if self.path is None
                 else f"the device server at {self.path}")
        if info is None:
            raise ModelNotFoundError(
                f"{where} does not serve {model!r}; it serves {sorted(models)}")
        if info.digests and path.is_file():
            try:
                same = file_digest(path) in info.digests
            except OSError as exc:
                raise ModelNotFoundError(f"cannot read {model!r}: {exc}") from exc
            if not same:
                raise ModelNotFoundError(
                    f"{where} serves a model named {info.name!r} from another file than "
                    f"{model!r} (their bytes differ): serve this file, or ask for "
                    f"{info.name!r} to use the server's")
        self._by_path[model] = (models, info)
        return info

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
        then it fails with DeadlineExceeded without running. With no answer by then plus a
        grace (twice its model's longest run seen, at least 0.25 s), the client fails it
        with DeadlineExceeded itself: a hung server cannot hold it. ``priority``: higher runs
        first. Blocks while this client has its full credit of requests in flight (flow
        control), at most until the deadline.

        Raises (at once): ModelNotFoundError, InputError, ServerGone.
        The Future raises: Busy, DeadlineExceeded, DeviceError, ServerGone.

        The Future's done-callbacks run on the thread that reads this client's replies:
        a callback may submit() more while one of the client's request slots is free (it
        has the server's ``--max-inflight`` credit, 32 by default); a call that would wait
        there (``submit`` with every slot in flight, ``infer``, ``status``, ``result()`` of
        an unfinished Future) raises RuntimeError instead, since no reply could come.
        """
        p = self._send(model, inputs, deadline_to_ns(deadline), priority, dequantize,
                       sync=False)
        assert p is not None and p.future is not None
        return p.future

    def _send(self, model: str, inputs: Inputs, deadline_ns: int, priority: int,
              deq: bool, *, sync: bool, block: bool = True) -> Pending | None:
        """Write the inputs into a free slot and send the request; the pending entry.
        ``deadline_ns``: see :func:`deadline_to_ns`. Without ``block``, None when no slot
        is free or the connection was lost (nothing sent, and no new connection made:
        the caller makes it where waiting is allowed).

        ``sync``: the calling thread waits for it at once (no Future, and the background
        reader is not involved).
        """
        if self.monitor:
            raise ServerError("a monitoring client cannot run inferences")
        if not block and self._link is None and not self._closed:
            return None  # connecting may wait: not here (see ainfer)
        link = self._current(deadline_ns)
        try:
            info = self._lookup(model)
            arrays = _fit(info, inputs)
        except (ModelNotFoundError, InputError):
            # A model not served, or inputs that do not fit, on a connection the server
            # has closed: with reconnect, the server there now may serve the model, or
            # serve it with other tensors (started again with other files). Only on this
            # error path is the connection looked at (a syscall).
            fresh = self._reconnected(link, deadline_ns)
            if fresh is None:
                raise
            link = fresh
            info = self._lookup(model)
            arrays = _fit(info, inputs)
        priority = check_priority(priority)
        for attempt in (0, 1):
            with self._cv:
                while not link.free and self._link is link and not self._closed:
                    if not block:
                        return None
                    self._refuse_in_callback(
                        "waiting for a free request slot (all of this client's are in "
                        "flight)",
                        "A callback may submit() only while a slot is free: keep fewer "
                        "requests in flight, or submit from another thread")
                    wait = None if not deadline_ns else (deadline_ns - time.monotonic_ns()) / 1e9
                    if wait is not None and wait <= 0:
                        p = Pending(info, -1, deq, True, None if sync else self._future())
                        p.finish(None, DeadlineExceeded(
                            f"{info.name}: no free slot before the deadline"))
                        return p
                    self._slot_waiters += 1
                    try:
                        self._cv.wait(wait)
                    finally:
                        self._slot_waiters -= 1
                slot = link.free.pop() if self._link is link and link.free else -1
            if slot < 0:
                if self._closed or attempt == 1:
                    raise self._gone()
                if not block:
                    return None  # the caller connects again where it may wait (ainfer)
                link = self._current(deadline_ns)
                info = self._lookup(model)
                arrays = _fit(info, inputs)
                continue
            try:
                # In a function of its own: a view left in this frame kept the arena
                # mapped (and its descriptor open) for as long as a ServerGone raised
                # below was kept (its traceback holds this frame).
                _copy_in(self._views(link, info, slot)[0], arrays)
            except BaseException:
                with self._cv:  # the slot is free again, whatever failed
                    if self._link is link:
                        link.free.append(slot)
                        self._cv.notify()
                raise
            fut = None if sync else self._future()
            p = Pending(info, slot, deq, sync, fut)
            if fut is not None:
                fut._entry = p
            req_id = next(self._ids)
            with self._lock:
                stale = self._link is not link
                if not stale:
                    self._pending[req_id] = p
                    if deadline_ns:
                        self._deadlines = True
                        grace = max(GIVE_UP_GRACE_NS, 2 * self._longest.get(info.id, 0))
                        give_ups = self._give_ups
                        if len(give_ups) > 2 * len(self._pending) + 64:
                            # entries of answered requests leave when due: far deadlines
                            # would keep them, so drop them now and then
                            give_ups[:] = [e for e in give_ups if e[1] in self._pending]
                            heapq.heapify(give_ups)
                        heapq.heappush(give_ups, (min(deadline_ns + grace, _NS_MAX), req_id))
                    if not sync:
                        self._unwaited += 1
                        self._start_background()
            if stale:
                # The connection went while this call held a slot of it: the next try is
                # on the connection there is now (it went on with the old one, which
                # gave no slot, and failed though a new server was there).
                if self._closed or attempt == 1:
                    raise self._gone()
                if not block:
                    return None
                link = self._current(deadline_ns)
                info = self._lookup(model)
                arrays = _fit(info, inputs)
                continue
            msg = encode_infer(req_id, info.id, 0, slot * link.slot_size, deadline_ns, priority)
            try:
                with self._send_lock:
                    link.sock.sendall(msg)
            except OSError as exc:
                self._read_last_words(link)  # the server's ERROR before it closed, if any
                self._lost(link, ServerGone(f"the device server went away: {exc}"))
                if not self.reconnect or attempt == 1:
                    if link.lost is not None:  # a fresh error: that one is the futures'
                        raise ServerGone(str(link.lost)) from exc
                    break
                if not block:
                    return None  # as above: not connecting here
                link = self._current(deadline_ns)
                info = self._lookup(model)
                arrays = _fit(info, inputs)
                continue
            return p
        raise ServerGone("the device server went away")

    def _read_last_words(self, link: _Link) -> None:
        """A send failed: read what the server said before it closed the connection (an
        ERROR saying why), unless another thread holds the reader role (it reads it)."""
        with self._lock:
            if self._reading or self._link is not link:
                return
            self._reading = True
        try:
            self._read_step(link, 0.0)
        finally:
            with self._lock:
                self._reading = False
                self._cv.notify_all()

    def _future(self) -> InferFuture:
        fut = InferFuture()
        fut._client = self
        fut._start()  # from here on it cannot be cancelled
        return fut

    def _start_background(self) -> None:
        # Under self._lock.
        if self._bg is None:
            self._bg = threading.Thread(target=_read_in_background, args=(weakref.ref(self),),
                                        name="conveyor-client-reader", daemon=True)
            self._bg.start()
        elif self._sleepers:
            self._cv.notify_all()

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

        Blocks until the result arrives (the calling thread reads the reply itself).
        Raises ModelNotFoundError, InputError, Busy, DeadlineExceeded, DeviceError or
        ServerGone. See :meth:`submit`.
        """
        # Before sending: refused after, its reply had nobody to read it, and its slot
        # stayed taken for good.
        self._refuse_in_callback("waiting for a reply")
        p = self._send(model, inputs, deadline_to_ns(deadline), priority, dequantize,
                       sync=True)
        assert p is not None
        if not p.finished:
            self._wait(p, None)
        if p.error is not None:
            raise p.error
        outputs: Outputs = p.outputs
        return outputs

    async def ainfer(
        self,
        model: str,
        inputs: Inputs,
        *,
        deadline: float | None = None,
        priority: int = 0,
        dequantize: bool = False,
    ) -> Outputs:
        """The asyncio form of :meth:`infer`.

        Does not block the event loop: when this client's credit is used up it awaits a
        free slot (up to the deadline), and a connection to be made runs in a worker
        thread. Cancelling the await, while it waits for a slot or for the reply,
        abandons the request.
        """
        deadline_ns = deadline_to_ns(deadline)
        loop = asyncio.get_running_loop()

        async def within_deadline(
            awaitable: asyncio.Future[None] | Callable[[], asyncio.Future[None]], what: str
        ) -> None:
            wait = None if not deadline_ns else (deadline_ns - time.monotonic_ns()) / 1e9
            if wait is not None and wait <= 0:  # before anything is made to wait on
                raise DeadlineExceeded(f"{model}: {what} before the deadline")
            fut = awaitable if isinstance(awaitable, asyncio.Future) else awaitable()
            # Not asyncio.wait_for: before Python 3.12 it returned the result when the
            # future was done as the cancel came, and the caller's cancel was lost (the
            # request was then sent). A timer cancels the future at the deadline instead.
            expired = False

            def expire() -> None:
                nonlocal expired
                if not fut.done():
                    expired = True
                    fut.cancel()

            timer = None if wait is None else loop.call_later(wait, expire)
            try:
                await fut
            except asyncio.CancelledError:
                if not expired:
                    raise  # the caller's cancel
                raise DeadlineExceeded(f"{model}: {what} before the deadline") from None
            finally:
                if timer is not None:
                    timer.cancel()

        while True:
            if self._link is None and not self._closed:
                # (Re)connecting waits for the server's handshake: in a thread, and no
                # longer than the deadline (the connection is then made for later calls).
                await within_deadline(self._connect_in_thread, "not connected to the server")
            waiter: asyncio.Future[None] = loop.create_future()
            key = next(self._waiter_ids)
            with self._lock:
                self._async_waiters[key] = (loop, waiter)  # before trying: no wake-up lost
            leaving = True
            p = None
            try:
                p = self._send(model, inputs, deadline_ns, priority, dequantize, sync=False,
                               block=False)
                if p is not None:
                    break
                if self._link is None:
                    leaving = False
                    continue  # the connection went: make a new one (above), then try again
                await within_deadline(waiter, "no free request slot")
                leaving = False
            finally:
                with self._lock:
                    woken = self._async_waiters.pop(key, None) is None
                if leaving and woken and p is None:
                    # Woken for a slot this call no longer takes (cancelled, past its
                    # deadline, failed): the next waiter's turn, passed on once. A wake
                    # still on its way finds the waiter cancelled and passes it on
                    # itself (_resolve_waiter); one that came, this call passes on.
                    if not waiter.done():
                        waiter.cancel()
                    elif not waiter.cancelled():
                        self._wake_async_waiters(one=True)
        assert p.future is not None
        return await asyncio.wrap_future(p.future)

    def _connect_in_thread(self) -> asyncio.Future[None]:
        """The outcome of connecting again (:meth:`_current`) in a daemon thread: one
        attempt at a time, shared by every ainfer() that waits for it (a thread each
        piled up thousands behind a server that did not answer). Not the loop's
        executor: ``asyncio.run()`` waits for those threads at its end, and a handshake
        with a server that does not answer takes ``timeout``. :meth:`close` ends it."""
        with self._lock:
            attempt = self._connecting
            if attempt is None or attempt.done():
                attempt = self._connecting = Future()
                attempt.set_running_or_notify_cancel()  # a waiter's cancel is not its
                threading.Thread(target=self._connect_for, args=(attempt,),
                                 name="conveyor-client-connect", daemon=True).start()
        return asyncio.wrap_future(attempt)

    def _connect_for(self, attempt: Future[None]) -> None:
        outcome: BaseException | None = None
        try:
            self._current()
        except BaseException as exc:  # handed to the awaiting tasks
            outcome = exc
        with contextlib.suppress(InvalidStateError):  # close() settled it first
            if outcome is None:
                attempt.set_result(None)
            else:
                attempt.set_exception(outcome)

    def _wake_async_waiters(self, one: bool = False) -> None:
        """The connection changed (or the client closed): every ainfer() waiting for a
        slot tries again; with ``one``, a slot came free: the oldest waiter tries (waking
        them all cost the square of their number, and stalled the event loop). Call
        without the lock held."""
        with self._lock:
            if one:
                waiters = [self._async_waiters.popitem(last=False)[1]] if (
                    self._async_waiters) else []
            else:
                waiters = list(self._async_waiters.values())
                self._async_waiters.clear()
        for loop, waiter in waiters:
            try:
                loop.call_soon_threadsafe(self._resolve_waiter, waiter, one)
            except RuntimeError:  # that loop is closed: nobody waits there
                if one:
                    self._wake_async_waiters(one=True)

    def _resolve_waiter(self, waiter: asyncio.Future[None], one: bool) -> None:
        if not waiter.done():
            waiter.set_result(None)
        elif one:  # cancelled meanwhile: the slot is the next waiter's
            self._wake_async_waiters(one=True)

    def status(self, timeout: float = 10.0) -> dict[str, Any]:
        """The server's status snapshot (see ``conveyor status --json``).

        Blocks for one round trip, at most ``timeout`` seconds. Raises ServerGone, or
        ServerError if no answer came in time.
        """
        self._refuse_in_callback("waiting for the status")
        link = self._fresh()
        req_id = next(self._ids)
        p = Pending(None, -1, False, True)
        with self._lock:
            if self._link is not link:
                raise self._gone()
            self._pending[req_id] = p
        try:
            with self._send_lock:
                link.sock.sendall(encode(MsgType.STATUS, b"", req_id))
        except OSError as exc:
            self._lost(link, ServerGone(f"the device server went away: {exc}"))
        try:
            self._wait(p, timeout)
        except FutureTimeout:
            with self._lock:
                if self._pending.pop(req_id, None) is not None:
                    p.gone = True
            raise ServerError(f"the device server did not answer within {timeout} s") from None
        if p.error is not None:
            raise p.error
        result: dict[str, Any] = p.outputs
        return result

    def models(self) -> dict[str, ModelInfo]:
        """The models the server serves, by name (their tensors and slot layout)."""
        self._fresh()
        return dict(self._models)

    def _fresh(self) -> _Link:
        """The live link, for a call that has no retry of its own: with ``reconnect``, a
        connection the server has closed (it was started again while this client was
        idle) is let go first, so that the call reaches the server there now. The
        request paths need no such look (a syscall): they retry once instead."""
        link = self._current()
        return self._reconnected(link) or link

    def _reconnected(self, link: _Link, deadline_ns: int = 0) -> _Link | None:
        """With ``reconnect``, a new connection if the server has closed ``link`` (looked
        at now: a syscall); else None."""
        if not self.reconnect or link is not self._link or self.connected:
            return None
        self._lost(link, ServerGone("the device server closed the connection"))
        return self._current(deadline_ns)

    def model_info(self, model: str) -> ModelInfo:
        """The specs of a served model (a bundled name or a path's stem).

        Raises ModelNotFoundError.
        """
        self._fresh()
        return self._lookup(model)

    @property
    def connected(self) -> bool:
        """Whether the client holds a connection the peer has not closed (looked at now,
        without waiting: a server that exited while this client was idle, or that closed
        this connection after a last message not read yet, shows here)."""
        link = self._link
        if link is None:
            return False
        hangup = getattr(select, "POLLRDHUP", 0)
        if hangup:  # Linux: the peer's close shows even behind unread bytes
            poller = select.poll()
            poller.register(link.sock, select.POLLIN | hangup)
            try:
                events = poller.poll(0)
            except (OSError, ValueError):  # closed meanwhile
                return False
            return not any(ev & (hangup | select.POLLHUP | select.POLLERR | select.POLLNVAL)
                           for _, ev in events)
        try:
            return link.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except (BlockingIOError, InterruptedError):
            return True  # open, nothing to read
        except OSError:
            return False

    def close(self) -> None:
        """Say goodbye and close; pending requests fail with ServerGone. Idempotent.

        Waits (briefly) for the background reader thread to end.
        """
        if self._forked():
            # A forked child's copy: let go of it without a word on the parent's
            # connection (a goodbye or a shutdown would end it for the parent too), and
            # without the lock, which a thread of the parent may have held at the fork:
            # the child's copy of it would never be released.
            if not self._closed:
                self._closed = True
                link, self._link = self._link, None
                if link is not None:
                    link.sock.close()
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
            link = self._link
            bg = self._bg
            handshaking, attempt = self._handshaking, self._connecting
            self._cv.notify_all()
        if handshaking is not None:  # a connection being made ends now (ServerGone)
            with contextlib.suppress(OSError):
                handshaking.shutdown(socket.SHUT_RDWR)
        if attempt is not None:  # ainfer() calls waiting for it need not wait it out
            with contextlib.suppress(InvalidStateError):
                attempt.set_exception(ServerGone("the client was closed"))
        self._wake_async_waiters()  # they find the client closed
        if link is not None:
            try:
                with self._send_lock:
                    link.sock.sendall(encode(MsgType.BYE))
            except OSError:
                pass
            self._lost(link, ServerGone("the client was closed"))
        if bg is not None and bg is not threading.current_thread():
            bg.join(timeout=2.0)

    def __repr__(self) -> str:
        where = "a private device worker" if self.path is None else str(self.path)
        return f"<DeviceClient of {where}{' (closed)' if self._closed else ''}>"

    def __del__(self) -> None:
        # A client its program dropped unclosed (collected where the last reference
        # went: the background reader's thread, say): said goodbye to, like one closed.
        if getattr(self, "_closed", True) or sys.is_finalizing():
            return
        try:
            if not self._forked():
                warnings.warn(f"unclosed {self!r}: use it in a with block or call close()",
                              ResourceWarning, stacklevel=2)
        finally:  # closed even where warnings are errors
            self.close()

    def __enter__(self) -> DeviceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: How long the background reader of an idle client waits before it lets go of the
#: client for a moment: a program that drops a client without close() has it collected
#: then (its socket closes, and the server frees its connection).
IDLE_LET_GO_S = 1.0


def _copy_in(dsts: list[npt.NDArray[Any]], arrays: Sequence[npt.NDArray[Any]]) -> None:
    """Copy a request's inputs into its slot's views."""
    for dst, arr in zip(dsts, arrays):
        np.copyto(dst, arr)


def _read_in_background(ref: weakref.ref[DeviceClient]) -> None:
    """The background reader thread: :meth:`DeviceClient._background`, holding the
    client only while it reads or waits for work, so that a client its program dropped
    is collected (a thread holding it for good kept its connection open, and enough of
    them locked every other program out of a server's ``--max-clients``)."""
    while True:
        client = ref()
        if client is None or not client._background():
            return
        del client


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
    Blocks for the handshake, at most ``timeout`` seconds.

    Raises:
        ServerGone: nothing is listening at ``path``.
        PermissionDenied: this user may not use the server (the socket's mode, or the
            server's check of its credentials; a ServerError and a PermissionError).
        ServerError: the server refused the connection for another reason.
        ProtocolError: the peer speaks another protocol version.
    """
    return DeviceClient(
        path=default_socket_path() if path is None else path,
        reconnect=reconnect, timeout=timeout, name=name,
    )


def query_status(path: str | os.PathLike[str] | None = None, timeout: float = 5.0
                 ) -> dict[str, Any]:
    """One status snapshot from the server at ``path`` (as a monitor: not a client).

    Blocks for the connection and one round trip, at most about ``timeout`` seconds each.
    Raises ServerGone (no server), ServerError, ProtocolError.
    """
    client = DeviceClient(path=default_socket_path() if path is None else path,
                          timeout=timeout, name="conveyor status", monitor=True)
    try:
        return client.status(timeout)
    finally:
        client.close()
