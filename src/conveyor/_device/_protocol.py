"""The wire protocol between device clients and a device worker or server.

Every message is a fixed 20-byte header followed by a body of ``body_len`` bytes::

    magic   4s  b"CVYR"
    version B   PROTOCOL_VERSION
    type    B   a MsgType
    flags   H   0 (reserved)
    length  I   body length, at most MAX_BODY
    req_id  Q   request id chosen by the client (0 for control messages)

Bodies are fixed ``struct`` layouts, UTF-8 text, or JSON (server to client, and the
client's HELLO). Nothing is pickled and nothing a peer sends is evaluated. Tensors never
travel on the socket: they sit in memfd segments (see :mod:`conveyor._shm`) whose file
descriptors are passed once with ``SCM_RIGHTS`` (the SEGMENT message).

The stream framing lives in :class:`FrameReader`; anything malformed raises
:class:`~conveyor.ProtocolError`, after which the connection must be closed.
"""

from __future__ import annotations

import enum
import json
import socket
import struct
from collections import deque
from dataclasses import dataclass
from typing import Any

from .._errors import ProtocolError, ServerGone

__all__ = [
    "HEADER",
    "INFER",
    "MAX_BODY",
    "PROTOCOL_VERSION",
    "RESULT",
    "SEGMENT",
    "Frame",
    "FrameReader",
    "MsgType",
    "Status",
    "encode",
    "json_body",
]

MAGIC = b"CVYR"
PROTOCOL_VERSION = 1
HEADER = struct.Struct("<4sBBHIQ")
MAX_BODY = 1 << 20
MAX_FDS = 4

#: INFER body: model id, segment id, offset in segment, deadline (CLOCK_MONOTONIC ns, 0 for
#: none), priority.
INFER = struct.Struct("<IIQqi")
#: RESULT body: status, device index, queue ns, compute ns, compute start ns (monotonic),
#: followed by UTF-8 error text when status is not OK.
RESULT = struct.Struct("<HHqqq")
#: SEGMENT body: segment id, size. Carries exactly one fd.
SEGMENT = struct.Struct("<IQ")


class MsgType(enum.IntEnum):
    HELLO = 1  # c->s, JSON {"version", "pid", "name"}
    WELCOME = 2  # s->c, JSON {"client_id", "models", "max_inflight", ...}
    SEGMENT = 3  # c->s, SEGMENT + fd
    INFER = 4  # c->s, INFER
    RESULT = 5  # s->c, RESULT (+ text)
    STATUS = 6  # c->s, empty
    STATUS_REPLY = 7  # s->c, JSON
    ERROR = 8  # s->c, UTF-8 text, then the server closes the connection
    BYE = 9  # c->s, empty


class Status(enum.IntEnum):
    OK = 0
    BUSY = 1
    DEADLINE_EXCEEDED = 2
    INPUT_ERROR = 3
    DEVICE_ERROR = 4
    UNKNOWN_MODEL = 5
    BAD_REQUEST = 6
    SHUTTING_DOWN = 7


@dataclass
class Frame:
    type: MsgType
    req_id: int
    body: bytes
    fd: int | None = None

    def json(self) -> Any:
        """The body parsed as JSON; ProtocolError if it is not."""
        try:
            return json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ProtocolError(f"{self.type.name} body is not valid JSON: {exc}") from exc


def encode(msg: MsgType, body: bytes = b"", req_id: int = 0) -> bytes:
    """One framed message."""
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, msg, 0, len(body), req_id) + body


def json_body(obj: Any) -> bytes:
    """Compact UTF-8 JSON."""
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


class FrameReader:
    """Reads framed messages (and passed fds) from a stream socket.

    Not thread-safe: one reader per socket. Received fds that no message claims are
    closed by :meth:`close`.
    """

    def __init__(self, sock: socket.socket, max_body: int = MAX_BODY) -> None:
        self._sock = sock
        self._buf = bytearray()
        self._fds: deque[int] = deque()
        self._max_body = max_body
        self.eof = False

    def feed_from_socket(self) -> int:
        """One ``recv`` into the buffer; returns the bytes read (0 at end of stream).

        Blocks if the socket is blocking and nothing is ready. Raises OSError from the socket.
        """
        data, fds, flags, _ = socket.recv_fds(self._sock, 1 << 16, MAX_FDS)
        self._fds.extend(fds)
        if flags & socket.MSG_CTRUNC:
            raise ProtocolError("too many file descriptors in one message")
        if not data:
            self.eof = True
        self._buf += data
        return len(data)

    def next_frame(self) -> Frame | None:
        """The next complete frame in the buffer, or None if more bytes are needed.

        Raises:
            ProtocolError: bad magic, version, type or size, or a SEGMENT without an fd.
        """
        if len(self._buf) < HEADER.size:
            if self.eof and self._buf:
                raise ProtocolError(f"truncated header: {len(self._buf)} bytes then end of stream")
            return None
        magic, version, mtype, _flags, length, req_id = HEADER.unpack_from(self._buf)
        if magic != MAGIC:
            raise ProtocolError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
        if version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"protocol version {version} not supported (this side speaks {PROTOCOL_VERSION})"
            )
        try:
            kind = MsgType(mtype)
        except ValueError:
            raise ProtocolError(f"unknown message type {mtype}") from None
        if length > self._max_body:
            raise ProtocolError(f"message body of {length} bytes exceeds {self._max_body}")
        end = HEADER.size + length
        if len(self._buf) < end:
            if self.eof:
                raise ProtocolError(f"truncated {kind.name}: {len(self._buf)} of {end} bytes")
            return None
        body = bytes(self._buf[HEADER.size : end])
        del self._buf[:end]
        fd = None
        if kind is MsgType.SEGMENT:
            if not self._fds:
                raise ProtocolError("SEGMENT message without a file descriptor")
            fd = self._fds.popleft()
        return Frame(kind, req_id, body, fd)

    def read_frame(self) -> Frame:
        """Block until one whole frame has arrived (blocking socket).

        Raises:
            ServerGone: the peer closed the stream.
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
            except OSError as exc:
                raise ServerGone(f"the connection broke: {exc}") from exc

    def close(self) -> None:
        """Close any received fds nobody claimed."""
        import os

        while self._fds:
            os.close(self._fds.popleft())
