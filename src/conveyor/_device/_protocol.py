"""The wire protocol between device clients and a device worker or server.

Every message is a fixed 20-byte header followed by a body of ``body_len`` bytes::

    magic   4s  b"CVYR"
    version B   PROTOCOL_VERSION
    type    B   a MsgType
    flags   H   0 (reserved)
    length  I   body length, at most the reader's ``max_body``
    req_id  Q   request id chosen by the client (0 for control messages)

Bodies are fixed ``struct`` layouts, UTF-8 text, or JSON (server to client, and the
client's HELLO). Nothing is pickled and nothing a peer sends is evaluated. Tensors never
travel on the socket: they sit in memfd segments (see :mod:`conveyor._shm`) whose file
descriptors are passed once with ``SCM_RIGHTS`` (the SEGMENT message).

A conversation::

    client                                server
    HELLO {"version", "pid", "name"}  ->
                                      <-  WELCOME {"client_id", "models", "max_inflight"}
    SEGMENT (id, size) + fd           ->
    INFER (model, segment, offset,    ->
           deadline, priority)
                                      <-  RESULT (status, device, queue, compute, start)
    STATUS                            ->
                                      <-  STATUS_REPLY {...}
    BYE                               ->

SEGMENT messages come before the first INFER (a server stops accepting descriptors then).
A client that only watches (``conveyor status``, ``conveyor top``) says
``"monitor": true`` in its HELLO, sends no SEGMENT and no INFER, and is not counted as a
client. Versions: the header's version byte must match exactly; a peer of another version
is answered with ERROR and closed. A malformed message of any kind is answered with ERROR
(JSON ``{"error", "message"}``) and the connection is closed.

The stream framing lives in :class:`FrameReader`; anything malformed raises
:class:`~conveyor.ProtocolError`, after which the connection must be closed.
"""

from __future__ import annotations

import array
import enum
import errno
import json
import os
import resource
import socket
import struct
from collections import deque
from typing import Any

from .._errors import ProtocolError, ServerGone

#: The six fixed fields after the header of an INFER or a RESULT message.
Fields6 = tuple[int, int, int, int, int, int]

__all__ = [
    "HEADER",
    "INFER",
    "INFER_MSG",
    "MAX_BODY",
    "MAX_INFLIGHT",
    "PROTOCOL_VERSION",
    "RESULT",
    "RESULT_MSG",
    "SEGMENT",
    "Frame",
    "FrameReader",
    "MsgType",
    "OutOfDescriptors",
    "Status",
    "descriptor_limit",
    "encode",
    "encode_infer",
    "encode_result",
    "json_body",
    "out_of_descriptors",
]

MAGIC = b"CVYR"
PROTOCOL_VERSION = 2  # 2: monitors, JSON errors, segments before the first INFER
#: The most requests a server may let one client have in flight (a client refuses more).
MAX_INFLIGHT = 4096
HEADER = struct.Struct("<4sBBHIQ")
#: The largest body a reader accepts unless told otherwise (STATUS_REPLY can be large).
MAX_BODY = 1 << 20
#: File descriptors one ``recvmsg`` may carry; more is a protocol error.
MAX_FDS = 4
#: Received descriptors waiting for their SEGMENT messages; more is a protocol error (a
#: client may send 16 segments at most, and one receive may bring 4 more). SEGMENT
#: messages take them in the order they came (the kernel hands a descriptor over with the
#: first part of the send that carried it, which a large send splits: the next send's may
#: come before this one's SEGMENTs are read); one still waiting when the segments end
#: (the first INFER, a monitor's HELLO) is refused then.
MAX_PENDING_FDS = 16 + MAX_FDS

