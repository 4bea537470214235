"""Messages between a pipeline and its own process-stage workers.

Frame: header ``<BBBxIIQqq`` (kind, segment slot, form, body length, buffer count, index,
start ns, end ns), then the body, whose layout the form gives:

- ``PICKLE``: a pickle (protocol 5), then (offset, length) pairs of its out-of-band
  buffers (any buffer of 4 KiB or more) in the sender's memfd segment.
- ``PICKLE_OOB``: the same, but the pickle itself is in the segment too (the first
  pair), when it is 4 KiB or more (a large ``bytes``, a dict of many small arrays).
- ``PICKLE_TABLE``: the same as ``PICKLE_OOB``, but the table of pairs is in the segment
  too, and the body is one pair: where the table is. For 256 buffers or more (a list
  of thousands of arrays).
  Socket messages so stay small (under 8 KiB): both ends may be sending at once (the
  parent its next task, the worker its last result) with nobody reading, and a message
  larger than the socket's buffer would leave both blocked for ever.
- ``INT``: an int64; the payload is an ``int``.
- ``ARRAY``: a bare C-contiguous numpy array: ndim and dtype-string length (``<BB``),
  the dtype string, the shape (``<q`` each), then the data itself when it is under
  4 KiB, else one (offset, length) pair in the segment.

The two short forms save a pickle round trip (several microseconds each way) on the
commonest payloads: task numbers out, arrays back. Pickle is used only between a parent
and the children it spawned on a private socket pair, never on a socket anyone else can
reach.

Each side writes into two segments in turn, so that with at most two messages
outstanding (the parent sends a worker its next task before the last result is back) a
message's buffers are never overwritten before the peer has read them. A segment is
announced by a ``SEGMENT`` message (index: its size) carrying its descriptor with
``SCM_RIGHTS``. The receiver reads the socket through one buffer, so one system call
takes in every message already queued.
"""

from __future__ import annotations

import array
import os
import pickle
import socket
import struct
from typing import Any

import numpy as np

from .._shm import Segment, align

__all__ = [
    "ByState", "LinkBroken", "MsgSocket", "NotSent", "PeerClosed", "Undecodable",
    "Unpicklable",
    "rebuild_exception",
]

HEAD = struct.Struct("<BBBxIIQqq")
BUF = struct.Struct("<QQ")
I64 = struct.Struct("<q")
DESC = struct.Struct("<BB")
SETUP, READY, TASK, OK, ERR, SEGMENT = 1, 2, 3, 4, 5, 6
PICKLE, INT, ARRAY, PICKLE_OOB, PICKLE_TABLE = 0, 1, 2, 3, 4
INBAND_LIMIT = 4096
RECV_SIZE = 1 << 16
_ANC_SIZE = socket.CMSG_SPACE(4 * array.array("i").itemsize)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)  # a plain int: & on the flag enum runs Python code
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 63) - 1
_CACHE_MAX = 64


class PeerClosed(Exception):
    """The other end closed the socket (or the process died)."""


class LinkBroken(PeerClosed):
    """The link cannot go on though the peer may be alive: a malformed frame, or a
    descriptor lost on the way in (this process out of file descriptors)."""


class NotSent(Exception):
    """The object could not be made ready to go, and nothing was sent (the link is still
    in step). ``__cause__`` says why."""


class Unpicklable(NotSent):
    """The object could not be pickled; nothing was sent. ``__cause__`` says why."""


class Undecodable(Exception):
    """A message arrived whole but its object could not be rebuilt here (unpickling
    raised ``__cause__``: a class this process lacks, a ``__reduce__`` that fails). The
    link is still in step; ``kind`` and ``index`` say whose message it was."""

    def __init__(self, kind: int, index: int) -> None:
        super().__init__(f"message {kind} for item {index} could not be unpickled")
        self.kind = kind
        self.index = index


def rebuild_exception(cls: type[BaseException], args: tuple[Any, ...],
                      state: dict[str, Any]) -> BaseException:
    """An exception of ``cls`` with ``args`` and attributes ``state``, made without calling
    its ``__init__`` (for classes whose ``__init__`` takes other arguments than ``args``,
    which plain pickling cannot rebuild)."""
    exc = cls.__new__(cls, *args)
    exc.args = args
    exc.__dict__.update(state)
    return exc


