"""The server's side of one client connection: socket, segments, tensor views, send queue.

Replies are written by whichever thread produces them (the I/O loop or a device
thread) without ever blocking: the socket is non-blocking, and what the kernel does not
take at once waits in a bounded outbox that the I/O loop flushes when the socket is
writable. A client that stops reading until the outbox overflows is disconnected, so a
slow or stuck client can never stall a device.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy.typing as npt

from .._errors import ProtocolError
from .._shm import Segment
from ._catalog import ModelInfo
from ._protocol import FrameReader, OutOfDescriptors, descriptor_limit
from ._scheduler import ClientState

__all__ = ["MAX_OUTBOX", "MAX_SEGMENTS", "MAX_SEGMENT_BYTES", "Conn"]

#: Segments one client may send, and their total size.
MAX_SEGMENTS = 16
MAX_SEGMENT_BYTES = 1 << 30
#: Largest body a client may send (HELLO is the only large one).
MAX_CLIENT_BODY = 1 << 16
#: Unsent reply bytes a connection may hold before the client is dropped as not reading.
MAX_OUTBOX = 4 << 20
#: Cached tensor views per connection (one per model and slot in use).
MAX_VIEWS = 1024

Views = tuple[list[npt.NDArray[Any]], list[npt.NDArray[Any]]]


class Conn:
    """One client connection (server side).

    Args:
        sock: the connected socket; made non-blocking here.
        client: its scheduler state.
        trusted: a pipeline's private link (its HELLO may name its pid).
        on_trouble: called (from any thread) when the connection needs the I/O loop:
            it has bytes waiting to be sent, or it broke.
    """

    def __init__(
        self,
        sock: socket.socket,
        client: ClientState,
        trusted: bool,
        on_trouble: Callable[[Conn], None],
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.fileno = sock.fileno()
        self.reader = FrameReader(sock, MAX_CLIENT_BODY, fds=True)
        self.client = client
        self.trusted = trusted
        self.welcomed = False
        self.monitor = False
        self.segments: dict[int, Segment] = {}
        self.opened = time.monotonic()
        self.alive = True
        self.writing = False  # registered for EVENT_WRITE (I/O loop only)
        self.turn = 0  # the round of I/O that last read it (I/O loop only)
        # Ending after a protocol error (I/O loop only): no longer read; the ERROR is sent
        # once its requests are answered, then it is closed.
        self.ending: bytes | None = None
        self.ending_since = 0.0
        self.lock = threading.Lock()
        self._outbox = bytearray()
        self._views: dict[tuple[int, int, int], Views] = {}
        self._on_trouble = on_trouble
        self._released = False

    # --- sending ----------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Queue ``data`` for the client; never blocks. Thread-safe.

        A broken socket or an overflowing outbox marks the connection dead (the I/O loop
        closes it).
        """
        trouble = False
        with self.lock:
            if not self.alive:
                return
            if self._outbox:
                self._outbox += data
                if len(self._outbox) > MAX_OUTBOX:
                    self.alive = False
                    trouble = True
            else:
                try:
                    n = self.sock.send(data)
                except (BlockingIOError, InterruptedError):
                    n = 0
                except OSError:
                    self.alive = False
                    n = len(data)
                    trouble = True
                if n < len(data):
                    self._outbox += data[n:]
                    trouble = True
        if trouble:
            self._on_trouble(self)

    @property
    def has_outbox(self) -> bool:
        return bool(self._outbox)

    def flush(self) -> bool:
        """Send what the outbox holds (the I/O loop, when writable); True once it is empty."""
        with self.lock:
            if not self.alive:
                return True
            try:
                n = self.sock.send(self._outbox)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:
                self.alive = False
                return True
            del self._outbox[:n]
            return not self._outbox

    # --- shared memory ------------------------------------------------------------------

    def add_segment(self, seg_id: int, fd: int, size: int) -> None:
        """Map a segment the client sent; takes ownership of ``fd``.

        Raises:
            ProtocolError: a duplicate id, over the limits, or not a sealed memfd.
        """
        total = sum(s.size for s in self.segments.values()) + size
        if seg_id in self.segments or len(self.segments) >= MAX_SEGMENTS:
            os.close(fd)
            raise ProtocolError(f"segment {seg_id} refused: duplicate id or too many segments")
        if total > MAX_SEGMENT_BYTES:
            os.close(fd)
            raise ProtocolError(
                f"segment {seg_id} refused: {total} bytes in all, at most {MAX_SEGMENT_BYTES}"
            )
        try:
            self.segments[seg_id] = Segment.attach(fd, size)
        except ValueError as exc:
            raise ProtocolError(f"bad segment {seg_id}: {exc}") from exc
        except OSError as exc:  # this server's own shortage (mapping takes a descriptor)
            raise OutOfDescriptors(
                exc.errno or errno.EMFILE,
                f"out of file descriptors or memory to map the client's segment: "
                f"{exc.strerror} (this process may have {descriptor_limit()}; see ulimit -n)",
            ) from exc

    def views(self, info: ModelInfo, seg_id: int, offset: int) -> Views:
        """Numpy views of a request's inputs and outputs in the client's segment (cached).

        Raises:
            ProtocolError: the segment was never sent, or the slot does not fit in it.
        """
        key = (info.id, seg_id, offset)
        views = self._views.get(key)
        if views is not None:
            return views
        seg = self.segments.get(seg_id)
        if seg is None:
            raise ProtocolError(f"INFER names segment {seg_id}, which was never sent")
        if offset + info.slot_size > seg.size:
            raise ProtocolError(
                f"INFER slot at offset {offset} of {info.slot_size} bytes does not fit in "
                f"segment {seg_id} of {seg.size} bytes"
            )
        ins = [seg.array(offset + off, s.shape, s.dtype)
               for off, s in zip(info.in_offsets, info.inputs)]
        outs = [seg.array(offset + off, s.shape, s.dtype)
                for off, s in zip(info.out_offsets, info.outputs)]
        if len(self._views) >= MAX_VIEWS:
            self._views.clear()
        self._views[key] = views = (ins, outs)
        return views

    # --- closing ------------------------------------------------------------------------

    def mark_dead(self) -> None:
        with self.lock:
            self.alive = False
            self._outbox.clear()

    def release(self) -> None:
        """Unmap the client's memory. Call only once no request of it can run any more."""
        with self.lock:
            if self._released:
                return
            self._released = True
            self._views.clear()
            segments, self.segments = self.segments, {}
        for seg in segments.values():
            seg.close()
