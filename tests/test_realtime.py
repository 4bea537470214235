"""Real-time scheduling of device threads: set where the OS allows it, reported either way."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import device_worker, kill_at
from test_server_support import FakeDevice, LogLines, ServeProcess, ThreadServer, env, x

import conveyor
from conveyor._device import _server
from conveyor._runtime._sched import check_realtime, probe_realtime, realtime_thread, set_realtime

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_FIFO"), reason="no SCHED_FIFO here")

SHORT = "face_detection_short_range"


def _in_thread(fn):  # type: ignore[no-untyped-def]
    """Run ``fn`` in a fresh thread (whose policy dies with it); return its result."""
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join(10)
    return out[0]


PERMITTED = probe_realtime(1).startswith("fifo")


def fifo_threads(pid: int) -> int:
    """How many threads of process ``pid`` run under SCHED_FIFO."""
    return sum(
        1 for tid in os.listdir(f"/proc/{pid}/task")
        if os.sched_getscheduler(int(tid)) == os.SCHED_FIFO
    )


def test_priority_range() -> None:
    assert (check_realtime(False), check_realtime(True), check_realtime(99)) == (0, 1, 99)
    for bad in (-1, 100):
        with pytest.raises(ValueError, match=r"0 \(off\) to 99"):
            check_realtime(bad)
    with pytest.raises(ValueError, match="0 \\(off\\) to 99"):
        conveyor.infer(SHORT, realtime=100)
    with pytest.raises(ValueError, match="conveyor serve --realtime"):
        conveyor.infer(SHORT, server="/nowhere.sock", realtime=True)


def test_realtime_thread_sets_the_policy_and_puts_it_back() -> None:
    def probe() -> tuple[str, int, int, int]:
        before = os.sched_getscheduler(0)
        with realtime_thread(1) as got:
            inside = os.sched_getscheduler(0)
        return got, before, inside, os.sched_getscheduler(0)

    got, before, inside, after = _in_thread(probe)
    if PERMITTED:
        assert (got, inside) == ("fifo:1", os.SCHED_FIFO)
    else:
        assert got.startswith("normal (") and inside == before
    assert after == before
    assert _in_thread(lambda: set_realtime(0)) == "normal"


def test_a_refusal_is_reported_not_raised() -> None:
    # A child without the privilege: no RLIMIT_RTPRIO, and (when root) another user.
    code = (
        "import os, resource\n"
        "from conveyor._runtime._sched import set_realtime\n"  # imported while readable
        "resource.setrlimit(resource.RLIMIT_RTPRIO, (0, 0))\n"
        "if os.getuid() == 0:\n"
        "    os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        "print(set_realtime(3))\n"
        "print(os.sched_getscheduler(0))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env(), timeout=30, check=True).stdout.split("\n")
    assert out[0].startswith("normal (SCHED_FIFO 3 refused"), out
    assert "RLIMIT_RTPRIO of at least 3" in out[0]
    assert int(out[1]) != os.SCHED_FIFO


@pytest.mark.skipif(resource.getrlimit(resource.RLIMIT_RTPRIO)[0] == 0 and os.getuid() != 0,
                    reason="needs root or an RLIMIT_RTPRIO")
def test_pipeline_device_thread_runs_realtime(no_leaks: None) -> None:
    x = np.zeros((128, 128, 3), np.float32)
    with conveyor.Pipeline(conveyor.infer(SHORT, device="sim-edgetpu", realtime=True)) as pipe:
        assert len(list(pipe.map([x] * 3))) == 3
        link = device_worker(pipe)
        assert "conveyor._device._worker" in " ".join(psutil.Process(link.worker.pid).cmdline())
        scheduling = pipe.stats()["device"]["scheduling"]
        if PERMITTED:
            # The device thread alone: the I/O thread and the rest stay at normal priority.
            assert scheduling == "fifo:1"
            assert fifo_threads(link.worker.pid) == 1
        else:
            assert scheduling.startswith("normal (")
    with conveyor.Pipeline(conveyor.infer(SHORT, device="sim-edgetpu")) as pipe:
        assert len(list(pipe.map([x]))) == 1
        assert pipe.stats()["device"]["scheduling"] == "normal"


def test_serve_realtime_shows_in_status(tmp_path: Path) -> None:
    path = tmp_path / "rt.sock"
    with ServeProcess(path, "--device", "sim-edgetpu", "--model", SHORT, "--realtime") as srv:
        out = subprocess.run(
            [sys.executable, "-m", "conveyor", "status", "--socket", str(path), "--json"],
            capture_output=True, text=True, env=env(), timeout=30, check=True,
        ).stdout
        (device,) = json.loads(out)["devices"]
        if PERMITTED:
            assert device["scheduling"] == "fifo:1"
            assert fifo_threads(srv.pid) == 1
        else:
            assert device["scheduling"].startswith("normal (")
        text = subprocess.run(
            [sys.executable, "-m", "conveyor", "status", "--socket", str(path)],
            capture_output=True, text=True, env=env(), timeout=30, check=True,
        ).stdout
        assert f"device 0 thread: {device['scheduling']}" in text
    bad = subprocess.run(
        [sys.executable, "-m", "conveyor", "serve", "--socket", str(path), "--realtime", "0"],
        capture_output=True, text=True, env=env(), timeout=30,
    )
    assert bad.returncode == 2 and "1 to 99" in bad.stderr


def test_server_without_the_privilege_serves_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    refusal = "normal (SCHED_FIFO 2 refused: it needs CAP_SYS_NICE or ...)"
    monkeypatch.setattr(_server, "set_realtime", lambda priority: refusal)
    device = FakeDevice()
    with (LogLines().installed() as logs,
          ThreadServer(tmp_path / "s.sock", [device], ["m"], realtime=2) as srv,
          conveyor.connect(srv.path) as client):
        (y, total) = client.infer("m", x(1.0))
        assert total[0] == 4.0 and float(y[0, 0]) == 2.0
        assert client.status()["devices"][0]["scheduling"] == refusal
    assert any(refusal in line for line in logs.lines)


def test_ray_predictor_passes_realtime_on(no_leaks: None) -> None:
    from conveyor.ray import Predictor

    predictor = Predictor(SHORT, device="sim-edgetpu", realtime=True)
    try:
        out = predictor({"item": [np.zeros((128, 128, 3), np.float32)] * 2})
        assert len(out["output"]) == 2
        scheduling = predictor.pipeline.stats()["device"]["scheduling"]
        assert scheduling == "fifo:1" if PERMITTED else scheduling.startswith("normal (")
    finally:
        predictor.pipeline.close()


@pytest.mark.skipif(not PERMITTED, reason="needs the privilege to see the policy carried over")
def test_a_restarted_device_worker_is_realtime_too(no_leaks: None) -> None:
    x = np.zeros((128, 128, 3), np.float32)
    with conveyor.Pipeline(conveyor.infer(SHORT, device="sim-edgetpu", realtime=True)) as pipe:
        link = device_worker(pipe)
        first = link.worker.pid
        assert len(list(pipe.map(kill_at([x] * 20, 10, first)))) == 20
        assert pipe.stats()["device"]["restarts"] == 1
        assert pipe.stats()["device"]["scheduling"] == "fifo:1"
        assert link.worker.pid != first and fifo_threads(link.worker.pid) == 1
