"""Messages between a pipeline and its own process-stage workers.

Objects are pickled with protocol 5; numpy arrays (any buffer of 4 KiB or more) travel
out of band through the sender's memfd segment, so only a small pickle crosses the
socket. Pickle is used only between a parent and the children it spawned on a private
socket pair, never on a socket anyone else can reach.

Frame: header ``<BBQIIqq`` (kind, segment slot, index, pickle length, buffer count, start
ns, end ns), the pickle, then (offset, length) pairs of the out-of-band buffers in the
segment. Each side writes into two segments in turn, so that with at most two messages
outstanding (the parent sends a worker its next task before the last result is back) a
message's buffers are never overwritten before the peer has read them.
"""

from __future__ import annotations

import pickle
import socket
import struct
from typing import Any

from .._shm import Segment, align

__all__ = ["MsgSocket", "PeerClosed", "RemoteError"]

HEAD = struct.Struct("<BBQIIqq")
BUF = struct.Struct("<QQ")
SETUP, READY, TASK, OK, ERR, SEGMENT = 1, 2, 3, 4, 5, 6
INBAND_LIMIT = 4096


class RemoteError(Exception):
    """Stands in for an exception from a worker that could not be pickled."""


class PeerClosed(Exception):
    """The other end closed the socket (or the process died)."""


class MsgSocket:
    """One end of a parent/worker socket pair, with its outgoing segment."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._outs: list[Segment | None] = [None, None]
        self._turn = 0
        self._ins: list[Segment | None] = [None, None]
        self._fds: list[int] = []

    def send(self, kind: int, index: int, obj: Any, start_ns: int = 0, end_ns: int = 0) -> None:
        """Pickle ``obj`` and send it. Raises PeerClosed if the peer is gone."""
        bufs: list[memoryview] = []

        def keep_out_of_band(pb: pickle.PickleBuffer) -> bool:
            raw = pb.raw()
            if raw.nbytes < INBAND_LIMIT:
                return True
            bufs.append(raw)
            return False

        data = pickle.dumps(obj, protocol=5, buffer_callback=keep_out_of_band)
        table = b""
        try:
            slot = self._turn
            if bufs:
                self._turn ^= 1
                need = sum(align(b.nbytes) for b in bufs)
                out = self._outs[slot]
                if out is None or out.size < need:
                    if out is not None:
                        out.close()
                    out = self._outs[slot] = Segment.create(max(need * 2, 1 << 20),
                                                            name="conveyor-stage")
                    socket.send_fds(
                        self.sock, [HEAD.pack(SEGMENT, slot, out.size, 0, 0, 0, 0)], [out.fd])
                    out.close_fd()
                pos = 0
                for b in bufs:
                    out.buf[pos : pos + b.nbytes] = b
                    table += BUF.pack(pos, b.nbytes)
                    pos += align(b.nbytes)
            self.sock.sendall(HEAD.pack(kind, slot, index, len(data), len(bufs), start_ns,
                                        end_ns) + data + table)
        except (BrokenPipeError, ConnectionError) as exc:
            raise PeerClosed(str(exc)) from exc
        finally:
            for b in bufs:
                b.release()

    def _recv_exact(self, n: int) -> bytes:
        chunks = []
        while n:
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, n, 1)
            except (ConnectionError, OSError) as exc:
                raise PeerClosed(str(exc)) from exc
            self._fds.extend(fds)
            if not data:
                raise PeerClosed("end of stream")
            chunks.append(data)
            n -= len(data)
        return b"".join(chunks)

    def recv(self) -> tuple[int, int, Any, int, int]:
        """Block for the next message: ``(kind, index, object, start_ns, end_ns)``.

        Raises PeerClosed at end of stream; exceptions from unpickling propagate.
        """
        while True:
            kind, slot, index, plen, nbufs, start_ns, end_ns = HEAD.unpack(
                self._recv_exact(HEAD.size))
            if slot > 1:
                raise PeerClosed(f"bad segment slot {slot}")
            if kind != SEGMENT:
                break
            if not self._fds:
                raise PeerClosed("segment message without a descriptor")
            old = self._ins[slot]
            if old is not None:
                old.close()
            self._ins[slot] = Segment.attach(self._fds.pop(0), index)
        body = self._recv_exact(plen + nbufs * BUF.size)
        buffers = []
        for i in range(nbufs):
            off, length = BUF.unpack_from(body, plen + i * BUF.size)
            seg = self._ins[slot]
            assert seg is not None
            buffers.append(bytearray(seg.buf[off : off + length]))
        obj = pickle.loads(body[:plen], buffers=buffers)
        return kind, index, obj, start_ns, end_ns

    def close(self) -> None:
        for seg in (*self._outs, *self._ins):
            if seg is not None:
                seg.close()
        self.sock.close()
