"""Worker death, live mode, and shutdown that never hangs or leaks."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import wait

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
    names = {e["args"]["name"] for e in json.loads(trace.read_text())["traceEvents"]
             if e.get("name") == "thread_name"}
    assert [n for n in names if n.startswith("device")] == ["device sim-edgetpu"]


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


def _start_script(tmp_path, src_env):  # type: ignore[no-untyped-def]
    script = tmp_path / "app.py"
    script.write_text(SCRIPT)
    env = dict(src_env)
    env["PYTHONPATH"] = os.path.dirname(__file__) + os.pathsep + env["PYTHONPATH"]
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    pids = [int(p) for p in line.split()]
    assert len(pids) == 3, (line, proc.stderr.read() if proc.stderr else "")
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
