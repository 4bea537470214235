"""The parent/worker socket protocol: framing, buffered reads, descriptors, short forms."""

from __future__ import annotations

import array
import os
import socket
import threading
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import conveyor
from conveyor._runtime import _wire
from conveyor._runtime._wire import (
    ARRAY,
    HEAD,
    INT,
    OK,
    PICKLE,
    PICKLE_OOB,
    PICKLE_TABLE,
    SEGMENT,
    TASK,
    MsgSocket,
    PeerClosed,
)

BIG = np.arange(1 * 192 * 192 * 3, dtype=np.float32).reshape(1, 192, 192, 3)


class ScriptedSocket:
    """Stands in for the socket: records what is sent (descriptors dup'ed, as the kernel
    would), and answers each read with the next scripted chunk (at most what fits)."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, list[int]]] = []
        self.reads: deque[tuple[bytes, list[int]]] = deque()
        self.read_calls = 0
        self.fail_sends = False

    def sendall(self, data: bytes) -> None:
        if self.fail_sends:
            raise BrokenPipeError("scripted")
        self.sent.append((bytes(data), []))

    def sendmsg(self, buffers: list[bytes], anc: list[tuple[int, int, Any]]) -> int:
        if self.fail_sends:
            raise BrokenPipeError("scripted")
        fds = array.array("i")
        for _, _, data in anc:
            fds.frombytes(bytes(data))
        data = b"".join(buffers)
        self.sent.append((data, [os.dup(fd) for fd in fds]))
        return len(data)

    def recvmsg_into(
        self, buffers: list[memoryview], ancbufsize: int
    ) -> tuple[int, list[Any], int, None]:
        self.read_calls += 1
        if not self.reads:
            return 0, [], 0, None
        data, fds = self.reads.popleft()
        view = buffers[0]
        n = min(len(view), len(data))
        view[:n] = data[:n]
        if n < len(data):
            self.reads.appendleft((data[n:], []))
        anc = []
        if fds:
            anc.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes()))
        return n, anc, 0, None

    def close(self) -> None:
        for _, fds in [*self.sent, *self.reads]:
            for fd in fds:
                os.close(fd)
        self.sent.clear()
        self.reads.clear()


@pytest.fixture
def pair() -> Iterator[tuple[MsgSocket, MsgSocket]]:
    """A sender and a receiver over the scripted socket (what was sent is not yet read)."""
    out, inp = ScriptedSocket(), ScriptedSocket()
    tx, rx = MsgSocket(out), MsgSocket(inp)  # type: ignore[arg-type]
    yield tx, rx
    tx.close()
    rx.close()


def stream(tx: MsgSocket) -> list[tuple[bytes, list[int]]]:
    """What ``tx`` sent so far, taken off its scripted socket."""
    sock = tx.sock
    assert isinstance(sock, ScriptedSocket)
    sent = list(sock.sent)
    sock.sent.clear()
    return sent


def deliver(rx: MsgSocket, chunks: list[tuple[bytes, list[int]]], size: int | None = None) -> None:
    """Script ``rx``'s reads: the chunks as sent, or the bytes cut every ``size`` with each
    descriptor on the piece holding the first byte of the send that carried it."""
    sock = rx.sock
    assert isinstance(sock, ScriptedSocket)
    if size is None:
        sock.reads.extend(chunks)
        return
    joined = b"".join(data for data, _ in chunks)
    fds_at: dict[int, list[int]] = {}
    at = 0
    for data, fds in chunks:
        fds_at.setdefault(at // size, []).extend(fds)
        at += len(data)
    for i in range(0, len(joined), size):
        sock.reads.append((joined[i : i + size], fds_at.get(i // size, [])))


def forms(chunks: list[tuple[bytes, list[int]]]) -> list[int]:
    """The form byte of each non-SEGMENT frame sent (one frame per send here)."""
    return [data[2] for data, _ in chunks if data[0] != SEGMENT]


def same(a: Any, b: Any) -> None:
    assert type(a) is type(b)
    if isinstance(a, list) and a and isinstance(a[0], np.ndarray):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            same(x, y)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape
        # (numpy 2.2 gives a datetime dtype an empty metadata mapping that pickling drops)
        assert (a.dtype.metadata or None) == (b.dtype.metadata or None)
        np.testing.assert_array_equal(a, b)
        assert b.flags.writeable
    else:
        assert a == b


CASES = [
    (7, INT),
    (-(1 << 63), INT),
    ((1 << 63), PICKLE),  # past int64
    (True, PICKLE),  # a bool stays a bool
    (BIG, ARRAY),
    (np.arange(10, dtype=np.int16), ARRAY),  # small: data in the frame
    (np.zeros((0, 3), np.float32), ARRAY),
    (np.array(2.5), ARRAY),  # 0-d
    (np.arange(2000, dtype=">f4"), ARRAY),
    (np.array(["ab", "cde"] * 900), ARRAY),
    (BIG[:, ::2], PICKLE_OOB),  # not contiguous: its data is in the pickle
    (np.asfortranarray(BIG[0]), PICKLE),
    (np.arange(0, 3000, dtype="M8[s]"), PICKLE_OOB),
    (np.zeros(2000, [("a", "<i4"), ("b", "<f8")]), PICKLE),
    (np.array([1, "x", None], dtype=object), PICKLE),
    (np.zeros(8, np.dtype(float, metadata={"unit": "m"})), PICKLE),  # keeps its metadata
    ({"a": BIG, "b": [1, 2]}, PICKLE),
    (b"\x01" * 300_000, PICKLE_OOB),  # bytes have no out-of-band form: the pickle moves
    ([str(i) * 20 for i in range(500)], PICKLE_OOB),
    # thousands of buffers: their table would make the socket message large
    ([np.full(1024, i, np.float32) for i in range(2000)], PICKLE_TABLE),
    ([np.full(1024, i, np.float32) for i in range(254)], PICKLE_OOB),  # a table under 4 KiB
    ([np.full(1024, i, np.float32) for i in range(255)], PICKLE_TABLE),
]


@pytest.mark.parametrize(("obj", "form"), CASES, ids=lambda c: type(c).__name__)
def test_round_trip_and_form(pair: tuple[MsgSocket, MsgSocket], obj: Any, form: int) -> None:
    tx, rx = pair
    tx.send(OK, 5, obj, 11, 22)
    sent = stream(tx)
    assert forms(sent) == [form]
    deliver(rx, sent)
    kind, index, got, start, end = rx.recv()
    assert (kind, index, start, end) == (OK, 5, 11, 22)
    if isinstance(obj, dict):
        same(obj["a"], got["a"])
        assert got["b"] == [1, 2]
    elif isinstance(obj, np.ndarray) and obj.dtype == object:
        assert got.tolist() == obj.tolist()
    else:
        same(obj, got)


def test_metadata_is_not_lost_to_an_equal_plain_dtype(pair: tuple[MsgSocket, MsgSocket]) -> None:
    tx, rx = pair
    plain = np.zeros(8)
    tagged = np.zeros(8, np.dtype(float, metadata={"unit": "m"}))
    tx.send(OK, 0, plain)
    tx.send(OK, 1, tagged)
    sent = stream(tx)
    assert forms(sent) == [ARRAY, PICKLE]
    deliver(rx, sent)
    same(plain, rx.recv()[2])
    same(tagged, rx.recv()[2])


def test_received_arrays_are_copies_not_views_of_the_segment() -> None:
    a, b = socket.socketpair()
    tx, rx = MsgSocket(a), MsgSocket(b)
    try:
        tx.send(OK, 0, BIG)
        first = rx.recv()[2]
        for i in (1, 2):  # reuses both slots
            tx.send(OK, i, np.full_like(BIG, -i))
            assert rx.recv()[2][0, 0, 0, 0] == -i
        np.testing.assert_array_equal(first, BIG)
    finally:
        tx.close()
        rx.close()


def test_several_messages_in_one_read(pair: tuple[MsgSocket, MsgSocket]) -> None:
    tx, rx = pair
    objs: list[Any] = [1, BIG, "x", BIG * 2, np.arange(4)]
    for i, obj in enumerate(objs):
        tx.send(TASK, i, obj)
    sent = stream(tx)
    assert sum(1 for _, fds in sent if fds) == 2  # one segment announced per slot
    joined = b"".join(data for data, _ in sent)
    deliver(rx, [(joined, [fd for _, fds in sent for fd in fds])])
    for i, obj in enumerate(objs):
        kind, index, got, _, _ = rx.recv()
        assert (kind, index) == (TASK, i)
        same(obj, got)
    assert isinstance(rx.sock, ScriptedSocket) and rx.sock.read_calls == 1


@pytest.mark.parametrize("size", [1, 7, 4099])
def test_messages_split_across_reads(pair: tuple[MsgSocket, MsgSocket], size: int) -> None:
    tx, rx = pair
    # > 64 KiB in all, so the buffer wraps; one frame is larger than the buffer itself (the
    # table of 4200 out-of-band buffers). Two messages use the segments, one per slot,
    # as at most two are outstanding on a real link.
    table = [np.full(1024, i, np.float32) for i in range(4200)]
    objs: list[Any] = [BIG, *range(1500), table, 3]
    for i, obj in enumerate(objs):
        tx.send(OK, i, obj)
    deliver(rx, stream(tx), size)
    for i, obj in enumerate(objs):
        _, index, got, _, _ = rx.recv()
        assert index == i
        same(obj, got)
    with pytest.raises(PeerClosed):
        rx.recv()


def test_segment_descriptor_crosses_a_real_socket() -> None:
    a, b = socket.socketpair()
    tx, rx = MsgSocket(a), MsgSocket(b)
    try:
        for i in range(2):  # both queued before a read: descriptors come with their frames
            tx.send(OK, i, BIG + i)
        same(BIG, rx.recv()[2])
        bigger = np.ones(3_000_000, np.float32)  # outgrows the segment: a new one is sent
        tx.send(OK, 2, bigger)
        same(BIG + 1, rx.recv()[2])
        same(bigger, rx.recv()[2])
    finally:
        tx.close()
        rx.close()


def test_segment_without_descriptor_is_refused(pair: tuple[MsgSocket, MsgSocket]) -> None:
    tx, rx = pair
    tx.send(OK, 0, BIG)
    sent = stream(tx)
    for _, fds in sent:
        for fd in fds:
            os.close(fd)
    deliver(rx, [(data, []) for data, _ in sent])
    with pytest.raises(PeerClosed, match="without a descriptor"):
        rx.recv()


def test_bad_slot_is_refused(pair: tuple[MsgSocket, MsgSocket]) -> None:
    tx, rx = pair
    tx.send(OK, 0, 1)
    data = bytearray(stream(tx)[0][0])
    data[1] = 2
    deliver(rx, [(bytes(data), [])])
    with pytest.raises(PeerClosed, match="bad segment slot"):
        rx.recv()


@pytest.mark.parametrize("cut", [0, 3, HEAD.size, HEAD.size + 5])
def test_truncated_stream_raises_peer_closed(pair: tuple[MsgSocket, MsgSocket], cut: int) -> None:
    tx, rx = pair
    tx.send(OK, 0, "a string that is pickled")
    deliver(rx, [(stream(tx)[0][0][:cut], [])] if cut else [])
    with pytest.raises(PeerClosed):
        rx.recv()


def test_failed_send_raises_peer_closed_and_keeps_the_slot_order(
    pair: tuple[MsgSocket, MsgSocket],
) -> None:
    tx, _ = pair
    tx.send(OK, 0, BIG)
    assert isinstance(tx.sock, ScriptedSocket)
    tx.sock.fail_sends = True
    with pytest.raises(PeerClosed):
        tx.send(OK, 1, BIG)
    tx.sock.fail_sends = False
    tx.send(OK, 2, BIG)
    slots = [data[1] for data, _ in stream(tx) if data[0] != SEGMENT]
    assert slots == [0, 1]


def test_a_mapping_released_by_close_in_another_thread_is_peer_closed() -> None:
    """close() from another thread may release a segment while a thread reads or writes
    it: that is the link closing (PeerClosed), not a ValueError from a stage thread."""
    a, b = socket.socketpair()
    tx, rx = MsgSocket(a), MsgSocket(b)
    try:
        for i in range(2):
            tx.send(OK, i, BIG + i)
        same(BIG, rx.recv()[2])
        same(BIG + 1, rx.recv()[2])  # both segments are mapped now; the next reuses one
        tx.send(OK, 2, BIG)
        for seg in rx._ins:
            if seg is not None:
                seg.buf.release()  # what close() does, between the check and the copy
        with pytest.raises(PeerClosed, match="closed"):
            rx.recv()
        for seg in tx._outs:
            if seg is not None:
                seg.buf.release()
        with pytest.raises(PeerClosed, match="closed"):
            tx.send(OK, 3, BIG)
        with pytest.raises(PeerClosed, match="closed"):
            tx.send(OK, 4, {"big": BIG})  # a pickled message with a buffer out of band
    finally:
        tx.close()
        rx.close()


def test_closed_peer_raises_peer_closed() -> None:
    a, b = socket.socketpair()
    tx, rx = MsgSocket(a), MsgSocket(b)
    rx.close()
    try:
        with pytest.raises(PeerClosed):
            for _ in range(100):  # the first sends may still fit in the socket buffer
                tx.send(OK, 0, 1)
    finally:
        tx.close()
    a, b = socket.socketpair()
    tx, rx = MsgSocket(a), MsgSocket(b)
    tx.close()
    try:
        with pytest.raises(PeerClosed):
            rx.recv()
    finally:
        rx.close()


def test_inband_limit_matches_the_short_form(pair: tuple[MsgSocket, MsgSocket]) -> None:
    tx, rx = pair
    n = _wire.INBAND_LIMIT
    for size in (n - 1, n):
        tx.send(OK, 0, np.ones(size, np.uint8))
    sent = stream(tx)
    frames = [data for data, _ in sent if data[0] != SEGMENT]
    assert [HEAD.unpack_from(f)[4] for f in frames] == [0, 1]  # buffer counts
    deliver(rx, sent)
    for size in (n - 1, n):
        same(np.ones(size, np.uint8), rx.recv()[2])


# --- through a real worker process ----------------------------------------------------


def typed_array(i: int) -> Any:
    return [np.full((50, 40), i, np.float64), np.arange(i, dtype="<i2"),
            np.array(["a", "bb"]), np.ones((700, 3), ">f4") * i, i][i % 5]


def unpicklable_on_2(i: int) -> Any:
    return threading.Lock() if i == 2 else BIG + i


def test_process_stage_round_trips_arrays_and_ints(no_leaks: None) -> None:
    with conveyor.Pipeline(conveyor.stage(typed_array, kind="process")) as pipe:
        for i, got in enumerate(pipe.map(range(12))):
            same(typed_array(i), got)


def test_unpicklable_result_is_a_stage_error(no_leaks: None) -> None:
    stage = conveyor.stage(unpicklable_on_2, kind="process", name="locks")
    with conveyor.Pipeline(stage, on_error="return") as pipe:
        out = list(pipe.map(range(5)))
    assert isinstance(out[2], conveyor.StageError)
    assert "pickle" in str(out[2]) and out[2].index == 2
    for i in (0, 1, 3, 4):  # the same worker went on
        same(BIG + i, out[i])


def echo(x: Any) -> Any:
    return x


def test_large_pickles_both_ways_at_once_do_not_deadlock(no_leaks: None) -> None:
    # The parent sends the next task while the worker sends the last result: with either
    # message larger than the socket's buffer in the socket, both blocked for ever.
    blobs = [bytes([i]) * 1_000_000 for i in range(4)]
    with conveyor.Pipeline(conveyor.stage(echo, kind="process"), maxsize=4) as pipe:
        assert list(pipe.map(blobs)) == blobs
        assert [f.result(timeout=30) for f in [pipe.submit(b) for b in blobs]] == blobs
        many = [{f"k{j}": np.full(3, i) for j in range(5000)} for i in range(3)]
        for i, got in enumerate(pipe.map(many)):
            assert len(got) == 5000 and int(got["k4999"][0]) == i
        # 20,000 arrays of 4 KiB: 16 bytes each of their table went in the socket message
        # (320 kB), and the parent and the worker each blocked sending to the other.
        item = [np.full(1024, i, np.float32) for i in range(20_000)]
        first, second = pipe.submit(item), pipe.submit(item)
        for got in (first.result(timeout=30), second.result(timeout=30)):
            assert len(got) == 20_000 and all(int(a[0]) == i for i, a in enumerate(got))


def _refuse_to_load() -> Any:
    raise RuntimeError("this result cannot be rebuilt here")


class LoadsBadly:
    def __reduce__(self) -> tuple[Any, ...]:
        return _refuse_to_load, ()


def loads_badly_on_2(i: int) -> Any:
    return LoadsBadly() if i == 2 else i


def test_a_result_the_parent_cannot_unpickle_fails_alone(no_leaks: None) -> None:
    # It used to kill the stage's thread, and map() waited for ever.
    stage = conveyor.stage(loads_badly_on_2, kind="process", name="odd")
    with conveyor.Pipeline(stage, on_error="return") as pipe:
        out = list(pipe.map(range(5)))
        st = pipe.stats()["stages"]["odd"]
    assert out[:2] == [0, 1] and out[3:] == [3, 4]
    err = out[2]
    assert isinstance(err, conveyor.StageError) and (err.stage, err.index) == ("odd", 2)
    assert isinstance(err.__cause__, RuntimeError) and "rebuilt" in str(err.__cause__)
    assert (st["in"], st["out"], st["errors"]) == (5, 4, 1)


def _rebuild_in_the_parent_only(parent: int) -> str:
    if os.getpid() != parent:
        raise LookupError("this item can only be rebuilt in the parent")
    return "rebuilt"


class ParentOnly:
    """Pickles in the parent, fails to unpickle in a worker (as a class of the parent's
    ``__main__`` does, in a notebook)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild_in_the_parent_only, (os.getpid(),)


