"""Worker death, live mode, and shutdown that never hangs or leaks."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import wait
from pathlib import Path

import numpy as np
import psutil
import pytest
import stagefns as sf
from conftest import children, device_worker, kill_at, wait_for

import conveyor


def test_killed_process_worker_costs_exactly_its_item(no_leaks: None) -> None:
    with conveyor.Pipeline(conveyor.stage(sf.die_on_5, kind="process", workers=2),
                           on_error="return") as pipe:
        out = list(pipe.map(range(12)))
        st = pipe.stats()["stages"]["die_on_5"]
    assert [o for i, o in enumerate(out) if i != 5] == [i for i in range(12) if i != 5]
    err = out[5]
    assert isinstance(err, conveyor.StageError) and err.stage == "die_on_5" and err.index == 5
    assert isinstance(err.__cause__, conveyor.WorkerDiedError)
    assert "SIGKILL" in str(err.__cause__)
    assert st["restarts"] == 1 and st["errors"] == 1 and st["out"] == 11


@pytest.mark.parametrize("fn", [sf.fork_then_die_on_5, sf.spawn_then_die_on_5])
def test_a_dead_worker_is_noticed_while_a_process_it_forked_lives_then_ended(tmp_path, fn) -> None:  # type: ignore[no-untyped-def]
    pidfile = tmp_path / "helper.pid"
    started = time.monotonic()
    with _killed_at_the_end(pidfile):
        with conveyor.Pipeline(conveyor.stage(fn, kind="process"),
                               on_error="return") as pipe:
            out = list(pipe.map((i, str(pidfile)) for i in range(10)))
        took = time.monotonic() - started
        helper = int(pidfile.read_text())
        # It was left running (60 s), an orphan: the dead worker's process group is ended.
        assert wait_for(lambda: _gone([helper]), timeout=5)
    # The helper holds a copy of the worker's end of the link, so no end of stream comes
    # while it lives (60 s): the worker's own exit must be what tells.
    assert took < 20, f"the worker's death was noticed after {took:.1f} s"
    assert [o for i, o in enumerate(out) if i != 5] == [i for i in range(10) if i != 5]
    assert isinstance(out[5], conveyor.StageError)
    assert "SIGKILL" in str(out[5].__cause__)


def test_closing_a_pipeline_ends_what_its_workers_left_running(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # A program a stage function started and never waited for outlived the pipeline.
    pidfile = tmp_path / "helper.pid"
    with _killed_at_the_end(pidfile):
        with conveyor.Pipeline(conveyor.stage(sf.start_sleeper, kind="process")) as pipe:
            (helper,) = pipe.map([str(pidfile)])
            assert not _gone([helper])
        assert wait_for(lambda: _gone([helper]), timeout=5)


@contextlib.contextmanager
def _killed_at_the_end(pidfile: Path) -> Iterator[None]:
    """Kill the process whose pid a test's stage wrote in ``pidfile``, if it still runs."""
    try:
        yield
    finally:
        if pidfile.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)


