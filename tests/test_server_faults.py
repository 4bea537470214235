"""Faults around a device server: clients and servers killed with SIGKILL, reconnection,
a full queue, a client that stops reading, a connection that never says HELLO."""

from __future__ import annotations

import contextlib
import gc
import os
import re
import shutil
import signal
import socket
import stat
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import wait_for, watch_event_loop
from test_server_support import (
    SLOW,
    FakeDevice,
    LogLines,
    ServeProcess,
    ThreadServer,
    fd_table,
    finish,
    memfd_maps,
    python,
    socket_count,
    socket_dir,
    wait_for_fds,
    wait_until,
    x,
)

import conveyor
import conveyor.cli
from conveyor import Busy, DeviceClient, ServerGone
from conveyor._device._client import long_socket_path, query_status
from conveyor._device._protocol import PROTOCOL_VERSION, MsgType, encode, json_body
from conveyor._models import resolve_model

IMG = np.zeros((1, 192, 192, 3), np.float32)


@pytest.fixture
def sdir() -> Iterator[Path]:
    with socket_dir() as d:
        yield d


VICTIM = """
import sys, numpy as np, conveyor
c = conveyor.connect(sys.argv[1], name="victim")
img = np.zeros((1, 192, 192, 3), np.float32)
futs = [c.submit("face_landmark", img) for _ in range(32)]
c.status()
print("sent", flush=True)
while True:  # keep 32 requests in flight until killed
    futs.pop(0).result()
    futs.append(c.submit("face_landmark", img))
"""

BYSTANDER = """
import sys, numpy as np, conveyor
img = np.zeros((1, 192, 192, 3), np.float32)
with conveyor.connect(sys.argv[1], name="bystander") as c:
    print("ready", flush=True)
    for _ in range(150):
        c.infer("face_landmark", img)
print("ok")
"""


def test_a_done_callback_may_submit_while_a_slot_is_free_and_is_told_when_none_is(
    sdir: Path,
) -> None:
    gate = threading.Event()
    with ThreadServer(sdir / "s", [FakeDevice(gate=gate)], ["m"], max_inflight=1) as srv, \
            DeviceClient(path=srv.path) as c:
        outcomes: list[object] = []
        done = threading.Event()

        def callback(_fut: object) -> None:
            for value in (2, 3):  # the first takes the slot the reply freed; none is left
                try:
                    outcomes.append(c.submit("m", x(value)))
                except BaseException as exc:
                    outcomes.append(exc)
            done.set()

        fut = c.submit("m", x(1))
        fut.add_done_callback(callback)
        assert not fut.done()
        gate.set()
        assert done.wait(10)
        first, second = outcomes
        assert isinstance(first, Future) and first.result(10)[1].tolist() == [4.0 * 2]
        assert isinstance(second, RuntimeError), second
        assert "all of this client's are in flight" in str(second)
        assert "keep fewer requests in flight" in str(second)


@pytest.mark.usefixtures("no_leaks")
def test_client_killed_mid_request_costs_the_server_nothing(sdir: Path) -> None:
    path = sdir / "s.sock"
    with ServeProcess(path, *SLOW) as srv:
        with conveyor.connect(path) as warm:  # first use allocates for good: not a leak
            warm.infer("face_landmark", IMG)
        # No connection left but the listener (the status query's own is gone too), and
        # the warm-up client's memory unmapped: Python's mmap holds a duplicate of the
        # segment's descriptor until then, closed a moment after the socket.
        wait_until(lambda: socket_count(srv.pid) == 1 and not any(
            "memfd:" in what for what in fd_table(srv.pid).values()), 10,
            "the warm-up connection and its memory gone")
        fds, maps = fd_table(srv.pid), memfd_maps(srv.pid)
        bystander = python(BYSTANDER, str(path))
        victim = python(VICTIM, str(path))
        try:
            assert victim.stdout is not None and bystander.stdout is not None
            assert victim.stdout.readline() == "sent\n"
            assert bystander.stdout.readline() == "ready\n"
            clients = {c["name"]: c for c in query_status(path)["clients"]}
            assert clients["victim"]["queued"] + clients["victim"]["running"] > 0
            wait_until(lambda: memfd_maps(srv.pid) == maps + 2, 10, "an arena per client")
            victim.kill()
            victim.wait(10)
            with conveyor.connect(path) as other:
                for _ in range(20):
                    other.infer("face_landmark", IMG)
            assert finish([bystander], 60) == ["ok\n"]
        finally:
            for p in (victim, bystander):
                if p.poll() is None:
                    p.kill()
                p.communicate()
        wait_until(lambda: socket_count(srv.pid) == 1, 10, "all connections gone")
        wait_for_fds(srv.pid, fds)
        wait_until(lambda: memfd_maps(srv.pid) == maps, 10, f"server memfd maps back to {maps}")
        assert "victim" not in srv.log() or "disconnected" in srv.log()


