"""Prometheus metrics made from a server's status: both writers, and the HTTP endpoint."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_server_support import FakeDevice, ThreadServer, socket_dir, x

from conveyor import Busy, DeviceClient
from conveyor._device._metrics import MetricsServer, render

NAMES = (
    "conveyor_request_success_total", "conveyor_request_failure_total",
    "conveyor_request_queue_seconds", "conveyor_request_compute_seconds",
    "conveyor_request_duration_seconds", "conveyor_device_utilization",
    "conveyor_device_busy_seconds_total", "conveyor_device_inferences_total",
    "conveyor_device_errors_total", "conveyor_device_up",
    "conveyor_device_model_switches_total", "conveyor_queue_depth",
    "conveyor_requests_running", "conveyor_clients_connected",
    "conveyor_connections_rejected_total", "conveyor_protocol_errors_total",
    "conveyor_server_uptime_seconds", "conveyor_server_info",
)


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadServer]:
    with socket_dir() as d, ThreadServer(d / "s", [FakeDevice(), FakeDevice("two")],
                                         ["a", 'b"\\q'], max_queue=1) as srv:
        with DeviceClient(path=srv.path) as c:
            for i in range(5):
                c.infer("a", x(i))
            c.infer('b"\\q', x(0))
            with pytest.raises(Busy):  # max_queue 1: the second and third cannot wait
                futs = [c.submit("a", x(i)) for i in range(40)]
                for f in futs:
                    f.result(10)
        yield srv


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


@pytest.mark.parametrize("use_client", [False, True])
def test_metrics_text(server: ThreadServer, use_client: bool) -> None:
    if use_client:
        pytest.importorskip("prometheus_client")
    text = render(server.server.status(), use_client=use_client)
    for name in NAMES:
        assert f"# TYPE {name.removesuffix('_total')}" in text, name
    samples = _samples(text)
    assert samples['conveyor_request_success_total{model="a"}'] >= 5
    assert samples['conveyor_request_failure_total{model="a",reason="busy"}'] >= 1
    assert samples['conveyor_request_success_total{model="b\\"\\\\q"}'] == 1  # escaped
    count = samples['conveyor_request_compute_seconds_count{model="a"}']
    inf = [v for k, v in samples.items()
           if k.startswith("conveyor_request_compute_seconds_bucket{")
           and 'le="+Inf"' in k and 'model="a"' in k]
    assert inf == [count]
    assert 'conveyor_device_up{device="1",spec="two"} 1' in text
    assert re.search(r"conveyor_server_info\{version=\"[^\"]+\"\} 1", text)


def test_both_writers_agree(server: ThreadServer) -> None:
    pytest.importorskip("prometheus_client")
    status = server.server.status()

    def norm(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        out = {}
        for name, value in _samples(text).items():
            base = name.split("{", 1)[0]
            labels = tuple(sorted(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', name)))
            out[(base, labels)] = value  # label order and number style differ
        return out

    assert norm(render(status, use_client=True)) == norm(render(status, use_client=False))


def test_metrics_endpoint(server: ThreadServer) -> None:
    metrics = MetricsServer(server.server.status, 0)
    try:
        assert metrics.host == "127.0.0.1"
        url = f"http://127.0.0.1:{metrics.port}"
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            assert r.status == 200
            assert "conveyor_request_success_total" in r.read().decode()
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(url + "/nope", timeout=10)
    finally:
        metrics.close()
    metrics.close()


def test_socket_path_and_status_of_thread_server(server: ThreadServer) -> None:
    st = server.server.status()
    assert st["server"]["socket"] == str(server.path)
    assert [d["spec"] for d in st["devices"]] == ["fake", "two"]
    assert st["totals"]["requests"]["ok"] >= 6
    assert Path(st["server"]["socket"]).is_socket()


def test_half_sent_scrapes_are_bounded_and_timed_out(server: ThreadServer,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # Each connection that sent half a request held a thread and a descriptor for good,
    # with no bound: enough of them (any local user can reach the port) left the device
    # server no descriptors to accept its clients with.
    import socket
    import threading
    import time

    from conveyor._device import _metrics

    monkeypatch.setattr(_metrics, "SCRAPE_TIMEOUT_S", 0.5)
    metrics = MetricsServer(server.server.status, 0)
    threads = threading.active_count()
    held = []
    try:
        for _ in range(3 * _metrics.MAX_SCRAPERS):
            s = socket.create_connection((metrics.host, metrics.port))
            s.sendall(b"GET /metr")
            held.append(s)
        time.sleep(0.2)
        assert threading.active_count() <= threads + _metrics.MAX_SCRAPERS
        t0 = time.monotonic()
        for s in held:  # each is closed by the server: at once, or after the timeout
            s.settimeout(5)
            try:
                assert s.recv(1024) == b""
            except ConnectionResetError:
                pass
        assert time.monotonic() - t0 < 3
        url = f"http://{metrics.host}:{metrics.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            assert b"conveyor_request_success_total" in resp.read()
    finally:
        for s in held:
            s.close()
        metrics.close()


def test_a_request_sent_a_byte_at_a_time_is_cut_off_at_the_scrape_timeout(
        server: ThreadServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # The timeout started again at every byte: eight connections sending a byte every
    # half second held every scrape slot for as long as they liked.
    import socket
    import time

    from conveyor._device import _metrics

    monkeypatch.setattr(_metrics, "SCRAPE_TIMEOUT_S", 0.5)
    metrics = MetricsServer(server.server.status, 0)
    s = socket.create_connection((metrics.host, metrics.port))
    try:
        t0 = time.monotonic()
        with pytest.raises(OSError):  # a broken pipe or a reset, once the server closed it
            for byte in b"GET /metrics HTTP/1.0\r\nX-Slow: " + b"x" * 100:
                s.send(bytes([byte]))
                time.sleep(0.05)
            pytest.fail("the server read a trickled request for 6 s")
        assert time.monotonic() - t0 < 2.0
    finally:
        s.close()
        metrics.close()