def test_a_replaced_process_worker_gets_a_trace_track_of_its_own(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    trace = tmp_path / "t.json"
    with conveyor.Pipeline(conveyor.stage(sf.die_on_5, kind="process"), on_error="return",
                           trace=trace) as pipe:
        out = list(pipe.map(range(10)))
    assert isinstance(out[5], conveyor.StageError)
    events = json.loads(trace.read_text())["traceEvents"]
    tracks = {e["tid"]: e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    items = {tracks[e["tid"]]: [] for e in events if e["ph"] == "X"}
    for e in events:
        if e["ph"] == "X":
            items[tracks[e["tid"]]].append(e["args"]["item"])
    assert len(items) == 2 and all(n.startswith("die_on_5 #0 (pid ") for n in items)
    before, after = sorted(items.values())  # each worker's spans on the track of its pid
    assert before == [0, 1, 2, 3, 4] and after == [6, 7, 8, 9]


def test_killed_device_worker_is_restarted_and_request_retried(no_leaks: None) -> None:
    with conveyor.Pipeline(
        conveyor.stage(sf.image_for), conveyor.infer("face_detection_short_range"),
        conveyor.stage(sf.max_score),
    ) as pipe:
        link = device_worker(pipe)
        first_pid = link.worker.pid
        out = list(pipe.map(kill_at(range(60), 20, first_pid)))
        assert len(out) == 60 and all(isinstance(o, float) for o in out)
        st = pipe.stats()
        assert st["device"]["restarts"] == 1
        assert st["stages"]["face_detection_short_range"]["restarts"] == 1
        assert link.worker.pid != first_pid
    assert not psutil.pid_exists(first_pid) or psutil.Process(first_pid).status() == "zombie"


@contextlib.contextmanager
def _sim_worker_killed() -> Iterator[tuple[conveyor.Pipeline, int, np.ndarray]]:
    """A pipeline on sim-edgetpu that ran one item and whose device worker was just
    killed (SIGKILL): ``(pipeline, the dead worker's pid, an input)``."""
    x = np.zeros((128, 128, 3), np.float32)
    with conveyor.Pipeline(conveyor.infer("face_detection_short_range",
                                          device="sim-edgetpu")) as pipe:
        pipe.submit(x).result(30)
        old = device_worker(pipe).worker.pid
        os.kill(old, signal.SIGKILL)
        yield pipe, old, x


def test_a_device_taken_while_its_worker_restarts_fails_the_item_with_why(
        no_leaks: None) -> None:
    # The item failed with "ServerGone: the device server went away (connect with
    # reconnect=True ...)", advice for a client, not a pipeline; the DeviceBusyError that
    # said who holds the device was only logged.
    with _sim_worker_killed() as (pipe, _, x):
        link = device_worker(pipe)
        assert wait_for(lambda: link.worker.worker.process.proc.poll() is not None)
        thief = conveyor.open_device("sim-edgetpu")  # another program takes the device
        try:
            with pytest.raises(conveyor.StageError) as info:
                pipe.submit(x).result(30)
            assert isinstance(info.value.__cause__, conveyor.DeviceBusyError)
            assert f"already open in this program (pid {os.getpid()})" in str(
                info.value.__cause__)
        finally:
            thief.close()
        assert len(pipe.submit(x).result(30)) == 2  # let go: the next item restarts it
        assert pipe.stats()["device"]["restarts"] == 1


def test_two_stages_on_one_edge_tpu_share_its_worker(tmp_path, no_leaks: None) -> None:  # type: ignore[no-untyped-def]
    """Detection then landmarks on one (simulated) Edge TPU: a device serves one process,
    so both stages use one device worker that loads both models; when it dies, it is
    replaced once and both stages go on."""
    import json

    trace = tmp_path / "t.json"
    with conveyor.Pipeline(
        conveyor.stage(sf.image_for), conveyor.infer("face_detection_short_range",
                                                     device="sim-edgetpu"),
        conveyor.stage(sf.to_landmark_input),
        conveyor.infer("face_landmark", device="sim-edgetpu"),
        conveyor.stage(sf.max_score), trace=trace,
    ) as pipe:
        workers = [p for p in children() if "conveyor._device._worker" in " ".join(p.cmdline())]
        assert len(workers) == 1
        first_pid = workers[0].pid
        out = list(pipe.map(kill_at(range(40), 20, first_pid)))
        assert len(out) == 40 and all(isinstance(o, float) for o in out)
        st = pipe.stats()
        assert [st["stages"][n]["restarts"] for n in ("face_detection_short_range",
                                                      "face_landmark")] == [1, 1]
        assert all(link.worker.pid != first_pid for link in pipe._core.links.values())
        assert [d["items"] for d in st["devices"].values()] == [40, 40]
        # Each entry counts its model; the device's own figures are their sums (each
        # entry alone looked about half as busy as the device was).
        det, land = st["devices"]["face_detection_short_range"], st["devices"]["face_landmark"]
        assert det["shared_with"] == ["face_landmark"]
        assert land["shared_with"] == ["face_detection_short_range"]
        for d in (det, land):
            assert d["device_busy_s"] == pytest.approx(det["busy_s"] + land["busy_s"])
            assert d["device_duty_cycle"] == pytest.approx(
                det["duty_cycle"] + land["duty_cycle"])
            assert d["device_duty_cycle"] > max(det["duty_cycle"], land["duty_cycle"])
    names = {e["args"]["name"] for e in json.loads(trace.read_text())["traceEvents"]
             if e.get("name") == "thread_name"}
    assert [n for n in names if n.startswith("device")] == ["device sim-edgetpu"]


def test_a_shared_device_worker_killed_under_backpressure_is_replaced(no_leaks: None) -> None:
    """The worker's replacement closed each stage's old client while holding the worker's
    lock; closing fails that stage's pending requests, whose callbacks restart the worker
    on the same thread: it waited for itself, for good. Seen when the second stage had
    not yet noticed the death, its reader held up by a full channel (slow stage between)."""
    with conveyor.Pipeline(
        conveyor.stage(sf.detection_input),
        conveyor.infer("face_detection_short_range", device="sim-edgetpu"),
        conveyor.stage(sf.landmark_input_slowly),
        conveyor.infer("face_landmark", device="sim-edgetpu"),
        maxsize=1,
    ) as pipe:
        (first_pid,) = {link.worker.pid for link in pipe._core.links.values()}
        watchdog = threading.Timer(30, pipe.close)  # a hang fails the test, not the suite
        watchdog.start()
        try:
            out = list(pipe.map(kill_at(range(150), 60, first_pid)))
        finally:
            watchdog.cancel()
        assert len(out) == 150
        st = pipe.stats()
        assert [st["stages"][n]["restarts"] for n in ("face_detection_short_range",
                                                      "face_landmark")] == [1, 1]


def test_stages_sharing_a_device_worker_never_wait_on_each_other(no_leaks: None) -> None:
    """Each stage has its own connection to the shared worker: a detection reply that
    waits for room in the next stage must not hold up the landmark replies that would
    make that room (one shared connection deadlocked within a few dozen items)."""
    with conveyor.Pipeline(
        conveyor.infer("face_detection_short_range", device="sim-edgetpu"),
        conveyor.stage(sf.to_landmark_input),
        conveyor.infer("face_landmark", device="sim-edgetpu:0"),  # the same device
        maxsize=1, inflight=2,
    ) as pipe:
        workers = [p for p in children() if "conveyor._device._worker" in " ".join(p.cmdline())]
        assert len(workers) == 1
        frames = (sf.image_for(i % 7) for i in range(300))
        assert sum(1 for _ in pipe.map(frames)) == 300


def test_one_model_by_name_and_by_path_on_one_edge_tpu_is_loaded_once(no_leaks: None) -> None:
    path = str(conveyor.resolve_model("face_detection_short_range"))
    with conveyor.Pipeline(
        conveyor.infer("face_detection_short_range", device="sim-edgetpu"),
        conveyor.stage(sf.first_output_as_input),
        conveyor.infer(path, device="sim-edgetpu"),
    ) as pipe:
        out = list(pipe.map([sf.image_for(i) for i in range(4)]))
    assert len(out) == 4 and all(o[0].shape == (1, 896, 16) for o in out)


def test_one_simulated_device_with_two_profiles_is_refused() -> None:
    with pytest.raises(conveyor.DeviceSpecError, match="two profiles"):
        conveyor.Pipeline(conveyor.infer("face_detection_short_range", device="sim-edgetpu"),
                          conveyor.infer("face_landmark", device="sim-edgetpu:usb2")).start()
    assert not children()


def test_a_second_close_returns_once_the_first_has_finished(no_leaks: None) -> None:
    """close() from a timer while map() runs, then the loop's own close() (leaving the
    with does the same): when it returns the pipeline is closed, its figures final."""
    import threading

    for _ in range(3):
        pipe = conveyor.Pipeline(conveyor.stage(sf.slow, kind="process", workers=2),
                                 conveyor.stage(sf.inc), maxsize=2)
        pipe.start()
        timer = threading.Timer(0.3, pipe.close)
        timer.start()
        with pytest.raises(conveyor.PipelineClosedError):
            for _ in pipe.map(range(10_000)):
                pass
        pipe.close()
        assert not children()
        for name, st in pipe.stats()["stages"].items():
            assert st["in"] == st["out"] + st["errors"] + st["cancelled"], (name, st)
        timer.join()


def test_live_mode_drops_oldest_and_counts_every_drop(no_leaks: None) -> None:
    n = 200
    with conveyor.Pipeline(conveyor.stage(sf.slow, kind="process"), drop="oldest",
                           on_error="return") as pipe:
        t0 = time.monotonic()
        out = list(pipe.map(range(n)))  # the source is much faster than the stage
        took = time.monotonic() - t0
        st = pipe.stats()
    dropped = st["items"]["dropped"]
    assert dropped > 0 and dropped == st["stages"]["slow"]["dropped"]
    assert len(out) + dropped == n  # exactly-once accounting
    assert out == sorted(out)  # still in order
    assert out[-1] == n - 1 or len(out) < n  # the freshest item survives
    assert took < n * 0.02  # the source never waited for the slow stage


def test_live_mode_submit_cancels_the_futures_of_dropped_items(no_leaks: None) -> None:
    with conveyor.Pipeline(conveyor.stage(sf.slow), drop="oldest", max_in_flight=3) as pipe:
        futs = [pipe.submit(i) for i in range(40)]  # far faster than the stage
        wait(futs, timeout=30)
        st = pipe.stats()
    cancelled = [f for f in futs if f.cancelled()]
    assert cancelled and len(cancelled) == st["stages"]["slow"]["dropped"]
    assert st["items"]["admitted"] == 40 and st["items"]["dropped"] == len(cancelled)
    done = [f.result() for f in futs if not f.cancelled()]
    assert len(done) + len(cancelled) == 40 and done[-1] == 39


def test_leaving_the_with_ends_everything_within_a_second(no_leaks: None) -> None:
    pipe = conveyor.Pipeline(
        conveyor.stage(sf.slow, kind="process", workers=2),
        conveyor.infer("face_detection_short_range"),
    )
    pipe.start()
    pids = [p.pid for p in children()]
    assert len(pids) >= 3
    it = pipe.map(sf.image_for(i) for i in range(10**6))
    next(iter([]), None)
    t0 = time.monotonic()
    it.close()
    pipe.close()
    assert time.monotonic() - t0 < 1.5
    assert wait_for(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() !=
                                    "zombie" for p in pids), timeout=1.0)


def _stuck(x: int) -> int:
    if x == 1:
        time.sleep(3)  # no way to interrupt a thread: close() must not wait it out
    return x


def test_close_returns_within_a_second_despite_a_stuck_thread_stage() -> None:
    with conveyor.Pipeline(conveyor.stage(_stuck, workers=1), maxsize=2) as pipe:
        it = pipe.map(range(10))
        assert next(it) == 0
        t0 = time.monotonic()
    took = time.monotonic() - t0
    assert took < 1.0, took


def test_exception_in_the_with_block_closes(no_leaks: None) -> None:
    with pytest.raises(RuntimeError, match="user"), conveyor.Pipeline(
        conveyor.stage(sf.inc, kind="process")
    ) as pipe:
        for out in pipe.map(range(100)):
            if out == 3:
                raise RuntimeError("user code failed")
    with pytest.raises(conveyor.PipelineClosedError):
        pipe.submit(1)


def test_unclosed_pipeline_warns_and_cleans_up(no_leaks: None) -> None:
    pipe = conveyor.Pipeline(conveyor.stage(sf.inc, kind="process"))
    pipe.start()
    assert list(pipe.map(range(3))) == [1, 2, 3]
    with pytest.warns(ResourceWarning, match="unclosed"):
        del pipe
        gc.collect()


SCRIPT = textwrap.dedent("""
    import sys, time, conveyor, stagefns as sf
    if __name__ == "__main__":
        with conveyor.Pipeline(conveyor.stage(sf.slow, kind="process", workers=2),
                               conveyor.infer("face_detection_short_range")) as pipe:
            import psutil
            print(" ".join(str(p.pid) for p in psutil.Process().children()), flush=True)
            for _ in pipe.map(sf.image_for(i % 7) for i in iter(int, 1)):
                pass
""")


def _start_script(tmp_path, src_env, text=SCRIPT, count=3):  # type: ignore[no-untyped-def]
    script = tmp_path / "app.py"
    script.write_text(text)
    env = dict(src_env)
    env["PYTHONPATH"] = os.path.dirname(__file__) + os.pathsep + env["PYTHONPATH"]
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    pids = [int(p) for p in line.split()]
    assert len(pids) == count, (line, proc.stderr.read() if proc.stderr else "")
    return proc, pids


def _gone(pids: list[int]) -> bool:
    return not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                   for p in pids)


