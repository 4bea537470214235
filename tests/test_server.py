"""``conveyor serve`` as users run it: a separate process on a Unix socket, used by several
client processes, watched with ``conveyor status``/``top``/metrics, stopped with SIGTERM,
and closed to users it does not allow."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import wait_for
from test_server_support import (
    LANDMARK_IN,
    MODEL,
    SHAPE,
    SLOW,
    ServeProcess,
    env,
    finish,
    python,
    socket_dir,
    wait_until,
)

import conveyor
from conveyor import DeviceClient, ServerError, ServerGone
from conveyor._models import bundled_models
from conveyor.backends import open_device

pytestmark = pytest.mark.usefixtures("no_leaks")


@pytest.fixture
def sdir() -> Iterator[Path]:
    with socket_dir() as d:
        yield d


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "conveyor", *args], env=env(), text=True,
                          capture_output=True, timeout=timeout)


def test_serves_the_same_outputs_as_a_local_run(sdir: Path) -> None:
    path = sdir / "s.sock"
    with ServeProcess(path) as srv:
        assert str(path) in srv.ready_line
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        runner = open_device("cpu").load(MODEL)
        rng = np.random.default_rng(1)
        with conveyor.connect(path) as client:
            assert MODEL in client.models()
            for _ in range(5):
                img = rng.random(SHAPE, dtype=np.float32)
                got = client.infer(MODEL, img)
                for a, b in zip(got, runner.run([img]), strict=True):
                    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
            futs = [client.submit(MODEL, rng.random(SHAPE, dtype=np.float32)) for _ in range(40)]
            assert all(len(f.result(30)) == 2 for f in futs)
            import asyncio

            outs = asyncio.run(client.ainfer(MODEL, np.zeros(SHAPE, np.float32)))
            assert [o.shape for o in outs] == [(1, 896, 16), (1, 896, 1)]
        srv.terminate()
        assert srv.wait() == 0
        assert not path.exists()


CLIENT = """
import sys, numpy as np, conveyor
from conveyor._models import bundled_models
from conveyor.backends import open_device
path, seed, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
runner = open_device("cpu:1").load("face_detection_short_range")
rng = np.random.default_rng(seed)
imgs = [rng.random((1, 128, 128, 3), dtype=np.float32) for _ in range(4)]
want = [runner.run([img]) for img in imgs]
with conveyor.connect(path, name=f"worker{seed}") as c:
    futs = [(i % 4, c.submit("face_detection_short_range", imgs[i % 4])) for i in range(n)]
    for k, f in futs:
        for a, b in zip(f.result(60), want[k]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for i in range(n):
        got = c.infer("face_detection_short_range", imgs[i % 4])
        np.testing.assert_allclose(got[0], want[i % 4][0], rtol=1e-5, atol=1e-5)
print("ok", 2 * n)
"""


def test_several_client_processes_share_one_server(sdir: Path) -> None:
    path = sdir / "s.sock"
    with ServeProcess(path, "--device", "cpu:1"):
        procs = [python(CLIENT, str(path), str(seed), "40") for seed in range(4)]
        assert finish(procs, 60) == ["ok 80\n"] * 4
        st = conveyor.connect(path)
        try:
            status = st.status()
        finally:
            st.close()
        assert status["totals"]["requests"]["ok"] == 320
        assert status["totals"]["errors"] == 0


def test_status_json_text_and_top(sdir: Path) -> None:
    path = sdir / "s.sock"
    with ServeProcess(path) as srv, conveyor.connect(path, name="watched") as client:
        for _ in range(10):
            client.infer(MODEL, np.zeros(SHAPE, np.float32))
        done = cli("status", "--socket", str(path), "--json")
        assert done.returncode == 0, done.stderr
        status = json.loads(done.stdout)
        assert set(status) == {"server", "devices", "models", "clients", "totals"}
        assert status["server"]["pid"] == srv.pid
        assert status["server"]["socket"] == str(path)
        (dev,) = status["devices"]
        for key in ("spec", "state", "current_model", "items", "errors", "model_switches",
                    "busy_s", "duty_cycle", "items_per_s", "p50_ms", "p99_ms", "models"):
            assert key in dev, key
        assert dev["items"] == 10 and dev["state"] == "ok" and 0 < dev["duty_cycle"] <= 1
        assert 0 < dev["p50_ms"] <= dev["p99_ms"]
        (model,) = status["models"]
        assert model["name"] == MODEL and model["requests"]["ok"] == 10
        assert model["compute"]["count"] == 10
        (me,) = status["clients"]  # `conveyor status` itself is a monitor, not a client
        assert me["name"] == "watched" and me["completed"] == 10 and me["pid"] == os.getpid()
        for key in ("queued", "running", "failed", "busy", "deadline_exceeded", "device_s"):
            assert key in me, key
        # Ten requests over at most the connection's life (under the 5 s window).
        assert me["requests_per_s"] >= 10 / me["connected_s"] * 0.9 > 0
        assert me["running"] == 0 and status["totals"]["running"] == 0
        assert status["totals"]["monitors"] == 1
        text = cli("status", "--socket", str(path))
        assert text.returncode == 0
        assert "DUTY" in text.stdout and "watched" in text.stdout and MODEL in text.stdout
        top = cli("top", "--socket", str(path), "--once")
        assert top.returncode == 0
        assert "conveyor top" in top.stdout and "REQ/S" in top.stdout
        # One frame, and still the client's own rate (not 0.0 for want of a previous one).
        row = next(line for line in top.stdout.splitlines() if "watched" in line)
        assert float(row.split()[-1]) > 0


def test_status_without_a_server_says_so(sdir: Path) -> None:
    done = cli("status", "--socket", str(sdir / "none.sock"))
    assert done.returncode == 1
    assert "no conveyor server" in done.stderr and "conveyor serve" in done.stderr
    assert cli("top", "--once", "--socket", str(sdir / "none.sock")).returncode == 1
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # bound, never listening:
    stale.bind(str(sdir / "stale.sock"))  # as a stopping server's, or a crashed one's
    try:
        done = cli("status", "--socket", str(sdir / "stale.sock"))
    finally:
        stale.close()
        (sdir / "stale.sock").unlink()
    assert done.returncode == 1 and "does not take connections" in done.stderr
    # A file or a folder: the kernel refuses it as it refuses a stale socket, and the
    # message blamed a stopped server, then suggested a serve command that refuses it.
    (sdir / "notes.txt").write_text("")
    for where in (sdir / "notes.txt", sdir):
        done = cli("status", "--socket", str(where))
        assert done.returncode == 1
        assert f"{where} is not a socket, so no conveyor server listens there" in done.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_metrics_endpoint(sdir: Path) -> None:
    path = sdir / "s.sock"
    port = _free_port()
    with ServeProcess(path, "--metrics-port", str(port)), conveyor.connect(path) as client:
        for _ in range(3):
            client.infer(MODEL, np.zeros(SHAPE, np.float32))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            assert r.headers["Content-Type"].startswith("text/plain")
            text = r.read().decode()
    assert re.search(rf'conveyor_request_success_total{{model="{MODEL}"}} 3', text), text
    for name in ("conveyor_request_failure_total", "conveyor_request_queue_seconds_bucket",
                 "conveyor_request_compute_seconds_sum", "conveyor_device_utilization",
                 "conveyor_queue_depth", "conveyor_clients_connected",
                 "conveyor_device_model_switches_total"):
        assert name in text, name


@pytest.mark.parametrize("round_trip", [True, False], ids=["admitted", "unread"])
def test_sigterm_drains_in_flight_requests(sdir: Path, round_trip: bool) -> None:
    # Without a round trip between the submits and the signal, some requests are still
    # unread in the server's socket when it stops. The client saw them sent: they are in
    # flight too.
    path = sdir / "s.sock"
    with ServeProcess(path, *SLOW) as srv, conveyor.connect(path) as client:
        img = np.zeros(LANDMARK_IN, np.float32)
        futs = [client.submit("face_landmark", img) for _ in range(24 if round_trip else 32)]
        if round_trip:
            client.status()  # one round trip: all 24 are admitted
        srv.terminate()
        if round_trip:
            assert not all(f.done() for f in futs), "too fast to test draining"
        assert all(len(f.result(30)) == 2 for f in futs)
        assert srv.wait(30) == 0
        assert not path.exists()
        assert "draining" in srv.log() or "stopping" in srv.log()
        with pytest.raises(ServerGone):
            client.infer("face_landmark", img)


PARENT = """
import subprocess, sys, time
srv = subprocess.Popen([sys.executable, "-m", "conveyor", "serve", "--socket", sys.argv[1],
                        "--exit-with-stdin"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                       stderr=subprocess.DEVNULL)
srv.stdout.readline()  # listening
print(srv.pid, flush=True)
time.sleep(600)
"""


def test_exit_with_stdin_outlives_no_killed_parent(sdir: Path) -> None:
    path = sdir / "s.sock"
    parent = python(PARENT, str(path))
    try:
        assert parent.stdout is not None
        server_pid = int(parent.stdout.readline())
        with conveyor.connect(path) as client:
            assert MODEL in client.models()
        parent.kill()  # SIGKILL: the parent runs no clean-up of its own
        parent.wait(10)

        def gone() -> bool:
            try:
                return psutil.Process(server_pid).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        assert wait_for(gone, 10), "the server outlived the program that started it"
        assert not path.exists()
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.communicate()


def test_second_sigterm_stops_at_once(sdir: Path) -> None:
    path = sdir / "s.sock"
    args = (*SLOW, "--max-inflight", "128")
    with ServeProcess(path, *args) as srv, conveyor.connect(path) as client:
        img = np.zeros((1, 192, 192, 3), np.float32)
        futs = [client.submit("face_landmark", img) for _ in range(128)]  # ~0.5 s of work
        client.status()
        t0 = time.monotonic()
        srv.terminate()
        time.sleep(0.3)  # within 0.2 s it is the same request sent twice (timeout(1))
        srv.terminate()
        assert srv.wait(10) == 1
        assert time.monotonic() - t0 < 2.0
        assert not path.exists()
        failed = 0
        for f in futs:
            try:
                f.result(10)
            except ServerGone:
                failed += 1
        assert failed > 0  # it did not drain


@pytest.mark.parametrize("gap_s", [0.002, 0.01, 0.05])
def test_a_second_sigterm_as_the_server_ends_never_kills_it(sdir: Path, gap_s: float) -> None:
    # timeout(1) sends SIGTERM to the server and then to its process group: the second
    # came after the drain, once the default handler was back, and killed the server
    # (-15; once in 20 before it had removed its socket).
    # It also counted as the second signal while the drain went on, and stopped the
    # server at once (exit 1) in 2-3 runs of 5, dropping what was queued.
    path = sdir / "s.sock"
    with ServeProcess(path, *SLOW, "--max-inflight", "64") as srv, \
            conveyor.connect(path) as client:
        img = np.zeros((1, 192, 192, 3), np.float32)
        futs = [client.submit("face_landmark", img) for _ in range(64)]
        client.status()
        srv.terminate()
        time.sleep(gap_s)
        srv.terminate()
        assert srv.wait(10) == 0, srv.log()  # drained, not stopped at once nor killed
        assert not path.exists()
        assert all(len(f.result(10)) == 2 for f in futs)


def test_refuses_a_second_server_and_replaces_a_stale_socket(sdir: Path) -> None:
    path = sdir / "s.sock"
    with ServeProcess(path) as first:
        second = cli("serve", "--socket", str(path))
        assert second.returncode == 2
        assert "already serving" in second.stderr
        first.kill()  # SIGKILL: leaves its socket file behind
    assert path.is_socket()
    with ServeProcess(path) as again, conveyor.connect(path) as client:
        client.infer(MODEL, np.zeros(SHAPE, np.float32))
        assert "stale" in again.log()
        again.terminate()
        assert again.wait() == 0
    assert not path.exists()


def test_a_server_that_cannot_start_leaves_no_folder_and_names_its_path(sdir: Path) -> None:
    # The folders made for the socket were left behind (the outer ones at the umask's
    # 0755, not 0700), and a socket that could not be bound was reported without its path.
    path = sdir / "new" / "sub" / "s.sock"
    bad = cli("serve", "--socket", str(path), "--model", "no_such_model")
    assert bad.returncode == 2 and "no_such_model" in bad.stderr
    assert not (sdir / "new").exists()
    server = subprocess.Popen([sys.executable, "-m", "conveyor", "serve", "--socket",
                               str(path)], env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        assert server.stdout is not None and "listening" in server.stdout.readline()
        modes = [stat.S_IMODE((sdir / p).stat().st_mode) for p in ("new", "new/sub")]
        assert modes == [0o700, 0o700]
    finally:
        server.terminate()
        assert server.wait(30) == 0
        assert server.stdout is not None
        server.stdout.close()
    unbindable = cli("serve", "--socket", "/proc/conveyor-test.sock")
    assert unbindable.returncode == 2
    assert "cannot listen on /proc/conveyor-test.sock: No such file" in unbindable.stderr
    # Failing once the models were loaded (a socket path too long to bind, a metrics
    # port taken) left the folders made, and "[Errno None]" for the long path.
    path = sdir / "other" / "sub" / "s.sock"
    long = sdir / "other" / ("x" * 120) / "s.sock"
    too_long = cli("serve", "--socket", str(long))  # refused before anything is made
    assert too_long.returncode == 2 and "more than the 107 a Unix socket's path may have" \
        in too_long.stderr
    assert "Errno None" not in too_long.stderr and not (sdir / "other").exists()
    taken = socket.socket()
    try:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        busy = cli("serve", "--socket", str(path), "--metrics-port", port)
    finally:
        taken.close()
    assert busy.returncode == 2 and "metrics port" in busy.stderr
    assert not (sdir / "other").exists()
    # A numeric group beyond any gid: a traceback (OverflowError from chown).
    huge = cli("serve", "--socket", str(path), "--group", "99999999999999999999")
    assert huge.returncode == 2 and "out of range" in huge.stderr
    assert "Traceback" not in huge.stderr
    assert "at most 4096" in cli("serve", "--max-inflight", "4097").stderr
    for command in ("serve", "status", "top"):  # "" was taken as the current folder
        empty = cli(command, "--socket", "")
        assert empty.returncode == 2 and "an empty path names no socket" in empty.stderr


# --- who may connect ---------------------------------------------------------------------

NOBODY = 65534


def _as_nobody(path: Path, infer: bool) -> int:
    """Fork a child that drops to uid/gid 65534 and connects; its exit code says how it
    went: 0 served, 2 refused by the server, 4 refused by the file system (both as
    PermissionDenied, a PermissionError, saying how to get in), other: bug."""
    img = np.zeros(SHAPE, np.float32)
    pid = os.fork()
    if pid == 0:
        code = 9
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                client = DeviceClient(path=path, timeout=5)
            except conveyor.PermissionDenied as exc:
                code = 6
                if not isinstance(exc, PermissionError):
                    code = 7
                elif "may not open the device server's socket" in str(exc):
                    code = 4
                elif "is not allowed by this server" in str(exc):
                    # ...and the message says how the server's owner can let it in.
                    code = 2 if f"--allow-user {NOBODY}" in str(exc) else 5
            except ServerError:
                code = 3
            else:
                code = 0
                if infer:
                    client.infer(MODEL, img)
                client.close()
        finally:
            os._exit(code)
    end = time.monotonic() + 20
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    raise AssertionError("the child did not finish")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_other_users_are_refused(sdir: Path) -> None:
    os.chmod(sdir, 0o755)
    path = sdir / "s.sock"
    with ServeProcess(path) as srv:
        assert _as_nobody(path, infer=False) == 4  # mode 0600: the kernel says no
        os.chmod(path, 0o777)  # now only the server's SO_PEERCRED check stands in the way
        assert _as_nobody(path, infer=False) == 2
        assert "refused connection" in srv.log()
        with conveyor.connect(path) as client:  # the owner still gets in
            client.infer(MODEL, np.zeros(SHAPE, np.float32))
            assert client.status()["totals"]["rejected_connections"] == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_group_shares_the_socket(sdir: Path) -> None:
    os.chmod(sdir, 0o755)
    path = sdir / "s.sock"
    with ServeProcess(path, "--group", str(NOBODY)):
        info = path.stat()
        assert stat.S_IMODE(info.st_mode) == 0o660 and info.st_gid == NOBODY
        assert _as_nobody(path, infer=True) == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_allowed_user_gets_in(sdir: Path) -> None:
    os.chmod(sdir, 0o755)
    path = sdir / "s.sock"
    with ServeProcess(path, "--allow-user", str(NOBODY)):
        # Reachable by the file mode; the server's SO_PEERCRED check decides.
        assert stat.S_IMODE(path.stat().st_mode) == 0o666
        assert _as_nobody(path, infer=True) == 0
    fresh = sdir / "new" / "s.sock"  # a folder the server makes: others may enter it
    with ServeProcess(fresh, "--allow-user", "nobody"):
        assert stat.S_IMODE(fresh.parent.stat().st_mode) == 0o711
        assert _as_nobody(fresh, infer=True) == 0


def test_pipeline_uses_the_shared_server(sdir: Path) -> None:
    path = sdir / "s.sock"
    imgs = [np.full(SHAPE, v, np.float32) for v in (0.0, 0.5, 1.0)] * 4
    runner = open_device("cpu").load(MODEL)
    want = [runner.run([img])[1] for img in imgs]
    with ServeProcess(path):
        for stage_def in (conveyor.infer(MODEL, server=path),
                          conveyor.infer(MODEL, device=f"server:{path}")):
            with conveyor.Pipeline(stage_def) as pipe:
                got = [outs[1] for outs in pipe.map(imgs)]
            for a, b in zip(got, want, strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        status = conveyor.connect(path)
        try:
            assert status.status()["totals"]["requests"]["ok"] == 2 * len(imgs)
        finally:
            status.close()


def test_pipeline_on_a_server_refuses_a_model_it_does_not_serve_at_start(sdir: Path) -> None:
    path = sdir / "s.sock"
    with ServeProcess(path):
        stage = conveyor.infer("face_landmark", server=path)
        with pytest.raises(conveyor.ModelNotFoundError,
                           match=r"does not serve 'face_landmark'; it serves \['face_det"), \
                conveyor.Pipeline(stage):
            pytest.fail("the pipeline started")
        # A path names the model it holds, as the server does: a name with no file
        # here, or a copy of the served file, is the served model...
        copy = sdir / "copy" / f"{MODEL}.tflite"
        copy.parent.mkdir()
        copy.write_bytes(bundled_models()[MODEL].read_bytes())
        for model in (f"/elsewhere/{MODEL}.tflite", str(copy)):
            with conveyor.Pipeline(conveyor.infer(model, server=path)) as pipe:
                assert len(list(pipe.map([np.zeros(SHAPE, np.float32)]))) == 1
        # ...but another file of that name is not: the server would run its own.
        with copy.open("ab") as f:
            f.write(b"\0")
        with pytest.raises(conveyor.ModelNotFoundError,
                           match=r"from another file than .*their bytes differ"), \
                conveyor.Pipeline(conveyor.infer(str(copy), server=path)):
            pytest.fail("the pipeline started")
        client = conveyor.connect(path)
        try:
            assert client.status()["totals"]["requests"]["ok"] == 2
            with pytest.raises(conveyor.ModelNotFoundError, match="another file"):
                client.infer(str(copy), np.zeros(SHAPE, np.float32))
        finally:
            client.close()


def _connect_or_none(path: Path, refused: list[str]) -> conveyor.DeviceClient | None:
    try:
        return conveyor.connect(path)
    except conveyor.ServerError as exc:
        refused.append(str(exc))
        return None


def test_max_clients_refuses_the_next_connection_and_keeps_serving(sdir: Path) -> None:
    path = sdir / "s.sock"
    x = np.zeros(SHAPE, np.float32)
    with ServeProcess(path, "--max-clients", "2"):
        first, second = conveyor.connect(path), conveyor.connect(path)
        try:
            with pytest.raises(conveyor.ServerError, match=r"too many connections \(at most 2\)"):
                conveyor.connect(path)
            assert second.status()["server"]["max_clients"] == 2
            first.infer(MODEL, x)  # the two admitted are served as before
            second.close()
            # a freed place is taken again, once the server has seen the goodbye
            refused: list[str] = []
            third = wait_until(lambda: _connect_or_none(path, refused), what="a freed place")
            assert all("too many connections" in why for why in refused)
            third.infer(MODEL, x)
            third.close()
            assert first.status()["totals"]["rejected_connections"] == 1 + len(refused)
        finally:
            first.close()
            second.close()


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_top_ended_by_a_signal_gives_the_terminal_back(sdir: Path, signum: int,
                                                        code: int) -> None:
    # Only q and Ctrl-C restored the terminal: after `kill` (or the terminal closing)
    # it was left without echo.
    import pty
    import select
    import termios

    pid, fd = pty.fork()
    if pid == 0:  # the child: top on a terminal, waiting for a server that is not there
        try:
            os.execvpe(sys.executable, [sys.executable, "-m", "conveyor", "top", "--socket",
                                        str(sdir / "none.sock")], env())
        finally:
            os._exit(127)
    try:
        before = termios.tcgetattr(fd)
        seen = b""
        end = time.monotonic() + 20
        while b"waiting for a server" not in seen and time.monotonic() < end:
            if select.select([fd], [], [], 0.1)[0]:
                seen += os.read(fd, 65536)
        assert b"waiting for a server" in seen
        assert not termios.tcgetattr(fd)[3] & termios.ECHO  # keys unechoed while it runs
        os.kill(pid, signum)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == code
        assert termios.tcgetattr(fd) == before
    finally:
        with contextlib.suppress(ChildProcessError, ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)


def test_top_to_a_pipe_prints_frames_without_screen_control(sdir: Path) -> None:
    # To a file or a pipe it wrote the terminal's clear-screen sequence before each frame.
    proc = subprocess.Popen(
        [sys.executable, "-m", "conveyor", "top", "--socket", str(sdir / "none.sock"),
         "--interval", "0.1"], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env())
    try:
        assert proc.stdout is not None
        seen = b""
        while seen.count(b"waiting for a server") < 2:
            chunk = proc.stdout.read1(65536)
            assert chunk, "top ended"
            seen += chunk
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
    assert b"\x1b" not in seen
    assert seen.count(b"conveyor top") >= 2


def test_status_and_the_log_say_where_auto_runs_each_model(sdir: Path) -> None:
    # `auto` showed as "auto" everywhere but the JSON: nobody could tell it was the CPU.
    path = sdir / "s.sock"
    with ServeProcess(path, "--device", "auto") as srv:
        text = cli("status", "--socket", str(path)).stdout
        (dev,) = json.loads(cli("status", "--socket", str(path), "--json").stdout)["devices"]
        log = srv.log()
    where, why = dev["choices"][MODEL]["device"], dev["choices"][MODEL]["why"]
    assert where in ("cpu", "edgetpu") and why
    assert f"  device 0 runs {MODEL} on {where}: {why}" in text.splitlines()
    assert f"auto runs {MODEL} on {where}: {why}" in log


def test_the_server_raises_its_descriptor_limit_to_the_hard_one(sdir: Path) -> None:
    # At the usual soft limit of 1024, one user's 56 connections (each with descriptors
    # waiting for their segment) left none for anyone else, the owner included.
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip("the hard limit leaves no room to raise")
    path = sdir / "s.sock"
    server = subprocess.Popen(
        [sys.executable, "-m", "conveyor", "serve", "--socket", str(path)], env=env(),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        text=True, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)))
    try:
        assert server.stdout is not None and "listening on" in server.stdout.readline()
        soft_now = psutil.Process(server.pid).rlimit(psutil.RLIMIT_NOFILE)[0]
        assert soft_now == (hard if hard != resource.RLIM_INFINITY else 1 << 16)
    finally:
        server.terminate()
        assert server.wait(10) == 0
        server.stdout.close()
