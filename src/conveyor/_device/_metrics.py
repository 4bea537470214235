"""Prometheus metrics for ``conveyor serve --metrics-port``, made from ``status()`` at scrape.

What Triton's metrics cover, named ``conveyor_*``:

==========================================  =======================================
conveyor_request_success_total{model}       nv_inference_request_success
conveyor_request_failure_total{model,       nv_inference_request_failure (reason:
  reason}                                   busy, deadline_exceeded, device_error...)
conveyor_request_queue_seconds{model}       nv_inference_queue_duration_us
  (histogram)
conveyor_request_compute_seconds{model}     nv_inference_compute_infer_duration_us
  (histogram)
conveyor_request_duration_seconds{model}    nv_inference_request_duration_us
  (histogram: queue + compute)
conveyor_device_utilization{device,spec}    nv_gpu_utilization (busy fraction over
                                            the status window)
conveyor_device_busy_seconds_total,         (device time, inferences, failures,
conveyor_device_inferences_total,            whether in service, parameter-cache
conveyor_device_errors_total,                reloads on model switches)
conveyor_device_up,
conveyor_device_model_switches_total
conveyor_queue_depth, conveyor_requests_    nv_inference_pending_request_count
  running
conveyor_clients_connected,                 (server health)
conveyor_connections_rejected_total,
conveyor_protocol_errors_total,
conveyor_server_uptime_seconds,
conveyor_server_info{version}
==========================================  =======================================

The exposition is written by ``prometheus_client`` when it is installed, else here (the
text format is small). The HTTP endpoint listens on 127.0.0.1 only, in one daemon thread
owned by :class:`MetricsServer`, which :meth:`MetricsServer.close` stops and joins.
"""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["CONTENT_TYPE", "Family", "MetricsServer", "families", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = dict[str, str]


@dataclass
class Family:
    """One metric family: ``samples`` are (labels, value); a histogram's value is
    ``(cumulative bucket counts by le, sum, count)``."""

    name: str
    type: str  # counter | gauge | histogram
    help: str
    samples: list[tuple[Labels, Any]] = field(default_factory=list)


def families(status: dict[str, Any]) -> list[Family]:
    """The metric families of one ``DeviceServer.status()`` snapshot."""
    success = Family("conveyor_request_success_total", "counter",
                     "Requests answered with outputs, by model.")
    failure = Family("conveyor_request_failure_total", "counter",
                     "Requests answered with an error, by model and reason.")
    hists = {
        key: Family(f"conveyor_request_{key}_seconds", "histogram", text)
        for key, text in (
            ("queue", "Time requests waited in the queue before running."),
            ("compute", "Time requests ran on a device (inputs in, inference, outputs out)."),
            ("duration", "Time from admission to the end of the run (queue + compute)."),
        )
    }
    for m in status["models"]:
        labels = {"model": m["name"]}
        requests = m["requests"]
        success.samples.append((labels, requests.get("ok", 0)))
        for reason, n in sorted(requests.items()):
            if reason != "ok":
                failure.samples.append(({**labels, "reason": reason}, n))
        for key, src in (("queue", "queue"), ("compute", "compute"), ("duration", "latency")):
            h = m[src]
            cumulative, total = [], 0
            for le, n in zip([*h["le"], float("inf")], h["counts"]):
                total += n
                cumulative.append((le, total))
            hists[key].samples.append((labels, (cumulative, h["sum_s"], h["count"])))
    # requests naming no model the server has: by reason alone (an empty label is none)
    for reason, n in sorted(status["totals"].get("modelless", {}).items()):
        if n:
            failure.samples.append(({"model": "", "reason": reason}, n))
    dev_families = [
        ("conveyor_device_utilization", "gauge",
         "Fraction of the last window the device spent running requests.", "duty_cycle"),
        ("conveyor_device_busy_seconds_total", "counter",
         "Device time spent running requests.", "busy_s"),
        ("conveyor_device_inferences_total", "counter", "Requests the device ran.", "items"),
        ("conveyor_device_errors_total", "counter", "Requests the device failed.", "errors"),
        ("conveyor_device_model_switches_total", "counter",
         "Times the device ran another model than the previous request's.",
         "model_switches"),
    ]
    devs = []
    for name, kind, text, key in dev_families:
        fam = Family(name, kind, text)
        for d in status["devices"]:
            fam.samples.append(({"device": str(d["index"]), "spec": str(d.get("spec", ""))},
                                d[key]))
        devs.append(fam)
    up = Family("conveyor_device_up", "gauge", "1 while the device is in service, 0 once "
                "it was taken out after failing.")
    for d in status["devices"]:
        up.samples.append(({"device": str(d["index"]), "spec": str(d.get("spec", ""))},
                           1 if d["state"] == "ok" else 0))
    totals = status["totals"]
    server = status["server"]

    def single(name: str, kind: str, text: str, value: Any, labels: Labels | None = None
               ) -> Family:
        return Family(name, kind, text, [(labels or {}, value)])

    return [
        success, failure, *hists.values(), *devs, up,
        single("conveyor_queue_depth", "gauge", "Requests waiting for a device.",
               totals["queue_depth"]),
        single("conveyor_requests_running", "gauge", "Requests on a device now.",
               totals["running"]),
        single("conveyor_clients_connected", "gauge", "Connected clients (not monitors).",
               totals["clients"]),
        single("conveyor_connections_rejected_total", "counter",
               "Connections refused (user not allowed, or too many).",
               totals["rejected_connections"]),
        single("conveyor_protocol_errors_total", "counter",
               "Connections closed for a malformed message.", totals["protocol_errors"]),
        single("conveyor_server_uptime_seconds", "gauge", "Seconds since the server started.",
               server["uptime_s"]),
        single("conveyor_server_info", "gauge", "The server's version (value is always 1).",
               1, {"version": str(server["version"])}),
    ]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _render_text(fams: list[Family]) -> str:
    lines: list[str] = []
    for fam in fams:
        lines.append(f"# HELP {fam.name} {fam.help}")
        lines.append(f"# TYPE {fam.name} {fam.type}")
        for labels, value in fam.samples:
            if fam.type != "histogram":
                lines.append(f"{fam.name}{_labels(labels)} {_number(value)}")
                continue
            buckets, total_s, count = value
            for le, n in buckets:
                lines.append(f"{fam.name}_bucket{_labels({**labels, 'le': _number(le)})} {n}")
            lines.append(f"{fam.name}_sum{_labels(labels)} {_number(total_s)}")
            lines.append(f"{fam.name}_count{_labels(labels)} {count}")
    return "\n".join(lines) + "\n"


def _render_client(fams: list[Family]) -> str:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    class Collector:
        def collect(self) -> Iterator[Any]:
            for fam in fams:
                names = sorted({k for labels, _ in fam.samples for k in labels})
                out: Any
                if fam.type == "counter":
                    out = CounterMetricFamily(fam.name, fam.help, labels=names)
                elif fam.type == "gauge":
                    out = GaugeMetricFamily(fam.name, fam.help, labels=names)
                else:
                    out = HistogramMetricFamily(fam.name, fam.help, labels=names)
                for labels, value in fam.samples:
                    values = [labels.get(k, "") for k in names]
                    if fam.type == "histogram":
                        buckets, total_s, _count = value
                        out.add_metric(values, [(_number(le), n) for le, n in buckets], total_s)
                    else:
                        out.add_metric(values, value)
                yield out

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())
    text: bytes = generate_latest(registry)
    return text.decode("utf-8")