def test_ctrl_c_ends_the_program_and_its_workers(tmp_path, src_env) -> None:  # type: ignore[no-untyped-def]
    proc, pids = _start_script(tmp_path, src_env)
    time.sleep(0.3)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=5)
    assert time.monotonic() - t0 < 2.0
    assert "Traceback" not in err or "KeyboardInterrupt" in err
    assert wait_for(lambda: _gone(pids), timeout=1.0)


def test_parent_killed_with_sigkill_leaves_no_orphans(tmp_path, src_env) -> None:  # type: ignore[no-untyped-def]
    proc, pids = _start_script(tmp_path, src_env)
    proc.kill()
    proc.communicate(timeout=5)
    assert wait_for(lambda: _gone(pids), timeout=3.0), "workers outlived their parent"


FORKING = textwrap.dedent("""
    import os, time, conveyor, psutil, stagefns as sf
    if __name__ == "__main__":
        with conveyor.Pipeline(conveyor.stage(sf.slow, kind="process", workers=2),
                               conveyor.infer("face_detection_short_range")) as pipe:
            workers = [p.pid for p in psutil.Process().children()]
            helper = os.fork()  # a helper the program keeps (a fork-started pool, say)
            if helper == 0:
                time.sleep(60)
                os._exit(0)
            print(*workers, helper, flush=True)
            for _ in pipe.map(sf.image_for(i % 7) for i in iter(int, 1)):
                pass
""")


