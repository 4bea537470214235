"""The client's reply path: the RESULT shortcut of the frame reader, the pool that output
arrays are copied into (never reused while anything refers to them), the Future's
lock-free reads once finished, and malformed replies (the connection fails, the reader
does not)."""

from __future__ import annotations

import os
import socket
import threading
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import wait_for
from test_server_support import FakeDevice, ThreadServer, socket_dir, x

from conveyor import Busy, DeviceClient, ProtocolError, ServerError
from conveyor._device import _requests
from conveyor._device._catalog import ModelInfo
from conveyor._device._protocol import (
    RESULT,
    FrameReader,
    MsgType,
    Status,
    encode,
    encode_result,
    json_body,
)
from conveyor._device._requests import InferFuture, OutputPool
from conveyor._tensors import TensorSpec


@pytest.fixture
def sdir() -> Iterator[Path]:
    with socket_dir() as d:
        yield d


# --- the frame reader's RESULT shortcut ----------------------------------------------------


def test_next_result_takes_plain_results_and_leaves_the_rest() -> None:
    a, b = socket.socketpair()
    with a, b:
        reader = FrameReader(b, fds=False)
        a.sendall(encode_result(7, Status.OK, 1, 10, 20, 30)
                  + encode_result(8, Status.BUSY, 0xFFFF, 0, 0, 0, "busy")
                  + encode(MsgType.STATUS_REPLY, b"{}", 9)
                  + encode_result(10, Status.OK, 0, 1, 2, 3)[:30])
        reader.feed_from_socket()
        assert reader.next_result() == (7, Status.OK, 1, 10, 20, 30)
        assert reader.next_result() is None  # error text: a whole frame
        frame = reader.next_frame()
        assert frame is not None and frame.type is MsgType.RESULT and frame.req_id == 8
        assert frame.body[RESULT.size:] == b"busy"
        assert reader.next_result() is None
        frame = reader.next_frame()
        assert frame is not None and frame.type is MsgType.STATUS_REPLY
        assert reader.next_result() is None  # incomplete
        assert reader.next_frame() is None


# --- the output pool -------------------------------------------------------------------------


def views(value: float) -> list[np.ndarray]:
    return [np.full((64, 256), value, np.float32), np.full((3,), value, np.int8)]


def test_pool_reuses_outputs_nobody_holds() -> None:
    pool = OutputPool(views(0))
    first = pool.fill(views(1))
    second = pool.fill(views(2))  # the first is still in use: a new set
    ids = [id(a) for a in first]
    assert not set(ids) & {id(a) for a in second}
    assert [a.tolist() for a in first] == [a.tolist() for a in views(1)]
    del first
    again = pool.fill(views(99))  # the oldest set is free again: refilled
    assert [id(a) for a in again] == ids
    assert all(a.flags.owndata and a.flags.writeable for a in again)
    assert [a.tolist() for a in again] == [a.tolist() for a in views(99)]
    assert [a.tolist() for a in second] == [a.tolist() for a in views(2)]


def test_pool_lets_go_of_outputs_kept_long() -> None:
    pool = OutputPool(views(0))
    kept = pool.fill(views(1))
    for v in range(2, 2 + 3 * _requests.POOL_SETS):  # full, then it forgets the kept set
        assert pool.fill(views(v))[0][0, 0] == v
        assert len(pool._ring) <= _requests.POOL_SETS
    assert [a.tolist() for a in kept] == [a.tolist() for a in views(1)]


@pytest.mark.parametrize("hold", ["array", "list", "view", "memoryview", "weakref", "future"])
def test_pool_never_reuses_outputs_still_referred_to(hold: str) -> None:
    pool = OutputPool(views(0))
    outs = pool.fill(views(1))
    kept: Any
    if hold == "array":
        kept = outs[0]
    elif hold == "list":
        kept = outs
    elif hold == "view":
        kept = outs[1][1:]
    elif hold == "memoryview":
        kept = outs[0].data
    elif hold == "weakref":
        kept = weakref.ref(outs[0])
    else:
        kept = InferFuture()
        kept.set_result(outs)
    del outs
    for v in range(2, 2 + 2 * _requests.POOL_SETS):
        pool.fill(views(v))
    if hold == "weakref":
        assert kept() is None  # let go of by the pool, not refilled
        return
    held = kept.result() if hold == "future" else kept
    first = held if hold in ("list", "future") else [held]
    assert float(np.asarray(first[0]).ravel()[0]) == 1.0


@pytest.mark.parametrize("change", ["shape", "dtype", "writeable"])
def test_pool_does_not_reuse_outputs_changed_in_place(change: str) -> None:
    pool = OutputPool(views(0))
    outs = pool.fill(views(1))
    if change in ("shape", "dtype"):
        # numpy 2.5 deprecates setting these (a later one will refuse): while it lets a
        # caller do it, the pool must notice
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                if change == "shape":
                    outs[0].shape = (256, 64)
                else:
                    outs[0].dtype = np.dtype("int32")  # type: ignore[misc]
            except AttributeError:
                pytest.skip(f"this numpy ({np.__version__}) refuses to set {change}")
    else:
        outs[1].flags.writeable = False
    del outs
    for v in range(2, 2 + 2 * _requests.POOL_SETS):  # refilling that set would fail
        outs = pool.fill(views(v))
        assert [(a.shape, a.dtype, a.flags.writeable) for a in outs] == [
            ((64, 256), np.dtype("float32"), True), ((3,), np.dtype("int8"), True)]
        assert [a.tolist() for a in outs] == [a.tolist() for a in views(v)]