def render(status: dict[str, Any], *, use_client: bool | None = None) -> str:
    """The Prometheus text exposition of ``status``.

    ``use_client``: True forces ``prometheus_client`` (ImportError if missing), False the
    built-in writer, None uses the library when it is installed.
    """
    fams = families(status)
    if use_client is None:
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            use_client = False
        else:
            use_client = True
    return _render_client(fams) if use_client else _render_text(fams)


#: Seconds a scrape's connection may take to send its request, or to take the reply.
SCRAPE_TIMEOUT_S = 5.0
#: Scrape connections served at once (Prometheus makes one at a time per target).
MAX_SCRAPERS = 8


class _Within(io.RawIOBase):
    """A scrape's request stream, to be read whole within ``seconds``: each read waits only
    for what is left (a socket timeout alone starts again at every byte, and a request
    sent a byte at a time held its connection, and so one of the few, for good)."""

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        super().__init__()
        self._sock = sock
        self._end = time.monotonic() + seconds

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self._end - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request was not in within its time")
        self._sock.settimeout(left)
        return self._sock.recv_into(buffer)


class MetricsServer:
    """Serve ``/metrics`` on ``host:port`` from a daemon thread (owned: see :meth:`close`).

    Each scrape calls ``status`` (thread-safe in DeviceServer) and renders it.
    Raises OSError if the port cannot be bound (``port=0`` picks a free one; see
    :attr:`port`).
    """

    def __init__(self, status: Callable[[], dict[str, Any]], port: int,
                 host: str = "127.0.0.1", *, use_client: bool | None = None) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            # A request not in (or a reply not taken) within this many seconds ends its
            # connection: a half-sent request held a thread and a descriptor for good.
            timeout = SCRAPE_TIMEOUT_S

            def setup(self) -> None:
                super().setup()
                self.rfile = io.BufferedReader(_Within(self.connection, SCRAPE_TIMEOUT_S))

            def do_GET(self) -> None:
                self.connection.settimeout(SCRAPE_TIMEOUT_S)  # the reply's own time
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404, "only /metrics is here")
                    return
                try:
                    body = render(outer._status(), use_client=outer._use_client).encode()
                except Exception as exc:  # a scrape must never take the server down
                    self.send_error(500, f"cannot render metrics: {exc}")
                    return
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            slots = threading.BoundedSemaphore(MAX_SCRAPERS)

            def process_request(self, request: Any, client_address: Any) -> None:
                # At most MAX_SCRAPERS connections at once: the next is closed unanswered,
                # so that connections never cost the device server its descriptors.
                if not self.slots.acquire(blocking=False):
                    self.shutdown_request(request)
                    return
                try:
                    super().process_request(request, client_address)
                except BaseException:
                    self.slots.release()
                    raise

            def process_request_thread(self, request: Any, client_address: Any) -> None:
                try:
                    super().process_request_thread(request, client_address)
                finally:
                    self.slots.release()

        self._status = status
        self._use_client = use_client
        self._httpd = Server((host, port), Handler)
        self.host = host
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
            name="conveyor-metrics", daemon=True,
        )
        self._thread.start()

    def close(self) -> None:
        """Stop serving and wait for the thread (at most about 0.1 s). Idempotent."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()
