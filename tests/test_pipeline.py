"""The pipeline runtime: results, order, errors, faces, stats and trace."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys

import numpy as np
import pytest
import stagefns as sf

import conveyor


def test_thread_and_process_stages_match_a_plain_loop(no_leaks: None) -> None:
    xs = list(range(50))
    with conveyor.Pipeline(
        conveyor.stage(sf.double, workers=3),
        conveyor.stage(sf.inc, workers=2, kind="process"),
        maxsize=2,
    ) as pipe:
        assert list(pipe.map(xs)) == [x * 2 + 1 for x in xs]
        # a pipeline serves several runs one after another
        assert list(pipe.map(range(5))) == [1, 3, 5, 7, 9]


def test_infer_stage_gives_what_the_runner_gives(no_leaks: None) -> None:
    runner = conveyor.open_device("cpu").load("face_detection_short_range")
    xs = [sf.image_for(i) for i in range(6)]
    with conveyor.Pipeline(conveyor.infer("face_detection_short_range")) as pipe:
        outs = list(pipe.map(xs))
    for x, got in zip(xs, outs):
        want = runner.run([x])
        assert [o.shape for o in got] == [(1, 896, 16), (1, 896, 1)]
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_arrays_cross_process_stages(no_leaks: None) -> None:
    with conveyor.Pipeline(
        conveyor.stage(sf.array_roundtrip, kind="process"),
        conveyor.stage(sf.array_sum, kind="process"),
    ) as pipe:
        assert list(pipe.map(range(4))) == [float(i * 64 * 64 * 3) for i in range(4)]


def test_unordered_gives_every_result_once() -> None:
    with conveyor.Pipeline(conveyor.stage(sf.slow, workers=4), ordered=False) as pipe:
        assert sorted(pipe.map(range(20))) == list(range(20))


def test_stage_error_names_stage_index_and_cause(no_leaks: None) -> None:
    with conveyor.Pipeline(
        conveyor.stage(sf.double, name="first"),
        conveyor.stage(sf.fail_on_multiple_of_7, kind="process", name="picky"),
    ) as pipe:
        got = []
        with pytest.raises(conveyor.StageError) as info:
            for out in pipe.map(range(10)):
                got.append(out)
    err = info.value
    # 2*x % 7 == 3 first holds for x = 5
    assert (err.stage, err.index) == ("picky", 5)
    assert isinstance(err.__cause__, sf.Boom)
    assert "bad item 10" in str(err)
    assert "fail_on_multiple_of_7" in err.traceback_text  # the worker's traceback
    if sys.version_info >= (3, 11):  # ...also printed under the cause, as a note
        assert "fail_on_multiple_of_7" in "".join(err.__cause__.__notes__)
    assert got == [x * 2 + 100 for x in range(5)]


def test_on_error_skip_and_return() -> None:
    xs = list(range(30))
    bad = [x for x in xs if x % 7 == 3]
    with conveyor.Pipeline(conveyor.stage(sf.fail_on_multiple_of_7), on_error="skip") as pipe:
        assert list(pipe.map(xs)) == [x + 100 for x in xs if x not in bad]
        assert pipe.stats()["items"]["skipped"] == len(bad)
    with conveyor.Pipeline(conveyor.stage(sf.fail_on_multiple_of_7), on_error="return") as pipe:
        out = list(pipe.map(xs))
    assert len(out) == len(xs)
    for x, o in zip(xs, out):
        if x in bad:
            assert isinstance(o, conveyor.StageError) and o.index == x
        else:
            assert o == x + 100


def test_input_iterator_error_reaches_the_caller() -> None:
    def source():  # type: ignore[no-untyped-def]
        yield 1
        yield 2
        raise OSError("camera unplugged")

    with conveyor.Pipeline(conveyor.stage(sf.double)) as pipe:
        got = []
        with pytest.raises(conveyor.StageError) as info:
            for out in pipe.map(source()):
                got.append(out)
    assert got == [2, 4]
    assert info.value.stage == "source" and info.value.index == 2
    assert isinstance(info.value.__cause__, OSError)


@pytest.mark.parametrize("on_error", ["raise", "return", "skip"])
def test_unordered_source_error_comes_after_the_items_before_it(on_error: str) -> None:
    """As completed, the input iterator's error still comes last: every item admitted
    before it keeps its outcome, whatever the on_error mode."""
    def source():  # type: ignore[no-untyped-def]
        yield from range(6)
        raise OSError("camera unplugged")

    with conveyor.Pipeline(conveyor.stage(sf.slow, kind="process", workers=2),
                           ordered=False, on_error=on_error) as pipe:
        got = []
        with pytest.raises(conveyor.StageError) as info:
            for out in pipe.map(source()):
                got.append(out)
        assert sorted(got) == list(range(6))
        assert info.value.stage == "source" and info.value.index == 6
        assert pipe.stats()["items"]["admitted"] == 7


def test_stats_count_every_run_and_submit() -> None:
    with conveyor.Pipeline(conveyor.stage(sf.fail_on_multiple_of_7, name="f"),
                           on_error="skip") as pipe:
        assert list(pipe.map(range(5))) == [100, 101, 102, 104]  # 3 is skipped
        assert list(pipe.map(range(5, 8))) == [105, 106, 107]
        assert [pipe.submit(i).result() for i in (8, 9)] == [108, 109]
        st = pipe.stats()
    assert st["items"] == {"admitted": 10, "dropped": 0, "skipped": 1}
    assert st["stages"]["f"]["in"] == 10 and st["stages"]["f"]["errors"] == 1


def test_bad_input_to_infer_is_a_typed_stage_error() -> None:
    with conveyor.Pipeline(conveyor.infer("face_detection_short_range"), on_error="return") as p:
        out = list(p.map([np.zeros((1, 64, 64, 3), np.float32), sf.image_for(0)]))
    assert isinstance(out[0], conveyor.StageError)
    assert isinstance(out[0].__cause__, conveyor.InputError)
    assert "expected shape [1, 128, 128, 3], got [1, 64, 64, 3]" in str(out[0].__cause__)
    assert isinstance(out[1], list)


def test_infinite_source_is_consumed_lazily_and_break_stops_it() -> None:
    pulled = itertools.count()

    def source():  # type: ignore[no-untyped-def]
        for i in itertools.count():
            next(pulled)
            yield i

    with conveyor.Pipeline(conveyor.stage(sf.inc), maxsize=2) as pipe:
        for out in pipe.map(source()):
            if out == 10:
                break
        bound = pipe.max_in_flight
    n = next(pulled)
    # out == 10 came from input 9: at least 10 pulls, and the feeder stopped near the bound
    assert 10 <= n <= 10 + bound + 2


def test_memory_is_bounded_by_max_in_flight() -> None:
    import threading

    pulled = 0
    lock = threading.Lock()

    def source():  # type: ignore[no-untyped-def]
        nonlocal pulled
        for i in range(10_000):
            with lock:
                pulled += 1
            yield i

    with conveyor.Pipeline(conveyor.stage(sf.inc), maxsize=3, max_in_flight=12) as pipe:
        it = pipe.map(source())
        assert next(it) == 1
        # the consumer stalls; the feeder must stop at the bound
        import time

        time.sleep(0.3)
        with lock:
            assert pulled <= 12 + 1
        it.close()


def test_submit_and_amap() -> None:
    async def agen():  # type: ignore[no-untyped-def]
        for i in range(15):
            yield i
            await asyncio.sleep(0)

    async def consume(pipe: conveyor.Pipeline) -> list[int]:
        a = [x async for x in pipe.amap(agen())]
        b = [x async for x in pipe.amap(range(5))]
        return a + b

    with conveyor.Pipeline(conveyor.stage(sf.square, workers=2)) as pipe:
        futs = [pipe.submit(i) for i in range(10)]
        assert [f.result(timeout=10) for f in futs] == [i * i for i in range(10)]
        assert asyncio.run(consume(pipe)) == [i * i for i in range(15)] + [0, 1, 4, 9, 16]


def test_submit_future_fails_with_stage_error() -> None:
    with conveyor.Pipeline(conveyor.stage(sf.fail_on_multiple_of_7)) as pipe:
        fut = pipe.submit(3)
        with pytest.raises(conveyor.StageError):
            fut.result(timeout=10)


def test_stats_and_trace(tmp_path) -> None:  # type: ignore[no-untyped-def]
    trace = tmp_path / "trace.json"
    with conveyor.Pipeline(
        conveyor.stage(sf.image_for, kind="process", workers=2, name="pre"),
        conveyor.infer("face_detection_short_range"),
        conveyor.stage(sf.max_score, name="post"),
        trace=trace,
    ) as pipe:
        assert len(list(pipe.map(range(40)))) == 40
        st = pipe.stats()
    pre, post = st["stages"]["pre"], st["stages"]["post"]
    assert (pre["in"], pre["out"], pre["errors"]) == (40, 40, 0)
    assert post["out"] == 40 and post["p99_ms"] >= post["p50_ms"] > 0
    dev = st["device"]
    assert dev["items"] == 40 and 0 < dev["duty_cycle"] <= 1 and dev["items_per_s"] > 0
    data = json.loads(trace.read_text())
    names = {e["args"]["name"] for e in data["traceEvents"] if e["name"] == "thread_name"}
    assert any(n.startswith("pre #0 (pid") for n in names)
    assert any(n.startswith("device ") for n in names)
    spans = [e for e in data["traceEvents"] if e["ph"] == "X"]
    assert len([e for e in spans if e["name"] == "face_detection_short_range"]) == 40


@pytest.mark.usefixtures("no_leaks")
@pytest.mark.parametrize(
    "where", ["missing/t.json", "/proc/conveyor-trace.json", "/proc/version"]
)
def test_an_unwritable_trace_path_fails_the_start_not_the_close(tmp_path, where) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / where  # an absolute `where` replaces tmp_path
    pipe = conveyor.Pipeline(
        conveyor.stage(sf.image_for, kind="process"),
        conveyor.infer("face_detection_short_range"),
        trace=path,
    )
    with pytest.raises(OSError) as info:
        pipe.start()  # before any worker starts, and before any work is lost
    assert str(path) in str(info.value)  # the error says which file
    pipe.close()


def test_an_empty_trace_path_is_refused_as_such() -> None:
    # It became '.', and the start failed with "Is a directory: '.'".
    with pytest.raises(ValueError, match="trace must be a file's path"):
        conveyor.Pipeline(conveyor.stage(abs), trace="")


def test_lambda_in_process_stage_is_refused_clearly() -> None:
    with pytest.raises(TypeError, match="picklable function defined at the top level"):
        conveyor.Pipeline(conveyor.stage(lambda x: x, kind="process")).start()


def test_missing_model_fails_at_start_with_typed_error(no_leaks: None) -> None:
    with pytest.raises(conveyor.ModelNotFoundError, match="no_such_model"):
        conveyor.Pipeline(conveyor.infer("no_such_model")).start()
    with pytest.raises(TypeError, match="model must be a bundled model's name or a file "
                       "path, got NoneType"):
        conveyor.infer(None)  # type: ignore[arg-type]


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="no SCHED_IDLE on this platform")
def test_background_process_stage_runs_at_idle_priority(no_leaks: None) -> None:
    normal = os.sched_getscheduler(0)
    with conveyor.Pipeline(
        conveyor.stage(sf.sched_policy, workers=2, kind="process", background=True),
    ) as pipe:
        assert set(pipe.map(range(6))) == {os.SCHED_IDLE}
    # Only the background stage: the next process stage's workers keep the normal policy.
    with conveyor.Pipeline(
        conveyor.stage(sf.sched_policy, kind="process", background=True),
        conveyor.stage(sf.sched_policy, kind="process"),
    ) as pipe:
        assert set(pipe.map(range(3))) == {normal}


def test_background_needs_a_process_stage() -> None:
    with pytest.raises(ValueError, match="kind='process'"):
        conveyor.stage(sf.sched_policy, background=True)


def _exit_on_1(x: int) -> int:
    if x == 1:
        raise SystemExit(3)
    if x == 3:
        raise KeyboardInterrupt
    return x


def test_thread_stage_raising_systemexit_fails_only_that_item() -> None:
    """SystemExit or KeyboardInterrupt raised by a thread stage's function fails the item
    (as a worker process exiting would); the stage thread lives on."""
    with conveyor.Pipeline(conveyor.stage(_exit_on_1, workers=1, name="quit"),
                           on_error="return") as pipe:
        out = list(pipe.map(range(5)))
        assert out[0] == 0 and out[2] == 2 and out[4] == 4
        for i, cls in ((1, SystemExit), (3, KeyboardInterrupt)):
            assert isinstance(out[i], conveyor.StageError) and out[i].stage == "quit"
            assert out[i].index == i and isinstance(out[i].__cause__, cls)
        assert list(pipe.map([0, 2])) == [0, 2]


def test_stats_say_what_auto_chose() -> None:
    with conveyor.Pipeline(conveyor.infer("face_detection_short_range", device="auto")) as pipe:
        dev = pipe.stats()["device"]
    assert dev["device"] == "auto"
    assert dev["runs_on"] == "cpu" or dev["runs_on"].startswith("edgetpu")  # a concrete one