def test_a_forked_helper_of_the_killed_parent_keeps_no_worker_alive(tmp_path, src_env) -> None:  # type: ignore[no-untyped-def]
    # The helper held copies of the parent's lifelines: the workers (the device's too)
    # lived as long as it did.
    proc, pids = _start_script(tmp_path, src_env, FORKING, count=4)
    *workers, helper = pids
    try:
        proc.kill()
        proc.wait(timeout=5)  # the helper holds the output pipes open
        assert wait_for(lambda: _gone(workers), timeout=3.0), "workers outlived their parent"
        assert psutil.pid_exists(helper)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(helper, signal.SIGKILL)
        proc.communicate(timeout=5)


UNCLOSED_AT_EXIT = textwrap.dedent("""
    import itertools, sys, conveyor, psutil, stagefns as sf
    if __name__ == "__main__":
        pipe = conveyor.Pipeline(conveyor.stage(sf.image_for, kind="process", workers=2),
                                 conveyor.infer("face_detection_short_range"))
        outs = pipe.map(itertools.count())  # left half used, as the program ends
        for _ in zip(range(5), outs):
            pass
        print(" ".join(str(p.pid) for p in psutil.Process().children()), flush=True)
        {end}
""")


@pytest.mark.parametrize("end", ["pass", "sys.exit(3)", "raise RuntimeError('boom')"])
def test_a_pipeline_left_open_at_exit_does_not_hang_it(tmp_path, src_env, end: str) -> None:  # type: ignore[no-untyped-def]
    """A program that ends with a pipeline still open (a global, a half-used map) exits
    at once and its workers go: closing it from __del__ during interpreter shutdown
    used to wait for ever for a thread to start."""
    script = tmp_path / "app.py"
    script.write_text(UNCLOSED_AT_EXIT.format(end=end))
    env = dict(src_env)
    env["PYTHONPATH"] = os.path.dirname(__file__) + os.pathsep + env["PYTHONPATH"]
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, env=env,
                          text=True, timeout=30)
    assert time.monotonic() - t0 < 15.0
    assert proc.returncode == {"pass": 0, "sys.exit(3)": 3}.get(end, 1), proc.stderr
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) == 3, proc.stdout
    assert wait_for(lambda: _gone(pids), timeout=3.0), "workers outlived the program"


