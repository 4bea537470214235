"""The runtime's building blocks on their own: channel wake-ups and run outcomes."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from conveyor._errors import StageError
from conveyor._runtime._channel import Aborted, Channel
from conveyor._runtime._run import DROP, ERR, OK, Run


def _blocked_put(ch: Channel[int], value: int) -> threading.Thread:
    t = threading.Thread(target=ch.put, args=(value,), daemon=True)
    t.start()
    t.join(0.1)
    assert t.is_alive(), "put should block on a full channel"
    return t


def test_full_channel_wakes_its_producer_only_at_the_refill_mark() -> None:
    ch: Channel[int] = Channel(4, refill_at=1)
    for i in range(4):
        ch.put(i)
    producer = _blocked_put(ch, 4)
    assert [ch.get(), ch.get()] == [0, 1]  # 2 left: above the mark, the producer sleeps
    producer.join(0.2)
    assert producer.is_alive()
    assert ch.get() == 2  # down to the mark: woken
    producer.join(5)
    assert not producer.is_alive()
    assert [ch.get(), ch.get()] == [3, 4]


def test_default_channel_wakes_its_producer_at_the_first_free_slot() -> None:
    ch: Channel[int] = Channel(2)
    ch.put(0)
    ch.put(1)
    producer = _blocked_put(ch, 2)
    assert ch.try_get() == 0
    producer.join(5)
    assert not producer.is_alive()
    assert len(ch) == 2


def test_abort_wakes_blocked_producers_and_consumers() -> None:
    full: Channel[int] = Channel(1, refill_at=0)
    full.put(0)
    empty: Channel[int] = Channel(1)
    errors: list[str] = []

    def put() -> None:
        try:
            full.put(1)
        except Aborted:
            errors.append("put")

    def get() -> None:
        try:
            empty.get()
        except Aborted:
            errors.append("get")

    threads = [threading.Thread(target=put), threading.Thread(target=get)]
    for t in threads:
        t.start()
    assert full.abort() == [0]
    assert empty.abort() == []
    for t in threads:
        t.join(5)
    assert sorted(errors) == ["get", "put"]


def test_ordered_run_hands_out_in_order_whatever_the_arrival_order() -> None:
    run = Run(ordered=True, max_in_flight=4)
    for _ in range(4):
        assert run.acquire()
    run.finish(4)
    got: list[int] = []
    consumer = threading.Thread(
        target=lambda: got.extend(i for i, _ in iter(run.take, None)), daemon=True
    )
    consumer.start()
    for index in (3, 1, 2):
        run.deliver(index, OK, index)
    consumer.join(0.1)
    assert got == []  # item 0 holds the rest back
    run.deliver(0, OK, 0)
    consumer.join(5)
    assert got == [0, 1, 2, 3]
    assert run.complete


def test_a_drop_frees_its_token_and_is_skipped_in_order() -> None:
    run = Run(ordered=True, max_in_flight=2)
    assert run.acquire() and run.acquire()
    assert not run.acquire(block=False)
    run.deliver(0, DROP)
    assert run.acquire(block=False)  # the drop gave its token back at once
    run.deliver(1, OK, "b")
    run.deliver(2, OK, "c")
    run.finish(3)
    assert [run.take(), run.take(), run.take()] == [(1, (OK, "b")), (2, (OK, "c")), None]
    assert run.dropped == 1


@pytest.mark.parametrize("ordered", [True, False])
@pytest.mark.parametrize("drop_errors", [True, False])
def test_live_mode_drops_a_stale_error_only_where_errors_are_results(
        ordered: bool, drop_errors: bool) -> None:
    run = Run(ordered=ordered, max_in_flight=3, drop_errors=drop_errors)
    assert run.acquire() and run.acquire() and run.acquire()
    run.deliver(0, ERR, StageError("f", 0, "bad frame"))
    run.deliver_last(2, ERR, StageError("source", 2, "the input iterator raised"))
    run.finish(3)
    # errors taken as results (on_error="return"): the item's is stale like any frame;
    # else kept; the input iterator's error is never dropped
    assert run.drop_oldest_result() is drop_errors
    assert not run.drop_oldest_result()
    run.deliver(1, OK, "b")
    assert run.drop_oldest_result()  # the result, whatever the errors
    assert run.dropped == 1 + drop_errors
    rest = [(i, kind) for i, (kind, _) in iter(run.take, None)]
    assert rest == ([] if drop_errors else [(0, ERR)]) + [(2, ERR)]


@pytest.mark.parametrize("ordered", [True, False])
def test_a_blocked_producer_gets_the_token_the_consumer_frees(ordered: bool) -> None:
    run = Run(ordered=ordered, max_in_flight=1)
    assert run.acquire()
    took = threading.Event()
    t = threading.Thread(target=lambda: run.acquire() and took.set(), daemon=True)
    t.start()
    assert not took.wait(0.1)
    run.deliver(0, OK, "a")
    assert not took.wait(0.1)  # delivered, not yet consumed: the token is still held
    assert run.take() == (0, (OK, "a"))
    assert took.wait(5)


def test_a_trace_keeps_its_events_compactly_and_writes_them_as_recorded(
        tmp_path: Path) -> None:
    # Each event was a dict of about 540 bytes until the file was written: a long camera
    # run with a trace on reached the 1,000,000-event cap with half a gigabyte held.
    import json
    import tracemalloc

    from conveyor._runtime._stats import Tracer

    tracer = Tracer(tmp_path / "t.json", max_events=30_000)
    track = tracer.track('device "sim"')
    t0 = time.monotonic_ns()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(20_000):
            tracer.span(track, "face_detection", t0 + i * 1000, t0 + i * 1000 + 700, i)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held / 20_000 < 64, held
    for _ in range(20_000):  # past the cap: not recorded
        tracer.span(track, "other", t0, t0 + 1)
    written = json.loads(tracer.write().read_text())["traceEvents"]
    spans = [e for e in written if e["ph"] == "X"]
    assert spans == tracer.events() and len(spans) == 30_000
    assert spans[5]["args"] == {"item": 5} and spans[5]["dur"] == 0.7
    assert spans[-1]["name"] == "other" and spans[-1]["args"] == {}
    names = {e["args"]["name"] for e in written if e["name"] == "thread_name"}
    assert names == {'device "sim"'}