def test_small_outputs_are_plain_copies() -> None:
    small = [np.arange(4, dtype=np.float32).reshape(1, 4)]
    pool = OutputPool(small)
    outs = [pool.fill(small)[0] for _ in range(3)]
    assert all(a.tolist() == [[0.0, 1.0, 2.0, 3.0]] and a.flags.owndata for a in outs)
    assert outs[0] is not small[0]


def test_outputs_kept_by_the_caller_stay_as_they_were(sdir: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_requests, "POOL_MIN_BYTES", 0)  # pool the fake model's tiny outputs
    with ThreadServer(sdir / "s", [FakeDevice()], ["m"]) as srv, \
            DeviceClient(path=srv.path) as c:
        kept = []
        for i in range(3 * _requests.POOL_SETS):
            outs = c.infer("m", x(float(i)))
            if i % 3 == 0:
                kept.append((i, outs[0]))
        futs = [(i, c.submit("m", x(float(i)))) for i in range(40)]
        for i, fut in futs:
            assert fut.result(10)[1].tolist() == [4.0 * i]
        for i, y in kept:
            assert y.tolist() == [[i + 1.0] * 4]


def test_client_with_its_own_reader_serves_futures_and_waits(sdir: Path) -> None:
    """reader=True: one thread reads every reply, in flight or not; futures, waiting
    calls and server restarts still work, and close() ends that thread."""
    with ThreadServer(sdir / "s", [FakeDevice()], ["m"]) as srv:
        c = DeviceClient(path=srv.path, reader=True)
        bg = c._bg
        assert bg is not None and bg.is_alive()  # reading before the first request
        for _ in range(3):  # nothing in flight between rounds: the reader stays put
            futs = [(i, c.submit("m", x(float(i)))) for i in range(10)]
            assert [f.result(10)[1].tolist() for _, f in futs] == [[4.0 * i] for i in range(10)]
            assert c.infer("m", x(2.0))[1].tolist() == [8.0]
            assert c.status()["totals"]["clients"] == 1
        # the same thread, back on the socket with nothing in flight
        assert c._bg is bg and wait_for(lambda: c._reading, timeout=2.0)
        c.close()
        bg.join(2)
        assert not bg.is_alive()


# --- the Future -------------------------------------------------------------------------------


def test_finished_future_reads_without_waiting() -> None:
    ok = InferFuture()
    ok._start()
    assert not ok.done() and ok.running()
    ok.set_result([np.zeros(1)])
    assert ok.done() and ok.exception() is None and ok.result()[0].tolist() == [0.0]
    bad = InferFuture()
    bad._start()
    bad.set_exception(Busy("full"))
    assert bad.done() and isinstance(bad.exception(), Busy)
    with pytest.raises(Busy):
        bad.result()
    assert not bad.cancel()


# --- malformed replies --------------------------------------------------------------------------


MODEL = ModelInfo(0, "m", (TensorSpec("x", (1, 4), np.dtype("float32")),),
                  (TensorSpec("y", (1, 4), np.dtype("float32")),))


def scripted_server(sock: socket.socket, reply: bytes) -> None:
    """Welcome one client, then answer its first INFER with ``reply`` (its request id
    patched in at the header's place) and keep the connection open until it closes."""
    reader = FrameReader(sock)
    reader.read_frame()  # HELLO
    welcome = {"client_id": 1, "max_inflight": 2, "models": [MODEL.to_json()]}
    sock.sendall(encode(MsgType.WELCOME, json_body(welcome)))
    seg = reader.read_frame()
    assert seg.type is MsgType.SEGMENT and seg.fd is not None
    os.close(seg.fd)
    while (req := reader.next_infer()) is None:
        reader.feed_from_socket()
    data = bytearray(reply)
    data[12:20] = req[0].to_bytes(8, "little")
    sock.sendall(bytes(data))
    while reader.feed_from_socket():
        pass


@pytest.mark.parametrize(("reply", "error", "why"), [
    (encode(MsgType.RESULT, b"\0\0\0", 1), ProtocolError, "RESULT body of 3 bytes"),
    (encode_result(1, 99, 0, 0, 0, 0, "?"), ServerError, "m: ?"),
    (encode_result(1, 99, 0, 0, 0, 0), ServerError, "status 99"),
])
def test_malformed_reply_fails_the_request_not_the_reader(reply: bytes, error: type,
                                                           why: str) -> None:
    a, b = socket.socketpair()
    server = threading.Thread(target=scripted_server, args=(b, reply), daemon=True)
    server.start()
    try:
        with DeviceClient(a, timeout=5) as c:
            fut = c.submit("m", x(1.0))
            with pytest.raises(error, match=why):
                fut.result(10)
    finally:
        server.join(10)
        b.close()
    assert not server.is_alive()



def test_a_long_error_text_is_cut_on_a_character() -> None:
    # Cut at 4096 bytes, it could end inside a character: not valid UTF-8.
    msg = encode_result(1, Status.DEVICE_ERROR, 0, 0, 0, 0, "a" + "é" * 3000)
    text = msg[48:]
    assert len(text) <= 4096
    assert text.decode("utf-8") == "a" + "é" * (len(text) // 2)