#: INFER body: model id, segment id, offset in segment, deadline (CLOCK_MONOTONIC ns, 0 for
#: none), priority.
INFER = struct.Struct("<IIQqi")
#: RESULT body: status, device index, queue ns, compute ns, compute start ns (monotonic),
#: followed by UTF-8 error text when status is not OK.
RESULT = struct.Struct("<HHqqq")
#: SEGMENT body: segment id, size. Carries exactly one fd.
SEGMENT = struct.Struct("<IQ")
#: A whole INFER message and a whole RESULT message (header and body), packed in one go.
INFER_MSG = struct.Struct(HEADER.format + INFER.format[1:])
RESULT_MSG = struct.Struct(HEADER.format + RESULT.format[1:])

_FDS_SIZE = array.array("i").itemsize
_ANC_SIZE = socket.CMSG_SPACE(MAX_FDS * _FDS_SIZE)
_CMSG_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0)


class OutOfDescriptors(OSError):
    """This process has no file descriptor left: one that a peer sent was lost."""


def descriptor_limit() -> int:
    """This process's soft limit on open file descriptors (RLIMIT_NOFILE)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def out_of_descriptors() -> bool:
    """Whether opening one more file descriptor fails for want of one."""
    try:
        fd = os.open(os.devnull, os.O_RDONLY)
    except OSError as exc:
        return exc.errno in (errno.EMFILE, errno.ENFILE)
    os.close(fd)
    return False


class MsgType(enum.IntEnum):
    HELLO = 1  # c->s, JSON {"version", "pid", "name", "monitor"}
    WELCOME = 2  # s->c, JSON {"client_id", "models", "max_inflight", ...}
    SEGMENT = 3  # c->s, SEGMENT + fd
    INFER = 4  # c->s, INFER
    RESULT = 5  # s->c, RESULT (+ text)
    STATUS = 6  # c->s, empty
    STATUS_REPLY = 7  # s->c, JSON
    ERROR = 8  # s->c, UTF-8 text or JSON {"error", "message"}, then the server closes
    BYE = 9  # c->s, empty


_TYPES = {int(t): t for t in MsgType}
_INFER_TYPE = int(MsgType.INFER)
_RESULT_TYPE = int(MsgType.RESULT)


class Status(enum.IntEnum):
    OK = 0
    BUSY = 1
    DEADLINE_EXCEEDED = 2
    INPUT_ERROR = 3
    DEVICE_ERROR = 4
    UNKNOWN_MODEL = 5
    BAD_REQUEST = 6
    SHUTTING_DOWN = 7


class Frame:
    """One received message; ``fd`` is set for SEGMENT (the receiver owns it)."""

    __slots__ = ("body", "fd", "req_id", "type")

    def __init__(self, type: MsgType, req_id: int, body: bytes, fd: int | None = None) -> None:
        self.type = type
        self.req_id = req_id
        self.body = body
        self.fd = fd

    def json(self) -> Any:
        """The body parsed as JSON; ProtocolError if it is not."""
        try:
            return json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ProtocolError(f"{self.type.name} body is not valid JSON: {exc}") from exc


def encode(msg: MsgType, body: bytes = b"", req_id: int = 0) -> bytes:
    """One framed message."""
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, msg, 0, len(body), req_id) + body


def encode_infer(
    req_id: int, model: int, segment: int, offset: int, deadline_ns: int, priority: int
) -> bytes:
    """A whole INFER message."""
    return INFER_MSG.pack(MAGIC, PROTOCOL_VERSION, _INFER_TYPE, 0, INFER.size, req_id,
                          model, segment, offset, deadline_ns, priority)


def encode_result(
    req_id: int, status: int, device: int, queue_ns: int, compute_ns: int, start_ns: int,
    text: str = "",
) -> bytes:
    """A whole RESULT message; ``text`` (at most 4 kB are kept) explains an error."""
    # Cut at 4 kB on a character's boundary: the text stays valid UTF-8.
    extra = (text.encode("utf-8", "replace")[:4096].decode("utf-8", "ignore").encode("utf-8")
             if text else b"")
    return RESULT_MSG.pack(MAGIC, PROTOCOL_VERSION, _RESULT_TYPE, 0, RESULT.size + len(extra),
                           req_id, status, device & 0xFFFF, queue_ns, compute_ns, start_ns) + extra


def json_body(obj: Any) -> bytes:
    """Compact UTF-8 JSON."""
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


class FrameReader:
    """Reads framed messages (and, with ``fds``, passed descriptors) from a stream socket.

    Receives into one reusable buffer, so reading a message allocates only its body.
    Not thread-safe: one reader per socket at a time. Received descriptors that no
    message claims are closed by :meth:`close`.

    Args:
        sock: a connected stream socket.
        max_body: the largest body accepted; a larger announced size is a ProtocolError
            raised from the header alone, before the body is read.
        fds: accept descriptors (``SCM_RIGHTS``); without, any that arrive are closed
            and the message carrying them is a ProtocolError.
    """

    def __init__(self, sock: socket.socket, max_body: int = MAX_BODY, *, fds: bool = True) -> None:
        self._sock = sock
        self._max_body = max_body
        #: Receive descriptors; a server turns this off once a client's segments are in
        #: (the kernel then closes any descriptor sent after, so none can pile up).
        self.want_fds = fds
        self._buf = bytearray(1 << 16)
        self._view = memoryview(self._buf)
        self._lo = 0
        self._hi = 0
        self._fds: deque[int] = deque()
        self._fds_ended = "SEGMENT after INFER: segments come before the first request"
        self.eof = False

    def feed_from_socket(self) -> int:
        """One receive into the buffer; returns the bytes read (0 at end of stream).

        Blocks if the socket is blocking and nothing is ready; raises BlockingIOError if
        it is not and nothing is ready, OSError from the socket, and ProtocolError for
        descriptors that were not asked for or too many of them.
        """
        if self._lo == self._hi:
            self._lo = self._hi = 0
        elif len(self._buf) - self._hi < 4096:
            # Move the partial message to the front to make room.
            n = self._hi - self._lo
            self._buf[:n] = self._buf[self._lo : self._hi]
            self._lo, self._hi = 0, n
        if self._hi == len(self._buf):
            self._grow(len(self._buf) * 2)
        if not self.want_fds:
            n = self._sock.recv_into(self._view[self._hi :])
        else:
            n, anc, flags, _ = self._sock.recvmsg_into(
                [self._view[self._hi :]], _ANC_SIZE, _CMSG_CLOEXEC
            )
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(data[: len(data) - len(data) % _FDS_SIZE])
                    self._fds.extend(fds)
            if flags & socket.MSG_CTRUNC:
                if out_of_descriptors():
                    raise OutOfDescriptors(
                        errno.EMFILE, "out of file descriptors: one the peer sent was lost "
                        f"(this process may have {descriptor_limit()}; see ulimit -n)")
                raise ProtocolError("too many file descriptors in one message")
            if len(self._fds) > MAX_PENDING_FDS:
                raise ProtocolError(f"{len(self._fds)} file descriptors waiting for their "
                                    f"SEGMENT messages (at most {MAX_PENDING_FDS})")
        if n == 0:
            self.eof = True
        self._hi += n
        return n

    def _grow(self, size: int) -> None:
        data = self._buf[self._lo : self._hi]
        self._view.release()
        self._buf = bytearray(size)
        self._buf[: len(data)] = data
        self._view = memoryview(self._buf)
        self._lo, self._hi = 0, len(data)

    def next_frame(self) -> Frame | None:
        """The next complete frame in the buffer, or None if more bytes are needed.

        Raises:
            ProtocolError: bad magic, version, type or size, a stream that ends inside a
                message, or a SEGMENT without a descriptor.
        """
        avail = self._hi - self._lo
        if avail < HEADER.size:
            if self.eof and avail:
                raise ProtocolError(f"truncated header: {avail} bytes then end of stream")
            return None
        magic, version, mtype, _flags, length, req_id = HEADER.unpack_from(self._buf, self._lo)
        if magic != MAGIC:
            raise ProtocolError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
        if version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"protocol version {version} not supported (this side speaks {PROTOCOL_VERSION})"
            )
        kind = _TYPES.get(mtype)
        if kind is None:
            raise ProtocolError(f"unknown message type {mtype}")
        if length > self._max_body:
            raise ProtocolError(f"message body of {length} bytes exceeds {self._max_body}")
        end = self._lo + HEADER.size + length
        if end > self._hi:
            if self.eof:
                raise ProtocolError(
                    f"truncated {kind.name}: {avail} of {HEADER.size + length} bytes"
                )
            if HEADER.size + length > len(self._buf):
                self._grow(HEADER.size + length)
            return None
        body = bytes(self._buf[self._lo + HEADER.size : end])
        self._lo = end
        fd = None
        if kind is MsgType.SEGMENT:
            if not self.want_fds:  # the kernel dropped any descriptor sent with it
                raise ProtocolError(self._fds_ended)
            if not self._fds:
                raise ProtocolError("SEGMENT message without a file descriptor")
            fd = self._fds.popleft()
        return Frame(kind, req_id, body, fd)

    def end_fds(self, why: str | None = None) -> None:
        """No more descriptors (a client's segments are in, or it is a monitor): from now
        on the kernel closes any sent, and a SEGMENT is refused (saying ``why``, if
        given). Raises ProtocolError if some came that no SEGMENT took (they are closed
        with the reader)."""
        self.want_fds = False
        if why is not None:
            self._fds_ended = why
        if self._fds:
            raise ProtocolError(f"{len(self._fds)} file descriptor(s) sent without SEGMENT")

    def _next_fixed(self, msg: struct.Struct, mtype: int, size: int) -> Fields6 | None:
        """The fields after the header of the next message if it is a well-formed
        ``mtype`` with a body of exactly ``size`` bytes (consumed); else None, leaving the
        buffer as it was."""
        lo = self._lo
        if self._hi - lo < msg.size or self._buf[lo + 5] != mtype:
            return None
        magic, version, _t, _f, length, a, b, c, d, e, f = msg.unpack_from(self._buf, lo)
        if magic != MAGIC or version != PROTOCOL_VERSION or length != size:
            return None
        self._lo = lo + msg.size
        return a, b, c, d, e, f

    def next_infer(self) -> Fields6 | None:
        """If the next complete message is a well-formed INFER, consume it and return
        ``(req_id, model, segment, offset, deadline_ns, priority)``; else None (leaving the
        buffer as it was: :meth:`next_frame` then reads, or rejects, the message).

        The request path's shortcut: one unpack, no Frame, no copy.
        """
        return self._next_fixed(INFER_MSG, _INFER_TYPE, INFER.size)

    def next_result(self) -> Fields6 | None:
        """If the next complete message is a RESULT without error text (every successful
        reply), consume it and return ``(req_id, status, device, queue_ns, compute_ns,
        start_ns)``; else None, leaving the buffer as it was (:meth:`next_frame` then
        reads, or rejects, the message).

        The reply path's shortcut: one unpack, no Frame, no copy.
        """
        return self._next_fixed(RESULT_MSG, _RESULT_TYPE, RESULT.size)

    def read_frame(self) -> Frame:
        """Block until one whole frame has arrived (blocking socket, or one with a timeout).

        Raises:
            ServerGone: the peer closed the stream, the socket failed or timed out.
            ProtocolError: malformed data.
        """
        while True:
            frame = self.next_frame()
            if frame is not None:
                return frame
            if self.eof:
                raise ServerGone("the connection was closed by the other side")
            try:
                self.feed_from_socket()
            except TimeoutError as exc:
                raise ServerGone("the other side did not answer in time (the socket's "
                                 f"timeout, {self._sock.gettimeout()} s)") from exc
            except OSError as exc:
                raise ServerGone(f"the connection broke: {exc}") from exc

    def close(self) -> None:
        """Close any received descriptors nobody claimed."""
        fds, self._fds = self._fds, deque()
        for fd in fds:
            os.close(fd)