def _in_forked_child(fn) -> str:  # type: ignore[no-untyped-def]
    """Run ``fn`` in a forked child; what it returns (or raises), as text."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            signal.alarm(10)  # a hang ends the child (and the text comes back empty)
            os.close(r)
            try:
                text = str(fn())
            except BaseException as exc:
                text = f"{type(exc).__name__}: {exc}"
            os.write(w, text.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    os.waitpid(pid, 0)
    return text


def test_a_forked_child_cannot_use_the_pipeline_nor_end_it_for_the_parent(
    no_leaks: None,
) -> None:
    with conveyor.Pipeline(conveyor.stage(sf.inc, kind="process"),
                           conveyor.infer("face_detection_short_range", device="cpu"),
                           conveyor.stage(sf.max_score)) as pipe:
        frames = [sf.image_for(i) for i in range(3)]
        want = list(pipe.map(frames))
        used = _in_forked_child(lambda: list(pipe.map(frames)))
        assert used.startswith("RuntimeError: this pipeline was started by process")
        assert "forked child" in used
        # A loop the parent started and the child resumes: it hung, or took an outcome.
        started = pipe.map(frames)
        first = next(started)
        assert _in_forked_child(lambda: next(started)).startswith(
            "RuntimeError: this pipeline was started by process")
        assert [first, *started] == want  # the parent's loop goes on
        assert _in_forked_child(lambda: pipe.close() or "closed") == "closed"
        with pipe._lock:  # a thread of the parent holds it at the fork: the child's
            # copy stays held for good, and closing must not wait for it
            assert _in_forked_child(lambda: pipe.close() or "closed") == "closed"
        assert list(pipe.map(frames)) == want  # the parent's workers live on
        assert all(s["restarts"] == 0 for s in pipe.stats()["stages"].values())
    # A Future of submit() waited for in the child: for ever, or a TimeoutError.
    with conveyor.Pipeline(conveyor.stage(sf.sleep_for)) as napping:
        slow = napping.submit(2.0)
        for wait_in_child in (lambda: slow.result(5), lambda: slow.exception(5)):
            assert _in_forked_child(wait_in_child).startswith(
                "RuntimeError: this Future belongs to a pipeline of process")
        assert slow.result(30) == 2.0


def test_a_pipeline_dropped_after_a_raised_error_frees_its_device(no_leaks: None) -> None:
    """Dropped without close() after map() raised, a pipeline is freed at once (the
    raising frames no longer refer to the error, a cycle that kept it until a garbage
    collection); after an amap() that raised, asyncio's own cycles keep it, and a new
    pipeline on the device collects it rather than failing with DeviceBusyError."""
    import asyncio
    import weakref

    def make() -> conveyor.Pipeline:
        return conveyor.Pipeline(conveyor.stage(sf.fail_on_multiple_of_7, kind="process"),
                                 conveyor.stage(sf.image_for),
                                 conveyor.infer("face_detection_short_range",
                                                device="sim-edgetpu"))

    gc.disable()
    try:
        pipe = make()
        ref = weakref.ref(pipe)
        try:  # (not pytest.raises: it keeps the traceback)
            list(pipe.map([1, 3, 5]))
        except conveyor.StageError:
            pass
        with pytest.warns(ResourceWarning, match="unclosed"):
            del pipe  # freed (and so closed) by reference counting alone
        assert ref() is None

        pipe = make()

        async def run(p: conveyor.Pipeline) -> list[object]:
            return [x async for x in p.amap([1, 3, 5])]

        with pytest.raises(conveyor.StageError):
            asyncio.run(run(pipe))
        del pipe
        with pytest.warns(ResourceWarning, match="unclosed"), make() as again:
            assert len(list(again.map([1, 2]))) == 2
    finally:
        gc.enable()


@pytest.mark.usefixtures("no_leaks")
def test_running_out_of_descriptors_fails_items_and_never_hangs() -> None:
    # Mapping a worker's new segment takes a descriptor: with none left, the stage's
    # thread died of the error and map() waited for ever.
    import resource

    with conveyor.Pipeline(conveyor.stage(sf.inc, kind="process", name="inc"),
                           on_error="return") as pipe:
        [warm] = pipe.map([np.ones(4)])
        assert warm.tolist() == [2.0] * 4
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        in_use = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (in_use, hard))  # nothing new opens
        try:
            out = list(pipe.map([np.ones(1 << 20)] * 4))  # 8 MB: new segments both ways
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert len(out) == 4
        failed = [o for o in out if isinstance(o, conveyor.StageError)]
        assert failed, "every item went through with no descriptor to spare"
        for err in failed:
            assert err.stage == "inc"
            assert "Too many open files" in str(err), err
        again = list(pipe.map([np.ones(1 << 20)] * 4))  # descriptors back: it goes on
        assert [float(a[0]) for a in again] == [2.0] * 4


@pytest.mark.usefixtures("no_leaks")
def test_a_start_that_runs_out_of_threads_leaves_no_worker(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Under a low `ulimit -u` starting the third starter thread failed; the two started
    # went on to start workers that close() had not seen, and they lived on.
    import threading

    from conveyor._runtime import _core

    calls = []

    class Scarce(threading.Thread):
        def start(self) -> None:
            calls.append(self)
            if len(calls) == 3:
                raise RuntimeError("can't start new thread")
            super().start()

    monkeypatch.setattr(_core.threading, "Thread", Scarce)
    pipe = conveyor.Pipeline(conveyor.stage(sf.inc, kind="process", workers=4))
    with pytest.raises(RuntimeError, match="can't start new thread"):
        pipe.start()
    pipe.close()


def test_a_main_module_without_a_guard_is_told_to_add_one(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Each worker, importing the script to find the stage function, ran the whole script
    # again: a nested pipeline per worker, and an error that never named the cause.
    script = tmp_path / "noguard.py"
    script.write_text(textwrap.dedent("""
        import conveyor

        def square(x):
            return x * x

        with conveyor.Pipeline(conveyor.stage(square, kind="process", workers=2)) as pipe:
            print(sum(pipe.map(range(10))))
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert proc.returncode != 0
    assert 'if __name__ == "__main__":' in proc.stderr, proc.stderr[-2000:]
    assert "WorkerStartError" in proc.stderr


