"""What the device server counts: per device and per model, cheap enough to leave on.

Counters only ever grow (Prometheus counters are derived from them); rates and duty cycles
are computed over a sliding window from 100 ms buckets, so a status snapshot costs the same
at any request rate. A successful inference is recorded by appending one tuple to a queue
(no lock, before the reply is sent, so a client that asks for the status next sees its
request counted); the queue is folded into the counters under the lock when a snapshot is
taken, or every few hundred inferences.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections import deque
from typing import Any

import numpy as np

from .._runtime._stats import RECENT_S, RecentWindow
from ._protocol import Status

__all__ = ["BUCKETS_S", "WINDOW_S", "Histogram", "ServerStats"]

#: Upper bounds (seconds) of the latency histogram buckets (Prometheus ``le``).
BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)
_BUCKETS_NS = tuple(int(b * 1e9) for b in BUCKETS_S)
#: The window over which rates and duty cycles are computed.
WINDOW_S = RECENT_S
_WINDOW_NS = int(WINDOW_S * 1e9)
_STATUS_NAMES = {int(s): s.name.lower() for s in Status}
_BATCH = 256  # successful inferences recorded before they are folded into the counters


class Histogram:
    """Counts of durations per bucket of :data:`BUCKETS_S` (the last bucket is +Inf)."""

    __slots__ = ("count", "counts", "sum_ns")

    def __init__(self) -> None:
        self.counts = [0] * (len(_BUCKETS_NS) + 1)
        self.sum_ns = 0
        self.count = 0

    def observe(self, ns: int) -> None:
        self.counts[bisect_left(_BUCKETS_NS, ns)] += 1
        self.sum_ns += ns
        self.count += 1

    def to_json(self) -> dict[str, Any]:
        """``{"le": bounds, "counts": per bucket (not cumulative), "sum_s", "count"}``."""
        return {"le": list(BUCKETS_S), "counts": list(self.counts),
                "sum_s": self.sum_ns / 1e9, "count": self.count}


class _DeviceStats:
    __slots__ = ("busy_ns", "errors", "items", "latency", "recent")

    def __init__(self) -> None:
        self.items = 0
        self.errors = 0
        self.busy_ns = 0
        self.recent = RecentWindow()
        self.latency: deque[tuple[int, int]] = deque(maxlen=4096)  # (end_ns, total_ns)


class _ModelStats:
    __slots__ = ("compute", "latency", "queue", "requests")

    def __init__(self) -> None:
        self.requests = dict.fromkeys(_STATUS_NAMES.values(), 0)
        self.queue = Histogram()
        self.compute = Histogram()
        self.latency = Histogram()


def _percentiles(values: list[int]) -> tuple[float, float]:
    if not values:
        return 0.0, 0.0
    p50, p99 = np.percentile(np.asarray(values, dtype=np.float64), [50, 99])
    return float(p50) / 1e6, float(p99) / 1e6


class ServerStats:
    """The server's counters. Thread-safe."""

    def __init__(self, n_devices: int, model_ids: list[int], started_ns: int) -> None:
        self._lock = threading.Lock()
        self.started_ns = started_ns
        self._devices = [_DeviceStats() for _ in range(n_devices)]
        self._models = {m: _ModelStats() for m in model_ids}
        self.rejected_connections = 0
        self.protocol_errors = 0
        #: Failures of requests that name no model the server has, by status name.
        self.modelless = dict.fromkeys(_STATUS_NAMES.values(), 0)
        self._log: deque[tuple[int, int, int, int, int, int]] = deque()

    def ok(self, device: int, model: int, queue_ns: int, compute_ns: int, end_ns: int,
           total_ns: int) -> None:
        """Record one successful inference: O(1), no lock (folded in in batches)."""
        log = self._log
        log.append((device, model, queue_ns, compute_ns, end_ns, total_ns))
        if len(log) >= _BATCH:
            with self._lock:
                self._fold()

    def _fold(self) -> None:
        # Under the lock: fold the recorded inferences into the counters.
        log = self._log
        while log:
            try:
                device, model, queue_ns, compute_ns, end_ns, total_ns = log.popleft()
            except IndexError:
                break
            d = self._devices[device]
            d.items += 1
            d.busy_ns += compute_ns
            d.latency.append((end_ns, total_ns))
            d.recent.add(end_ns, compute_ns)
            m = self._models[model]
            m.requests["ok"] += 1
            m.queue.observe(queue_ns)
            m.compute.observe(compute_ns)
            m.latency.observe(total_ns)

    def failed(self, model: int | None, status: int, device: int | None = None,
               busy_ns: int = 0) -> None:
        """Record a request answered with an error ``status``."""
        name = _STATUS_NAMES.get(status, "bad_request")
        with self._lock:
            if model in self._models:
                self._models[model].requests[name] += 1
            else:
                self.modelless[name] += 1
            if device is not None and status == Status.DEVICE_ERROR:
                d = self._devices[device]
                d.errors += 1
                d.busy_ns += busy_ns

    def device_error(self, device: int) -> None:
        """Count a device's failed run whose request goes on elsewhere (a retry)."""
        with self._lock:
            self._devices[device].errors += 1

    def count(self, what: str) -> None:
        """Count a rejected connection or a protocol error."""
        with self._lock:
            setattr(self, what, getattr(self, what) + 1)

    def snapshot(self, devices: list[int], models: list[int], now_ns: int) -> dict[str, Any]:
        """The counters of ``devices`` and ``models`` and the server-wide ones, read at one
        instant (one fold, under the lock), so that they agree: a request counted ``ok``
        by its model is among its device's ``items``."""
        with self._lock:
            self._fold()
            device_parts = [self._device(i, now_ns) for i in devices]
            model_parts = [self._model(m) for m in models]
            server = {"rejected_connections": self.rejected_connections,
                      "protocol_errors": self.protocol_errors,
                      "modelless": dict(self.modelless)}
        out_devices = []
        for latency, part in device_parts:
            p50, p99 = _percentiles(latency)
            out_devices.append({**part, "p50_ms": p50, "p99_ms": p99})
        return {"devices": out_devices, "models": model_parts, **server}

    def _device(self, index: int, now_ns: int) -> tuple[list[int], dict[str, Any]]:
        # Under the lock, folded: a device's counters, rates and recent latencies.
        d = self._devices[index]
        rate, duty = d.recent.rates(now_ns, self.started_ns)
        since = now_ns - _WINDOW_NS  # percentiles over the same window as the rates
        latency = [total for end, total in d.latency if end >= since]
        return latency, {
            "items": d.items, "errors": d.errors, "busy_s": d.busy_ns / 1e9,
            "items_per_s": rate,
            "requests_per_s": rate,  # the same figure, under the name Triton's users expect
            "duty_cycle": duty,
            "duty_cycle_total": min(d.busy_ns / max(now_ns - self.started_ns, 1), 1.0),
        }

    def _model(self, model: int) -> dict[str, Any]:
        # Under the lock, folded: a model's request counts by status and time histograms.
        m = self._models[model]
        return {
            "requests": dict(m.requests),
            "queue": m.queue.to_json(),
            "compute": m.compute.to_json(),
            "latency": m.latency.to_json(),
        }

    def device(self, index: int, now_ns: int) -> dict[str, Any]:
        """A device's counters, and its rates and latency percentiles (milliseconds) over
        the last :data:`WINDOW_S` (0 when it ran nothing then; at most 4096 requests)."""
        result: dict[str, Any] = self.snapshot([index], [], now_ns)["devices"][0]
        return result
