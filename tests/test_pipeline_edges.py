"""Edges found by black-box checks: items of the wrong form for ``with_context``, a
worker that dies while idle, live-mode ``submit()``, a pipeline closed under a running
``map``/``amap``/``submit``, collection of a pipeline used through ``submit()``, and the
latency a process stage reports."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import CancelledError, wait
from typing import Any

import numpy as np
import psutil
import pytest
import stagefns as sf
from conftest import children, wait_for, watch_event_loop

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


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_an_exception_whose_str_fails_still_fails_its_item_alone(kind: str) -> None:
    with conveyor.Pipeline(conveyor.stage(sf.raise_bad_str, kind=kind),  # type: ignore[arg-type]
                           on_error="return") as pipe:
        out = list(pipe.map(range(5)))
        assert [o for i, o in enumerate(out) if i != 2] == [0, 1, 3, 4]
        assert isinstance(out[2], conveyor.StageError) and "BadStr" in str(out[2])
        assert type(out[2].__cause__) is sf.BadStr
        assert list(pipe.map([0, 1, 3])) == [0, 1, 3]  # every worker lives on


def test_two_inference_stages_stats_and_trace_in_stage_order(tmp_path: Any) -> None:
    trace = tmp_path / "t.json"
    for _ in range(3):  # the device workers start in parallel: order must not depend on it
        with conveyor.Pipeline(
            conveyor.infer("face_detection_short_range", device="cpu"),
            conveyor.stage(sf.to_landmark_input),
            conveyor.infer("face_landmark", device="cpu"),
            trace=trace,
        ) as pipe:
            assert len(list(pipe.map([IMG] * 6))) == 6
            st = pipe.stats()
        assert list(st["devices"]) == ["face_detection_short_range", "face_landmark"]
        assert st["device"] is st["devices"]["face_detection_short_range"]
        assert "shared_with" not in st["device"]  # on the CPU each has a worker of its own
    import json

    names = {e["args"]["name"] for e in json.loads(trace.read_text())["traceEvents"]
             if e.get("name") == "thread_name"}
    assert {"device cpu: face_detection_short_range", "device cpu: face_landmark"} <= names


@pytest.mark.parametrize("option", [{"max_in_flight": 0}, {"max_in_flight": -1},
                                    {"inflight": 0}])
def test_bounds_below_one_are_refused(option: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        conveyor.Pipeline(conveyor.stage(sf.inc), **option)  # type: ignore[arg-type]


def test_big_endian_input_is_the_same_input() -> None:
    img = sf.image_for(3)
    with conveyor.Pipeline(conveyor.infer("face_detection_short_range")) as pipe:
        native, swapped = pipe.map([img, img.astype(">f4")])
    for a, b in zip(native, swapped):
        np.testing.assert_array_equal(a, b)


def _reenter(pipe_box: list[Any]) -> Any:
    def fn(x: int) -> Any:
        return list(pipe_box[0].map([x]))
    return fn


def test_map_from_inside_a_stage_of_the_same_pipeline_is_refused() -> None:
    box: list[Any] = []
    with conveyor.Pipeline(conveyor.stage(_reenter(box)), on_error="return") as pipe:
        box.append(pipe)
        (err,) = pipe.map([1])
    assert isinstance(err, conveyor.StageError)
    assert isinstance(err.__cause__, RuntimeError) and "inside a stage" in str(err.__cause__)


def test_a_closed_pipelines_figures_stay_put() -> None:
    with conveyor.Pipeline(conveyor.stage(sf.inc)) as pipe:
        list(pipe.map(range(3)))
    first = pipe.stats()["elapsed_s"]
    time.sleep(0.05)
    assert pipe.stats()["elapsed_s"] == first


def test_workers_are_out_of_reach_of_the_terminals_ctrl_c(no_leaks: None) -> None:
    # Ctrl-C signals the terminal's foreground process group; the pipeline ends its own
    # children. A worker still importing would otherwise die with a traceback of its own.
    with conveyor.Pipeline(conveyor.stage(sf.worker_pid, kind="process"),
                           conveyor.infer("face_detection_short_range")):
        kids = psutil.Process().children()
        assert len(kids) == 2  # the stage's worker and the device worker
        for kid in kids:
            assert os.getpgid(kid.pid) != os.getpgid(0)


def test_live_amap_whose_item_waits_behind_another_callers_ends_with_it() -> None:
    with conveyor.Pipeline(conveyor.stage(sf.sleep_for), maxsize=1, drop="oldest",
                           max_in_flight=2) as pipe:
        first = pipe.submit(0.5)  # holds the only worker
        time.sleep(0.05)

        async def main() -> tuple[list[Any], Any]:
            task = asyncio.ensure_future(_collect(pipe.amap([0.0])))
            await asyncio.sleep(0.1)  # its item waits in the full first channel
            # Another caller's item no longer pushes it out (it was the amap's last
            # item): the channel takes it over its bound, each caller bounded by its own.
            later = await asyncio.to_thread(pipe.submit, 0.0)
            return await asyncio.wait_for(task, 10), later

        got, later = asyncio.run(main())
        assert got == [0.0]
        assert [first.result(10), later.result(10)] == [0.5, 0.0]
        assert pipe.stats()["items"]["dropped"] == 0


async def _collect(source: Any) -> list[Any]:
    return [x async for x in source]


def _source_that_breaks() -> Iterator[float]:
    yield 0.0
    yield 0.3
    raise ValueError("the input broke")


def test_unordered_close_is_not_taken_for_the_inputs_error() -> None:
    pipe = conveyor.Pipeline(conveyor.stage(sf.sleep_for, workers=2), ordered=False)
    with pipe:
        threading.Timer(0.1, pipe.close).start()
        # Item 1 is still in its stage when close() comes: its outcome never arrives, so
        # the input's error, which comes after it, must not be given either.
        with pytest.raises(conveyor.PipelineClosedError):
            for _ in pipe.map(_source_that_breaks()):
                time.sleep(0.5)


def test_close_while_map_is_starting_ends_it_with_pipeline_closed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import conveyor._pipeline as cp

    class SlowRun(cp.Run):  # widens the moment between map()'s check and its run's start
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            time.sleep(0.2)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(cp, "Run", SlowRun)
    pipe = conveyor.Pipeline(conveyor.stage(sf.inc))
    with pipe:
        threading.Timer(0.05, pipe.close).start()
        with pytest.raises(conveyor.PipelineClosedError):
            list(pipe.map(range(20)))


def test_amap_starts_a_pipeline_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Starting worker processes takes a while: a first amap() does it in a thread, so
    the event loop goes on meanwhile."""
    started_on: list[threading.Thread] = []
    real_start = conveyor.Pipeline.start

    def start(self: conveyor.Pipeline) -> conveyor.Pipeline:
        started_on.append(threading.current_thread())
        return real_start(self)

    monkeypatch.setattr(conveyor.Pipeline, "start", start)

    async def main() -> list[int]:
        loop_thread = threading.current_thread()
        pipe = conveyor.Pipeline(conveyor.stage(sf.inc, kind="process"))
        try:
            out = [o async for o in pipe.amap(range(4))]
        finally:
            pipe.close()
        assert started_on and loop_thread not in started_on
        return out

    assert asyncio.run(main()) == [1, 2, 3, 4]