def _workers_of_this_test() -> list[psutil.Process]:
    return [p for p in children() if "conveyor." in " ".join(p.cmdline())]


def test_ctrl_c_while_workers_start_ends_them_at_once(monkeypatch: pytest.MonkeyPatch,
                                                      no_leaks: None) -> None:
    # The workers were not the pipeline's yet while in their start-up handshake (an import
    # that hangs: up to a minute): Ctrl-C left them running for the handshake's 60 s.
    import slowstart

    monkeypatch.setenv("CONVEYOR_TEST_PARENT", str(os.getpid()))
    monkeypatch.setenv("CONVEYOR_TEST_SLOW_IMPORT_S", "120")
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt), conveyor.Pipeline(
                conveyor.stage(slowstart.exit_on_1, workers=2, kind="process")):
            pytest.fail("the pipeline started")
    finally:
        timer.cancel()
    assert time.monotonic() - t0 < 3.0
    assert wait_for(lambda: not _workers_of_this_test(), timeout=1.0)


def test_close_while_a_worker_is_replaced_is_final_at_once(
        monkeypatch: pytest.MonkeyPatch, no_leaks: None) -> None:
    # The replacement of a dead worker was still starting (a slow import) when close()
    # came: close() returned with the item queued behind the dead one not yet counted,
    # the replacement lived on, and stopping it counted a second restart.
    import slowstart

    monkeypatch.setenv("CONVEYOR_TEST_PARENT", str(os.getpid()))
    with conveyor.Pipeline(conveyor.stage(slowstart.exit_on_1, kind="process")) as pipe:
        monkeypatch.setenv("CONVEYOR_TEST_SLOW_IMPORT_S", "60")  # the replacement's import
        futures = [pipe.submit(i) for i in range(4)]
        assert futures[0].result(30) == 0
        with pytest.raises(conveyor.StageError, match="exited with code 3"):
            futures[1].result(30)  # its worker died
        time.sleep(0.3)  # the replacement is importing
        t0 = time.monotonic()
        pipe.close()
        assert time.monotonic() - t0 < 1.5
        stage = pipe.stats()["stages"]["exit_on_1"]
        assert stage["in"] == stage["out"] + stage["errors"] + stage["cancelled"], stage
        assert stage["restarts"] == 1
        assert not _workers_of_this_test()
        for f in futures[2:]:
            with pytest.raises(conveyor.PipelineClosedError):
                f.result(5)


