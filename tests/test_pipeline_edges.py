"""Edges found by black-box checks: items of the wrong form for ``with_context``, a
worker that dies while idle, live-mode ``submit()``, a pipeline closed under a running
``map``/``amap``/``submit``, collection of a pipeline used through ``submit()``, and the
latency a process stage reports."""

from __future__ import annotations

import asyncio
import gc
import itertools
import threading
import time
from concurrent.futures import CancelledError, wait
from typing import Any

import numpy as np
import psutil
import pytest
import stagefns as sf
from conftest import children, wait_for

import conveyor

IMG = np.zeros((1, 128, 128, 3), np.float32)


@pytest.mark.parametrize("bad", [IMG, None, {"x": 1}, (IMG,), [IMG, 1, 2]],
                         ids=["array", "none", "dict", "1-tuple", "3-list"])
def test_with_context_item_that_is_not_a_pair_fails_alone(bad: Any, no_leaks: None) -> None:
    with conveyor.Pipeline(
        conveyor.stage(lambda x: x),
        conveyor.infer("face_detection_short_range", with_context=True),
        on_error="return",
    ) as pipe:
        out = list(pipe.map([(IMG, "a"), bad, (IMG, "b")]))
        assert len(out) == 3
        assert out[0][1] == "a" and out[2][1] == "b"  # good items before and after
        err = out[1]
        assert isinstance(err, conveyor.StageError) and err.index == 1
        assert isinstance(err.__cause__, conveyor.InputError)
        assert "(inputs, context) pair" in str(err.__cause__)
        # The stage lives on.
        assert [ctx for _, ctx in pipe.map([(IMG, i) for i in range(5)])] == list(range(5))


def _dead(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_worker_killed_while_idle_costs_no_item(no_leaks: None) -> None:
    with conveyor.Pipeline(conveyor.stage(sf.worker_pid, kind="process"),
                           on_error="return") as pipe:
        (pid,) = pipe.map([0])
        psutil.Process(pid).kill()
        assert wait_for(lambda: _dead(pid), 5)
        # A killed process shows as a zombie a moment before it can be reaped (its other
        # threads are still exiting): until then it looks alive to its parent.
        time.sleep(0.3)
        out = list(pipe.map(range(3)))
        st = pipe.stats()["stages"]["worker_pid"]
    assert all(isinstance(o, int) and o != pid for o in out), out
    assert st["errors"] == 0 and st["restarts"] == 1 and st["out"] == 4


def test_live_submit_keeps_at_most_max_in_flight(no_leaks: None) -> None:
    with conveyor.Pipeline(conveyor.stage(sf.nap), drop="oldest", max_in_flight=2) as pipe:
        futs = [pipe.submit(i) for i in range(20)]  # 0.1 s a stage call: far faster
        wait(futs, timeout=30)
        st = pipe.stats()
    done = [f.result() for f in futs if not f.cancelled()]
    # Two in flight at most: the one the stage holds and the newest waiting.
    assert 1 <= len(done) <= 3 and done[-1] == 19, done
    assert st["items"]["dropped"] == 20 - len(done) == st["stages"]["nap"]["dropped"]


def test_close_under_a_running_map_raises_in_the_consumer(no_leaks: None) -> None:
    pipe = conveyor.Pipeline(conveyor.stage(sf.nap))
    got: list[int] = []
    with pipe:
        threading.Timer(0.35, pipe.close).start()
        with pytest.raises(conveyor.PipelineClosedError):
            for x in pipe.map(range(50)):
                got.append(x)
    assert got == list(range(len(got))) and len(got) < 50


@pytest.mark.parametrize("closer", ["thread", "task"])
def test_close_under_a_waiting_amap_raises_promptly(closer: str, no_leaks: None) -> None:
    pipe = conveyor.Pipeline(conveyor.stage(sf.nap))

    async def main() -> float:
        if closer == "thread":
            threading.Timer(0.25, pipe.close).start()
        else:
            asyncio.get_running_loop().call_later(0.25, pipe.close)
        t0 = time.monotonic()
        with pytest.raises(conveyor.PipelineClosedError):
            async for _ in pipe.amap(range(3)):
                pass
        return time.monotonic() - t0

    with pipe:
        took = asyncio.run(asyncio.wait_for(main(), 10))
    assert took < 2.0


def test_close_under_a_blocked_submit_raises_pipeline_closed(no_leaks: None) -> None:
    pipe = conveyor.Pipeline(conveyor.stage(sf.nap), maxsize=1)
    errors: list[BaseException] = []

    def flood() -> None:
        try:
            for i in range(100):
                pipe.submit(i)
        except BaseException as exc:
            errors.append(exc)

    with pipe:
        t = threading.Thread(target=flood)
        t.start()
        time.sleep(0.3)  # the submitting thread waits for room by now
    t.join(5)
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], conveyor.PipelineClosedError)


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_unclosed_pipeline_used_by_submit_is_collected(kind: str, no_leaks: None) -> None:
    before = {p.pid for p in children()}
    pipe = conveyor.Pipeline(conveyor.stage(sf.inc, kind=kind))  # type: ignore[arg-type]
    assert pipe.submit(1).result(10) == 2
    with pytest.warns(ResourceWarning, match="unclosed"):
        del pipe
        gc.collect()
    assert wait_for(lambda: {p.pid for p in children()} <= before, 3)
    assert wait_for(lambda: not [t for t in threading.enumerate()
                                 if t.name.startswith("conveyor-inc")], 3)