def test_close_counts_the_item_of_a_stuck_thread_stage_cancelled_at_once() -> None:
    # A thread cannot be stopped: close() used to return with the item counted in but not
    # out, and the counts changed later, when the function returned.
    release = threading.Event()
    started = threading.Event()

    def stuck(x: int) -> int:
        started.set()
        release.wait(30)
        return x

    pipe = conveyor.Pipeline(conveyor.stage(stuck, name="stuck"), conveyor.stage(sf.double))
    fut = pipe.submit(1)
    assert started.wait(10)
    t0 = time.monotonic()
    pipe.close()
    assert time.monotonic() - t0 < 1.5
    final = pipe.stats()["stages"]
    assert (final["stuck"]["in"], final["stuck"]["out"], final["stuck"]["cancelled"]) == (1, 0, 1)
    assert final["double"]["in"] == 0
    with pytest.raises((CancelledError, conveyor.PipelineClosedError)):
        fut.result(timeout=5)
    release.set()
    assert wait_for(lambda: not any(t.name.startswith("conveyor-stuck")
                                    for t in threading.enumerate()), timeout=5)
    assert pipe.stats()["stages"] == final  # nothing moved when the function returned


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_live_mode_drops_nothing_when_the_pipeline_keeps_up(kind: str) -> None:
    # The feeder looked for a free slot before waiting for the next frame: a slot freed
    # meanwhile went unseen, and the new frame (the input's last one too) was dropped.
    def frames() -> Iterator[int]:
        for i in range(8):
            if i:
                time.sleep(0.1)  # a slow camera: each frame is done before the next
            yield i

    with conveyor.Pipeline(conveyor.stage(sf.double, kind=kind), drop="oldest",
                           max_in_flight=1) as pipe:
        got = list(pipe.map(frames()))
        dropped = pipe.stats()["stages"]["double"]["dropped"]
    assert (got, dropped) == ([2 * i for i in range(8)], 0)