def test_close_while_the_device_worker_is_replaced_ends_the_replacement(
        no_leaks: None) -> None:
    # The replacement of a dead device worker that is slow to start (here: stopped)
    # outlived close() by the handshake's minute, holding the device, and the item that
    # waited for it was counted only then.
    with _sim_worker_killed() as (pipe, old, x):
        waiting = pipe.submit(x)  # fails on the dead worker: a replacement starts
        new: list[psutil.Process] = []
        assert wait_for(lambda: bool(new.extend(
            p for p in _workers_of_this_test() if p.pid != old and "_device." in
            " ".join(p.cmdline())) or new), timeout=10)
        new[0].suspend()  # SIGSTOP: its handshake never comes
        time.sleep(0.3)
        t0 = time.monotonic()
        pipe.close()
        assert time.monotonic() - t0 < 1.5
        stage = pipe.stats()["stages"]["face_detection_short_range"]
        assert stage["in"] == stage["out"] + stage["errors"] + stage["cancelled"], stage
        with pytest.raises(conveyor.PipelineClosedError):
            waiting.result(5)
    assert not psutil.pid_exists(new[0].pid) or new[0].status() == psutil.STATUS_ZOMBIE


@pytest.mark.parametrize("face", ["start", "map"])
def test_close_from_another_thread_while_the_pipeline_starts(
        monkeypatch: pytest.MonkeyPatch, face: str, no_leaks: None) -> None:
    # start() holds the pipeline's lock while its workers start, and close() waited for
    # that lock: for the whole start-up handshake of a slow import (up to a minute).
    import slowstart

    monkeypatch.setenv("CONVEYOR_TEST_PARENT", str(os.getpid()))
    monkeypatch.setenv("CONVEYOR_TEST_SLOW_IMPORT_S", "120")
    pipe = conveyor.Pipeline(conveyor.stage(slowstart.exit_on_1, workers=2, kind="process"))
    ended: list[BaseException] = []

    def begin() -> None:
        try:
            pipe.start() if face == "start" else list(pipe.map([0, 2]))
        except BaseException as exc:
            ended.append(exc)

    starter = threading.Thread(target=begin)
    starter.start()
    assert wait_for(lambda: len(_workers_of_this_test()) == 2, timeout=10)
    t0 = time.monotonic()
    pipe.close()
    starter.join(5)
    assert time.monotonic() - t0 < 2.0 and not starter.is_alive()
    assert len(ended) == 1 and isinstance(ended[0], conveyor.PipelineClosedError), ended
    assert wait_for(lambda: not _workers_of_this_test(), timeout=1.0)


OUT_OF_MEMORY = textwrap.dedent("""
    import resource, sys, numpy as np, conveyor, stagefns as sf

    def vm_bytes():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmSize:")) * 1024

    if __name__ == "__main__":
        sending = sys.argv[1] == "send"
        fn = sf.same if sending else sf.megabytes
        small = np.full(10 << 20, 7, np.uint8) if sending else 10
        big = np.full(400 << 20, 7, np.uint8) if sending else 400
        with conveyor.Pipeline(conveyor.stage(fn, kind="process"), on_error="return") as pipe:
            for _ in range(2):
                pipe.submit(small).result(60)
            # This process may now take 150 MB more (sending: not the 400 MB item's shared
            # memory), or 1 GB (a result: the worker's 800 MB segment, not a copy of 400).
            room = vm_bytes() + ((150 if sending else 1000) << 20)
            resource.setrlimit(resource.RLIMIT_AS, (room, resource.RLIM_INFINITY))
            for i, item in enumerate([big, small, small]):
                try:
                    out = pipe.submit(item).result(60)
                    print(i, "ok", out.nbytes >> 20, int(out[-1]))
                except conveyor.StageError as err:
                    print(i, "error", type(err.__cause__).__name__, err.__cause__)
                out = None
            print("restarts", pipe.stats()["stages"][fn.__name__]["restarts"])
""")