def test_amap_over_an_endless_iterable_leaves_no_thread_error() -> None:
    errors: list[Any] = []
    old = threading.excepthook
    threading.excepthook = errors.append
    try:
        with conveyor.Pipeline(conveyor.stage(sf.inc)) as pipe:
            async def first() -> int:
                async for x in pipe.amap(itertools.count()):
                    return int(x)
                return -1

            for _ in range(20):
                assert asyncio.run(first()) == 1
            time.sleep(0.2)  # feeders still running see a closed loop
    finally:
        threading.excepthook = old
    assert errors == []


def test_process_stage_reports_the_workers_own_time_per_item(no_leaks: None) -> None:
    with conveyor.Pipeline(conveyor.stage(sf.nap, kind="process")) as pipe:
        assert list(pipe.map(range(8))) == list(range(8))
        st = pipe.stats()["stages"]["nap"]
    # Two tasks wait in a worker's socket at once: from the parent's side an item took
    # about twice its time. The worker's own time is what the stage reports.
    assert 95 <= st["p50_ms"] < 150, st
    assert st["busy_fraction"] <= 1.0


def test_live_submit_future_of_a_dropped_item_is_cancelled_not_failed() -> None:
    with conveyor.Pipeline(conveyor.stage(sf.nap), drop="oldest", max_in_flight=1) as pipe:
        futs = [pipe.submit(i) for i in range(5)]
        wait(futs, timeout=10)
    dropped = [f for f in futs if f.cancelled()]
    assert dropped
    with pytest.raises(CancelledError):
        dropped[0].result()


def test_device_recent_rate_covers_the_last_seconds_only() -> None:
    from conveyor._runtime._stats import DeviceStats

    s, ms = 1_000_000_000, 1_000_000
    st = DeviceStats("sim")
    for i in range(100):  # 100 runs of 5 ms in the first second
        st.record(i * 10 * ms, 5 * ms)
    early = st.snapshot(now_ns=1 * s, since_ns=0)
    assert early["items_per_s"] == pytest.approx(100)
    assert early["items_per_s_recent"] == pytest.approx(100)
    assert early["duty_cycle_recent"] == pytest.approx(0.5)
    st.record(19 * s, 5 * ms)  # one more, long after
    late = st.snapshot(now_ns=20 * s, since_ns=0)
    assert late["items_per_s"] == pytest.approx(101 / 20)  # whole life, idle included
    assert late["items_per_s_recent"] == pytest.approx(1 / 5, rel=0.05)  # the last 5 s
    assert late["duty_cycle_recent"] == pytest.approx(0.005 / 5, rel=0.05)


def test_worker_exception_that_pickle_cannot_rebuild_keeps_its_type(no_leaks: None) -> None:
    with conveyor.Pipeline(conveyor.stage(sf.raise_coded, kind="process"),
                           on_error="return") as pipe:
        (err,) = pipe.map([7])
    assert isinstance(err, conveyor.StageError)
    cause = err.__cause__
    assert type(cause) is sf.CodedError and cause.code == 7 and str(cause) == "7: bad item"