def test_async_with_and_aclose_leave_the_event_loop_running() -> None:
    # `with` blocked the loop while workers started, and close() for up to a second
    # (here: a thread stage still in its function, which close() waits 0.8 s for).
    release = threading.Event()

    def stuck(x: int) -> int:
        if x == 100:
            release.wait(10)
        return x

    async def main() -> tuple[list[int], float]:
        beat, gaps = watch_event_loop()
        got = []
        async with conveyor.Pipeline(conveyor.stage(sf.inc, kind="process"),
                                     conveyor.stage(stuck)) as pipe:
            async for y in pipe.amap(range(3)):
                got.append(y)
            pipe.submit(99)  # inc makes it 100: stuck until close() gives up on it
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.05)  # the heartbeat notes the gap, if there was one
        beat.cancel()
        return got, max(gaps)

    try:
        got, worst = asyncio.run(main())
    finally:
        release.set()
    assert got == [1, 2, 3]
    assert worst < 0.4, f"the event loop stood still for {worst:.2f} s"


@pytest.mark.usefixtures("no_leaks")
def test_cancelled_while_async_with_starts_leaves_nothing_running() -> None:
    # The start went on in its thread and the pipeline ran on, workers and all, until
    # it was garbage-collected ("unclosed", though it was used in an async with).
    async def main() -> conveyor.Pipeline:
        pipe = conveyor.Pipeline(conveyor.stage(sf.inc, kind="process", workers=2),
                                 conveyor.infer("face_detection_short_range"))

        async def enter() -> None:
            async with pipe:
                await asyncio.sleep(30)

        reported: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: reported.append(ctx))
        with pytest.raises(asyncio.TimeoutError):  # TimeoutError from Python 3.11
            await asyncio.wait_for(enter(), 0.05)  # inside the start
        await asyncio.sleep(0.2)
        gc.collect()
        # The start's PipelineClosedError (the close's doing) was never retrieved, and
        # asyncio printed it with its whole chain after the cancel.
        assert reported == []
        return pipe

    pipe = asyncio.run(main())
    with pytest.raises(conveyor.PipelineClosedError):
        pipe.submit(1)