@pytest.mark.usefixtures("no_leaks")
def test_server_killed_clients_get_server_gone_promptly(sdir: Path) -> None:
    path = sdir / "s.sock"
    with ServeProcess(path, *SLOW) as srv, conveyor.connect(path) as client:
        futs = [client.submit("face_landmark", IMG) for _ in range(24)]
        client.status()
        srv.kill()
        t0 = time.monotonic()
        gone = 0
        for f in futs:
            try:
                f.result(5)
            except ServerGone:
                gone += 1
        assert gone > 0 and time.monotonic() - t0 < 2.0
        with pytest.raises(ServerGone):
            client.infer("face_landmark", IMG)
        path.unlink()


@pytest.mark.usefixtures("no_leaks")
def test_connected_sees_a_close_behind_the_servers_last_message(sdir: Path) -> None:
    # The server answers junk with an ERROR message and closes: that unread message used
    # to hide the close from `connected` (it peeked one byte).
    path = sdir / "s.sock"
    img = np.zeros((1, 128, 128, 3), np.float32)
    with ServeProcess(path) as srv, conveyor.connect(path) as client:
        client.infer("face_detection_short_range", img)
        assert client.connected
        client._link.sock.sendall(b"JUNK" * 5)  # type: ignore[union-attr]  # a bad header
        assert wait_for(lambda: not client.connected, timeout=5.0)
        srv.terminate()
        assert srv.wait() == 0


@pytest.mark.usefixtures("no_leaks")
def test_reconnect_after_the_server_restarts(sdir: Path) -> None:
    path = sdir / "s.sock"
    img = np.zeros((1, 128, 128, 3), np.float32)
    first = ServeProcess(path)
    try:
        client = conveyor.connect(path, reconnect=True)
        try:
            client.infer("face_detection_short_range", img)
            assert client.connected
            first.kill()
            # An idle client sees the server gone before it next calls it.
            assert wait_for(lambda: not client.connected, timeout=5.0)
            with pytest.raises(ServerGone):
                client.infer("face_detection_short_range", img)
            assert not client.connected
            with ServeProcess(path) as second:
                assert len(client.infer("face_detection_short_range", img)) == 2
                assert client.status()["server"]["pid"] == second.pid
        finally:
            client.close()
    finally:
        first.close()


@pytest.mark.usefixtures("no_leaks")
def test_full_queue_answers_busy(sdir: Path) -> None:
    path = sdir / "s.sock"
    with ServeProcess(path, *SLOW, "--max-queue", "2") as srv, conveyor.connect(path) as c:
        futs = [c.submit("face_landmark", IMG) for _ in range(16)]  # ~4 ms each to run
        busy = ok = 0
        for f in futs:
            try:
                f.result(10)
                ok += 1
            except Busy:
                busy += 1
        # How many get in depends on how fast this process submits; some must not.
        assert busy >= 1 and ok >= 2 and busy + ok == 16
        assert c.status()["totals"]["requests"]["busy"] == busy
        srv.terminate()
        assert srv.wait() == 0