class ByState:
    """Pickles an exception as its class, args and attributes (see rebuild_exception).
    Defined here, not in the worker's own module, which runs as ``__main__``."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __reduce__(self) -> tuple[Any, ...]:
        exc = self.exc
        return rebuild_exception, (type(exc), exc.args, dict(getattr(exc, "__dict__", {})))


def _describe(dtype: np.dtype[Any], shape: tuple[int, ...]) -> bytes | None:
    """The ARRAY descriptor of arrays of this dtype and shape, or None when the dtype
    does not survive the short form (objects, fields, datetimes)."""
    if (dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None
            or dtype.itemsize == 0 or len(shape) > 255):
        return None
    code: bytes = dtype.str.encode("ascii")
    try:
        if np.dtype(code.decode()) != dtype:
            return None
        np.empty(1, dtype).data.cast("B")  # the data must export a buffer
    except (TypeError, ValueError):
        return None
    return DESC.pack(len(shape), len(code)) + code + struct.pack(f"<{len(shape)}q", *shape)


class MsgSocket:
    """One end of a parent/worker socket pair, with its outgoing segments.

    Not thread-safe: one thread sends and receives (or one sends, one receives).
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._outs: list[Segment | None] = [None, None]
        self._turn = 0
        self._ins: list[Segment | None] = [None, None]
        self._fds: list[int] = []
        self._rbuf = bytearray(RECV_SIZE)
        self._rview = memoryview(self._rbuf)
        self._rpos = 0  # unread bytes are _rbuf[_rpos:_rend]
        self._rend = 0
        self._descs: dict[tuple[np.dtype[Any], tuple[int, ...]], bytes | None] = {}
        self._layouts: dict[bytes, tuple[np.dtype[Any], tuple[int, ...], int]] = {}

    # --- sending ----------------------------------------------------------------------

    def send(self, kind: int, index: int, obj: Any, start_ns: int = 0, end_ns: int = 0) -> None:
        """Send ``obj`` (pickled unless an int or a plain array). Blocks while the socket
        is full. Raises PeerClosed if the peer is gone, Unpicklable (nothing sent) if
        ``obj`` cannot be pickled."""
        tp = type(obj)
        try:
            if tp is int and _INT_MIN <= obj <= _INT_MAX:
                self.sock.sendall(HEAD.pack(kind, 0, INT, 8, 0, index, start_ns, end_ns)
                                  + I64.pack(obj))
                return
            # (A read-only array goes pickled, which keeps it read-only, as in a tuple.)
            if tp is np.ndarray and obj.flags.c_contiguous and obj.flags.writeable:
                dtype = obj.dtype
                key = (dtype, obj.shape)
                try:
                    desc = self._descs[key]
                except KeyError:
                    if len(self._descs) >= _CACHE_MAX:
                        self._descs.clear()
                    desc = self._descs[key] = _describe(*key)
                # Metadata does not change a dtype's hash or equality; the short form drops it.
                if desc is not None and dtype.metadata is None:
                    self._send_array(kind, index, obj, desc, start_ns, end_ns)
                    return
            self._send_pickle(kind, index, obj, start_ns, end_ns)
        except (BrokenPipeError, ConnectionError) as exc:
            raise PeerClosed(str(exc)) from exc

    def _send_array(self, kind: int, index: int, obj: Any, desc: bytes, start_ns: int,
                    end_ns: int) -> None:
        n = obj.nbytes
        if n < INBAND_LIMIT:
            self.sock.sendall(HEAD.pack(kind, 0, ARRAY, len(desc) + n, 0, index, start_ns,
                                        end_ns) + desc + obj.tobytes())
            return
        slot = self._turn
        out = self._segment(slot, n)
        try:
            out.buf[0:n] = obj.data.cast("B")
        except ValueError as exc:  # close() in another thread released the mapping
            raise PeerClosed("the link was closed") from exc
        self.sock.sendall(HEAD.pack(kind, slot, ARRAY, len(desc) + BUF.size, 1, index,
                                    start_ns, end_ns) + desc + BUF.pack(0, n))
        self._turn = slot ^ 1  # only once sent: a failed send must not skip a slot

    def _send_pickle(self, kind: int, index: int, obj: Any, start_ns: int,
                     end_ns: int) -> None:
        bufs: list[memoryview] = []

        def keep_out_of_band(pb: pickle.PickleBuffer) -> bool:
            raw = pb.raw()
            if raw.nbytes < INBAND_LIMIT:
                return True
            bufs.append(raw)
            return False

        try:
            data = pickle.dumps(obj, protocol=5, buffer_callback=keep_out_of_band)
        except KeyboardInterrupt:
            for b in bufs:
                b.release()
            raise
        except BaseException as exc:  # a __reduce__ that raises SystemExit fails the item too
            for b in bufs:
                b.release()
            raise Unpicklable(f"cannot pickle {type(obj).__name__}: "
                              f"{type(exc).__name__}: {exc}") from exc
        form = PICKLE
        if (len(bufs) + 1) * BUF.size >= INBAND_LIMIT:
            form = PICKLE_TABLE
            bufs.insert(0, memoryview(data))
        elif len(data) >= INBAND_LIMIT:
            form = PICKLE_OOB
            bufs.insert(0, memoryview(data))
        try:
            slot = self._turn
            table = bytearray()
            if bufs:
                table_size = len(bufs) * BUF.size if form == PICKLE_TABLE else 0
                out = self._segment(slot, sum(align(b.nbytes) for b in bufs) + table_size)
                pos = 0
                try:
                    for b in bufs:
                        out.buf[pos : pos + b.nbytes] = b
                        table += BUF.pack(pos, b.nbytes)
                        pos += align(b.nbytes)
                    if form == PICKLE_TABLE:
                        out.buf[pos : pos + table_size] = table
                        table = bytearray(BUF.pack(pos, table_size))
                except ValueError as exc:  # close() in another thread released it
                    raise PeerClosed("the link was closed") from exc
            body = data + table if form == PICKLE else table
            self.sock.sendall(HEAD.pack(kind, slot, form, len(body), len(bufs), index,
                                        start_ns, end_ns) + body)
            if bufs:
                self._turn = slot ^ 1
        finally:
            for b in bufs:
                b.release()

    def _segment(self, slot: int, need: int) -> Segment:
        """Our outgoing segment ``slot``, replaced (and announced) if under ``need``."""
        out = self._outs[slot]
        if out is not None and out.size >= need:
            return out
        if out is not None:
            self._outs[slot] = None
            out.close()
        try:  # room to grow: twice the need, else just the need
            try:
                out = Segment.create(max(need * 2, 1 << 20), name="conveyor-stage")
            except OSError:
                out = Segment.create(need, name="conveyor-stage")
        except OSError as exc:  # out of memory or descriptors: this object, not the link
            why = OSError(exc.errno, f"no shared memory of {need} bytes for the object to "
                                     f"send: {exc.strerror or exc}")
            raise NotSent(str(why)) from why
        try:
            socket.send_fds(self.sock, [HEAD.pack(SEGMENT, slot, PICKLE, 0, 0, out.size, 0, 0)],
                            [out.fd])
        except BaseException:
            out.close()
            raise
        out.close_fd()
        self._outs[slot] = out
        return out

    # --- receiving --------------------------------------------------------------------

    def _read(self, view: memoryview) -> int:
        """One read into ``view``, keeping any descriptors; the byte count (never 0)."""
        try:
            n, anc, flags, _ = self.sock.recvmsg_into([view], _ANC_SIZE)
        except OSError as exc:
            raise PeerClosed(str(exc)) from exc
        for level, typ, data in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
                self._fds.extend(fds)
        if flags & _MSG_CTRUNC:
            raise LinkBroken("a descriptor the peer sent was lost (is this process out of "
                             "file descriptors? see ulimit -n)")
        if not n:
            raise PeerClosed("end of stream")
        return n

    def _fill(self, need: int) -> int:
        """Read until ``need`` (at most RECV_SIZE) bytes are buffered; their offset."""
        pos, end = self._rpos, self._rend
        if pos == end:
            pos = end = 0
        elif pos + need > RECV_SIZE:
            end -= pos
            self._rview[:end] = bytes(self._rview[pos : pos + end])
            pos = 0
        self._rpos, self._rend = pos, end
        while end - pos < need:
            end += self._read(self._rview[end:])
            self._rend = end
        return pos

    def _read_large(self, total: int) -> memoryview:
        """A whole frame longer than the buffer, in a buffer of its own."""
        frame = memoryview(bytearray(total))
        have = self._rend - self._rpos
        frame[:have] = self._rview[self._rpos : self._rend]
        self._rpos = self._rend = 0
        while have < total:
            have += self._read(frame[have:])
        return frame

    def recv(self) -> tuple[int, int, Any, int, int]:
        """Block for the next message: ``(kind, index, object, start_ns, end_ns)``.

        Blocks on the socket (under its timeout, if one is set); to cancel, shut the
        socket down from another thread. Raises PeerClosed at end of stream (a frame cut
        short included), on a timeout or a malformed frame; Undecodable (the cause:
        unpickling's exception) for a whole message whose object cannot be rebuilt.
        """
        while True:
            pos = self._rpos
            if self._rend - pos < HEAD.size:
                pos = self._fill(HEAD.size)
            kind, slot, form, blen, nbufs, index, start_ns, end_ns = HEAD.unpack_from(
                self._rbuf, pos)
            if slot > 1:
                raise LinkBroken(f"bad segment slot {slot}")
            total = HEAD.size + blen
            if total <= RECV_SIZE:
                if self._rend - pos < total:
                    pos = self._fill(total)
                self._rpos = pos + total
                frame = self._rview
            else:
                frame = self._read_large(total)
                pos = 0
            if kind != SEGMENT:
                try:
                    obj = self._decode(frame, pos + HEAD.size, form, blen, nbufs, slot)
                except PeerClosed:
                    raise
                except Exception as exc:
                    raise Undecodable(kind, index) from exc
                return kind, index, obj, start_ns, end_ns
            if not self._fds:
                raise LinkBroken("segment message without a descriptor")
            old = self._ins[slot]
            self._ins[slot] = None
            if old is not None:
                old.close()
            try:
                self._ins[slot] = Segment.attach(self._fds.pop(0), index)
            except (OSError, ValueError) as exc:
                raise LinkBroken(f"cannot map the peer's segment: {exc}") from exc

    def _decode(self, frame: memoryview, at: int, form: int, blen: int, nbufs: int,
                slot: int) -> Any:
        if form == INT:
            return I64.unpack_from(frame, at)[0]
        if form == ARRAY:
            ndim, dlen = DESC.unpack_from(frame, at)
            dend = at + DESC.size + dlen + 8 * ndim
            code = bytes(frame[at:dend])
            try:
                dtype, shape, nbytes = self._layouts[code]
            except KeyError:
                if len(self._layouts) >= _CACHE_MAX:
                    self._layouts.clear()
                dtype = np.dtype(code[DESC.size : DESC.size + dlen].decode("ascii"))
                shape = struct.unpack_from(f"<{ndim}q", code, DESC.size + dlen)
                nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                self._layouts[code] = dtype, shape, nbytes
            if nbufs:
                off, length = BUF.unpack_from(frame, dend)
                if length != nbytes:
                    raise LinkBroken("array size does not match its shape")
                data = self._segment_bytes(slot, off, length)
            else:
                if blen - (dend - at) != nbytes:
                    raise LinkBroken("array size does not match its shape")
                data = bytearray(frame[dend : dend + nbytes])
            return np.ndarray(shape, dtype, buffer=data)
        if form == PICKLE_TABLE:
            if blen != BUF.size or not nbufs:
                raise LinkBroken("bad frame length")
            off, length = BUF.unpack_from(frame, at)
            if length != nbufs * BUF.size:
                raise LinkBroken("buffer table size does not match its count")
            frame, at, plen = memoryview(self._segment_bytes(slot, off, length)), 0, 0
        elif form in (PICKLE, PICKLE_OOB):
            plen = blen - nbufs * BUF.size
            if plen < 0 or (form == PICKLE_OOB and (plen or not nbufs)):
                raise LinkBroken("bad frame length")
        else:
            raise LinkBroken(f"bad frame form {form}")
        buffers = []
        for i in range(nbufs):
            off, length = BUF.unpack_from(frame, at + plen + i * BUF.size)
            buffers.append(self._segment_bytes(slot, off, length))
        if form != PICKLE:
            return pickle.loads(buffers[0], buffers=buffers[1:])
        return pickle.loads(frame[at : at + plen], buffers=buffers)

    def _segment_bytes(self, slot: int, off: int, length: int) -> bytearray:
        """A copy of bytes the peer put in its segment ``slot`` (it reuses the slot
        two messages later)."""
        seg = self._ins[slot]
        if seg is None or off + length > seg.size:
            raise LinkBroken("buffer outside the peer's segment")
        try:
            return bytearray(seg.buf[off : off + length])
        except ValueError as exc:  # close() in another thread released the mapping
            raise PeerClosed("the link was closed") from exc
        except MemoryError:  # (the message is whole: the link is still in step)
            raise MemoryError(f"no memory to copy {length} bytes out of the peer's shared "
                              f"memory") from None

    def close(self) -> None:
        """Close the socket and unmap the segments."""
        for seg in (*self._outs, *self._ins):
            if seg is not None:
                seg.close()
        self._outs = [None, None]
        self._ins = [None, None]
        while self._fds:
            fd = self._fds.pop()
            try:
                os.close(fd)
            except OSError:
                pass
        self.sock.close()