@pytest.mark.parametrize(("way", "why"), [
    ("send", "OSError [Errno 12] no shared memory of 419430400 bytes for the object to "
             "send: Cannot allocate memory"),
    ("result", "MemoryError no memory to copy 419430400 bytes out of the peer's shared "
               "memory"),
])
def test_an_item_too_big_for_memory_fails_alone_and_the_worker_stays(
        tmp_path, src_env, way: str, why: str) -> None:  # type: ignore[no-untyped-def]
    # Sending: the item's error named the next item and "Bad file descriptor", and the
    # worker was killed and replaced. A result: an empty "MemoryError: " blamed on the
    # link, and the worker killed too.
    script = tmp_path / "app.py"
    script.write_text(OUT_OF_MEMORY)
    env = dict(src_env)
    env["PYTHONPATH"] = os.path.dirname(__file__) + os.pathsep + env["PYTHONPATH"]
    proc = subprocess.run([sys.executable, str(script), way], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"0 error {why}", "1 ok 10 7", "2 ok 10 7", "restarts 0"]


DAEMON_AT_EXIT = textwrap.dedent("""
    import threading, time, conveyor, stagefns as sf

    def consume():
        pipe = conveyor.Pipeline(conveyor.stage(sf.inc, kind="process"),
                                 conveyor.stage(sf.slow))
        pipe.start()
        for _ in pipe.map(iter(int, 1)):  # until the program ends
            pass
        print("the input ended", flush=True)  # it did not: this must not run

    if __name__ == "__main__":
        threading.Thread(target=consume, daemon=True).start()
        time.sleep(1.0)
        print("done", flush=True)
""")


def test_a_daemon_thread_in_map_at_exit_ends_quietly(tmp_path, src_env) -> None:  # type: ignore[no-untyped-def]
    # The close at exit of the pipeline it never closed raised PipelineClosedError in
    # the thread, printed as "Exception in thread ..." at every exit.
    script = tmp_path / "app.py"
    script.write_text(DAEMON_AT_EXIT)
    env = dict(src_env)
    env["PYTHONPATH"] = os.path.dirname(__file__) + os.pathsep + env["PYTHONPATH"]
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, timeout=60)
    assert (proc.returncode, proc.stdout) == (0, "done\n")
    assert "Exception in thread" not in proc.stderr and "Traceback" not in proc.stderr, \
        proc.stderr


def test_a_worker_that_cannot_map_an_item_says_why(capfd: pytest.CaptureFixture[str],
                                                    no_leaks: None) -> None:
    # It died with "exited with code 0", and nothing said that it ran out of memory.
    with conveyor.Pipeline(conveyor.stage(sf.size_in_a_small_worker, kind="process"),
                           on_error="return") as pipe:
        assert pipe.submit("limit").result(60) == "limited"
        with pytest.raises(conveyor.StageError) as info:
            pipe.submit(np.full(400 << 20, 7, np.uint8)).result(60)
        assert pipe.submit(np.full(10 << 20, 7, np.uint8)).result(60) == 10
    assert "a link to this process that failed on the worker's side (the worker said why" in str(
        info.value)
    assert "cannot map the peer's segment: [Errno 12] Cannot allocate memory" in \
        capfd.readouterr().err


def test_a_worker_that_dies_idle_is_replaced_without_waiting_for_an_item(
        tmp_path: Path, no_leaks: None) -> None:
    # Its death was noticed at the next item only: until then it stayed a zombie, and what
    # it had started lived on.
    pidfile = tmp_path / "helper.pid"
    with _killed_at_the_end(pidfile), conveyor.Pipeline(
            conveyor.stage(sf.start_sleeper, kind="process")) as pipe:
        (helper,) = pipe.map([str(pidfile)])
        (worker,) = [p for p in children() if p.pid != helper]
        os.kill(worker.pid, signal.SIGKILL)
        assert wait_for(lambda: _gone([worker.pid, helper]), timeout=5)
        assert wait_for(lambda: len(children()) == 1, timeout=10)  # its replacement
        assert pipe.stats()["stages"]["start_sleeper"]["restarts"] == 1


def test_an_idle_worker_whose_replacement_fails_is_not_tried_again_every_second(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        no_leaks: None) -> None:
    # The idle check tried again each second, for ever: a Python process started a
    # second (half a core) and an 18-line warning each time.
    import slowstart

    monkeypatch.setenv("CONVEYOR_TEST_PARENT", str(os.getpid()))
    with conveyor.Pipeline(conveyor.stage(slowstart.pid, kind="process"),
                           on_error="return") as pipe:
        (worker,) = pipe.map([0])
        monkeypatch.setenv("CONVEYOR_TEST_FAIL_IMPORT", "1")  # its replacement's import
        os.kill(worker, signal.SIGKILL)
        time.sleep(3.5)  # three idle checks and more
        tries = [r for r in caplog.records if "could not replace a worker" in r.message]
        assert len(tries) == 1 and pipe.stats()["stages"]["pid"]["restarts"] == 1
        (failed,) = pipe.map([1])  # an item tries again, and says why it cannot run
        assert isinstance(failed, conveyor.StageError)
        assert "this import fails on purpose" in str(failed)