def kind_of(x: Any) -> str:
    return type(x).__name__


def test_an_item_a_worker_cannot_unpickle_fails_alone_with_its_cause(no_leaks: None) -> None:
    # The worker died of it (a restart for every such item), and the item's cause was a
    # WorkerDiedError saying "exited with code 1" instead of the unpickling error.
    stage = conveyor.stage(kind_of, kind="process", name="kinds")
    with conveyor.Pipeline(stage, on_error="return") as pipe:
        out = list(pipe.map([1, ParentOnly(), "x", ParentOnly(), 2.0]))
        st = pipe.stats()["stages"]["kinds"]
    assert [out[i] for i in (0, 2, 4)] == ["int", "str", "float"]
    for i in (1, 3):
        err = out[i]
        assert isinstance(err, conveyor.StageError) and err.index == i
        assert isinstance(err.__cause__, LookupError), repr(err.__cause__)
        assert "rebuilt in the parent" in str(err.__cause__)
    assert (st["errors"], st["restarts"]) == (2, 0)


def lock_on_2(i: int) -> Any:
    return threading.Lock() if i == 2 else i


@pytest.mark.parametrize("via_thread_stage", [False, True])
def test_unpicklable_item_for_a_process_stage_fails_alone(no_leaks: None,
                                                          via_thread_stage: bool) -> None:
    """An item that cannot be pickled never reaches the worker: it fails with its own
    StageError (cause: pickle's TypeError), and the items around it go through."""
    stages = [conveyor.stage(lock_on_2, name="make")] if via_thread_stage else []
    stages.append(conveyor.stage(np.asarray, kind="process", name="send"))
    items: list[Any] = list(range(5))
    if not via_thread_stage:
        items[2] = threading.Lock()
    with conveyor.Pipeline(*stages, on_error="return") as pipe:
        out = list(pipe.map(items))
        futs = [pipe.submit(x) for x in items]
        late = [f.exception(timeout=30) or f.result() for f in futs]
    assert isinstance(out[2], conveyor.StageError) and out[2].index == 2
    for got in (out, late):
        err = got[2]
        assert isinstance(err, conveyor.StageError), got
        assert err.stage == "send"
        assert isinstance(err.__cause__, TypeError) and "pickle" in str(err)
        assert [int(got[i]) for i in (0, 1, 3, 4)] == [0, 1, 3, 4]


