"""The server's counters: latency percentiles cover the same recent window as the rates."""

from __future__ import annotations

from conveyor._cli.status import _ms
from conveyor._device._stats import WINDOW_S, ServerStats

S = 1_000_000_000
MS = 1_000_000


def test_latency_percentiles_cover_the_window_of_the_rates() -> None:
    stats = ServerStats(1, [0], started_ns=0)
    for i in range(32):  # a slow burst at t = 1 s
        stats.ok(0, 0, queue_ns=0, compute_ns=2 * MS, end_ns=1 * S + i, total_ns=30 * MS)
    burst = stats.device(0, now_ns=2 * S)
    assert burst["p50_ms"] == burst["p99_ms"] == 30.0 and burst["items_per_s"] > 0
    idle = stats.device(0, now_ns=int((1 + WINDOW_S + 1) * S))
    assert (idle["items_per_s"], idle["p50_ms"], idle["p99_ms"]) == (0.0, 0.0, 0.0)
    assert idle["items"] == 32  # counts cover the server's life
    now = int((1 + WINDOW_S + 2) * S)
    for i in range(20):  # fast requests after the idle spell: the burst no longer shows
        stats.ok(0, 0, queue_ns=0, compute_ns=1 * MS, end_ns=now - S + i, total_ns=2 * MS)
    fresh = stats.device(0, now_ns=now)
    assert fresh["p50_ms"] == fresh["p99_ms"] == 2.0 and fresh["items"] == 52


def test_the_table_shows_no_latency_for_an_idle_window() -> None:
    assert (_ms(0.0), _ms(1.234), _ms(250.0)) == ("-", "1.23ms", "250ms")


def test_a_status_snapshot_counts_each_request_once_on_its_device_and_its_model() -> None:
    import threading
    from pathlib import Path

    from test_server_support import FakeDevice, ThreadServer, socket_dir, x

    from conveyor import DeviceClient

    stop = threading.Event()
    with socket_dir() as sdir, ThreadServer(Path(sdir) / "s", [FakeDevice()], ["m"]) as srv:

        def load() -> None:
            with DeviceClient(path=srv.path) as client:
                while not stop.is_set():
                    client.infer("m", x(1.0))

        worker = threading.Thread(target=load)
        worker.start()
        try:
            items, calls = 0, 0
            while items < 500 or calls < 300:
                calls += 1
                status = srv.server.status()
                items = sum(d["items"] for d in status["devices"])
                assert items == status["models"][0]["requests"]["ok"] \
                    == status["totals"]["requests"]["ok"], status["totals"]
        finally:
            stop.set()
            worker.join(10)