def test_live_mode_keeps_the_newest_frames_when_the_caller_is_behind() -> None:
    # With the caller the slow part, finished results waited for it while every new
    # frame was dropped: it got stale frames, and not the input's last ones at all.
    def camera() -> Iterator[int]:
        for i in range(30):
            time.sleep(0.01)
            yield i

    got = []
    with conveyor.Pipeline(conveyor.stage(sf.double, name="d"), drop="oldest") as pipe:
        for y in pipe.map(camera()):
            got.append(y // 2)
            time.sleep(0.1)  # a slow display
        items = pipe.stats()["items"]
    assert got == sorted(got) and got[-1] == 29, got
    assert items["admitted"] == 30 and items["dropped"] == 30 - len(got)


@pytest.mark.parametrize("ordered", [True, False])
def test_live_mode_with_errors_as_results_keeps_delivering_fresh_frames(ordered: bool) -> None:
    # Stale errors were never dropped: they came to hold every item in flight, and a
    # slow caller got old errors and no frame but the first and the last.
    def camera() -> Iterator[int]:
        for i in range(400):
            time.sleep(0.002)
            yield i

    ok = errors = 0
    with conveyor.Pipeline(conveyor.stage(sf.fail_on_multiple_of_7), drop="oldest",
                           on_error="return", ordered=ordered) as pipe:
        for y in pipe.map(camera()):
            if isinstance(y, conveyor.StageError):
                errors += 1
            else:
                ok += 1
            time.sleep(0.03)  # a slow display
        items = pipe.stats()["items"]
    assert ok >= 8, (ok, errors)
    assert items["admitted"] == 400 and ok + errors + items["dropped"] == 400


@pytest.mark.parametrize("device", ["sim-edgetpu", "cpu"])
def test_two_inference_stages_with_a_slow_consumer_never_stall(
    device: str, no_leaks: None
) -> None:
    # Several threads wait for each inference stage's device credit. A credit given back
    # by one stage once woke a waiter of the other stage, who slept on, and the pipeline
    # stalled for good (detection -> landmarks, as in the README).
    done = threading.Event()
    with conveyor.Pipeline(
        conveyor.stage(sf.detection_input, workers=3),
        conveyor.infer("face_detection_short_range", device=device),
        conveyor.stage(sf.landmark_input, workers=2),
        conveyor.infer("face_landmark", device=device),
        conveyor.stage(sf.slow_count),
    ) as pipe:
        watchdog = threading.Timer(30, pipe.close)  # a stall fails the test, not the suite
        watchdog.start()
        try:
            out = list(pipe.map(range(200)))
            done.set()
        finally:
            watchdog.cancel()
    assert done.is_set() and out == [2] * 200  # face_landmark has two outputs


def test_a_cancelled_submit_future_counts_as_done_for_wait_and_as_completed() -> None:
    from concurrent.futures import as_completed

    with conveyor.Pipeline(conveyor.stage(sf.nap)) as pipe:  # 0.1 s an item, one worker
        futs = [pipe.submit(i) for i in range(6)]
        cancelled = futs[2:]
        assert all(f.cancel() for f in cancelled)
        started = time.monotonic()
        _, pending = wait(cancelled, timeout=5)
        assert not pending and time.monotonic() - started < 1
        assert set(as_completed(cancelled, timeout=5)) == set(cancelled)
        assert [f.result(timeout=5) for f in futs[:2]] == [0, 1]


def test_a_second_close_waits_for_the_first_without_holding_it_up() -> None:
    pipe = conveyor.Pipeline(conveyor.stage(sf.sleep_for)).start()  # a thread stage
    futs = [pipe.submit(5.0) for _ in range(6)]  # the first holds the stage for 5 s
    assert wait_for(lambda: pipe.stats()["stages"]["sleep_for"]["in"] == 1)
    first = threading.Thread(target=pipe.close)
    started = time.monotonic()
    first.start()
    time.sleep(0.05)
    pipe.close()  # as leaving the `with` after a close() from elsewhere
    second = time.monotonic() - started
    # It returned once the first had finished: every Future failed, the figures final.
    assert all(f.done() for f in futs), [f for f in futs if not f.done()]
    first.join(5)
    took = time.monotonic() - started
    assert second < 1.8 and took < 1.8, (second, took)
    for f in futs:
        assert isinstance(f.exception(), conveyor.PipelineClosedError)
    st = pipe.stats()["stages"]["sleep_for"]
    assert st["in"] == st["out"] + st["errors"] + st["cancelled"]


def _live_run(pipe: conveyor.Pipeline, face: str, frames: int, gap: float) -> list[int]:
    """What ``pipe.map`` (or ``amap``) gives for a camera of ``frames`` frames, ``gap`` s
    apart."""

    def camera() -> Iterator[int]:
        for i in range(frames):
            time.sleep(gap)
            yield i

    async def acamera() -> Any:
        for i in range(frames):
            await asyncio.sleep(gap)
            yield i

    async def consume() -> list[int]:
        return [y async for y in pipe.amap(acamera())]

    return list(pipe.map(camera())) if face == "map" else asyncio.run(consume())


@pytest.mark.parametrize("face", ["map", "amap"])
@pytest.mark.parametrize("max_in_flight", [1, 2])
def test_live_mode_never_drops_the_inputs_last_frame(face: str, max_in_flight: int) -> None:
    # Every item in flight inside the stage (none waiting to enter it, no result unread):
    # the new frame was dropped, the input's last one too.
    with conveyor.Pipeline(conveyor.stage(sf.nap, workers=2), drop="oldest",
                           max_in_flight=max_in_flight) as pipe:  # nap: 0.1 s an item
        got = _live_run(pipe, face, 40, 0.002)
        items = pipe.stats()["items"]
    assert got[-1] == 39 and got == sorted(got), got
    assert items["dropped"] == 40 - len(got) > 0


@pytest.mark.parametrize("face", ["map", "amap"])
@pytest.mark.parametrize("max_in_flight", [1, 2])
def test_live_mode_keeps_max_in_flight_with_frames_held_and_dropped(
        face: str, max_in_flight: int) -> None:
    # A frame the feeder held (no room) and then dropped for a newer one gave back a token
    # it never took: a room more for good each time, so with 4 workers up to 4 items were
    # inside the stage at once with max_in_flight=1.
    lock = threading.Lock()
    inside = peak = 0

    def slow(x: int) -> int:
        nonlocal inside, peak
        with lock:
            inside += 1
            peak = max(peak, inside)
        time.sleep(0.03)
        with lock:
            inside -= 1
        return x

    with conveyor.Pipeline(conveyor.stage(slow, workers=4), drop="oldest",
                           max_in_flight=max_in_flight) as pipe:
        got = _live_run(pipe, face, 120, 0.003)
        items = pipe.stats()["items"]
    assert peak <= max_in_flight
    assert got[-1] == 119 and got == sorted(got)
    assert items["admitted"] == 120 and items["dropped"] == 120 - len(got) > 0


def test_live_runs_sharing_a_pipeline_drop_only_their_own_frames() -> None:
    # Camera B's frame, finding the first channel full of camera A's, dropped A's last
    # frame: the input's last frame is never dropped, and a run drops only its own.
    def camera(frames: list[str], gap: float) -> Iterator[str]:
        for f in frames:
            yield f
            time.sleep(gap)

    with conveyor.Pipeline(conveyor.stage(sf.nap), drop="oldest", maxsize=1) as pipe:
        got: dict[str, list[str]] = {}

        def run(tag: str, frames: list[str], delay: float) -> None:
            time.sleep(delay)
            got[tag] = list(pipe.map(camera(frames, 0.03)))

        threads = [threading.Thread(target=run, args=("a", ["a0", "a1"], 0.0)),
                   threading.Thread(target=run, args=("b", ["b0"], 0.05))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        items = pipe.stats()["items"]
    assert got == {"a": ["a0", "a1"], "b": ["b0"]}
    assert items["dropped"] == 0


@pytest.mark.parametrize("on_error", ["skip", "return"])
def test_a_stage_named_source_is_not_taken_for_the_input(on_error: str) -> None:
    # "source" names the input iterator in errors, and its errors always raise.
    with conveyor.Pipeline(conveyor.stage(sf.fail_on_multiple_of_7, name="source"),
                           on_error=on_error) as pipe:  # type: ignore[arg-type]
        out = list(pipe.map([2, 3, 4]))  # 3 fails
        names = list(pipe.stats()["stages"])
    assert names == ["source#2"]
    if on_error == "skip":
        assert out == [102, 104]
    else:
        assert out[0] == 102 and out[2] == 104
        assert isinstance(out[1], conveyor.StageError) and out[1].stage == "source#2"


def test_stage_names_stay_unique_past_a_suffix_given_by_hand() -> None:
    with conveyor.Pipeline(conveyor.stage(sf.inc, name="a"), conveyor.stage(sf.inc, name="a"),
                           conveyor.stage(sf.double, name="a#2")) as pipe:
        assert list(pipe.map([0])) == [4]
        stages = pipe.stats()["stages"]
    assert len(stages) == 3 and all(s["out"] == 1 for s in stages.values())
    # A name given by hand, unique, stays that stage's: the second "a" steps past it.
    assert list(stages) == ["a", "a#3", "a#2"]
    with conveyor.Pipeline(conveyor.stage(sf.inc, name="source"),
                           conveyor.stage(sf.inc, name="source#2")) as pipe:
        assert list(pipe.stats()["stages"]) == ["source#3", "source#2"]


class _Quit(BaseException):
    pass


def _source_that_exits(exc: BaseException) -> Iterator[int]:
    yield 0
    yield 1
    raise exc


@pytest.mark.parametrize("exc", [SystemExit(3), KeyboardInterrupt(), _Quit()],
                         ids=["SystemExit", "KeyboardInterrupt", "BaseException"])
def test_an_input_cut_short_by_a_base_exception_is_not_an_end(exc: BaseException) -> None:
    with conveyor.Pipeline(conveyor.stage(sf.inc)) as pipe:
        got = []
        with pytest.raises(conveyor.StageError) as info:
            for x in pipe.map(_source_that_exits(exc)):
                got.append(x)
    assert got == [1, 2]
    assert info.value.stage == "source" and info.value.index == 2
    assert info.value.__cause__ is exc


async def _twice(x: int) -> int:
    return 2 * x


class _AsyncCall:
    async def __call__(self, x: int) -> int:
        return x


@pytest.mark.parametrize("fn", [_twice, _AsyncCall()], ids=["function", "callable"])
def test_a_coroutine_function_is_refused_as_a_stage(fn: Any) -> None:
    with pytest.raises(TypeError, match="coroutine function"):
        conveyor.stage(fn)


@pytest.mark.parametrize("make", [lambda: conveyor.stage(sf.inc, workers=2.5),  # type: ignore[arg-type]
                                  lambda: conveyor.Pipeline(conveyor.stage(sf.inc),
                                                            maxsize=True),
                                  lambda: conveyor.Pipeline(conveyor.stage(sf.inc),
                                                            inflight="3")],  # type: ignore[arg-type]
                         ids=["workers", "maxsize", "inflight"])
def test_counts_that_are_not_ints_are_refused_up_front(make: Any) -> None:
    with pytest.raises(TypeError, match="must be an int"):
        make()


def test_a_removed_current_directory_is_named_when_process_workers_start(
        monkeypatch: pytest.MonkeyPatch, no_leaks: None) -> None:
    # It said "worker pid N did not start: [Errno 2] No such file or directory (killed by
    # signal SIGKILL)": the parent's own os.getcwd() had failed, and it killed the worker.
    def gone() -> str:
        raise FileNotFoundError(2, "No such file or directory")

    pipe = conveyor.Pipeline(conveyor.stage(sf.inc, kind="process"))
    monkeypatch.setattr(os, "getcwd", gone)
    with pytest.raises(conveyor.WorkerStartError, match="current directory, and it is gone"):
        pipe.start()


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_sys_exit_in_a_stage_fails_its_item_alike_in_threads_and_processes(kind: str) -> None:
    # In a process stage the worker died of it: "WorkerDiedError ... exited with code 5",
    # "killed by signal SIGINT" for a KeyboardInterrupt nobody sent, and a respawn.
    with conveyor.Pipeline(conveyor.stage(sf.exit_on_2, kind=kind),  # type: ignore[arg-type]
                           on_error="return") as pipe:
        out = list(pipe.map(range(5)))
    assert [out[i] for i in (0, 1, 4)] == [0, 1, 4]
    assert isinstance(out[2].__cause__, SystemExit) and out[2].__cause__.code == 5
    assert isinstance(out[3].__cause__, KeyboardInterrupt)


async def _async_source_that_exits(exc: BaseException) -> AsyncIterator[int]:
    yield 0
    yield 1
    raise exc


@pytest.mark.parametrize("exc", [SystemExit(3), _Quit()], ids=["SystemExit", "BaseException"])
def test_an_async_input_cut_short_by_a_base_exception_is_the_sources_error(
        exc: BaseException) -> None:
    # The raw exception came out of the async for (SystemExit stopped the event loop,
    # and asyncio reported the feeder task's exception as never retrieved).
    async def main() -> tuple[list[int], BaseException]:
        got = []
        async with conveyor.Pipeline(conveyor.stage(sf.inc)) as pipe:
            try:
                async for x in pipe.amap(_async_source_that_exits(exc)):
                    got.append(x)
            except conveyor.StageError as err:
                return got, err
        pytest.fail("the run ended with no error")

    got, err = asyncio.run(main())
    assert got == [1, 2]
    assert isinstance(err, conveyor.StageError) and err.stage == "source"
    assert err.__cause__ is exc


def test_amap_streams_waiting_for_room_hold_none_of_the_loops_executor() -> None:
    # Each stream whose consumer lagged held a thread of the loop's default executor
    # while it waited for room: with as many streams as threads, aclose() (and the
    # program's own to_thread calls) waited behind them for good.
    from concurrent.futures import ThreadPoolExecutor

    async def frames() -> AsyncIterator[int]:
        for i in range(100):
            yield i

    async def main() -> tuple[float, float]:
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(2))
        pipe = conveyor.Pipeline(conveyor.stage(sf.inc), maxsize=1)
        await pipe.__aenter__()
        streams = [pipe.amap(frames()) for _ in range(4)]
        for s in streams:
            await s.__anext__()  # then the consumers stop reading
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        await asyncio.wait_for(asyncio.to_thread(lambda: None), 5)
        unrelated = time.monotonic() - t0
        t0 = time.monotonic()
        await asyncio.wait_for(pipe.aclose(), 10)
        closing = time.monotonic() - t0
        for s in streams:
            await s.aclose()
        return unrelated, closing

    unrelated, closing = asyncio.run(main())
    assert unrelated < 1.0 and closing < 3.0


def test_live_amap_of_an_async_source_counts_a_held_frame_dropped_once() -> None:
    # The last frame, held for room, was dropped by the feeder's wait and again by the
    # cancelled feeder task: two drops of two frames, one of which was delivered.
    async def two() -> AsyncIterator[float]:
        yield 0.5
        await asyncio.sleep(0.1)
        yield 0.0

    async def main() -> dict[str, Any]:
        async with conveyor.Pipeline(conveyor.stage(sf.sleep_for), drop="oldest",
                                     max_in_flight=1) as pipe:
            async def consume() -> None:
                async for _ in pipe.amap(two()):
                    pass

            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(consume(), 0.3)  # while frame 0 is in the stage
            await asyncio.sleep(0.6)
            return pipe.stats()

    st = asyncio.run(main())
    assert st["items"]["admitted"] == 2 and st["items"]["dropped"] == 1


def test_live_mode_drops_the_frames_waiting_before_a_slow_later_stage() -> None:
    # Only frames waiting for the first stage were dropped: those queued before a slow
    # last stage were "inside" the pipeline, and every result came out about four
    # stage times old (p50 372 ms for a 100 ms stage; now about two).
    def camera() -> Iterator[float]:
        for _ in range(45):  # 30 fps for 1.5 s
            time.sleep(1 / 30)
            yield time.monotonic()

    ages = []
    with conveyor.Pipeline(conveyor.stage(sf.inc, name="fast"),
                           conveyor.stage(sf.inc, name="fast2"),
                           conveyor.stage(sf.nap_then_return, name="slow"),
                           drop="oldest") as pipe:
        for sent in pipe.map(camera()):
            ages.append(time.monotonic() - (sent + 2))
        st = pipe.stats()
    assert st["stages"]["slow"]["dropped"] > 0 and st["stages"]["fast"]["dropped"] == 0
    assert sorted(ages)[len(ages) // 2] < 0.3, ages


def test_an_async_source_runs_in_one_task_in_the_consumers_context() -> None:
    # Read one step at a time from a thread, each step ran in a task of its own with an
    # empty context: the consumer's contextvars were gone, what the generator set was
    # lost at each yield, and an asyncio.timeout around its loop never fired.
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    seen = []

    async def source() -> AsyncIterator[int]:
        tasks = set()
        for i in range(4):
            tasks.add(asyncio.current_task())
            seen.append(var.get())
            await asyncio.sleep(0.01)
            yield i
        assert len(tasks) == 1

    async def main() -> list[int]:
        var.set("consumer's")
        async with conveyor.Pipeline(conveyor.stage(sf.inc)) as pipe:
            return [x async for x in pipe.amap(source())]

    assert asyncio.run(main()) == [1, 2, 3, 4]
    assert seen == ["consumer's"] * 4


def test_an_async_sources_own_cancelled_error_is_the_sources_error() -> None:
    # A CancelledError the source raised (a future of its own cancelled) ended the run
    # as if the input had ended: only a cancel of the run may end it quietly.
    async def source() -> AsyncIterator[int]:
        yield 1
        yield 2
        waiting = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.05, waiting.cancel)
        await waiting

    async def main() -> tuple[list[int], BaseException | None]:
        got = []
        async with conveyor.Pipeline(conveyor.stage(sf.inc)) as pipe:
            try:
                async for x in pipe.amap(source()):
                    got.append(x)
            except conveyor.StageError as err:
                return got, err
        return got, None

    got, err = asyncio.run(main())
    assert got == [2, 3]
    assert isinstance(err, conveyor.StageError) and err.stage == "source"
    assert isinstance(err.__cause__, asyncio.CancelledError)


def test_a_worker_exception_that_cannot_be_sent_is_a_remote_error(no_leaks: None) -> None:
    # It became an undocumented, unexported RemoteError of the runtime's internals.
    with conveyor.Pipeline(conveyor.stage(sf.raise_with_a_lock, kind="process"),
                           on_error="return") as pipe:
        (err,) = pipe.map([1])
    assert isinstance(err, conveyor.StageError)
    cause = err.__cause__
    assert type(cause) is conveyor.RemoteError and isinstance(cause, conveyor.ConveyorError)
    assert cause.type_name == "ValueError" and str(cause) == "ValueError: bad thing 1"
    assert "raise_with_a_lock" in err.traceback_text
    import pickle

    again = pickle.loads(pickle.dumps(cause))
    assert again.type_name == "ValueError" and str(again) == str(cause)


def test_cancelling_an_amap_consumer_closes_its_async_source_at_once() -> None:
    # The source stayed open (a camera held) until a garbage collection: the pump's
    # frame, kept by its task's CancelledError, kept it. A plain `async for` closes it.
    closed: list[float] = []

    async def camera() -> AsyncIterator[int]:
        try:
            i = 0
            while True:
                await asyncio.sleep(0)
                yield i
                i += 1
        finally:
            closed.append(time.monotonic())

    async def show(pipe: conveyor.Pipeline) -> None:
        async for _ in pipe.amap(camera()):
            await asyncio.sleep(0.001)

    async def main() -> None:
        async with conveyor.Pipeline(conveyor.stage(sf.double), maxsize=4) as pipe:
            for _ in range(5):
                task = asyncio.create_task(show(pipe))
                await asyncio.sleep(0.05)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                del task
                cancelled = time.monotonic()
                for _ in range(100):
                    if closed:
                        break
                    await asyncio.sleep(0.01)
                assert closed and closed.pop() - cancelled < 1.0

    gc.disable()  # only reference counts free things, as between two collections
    try:
        asyncio.run(main())
    finally:
        gc.enable()