def test_client_that_stops_reading_is_dropped(sdir: Path, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    from conveyor._device import _conn

    monkeypatch.setattr(_conn, "MAX_OUTBOX", 64 * 1024)
    hello = encode(MsgType.HELLO, json_body({"version": PROTOCOL_VERSION, "name": "deaf"}))
    with LogLines().installed() as logs, \
            ThreadServer(sdir / "s", [FakeDevice(delay=0.001)], ["m"]) as srv, \
            DeviceClient(path=srv.path) as good:
        deaf = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deaf.settimeout(10)
        try:
            deaf.connect(str(srv.path))
            deaf.sendall(hello)
            status = encode(MsgType.STATUS, b"", 1)
            with pytest.raises(OSError):  # dropped while we are still sending
                for _ in range(100_000):
                    deaf.sendall(status)
            assert good.infer("m", x(1))[1].tolist() == [4.0]
        finally:
            deaf.close()
        assert any("stopped reading" in line for line in logs.lines), logs.lines


def test_connection_without_hello_is_closed(sdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from conveyor._device import _server

    monkeypatch.setattr(_server, "HANDSHAKE_TIMEOUT", 0.2)
    with ThreadServer(sdir / "s", [FakeDevice()], ["m"]) as srv:
        mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        mute.settimeout(5)
        try:
            mute.connect(str(srv.path))
            t0 = time.monotonic()
            assert mute.recv(100) == b""
            assert time.monotonic() - t0 < 3
        finally:
            mute.close()
        with DeviceClient(path=srv.path) as c:
            c.infer("m", x(0))


@pytest.mark.parametrize("credit", [32, 2])
def test_close_wakes_every_thread_waiting_on_the_client(sdir: Path, credit: int) -> None:
    dev = FakeDevice(delay=0.002)
    with ThreadServer(sdir / "s", [dev], ["m"], max_inflight=credit) as srv:
        for trial in range(15):  # the window was narrow: about one trial in five hung
            client = DeviceClient(path=srv.path)
            ended: list[BaseException] = []

            def loop(client: DeviceClient = client, ended: list[BaseException] = ended) -> None:
                try:
                    while True:
                        client.submit("m", x(1)).result()
                except BaseException as exc:  # how it ended is what the test checks
                    ended.append(exc)

            threads = [threading.Thread(target=loop, daemon=True) for _ in range(6)]
            for t in threads:
                t.start()
            time.sleep(0.02 + 0.01 * (trial % 5))
            client.close()
            for t in threads:
                t.join(5)
            assert not any(t.is_alive() for t in threads), f"trial {trial}: a thread hung"
            assert all(isinstance(e, ServerGone) for e in ended), ended
            # not "the device server went away": threads waiting for a slot were told so
            assert {str(e) for e in ended} <= {"the client was closed",
                                               "the client is closed"}, ended


def test_waiting_inside_a_done_callback_is_refused_not_a_deadlock(sdir: Path) -> None:
    gate = threading.Event()  # the first run waits: the callback is attached before it ends
    dev = FakeDevice(gate=gate)
    with ThreadServer(sdir / "s", [dev], ["m"]) as srv, DeviceClient(path=srv.path) as c:
        seen: list[BaseException | None] = []
        done = threading.Event()

        def callback(_fut: object) -> None:
            try:
                c.infer("m", x(2))  # would wait for a reply only this thread can read
                seen.append(None)
            except BaseException as exc:
                seen.append(exc)
            done.set()

        fut = c.submit("m", x(1))
        fut.add_done_callback(callback)
        assert not fut.done()  # so the callback runs on the reader thread, not this one
        gate.set()
        assert done.wait(10)
        assert isinstance(seen[0], RuntimeError) and "done-callback" in str(seen[0])
        c.infer("m", x(3))  # the client is still usable
        # Refused before it was sent: it was sent, and its reply, which nobody read, held
        # its slot for good (with a small credit, every later call waited for ever).
        assert [value for _, _, value in dev.runs] == [1.0, 3.0]
        assert not c._pending


@pytest.mark.usefixtures("no_leaks")
def test_a_forked_child_cannot_use_the_client_nor_end_it_for_the_parent(sdir: Path) -> None:
    from test_pipeline_faults import _in_forked_child

    path = sdir / "s.sock"
    img = np.zeros((1, 128, 128, 3), np.float32)
    with ServeProcess(path) as srv, conveyor.connect(path) as client:
        want = client.infer("face_detection_short_range", img)
        used = _in_forked_child(lambda: client.infer("face_detection_short_range", img))
        assert used.startswith("RuntimeError: this client was connected by process")
        # A Future the parent sent: the child hung, or read the reply the parent waits for.
        srv.proc.send_signal(signal.SIGSTOP)  # no reply before the child has tried
        try:
            fut = client.submit("face_detection_short_range", img)
            for wait_in_child in (lambda: fut.result(10), lambda: fut.exception(10)):
                assert _in_forked_child(wait_in_child).startswith(
                    "RuntimeError: this client was connected by process")
        finally:
            srv.proc.send_signal(signal.SIGCONT)
        for a, b in zip(fut.result(10), want):
            np.testing.assert_array_equal(a, b)
        assert _in_forked_child(lambda: client.close() or "closed") == "closed"
        with client._lock:  # held by a thread of the parent (its reader) at the fork
            assert _in_forked_child(lambda: client.close() or "closed") == "closed"
        got = client.infer("face_detection_short_range", img)  # the parent's link lives on
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
        assert len(client.status()["clients"]) == 1


@contextlib.contextmanager
def _replaced_by_a_stopped_server(
        sdir: Path) -> Iterator[tuple[DeviceClient, np.ndarray, ServeProcess]]:
    """A ``reconnect=True`` client that ran a request on a server since killed, and a new
    server on the socket that listens but does not answer (SIGSTOP, SIGCONT at the end):
    ``(client, an input, the new server)``. The client is closed at the end."""
    path = sdir / "s.sock"
    img = np.zeros((1, 128, 128, 3), np.float32)
    first = ServeProcess(path)
    client = conveyor.connect(path, reconnect=True)
    try:
        client.infer("face_detection_short_range", img)
        first.kill()
        with ServeProcess(path) as second:
            second.proc.send_signal(signal.SIGSTOP)  # listening, but not answering
            assert wait_for(lambda: _stopped(second.pid), timeout=5.0)
            try:
                yield client, img, second
            finally:
                second.proc.send_signal(signal.SIGCONT)
    finally:
        client.close()
        first.close()


@pytest.mark.usefixtures("no_leaks")
def test_ainfer_reconnects_off_the_event_loop_within_its_deadline(sdir: Path) -> None:
    """An idle client whose server was replaced by one that does not answer yet: the
    reconnection runs in a thread, bounded by the deadline, and the loop keeps running
    (it was made on the loop thread: the loop stood still up to the 10 s handshake)."""
    import asyncio

    with _replaced_by_a_stopped_server(sdir) as (client, img, second):

        async def main() -> tuple[float, BaseException | None]:
            beat, gaps = watch_event_loop(0.01)
            try:
                await client.ainfer("face_detection_short_range", img, deadline=0.5)
                error = None
            except BaseException as exc:
                error = exc
            beat.cancel()
            return max(gaps), error

        t0 = time.monotonic()
        stall, error = asyncio.run(main())
        assert isinstance(error, conveyor.DeadlineExceeded), error
        assert time.monotonic() - t0 < 3.0
        assert stall < 0.4, f"the event loop stood still {stall:.2f} s"
        second.proc.send_signal(signal.SIGCONT)
        outs = asyncio.run(client.ainfer("face_detection_short_range", img, deadline=30))
        assert len(outs) == 2


def test_a_reconnect_to_a_server_that_does_not_answer(sdir: Path) -> None:
    """The server was replaced by one that does not answer its handshake yet (SIGSTOP):
    a sync infer() with a deadline waited out the 10 s handshake timeout and said
    ServerGone; ainfer() calls started a thread each (thousands), and their failures were
    logged as never retrieved; close() during the handshake was undone when it ended
    (the client connected again, and its ainfer() callers waited for good)."""
    import asyncio

    with _replaced_by_a_stopped_server(sdir) as (client, img, second):
        t0 = time.monotonic()
        with pytest.raises(conveyor.DeadlineExceeded):
            client.infer("face_detection_short_range", img, deadline=0.3)
        assert time.monotonic() - t0 < 2.0

        async def many() -> list[BaseException | None]:
            calls = [client.ainfer("face_detection_short_range", img, deadline=d)
                     for d in [0.2] * 50 + [0.0] * 10]
            return list(await asyncio.gather(*calls, return_exceptions=True))

        threads = threading.active_count()
        with LogLines().installed() as logs:
            got = asyncio.run(many())
        assert all(isinstance(e, conveyor.DeadlineExceeded) for e in got), got
        assert threading.active_count() <= threads + 2  # one attempt, shared
        assert not [li for li in logs.lines if "never retrieved" in li]

        async def closed_meanwhile() -> BaseException | None:
            task = asyncio.ensure_future(client.ainfer("face_detection_short_range",
                                                       img))  # no deadline
            await asyncio.sleep(0.3)  # it waits for the handshake
            threading.Thread(target=client.close).start()
            try:
                await asyncio.wait_for(task, 3)
            except BaseException as exc:
                return exc
            return None

        error = asyncio.run(closed_meanwhile())
        assert isinstance(error, conveyor.ServerGone), error
        # not "the connection was closed by the other side": close() did it
        assert str(error) == "the client was closed", error
        second.proc.send_signal(signal.SIGCONT)
        time.sleep(0.5)  # the server answers now: the closed client must not connect
        assert not client.connected
        with pytest.raises(conveyor.ServerGone):
            client.infer("face_detection_short_range", img)


@pytest.mark.usefixtures("no_leaks")
def _stopped(pid: int) -> bool:
    """Every thread of process ``pid`` is stopped (state T in /proc)."""
    states = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            stat = (task / "stat").read_text()
            states.append(stat[stat.rindex(")") + 2])
    return bool(states) and all(st in "tT" for st in states)


def test_a_deadline_holds_when_the_server_hangs(sdir: Path) -> None:
    # Only the server checked deadlines: with it stopped (SIGSTOP), a request with a
    # 0.3 s deadline waited for as long as the server did.
    import asyncio

    from conveyor import DeadlineExceeded

    path = sdir / "s.sock"
    img = np.zeros((1, 128, 128, 3), np.float32)
    model = "face_detection_short_range"
    with ServeProcess(path) as srv, conveyor.connect(path) as client:
        client.infer(model, img)
        os.kill(srv.pid, signal.SIGSTOP)
        try:
            # Stopped for sure first: a request sent just after kill() was once answered.
            assert wait_for(lambda: _stopped(srv.pid), timeout=5.0)
            t0 = time.monotonic()
            with pytest.raises(DeadlineExceeded, match="no answer"):
                client.infer(model, img, deadline=0.3)
            fut = client.submit(model, img, deadline=0.3)
            with pytest.raises(DeadlineExceeded):
                fut.result(timeout=10)

            async def in_loop() -> None:
                await client.ainfer(model, img, deadline=0.3)

            with pytest.raises(DeadlineExceeded):
                asyncio.run(in_loop())
            assert time.monotonic() - t0 < 5  # three times 0.3 s and a grace, not for ever
        finally:
            os.kill(srv.pid, signal.SIGCONT)
        # The abandoned requests' slots come back as the server answers them.
        for _ in range(40):
            assert len(client.infer(model, img)) == 2
        srv.terminate()
        assert srv.wait() == 0


@pytest.mark.usefixtures("no_leaks")
def test_a_server_out_of_descriptors_says_so_and_serves_on(sdir: Path) -> None:
    # Clients past the limit were told "protocol error: too many file descriptors in one
    # message" (the server's log said the same), or just "the device server went away".
    import subprocess
    import sys

    path = sdir / "s.sock"
    img = np.zeros((1, 128, 128, 3), np.float32)
    model = "face_detection_short_range"
    srv = subprocess.Popen(
        ["bash", "-c", f"ulimit -n 40; exec {sys.executable} -m conveyor serve --socket "
         f"{path} --device cpu --model {model}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    clients: list[DeviceClient] = []
    try:
        assert srv.stdout is not None and "listening" in srv.stdout.readline()
        refusal = None
        for _ in range(40):
            try:
                client = conveyor.connect(path)
            except ServerGone as exc:
                refusal = exc
                break
            clients.append(client)
            try:
                client.infer(model, img)
            except ServerGone as exc:
                refusal = exc
                break
        assert refusal is not None, "40 clients fit in 40 descriptors"
        assert "out of file descriptors" in str(refusal), refusal
        for c in clients[:-1]:  # the ones it took keep their service
            assert len(c.infer(model, img)) == 2
        for c in clients:
            c.close()
        clients.clear()
        with conveyor.connect(path) as late:  # descriptors back: a new client is served
            assert len(late.infer(model, img)) == 2
        srv.send_signal(signal.SIGTERM)
        assert srv.wait(timeout=20) == 0
        assert srv.stderr is not None
        log = srv.stderr.read()
        assert "out of file descriptors" in log and "protocol error" not in log
    finally:
        for c in clients:
            c.close()
        if srv.poll() is None:
            srv.kill()
            srv.wait()
        for stream in (srv.stdout, srv.stderr):
            if stream is not None:
                stream.close()


def test_sigterm_handed_to_another_thread_still_stops_an_idle_server(sdir: Path) -> None:
    # Python runs handlers in the main thread only; the kernel may hand a process's
    # SIGTERM to any thread (it did after SIGSTOP and SIGCONT), and an idle server's
    # main thread slept without a timeout: the signal sat there until the next client.
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import signal, sys, threading, time
        from conveyor._device._serve import serve

        def to_a_device_thread():
            time.sleep(2.0)  # up, and idle for a while
            (dev,) = [t for t in threading.enumerate() if t.name == "conveyor-device-0"]
            signal.pthread_kill(dev.ident, signal.SIGTERM)

        threading.Thread(target=to_a_device_thread, daemon=True).start()
        sys.exit(serve(socket_path=sys.argv[1], devices=["sim-edgetpu"],
                       models=["face_detection_short_range"]))
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(sdir / "s.sock")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (sdir / "s.sock").exists()  # a drained stop: the socket is removed


@pytest.mark.usefixtures("no_leaks")
def test_a_reader_finding_its_socket_closed_by_another_thread_lets_the_link_go(
        sdir: Path) -> None:
    # The reader's poll met the socket another thread had just closed (descriptor -1):
    # the ValueError killed the reader thread, and every waiter hung.
    path = sdir / "s.sock"
    img = np.zeros((1, 128, 128, 3), np.float32)
    with ServeProcess(path) as srv, conveyor.connect(path, reconnect=True) as client:
        client.infer("face_detection_short_range", img)
        link = client._link
        assert link is not None
        link.sock.close()  # as the thread that lost the connection does
        client._read_messages(link, 0.1)  # a reader with a timeout (deadlines in use)
        assert client._link is None
        assert len(client.infer("face_detection_short_range", img)) == 2  # reconnected
        srv.terminate()
        assert srv.wait() == 0


def test_an_idle_client_meets_a_restarted_server_with_other_models(
        sdir: Path, tmp_path: Path) -> None:
    # The server comes back while the client is idle. status() failed on the dead
    # connection and models() gave the old server's list. A request was checked against
    # the old model's tensors: for a model of the same name with others, a raw numpy
    # ValueError, and its slot was lost for good (with a credit of 1, every later request
    # waited for ever).
    path = sdir / "s.sock"
    small = np.zeros((1, 128, 128, 3), np.float32)
    other = tmp_path / "face_detection_short_range.tflite"  # full range (192x192), renamed
    shutil.copy(resolve_model("face_detection_full_range"), other)
    with ServeProcess(path, "--model", "face_landmark") as first:
        client = conveyor.connect(path, reconnect=True)
    try:
        assert first.proc.returncode is not None
        with ServeProcess(path) as second:
            assert wait_for(lambda: not client.connected, timeout=5.0)
            assert list(client.models()) == ["face_detection_short_range"]
            assert client.status()["server"]["pid"] == second.pid
            assert len(client.infer("face_detection_short_range", small)) == 2
        with ServeProcess(path, "--model", str(other), "--max-inflight", "1"):
            with pytest.raises(conveyor.InputError, match=r"expected shape \[1, 192, 192, 3\], "
                                                          r"got \[1, 128, 128, 3\]"):
                client.infer("face_detection_short_range", small)
            big = np.zeros((1, 192, 192, 3), np.float32)
            for _ in range(3):  # its one slot is free
                assert len(client.infer("face_detection_short_range", big, deadline=10)) == 2
        with ServeProcess(path):  # the 128x128 model under the name again
            assert wait_for(lambda: not client.connected, timeout=5.0)
            # checked against the dead connection's 192x192 model, it was an InputError
            # for good: nothing made the client connect again
            assert len(client.infer("face_detection_short_range", small, deadline=10)) == 2
        with ServeProcess(path, "--model", "face_landmark"):
            assert wait_for(lambda: not client.connected, timeout=5.0)
            # looked up in the dead connection's models, it was ModelNotFoundError for
            # good, naming the old server's models
            landmark = np.zeros((1, 192, 192, 3), np.float32)
            assert len(client.infer("face_landmark", landmark, deadline=10)) == 2
        with ServeProcess(path):
            assert wait_for(lambda: not client.connected, timeout=5.0)
            assert client.model_info("face_detection_short_range").inputs[0].shape == \
                (1, 128, 128, 3)
    finally:
        client.close()


def test_close_during_a_reconnect_handshake_says_the_client_was_closed(sdir: Path) -> None:
    # A sync infer() reconnecting to a server that does not answer yet (SIGSTOP), ended
    # by close() from another thread, said "the connection was closed by the other side".
    with _replaced_by_a_stopped_server(sdir) as (client, img, _):
        ended: list[BaseException] = []

        def call() -> None:
            try:
                client.infer("face_detection_short_range", img)
            except BaseException as exc:
                ended.append(exc)

        caller = threading.Thread(target=call)
        caller.start()
        time.sleep(0.5)  # it waits in the handshake
        client.close()
        caller.join(5)
        assert not caller.is_alive()
        assert [str(e) for e in ended] == ["the client was closed"], ended


def test_a_client_dropped_after_submit_is_collected_and_lets_go_of_the_server(
        sdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Its background reader held it for good: a thread, a socket and a memfd each, and
    # a connection of the server's --max-clients, for the life of the program.
    import asyncio

    import conveyor._device._client as client_mod

    monkeypatch.setattr(client_mod, "IDLE_LET_GO_S", 0.05)

    def readers() -> int:
        return sum(t.name == "conveyor-client-reader" for t in threading.enumerate())

    with ThreadServer(sdir / "s", [FakeDevice()], ["m"], max_clients=3) as srv:
        before = readers()

        def submitted() -> Any:
            return DeviceClient(path=srv.path).submit("m", x(1.0)).result(10)

        async def awaited() -> Any:
            return await DeviceClient(path=srv.path).ainfer("m", x(1.0))

        for use in [submitted] * 4 + [lambda: asyncio.run(awaited())]:  # 5 > max_clients
            with pytest.warns(ResourceWarning, match=r"unclosed <DeviceClient of .*/s>"):
                assert use()[1].tolist() == [4.0]
                gc.collect()
                assert wait_for(lambda: readers() == before, timeout=5.0)
            assert wait_for(lambda: readers() == before, timeout=5.0)
            assert wait_for(lambda: not srv.server.status()["clients"], timeout=5.0)


@pytest.mark.parametrize("timeout", [0, 0.0, -1, float("nan"), float("inf"), True])
def test_a_connect_timeout_that_is_no_time_is_refused_as_such(sdir: Path,
                                                              timeout: float) -> None:
    # 0 made the socket non-blocking (ServerGone "the connection broke" from a healthy
    # server), -1 a bare ValueError from the socket module.
    with pytest.raises(ValueError, match="timeout must be a number of seconds above 0"):
        DeviceClient(path=sdir / "nothing-here", timeout=timeout)


def test_a_long_client_name_is_cut_to_what_the_server_keeps(sdir: Path) -> None:
    # 70,000 characters made the HELLO too long: ProtocolError, not naming the name.
    with ThreadServer(sdir / "s", [FakeDevice()], ["m"]) as srv, \
            DeviceClient(path=srv.path, name="n" * 70_000) as c:
        assert c.infer("m", x(1.0))[1].tolist() == [4.0]
        assert [k["name"] for k in srv.server.status()["clients"]] == ["n" * 64]


def test_a_full_queue_of_new_connections_is_waited_out_not_taken_for_no_server(
        sdir: Path) -> None:
    # A Unix socket refuses a connect at once (EAGAIN) while its queue of connections
    # not yet accepted is full: after a burst, connect() said "no conveyor server".
    path = sdir / "s"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(0)
    held = []
    try:
        while True:  # fill the queue (nobody accepts)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(str(path))
            except BlockingIOError:
                s.close()
                break
            held.append(s)
        t0 = time.monotonic()
        with pytest.raises(ServerGone, match=r"took no new connection within 0\.3 s"):
            DeviceClient(path=path, timeout=0.3)
        assert time.monotonic() - t0 >= 0.25
    finally:
        for s in held:
            s.close()
        listener.close()
        path.unlink()


def test_connection_churn_does_not_flood_the_log(sdir: Path) -> None:
    # One line per connect and one per disconnect, with no bound: 10,000 connections
    # made 20,000 lines.
    with LogLines().installed() as logs, ThreadServer(sdir / "s", [FakeDevice()], ["m"]) as srv:
        t0 = time.monotonic()
        for _ in range(150):
            DeviceClient(path=srv.path).close()
        seconds = time.monotonic() - t0
        time.sleep(1.1)
        DeviceClient(path=srv.path).close()  # in a new second: says what was held back
    plain = [line for line in logs.lines if "connected:" in line or line.endswith("disconnected")]
    assert len(plain) <= 20 * (int(seconds) + 3), len(plain)
    assert any("were not logged" in line for line in logs.lines)


def test_refused_connections_do_not_flood_the_log(sdir: Path) -> None:
    # Every refusal was logged: a user not let in, connecting in a loop, wrote 2 MB of
    # log a second and slowed the server's clients tenfold.
    with LogLines().installed() as logs, ThreadServer(sdir / "s", [FakeDevice()], ["m"],
                                                      max_clients=1) as srv:
        kept = DeviceClient(path=srv.path)  # the one connection allowed
        try:
            t0 = time.monotonic()
            for _ in range(300):
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(str(srv.path))
                    s.recv(4096)  # the refusal, then the close
            seconds = time.monotonic() - t0
            time.sleep(1.1)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(srv.path))  # in a new second: says what was held back
                s.recv(4096)
            assert srv.server.status()["totals"]["rejected_connections"] == 301
        finally:
            kept.close()
    refused = [line for line in logs.lines if "refused connection from" in line]
    assert 0 < len(refused) <= 20 * (int(seconds) + 3), len(refused)
    assert any("refused connection lines were not logged" in line for line in logs.lines)


def test_a_call_whose_connection_another_thread_drops_goes_on_the_new_one(
        sdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # It took a slot of the connection; before it registered its request, another
    # thread's failed send dropped that connection: its second try went on with the old
    # one (no slot there) and failed with ServerGone though a server was there.
    with ThreadServer(sdir / "s", [FakeDevice()], ["m"]) as srv, \
            DeviceClient(path=srv.path, reconnect=True) as c:
        c.infer("m", x(1))
        views = c._views
        dropped = []

        def dropping(link: Any, info: Any, slot: int) -> Any:
            got = views(link, info, slot)
            if not dropped:  # as another thread would, while this one fills its slot
                dropped.append(link)
                c._lost(link, ServerGone("the device server went away"))
            return got

        monkeypatch.setattr(c, "_views", dropping)
        assert c.infer("m", x(2))[1].tolist() == [8.0]
        assert dropped and c._link is not dropped[0]


def test_a_kept_server_gone_does_not_keep_the_lost_connections_memory(sdir: Path) -> None:
    # The error's traceback held the frame that filled the request's slot, with a view of
    # the arena in it: each kept error kept a lost connection's 8 MB arena mapped and its
    # descriptor open.
    def arenas() -> int:
        with open("/proc/self/maps") as f:
            return sum("conveyor-client" in line for line in f)

    path = sdir / "s.sock"
    img = np.zeros((1, 128, 128, 3), np.float32)
    with ServeProcess(path) as srv, conveyor.connect(path, reconnect=True) as client:
        client.infer("face_detection_short_range", img)
        gc.collect()  # (other tests' clients, not collected yet, may hold theirs)
        before = arenas()
        assert before >= 1
        srv.kill()
        path.unlink()  # a killed server leaves its socket
        with pytest.raises(ServerGone) as info:
            client.infer("face_detection_short_range", img)
        gc.collect()
        assert arenas() == before - 1, info.value


def test_an_empty_socket_path_is_refused_as_such() -> None:
    # Path("") is ".": the error said ". is not a socket", a folder nobody named.
    with pytest.raises(ValueError, match="socket path is empty"):
        conveyor.connect("")
    with pytest.raises(ValueError, match="server= is an empty path"):
        conveyor.infer("face_detection_short_range", server="")


def test_a_socket_path_too_long_for_a_unix_socket_says_so(
        capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # It was "no conveyor server at ...: AF_UNIX path too long; start one with conveyor
    # serve --socket ..." (a command that cannot work), from connect() and the CLI.
    long = "/tmp/" + "s" * 103  # 108 bytes: one more than sun_path holds with its NUL
    why = "is 108 bytes, more than the 107 a Unix socket's path may have"
    with pytest.raises(ValueError, match=why):
        conveyor.connect(long)
    for command in ("status", "top", "serve"):
        with pytest.raises(SystemExit) as exited:
            conveyor.cli.main([command, "--socket", long])
        assert exited.value.code == 2
        assert why in capsys.readouterr().err
    assert long_socket_path(long[:-1]) is None  # 107 bytes may be a socket's path
    # The default path, in a deep $XDG_RUNTIME_DIR: status and top printed a traceback.
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(deep))
    for command in (["status"], ["top", "--once"]):
        assert conveyor.cli.main(command) == 2
        err = capsys.readouterr().err
        assert f"conveyor {command[0]}: the socket path {deep}/conveyor.sock is " in err
        assert "(the default path; pass --socket)" in err and "Traceback" not in err


@pytest.mark.parametrize("how", ["another user's", "a link", "a dangling link",
                                 "writable by all"])
def test_a_default_socket_folder_that_is_not_this_users_is_refused(
        how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Anyone may make /tmp/conveyor-<uid> first: the client connected to the server
    # another user put there, and sent it this user's tensors.
    from conveyor._device import _client, _serve

    folder = tmp_path / f"conveyor-{os.getuid()}"
    if how.endswith("link"):
        if how == "a link":
            (tmp_path / "elsewhere").mkdir(mode=0o700)
        folder.symlink_to(tmp_path / "elsewhere")
        why = "is a symbolic link"
    else:
        folder.mkdir(mode=0o700)
        if how == "writable by all":
            folder.chmod(0o777)
            why = "may be written by other users (mode 777)"
        else:
            if os.getuid() != 0:
                pytest.skip("making a folder another user's needs root")
            os.chown(folder, 65534, 65534)
            why = "belongs to uid 65534"
    for module in (_client, _serve):
        monkeypatch.setattr(module, "private_tmp_dir", lambda: folder)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    text = f"{folder} {why}, so it is not this user's (uid {os.getuid()}) private folder"
    with pytest.raises(conveyor.PermissionDenied, match=re.escape(text)):
        conveyor.connect()
    with pytest.raises(conveyor.ServerError, match=re.escape(text)):
        _serve._prepare_dir(folder, None)


def test_a_servers_own_default_folder_is_opened_for_those_let_in(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Left 0700 by an earlier server, it stayed so: the users of --allow-user (or the
    # group of --group) could not reach the socket, and were told to ask for what the
    # owner had already given.
    from conveyor._device import _serve

    folder = tmp_path / f"conveyor-{os.getuid()}"
    folder.mkdir(mode=0o700)
    monkeypatch.setattr(_serve, "private_tmp_dir", lambda: folder)
    assert _serve._prepare_dir(folder, None) == []
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700  # nobody else let in: as it was
    _serve._prepare_dir(folder, None, others=True)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o711  # enter, not list
    _serve._prepare_dir(folder, os.getgid())
    assert stat.S_IMODE(folder.stat().st_mode) == 0o751
    assert folder.stat().st_gid == os.getgid()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_group_sharing_by_a_user_outside_the_group_says_why() -> None:
    # "cannot start: [Errno 1] Operation not permitted: '/tmp/conveyor-4123'", naming
    # neither the group nor the cause, when the folder or the socket was new.
    import tempfile

    from test_pipeline_faults import _in_forked_child

    from conveyor._device import _serve

    with tempfile.TemporaryDirectory(prefix="cvg-", dir="/tmp") as base:
        os.chmod(base, 0o755)  # (pytest's own folders are closed to other users)
        folder = Path(base) / "f"
        folder.mkdir()
        os.chown(folder, 65534, 65534)
        text = _in_forked_child(lambda: _as_nobody(lambda: _serve._prepare_dir(
            folder / "new", 0)))
        assert text == (f"ServerError: cannot give {folder / 'new'} to group 0: Operation "
                        f"not permitted (is this user a member of that group?)")
        assert not (folder / "new").exists()  # the folder it made is removed


def _as_nobody(fn: Any) -> Any:
    """In a forked child: become nobody, then call ``fn``."""
    os.setgid(65534)
    os.setgroups([])
    os.setuid(65534)
    return fn()