class ExitOnPickle:
    """Its pickling raises SystemExit (a __reduce__ that calls sys.exit)."""

    def __reduce__(self) -> Any:
        raise SystemExit(3)


def exit_on_pickle_at_2(i: int) -> Any:
    return ExitOnPickle() if i == 2 else i


@pytest.mark.timeout(60)
def test_an_item_whose_pickling_raises_system_exit_fails_alone(no_leaks: None) -> None:
    # The SystemExit escaped the stage's dispatch thread and ended it silently: no item
    # came out any more, and map() waited for ever.
    items: list[Any] = [0, 1, ExitOnPickle(), 3]
    with conveyor.Pipeline(conveyor.stage(echo, kind="process", name="send"),
                           on_error="return") as pipe:
        out = list(pipe.map(items))
        assert list(pipe.map(range(4))) == [0, 1, 2, 3]  # the stage goes on
    assert out[:2] == [0, 1] and out[3] == 3
    assert isinstance(out[2], conveyor.StageError) and out[2].index == 2
    assert isinstance(out[2].__cause__, SystemExit)


@pytest.mark.timeout(60)
def test_a_result_whose_pickling_raises_system_exit_fails_alone(no_leaks: None) -> None:
    # The worker took it for its own death: "WorkerDiedError: ... exited with code 1".
    with conveyor.Pipeline(conveyor.stage(exit_on_pickle_at_2, kind="process"),
                           on_error="return") as pipe:
        out = list(pipe.map(range(4)))
    assert out[:2] == [0, 1] and out[3] == 3
    assert isinstance(out[2], conveyor.StageError)
    assert isinstance(out[2].__cause__, SystemExit), repr(out[2].__cause__)


def read_only(i: int) -> Any:
    a = np.full((4, 4) if i % 2 else (100, 100), i, np.float32)
    a.flags.writeable = False
    return a


def test_a_read_only_array_stays_read_only_alone_as_in_a_tuple(no_leaks: None) -> None:
    # Alone it came back writeable (the short array form ignored the flag); in a tuple,
    # pickled, it stayed read-only.
    with conveyor.Pipeline(conveyor.stage(read_only, kind="process"),
                           conveyor.stage(echo, kind="process")) as pipe:
        out = list(pipe.map(range(4)))
    with conveyor.Pipeline(conveyor.stage(echo, kind="process")) as pipe:
        back = list(pipe.map([read_only(5), (read_only(6),)]))
    for i, a in enumerate(out):
        assert not a.flags.writeable and float(a[0, 0]) == i
    assert not back[0].flags.writeable and not back[1][0].flags.writeable
