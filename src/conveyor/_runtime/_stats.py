"""Per-stage accounting and the Chrome trace recorder."""

from __future__ import annotations

import array
import errno
import json
import os
import stat
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["RECENT_S", "DeviceStats", "RecentWindow", "StageStats", "Tracer", "probe_writable"]

#: The window of recent rates: a device's ``items_per_s_recent`` and ``duty_cycle_recent``
#: here, and the device server's rates and duty cycles.
RECENT_S = 5.0
_SLICE_NS = 100_000_000
_SLICES = int(RECENT_S * 1e9) // _SLICE_NS


class RecentWindow:
    """Counts and busy time in 100 ms slices over the last :data:`RECENT_S`, so that a
    rate costs the same at any event rate. One writer (or its owner's lock); reading while
    it writes is safe."""

    __slots__ = ("_slices",)

    def __init__(self) -> None:
        self._slices: deque[list[int]] = deque(maxlen=_SLICES + 1)  # [slice, count, busy]

    def add(self, end_ns: int, busy_ns: int = 0) -> None:
        """One event that ended at ``end_ns`` (CLOCK_MONOTONIC), busy for ``busy_ns``."""
        idx = end_ns // _SLICE_NS
        slices = self._slices
        if slices and slices[-1][0] == idx:
            slices[-1][1] += 1
            slices[-1][2] += busy_ns
        else:
            slices.append([idx, 1, busy_ns])

    def rates(self, now_ns: int, since_ns: int) -> tuple[float, float]:
        """(events/s, busy fraction) over the window, or since ``since_ns`` if later."""
        first = now_ns // _SLICE_NS - _SLICES + 1
        count = busy = 0
        for idx, n, b in list(self._slices):  # a copy: a writer may append meanwhile
            if idx >= first:
                count += n
                busy += b
        span = max(min(now_ns - first * _SLICE_NS, now_ns - since_ns), 1)
        return count / (span / 1e9), min(busy / span, 1.0)


class StageStats:
    """Counts and recent latencies of one stage. Updated under its own lock."""

    def __init__(self, name: str, kind: str, workers: int) -> None:
        self.name = name
        self.kind = kind
        self.workers = workers
        self.lock = threading.Lock()
        self.items_in = 0
        self.items_out = 0
        self.errors = 0
        self.dropped = 0
        self.cancelled = 0
        self.restarts = 0
        self.busy_ns = 0
        self.latency_ns: deque[int] = deque(maxlen=2048)

    def record(self, ok: bool, dur_ns: int) -> None:
        with self.lock:
            if ok:
                self.items_out += 1
            else:
                self.errors += 1
            self.busy_ns += dur_ns
            self.latency_ns.append(dur_ns)

    def snapshot(self, queue_depth: int, elapsed_s: float) -> dict[str, Any]:
        with self.lock:
            lat = list(self.latency_ns)
            out = {
                "kind": self.kind,
                "workers": self.workers,
                "in": self.items_in,
                "out": self.items_out,
                "errors": self.errors,
                "dropped": self.dropped,
                "cancelled": self.cancelled,
                "restarts": self.restarts,
                "queue_depth": queue_depth,
                "busy_fraction": self.busy_ns / 1e9 / max(elapsed_s, 1e-9) / max(self.workers, 1),
            }
        p50, p99 = (np.percentile(lat, [50, 99]) / 1e6) if lat else (0.0, 0.0)
        out["p50_ms"] = float(p50)
        out["p99_ms"] = float(p99)
        return out


class DeviceStats:
    """Device time as the device worker reports it with each result."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.lock = threading.Lock()
        self.items = 0
        self.busy_ns = 0
        self.first_start_ns = 0
        self.last_end_ns = 0
        self.restarts = 0
        self.scheduling = "normal"  # the device thread's CPU policy, as its worker says
        self.runs_on = spec  # what "auto" chose for the model, else the spec
        self._recent = RecentWindow()

    def record(self, start_ns: int, compute_ns: int) -> None:
        end = start_ns + compute_ns
        with self.lock:
            if not self.first_start_ns:
                self.first_start_ns = start_ns
            self.items += 1
            self.busy_ns += compute_ns
            self.last_end_ns = max(self.last_end_ns, end)
            self._recent.add(end, compute_ns)

    def snapshot(self, now_ns: int, since_ns: int) -> dict[str, Any]:
        with self.lock:
            span = max(now_ns - since_ns, 1)
            active = max(self.last_end_ns - self.first_start_ns, 1) if self.items else 1
            rate, duty = self._recent.rates(now_ns, since_ns)
            return {
                "device": self.spec,
                "items": self.items,
                "busy_s": self.busy_ns / 1e9,
                # busy / wall time since the pipeline started
                "duty_cycle": self.busy_ns / span,
                "busy_fraction": self.busy_ns / span,
                # busy / time from the first inference's start to the last one's end
                "duty_cycle_active": self.busy_ns / active if self.items else 0.0,
                "items_per_s": self.items / (span / 1e9),
                # over the last RECENT_S seconds: what a live pipeline does now
                "items_per_s_recent": rate,
                "duty_cycle_recent": duty,
                "restarts": self.restarts,
                "scheduling": self.scheduling,
                "runs_on": self.runs_on,
            }


def probe_writable(path: str | os.PathLike[str]) -> None:
    """Raise the ``OSError`` that writing a file at ``path`` would meet (no such folder,
    a folder, no permission, a read-only or pseudo file system): the file is opened for
    appending, and removed again if that created it."""
    existed = os.path.lexists(path)
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = 0
    if stat.S_ISFIFO(mode):
        # A pipe (``>(cat)``, a FIFO): opening it to try would block (no reader yet) or
        # end the reader's input. Its permission says. (A device or a socket is tried.)
        if not os.access(path, os.W_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return
    try:
        with open(path, "ab"):
            pass
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        # Some pseudo files accept the open and fail the seek or close that follows
        # (/proc: EINVAL), an error that would otherwise not say which file.
        raise OSError(exc.errno, exc.strerror, os.fspath(path)) from exc
    if not existed:
        Path(path).unlink(missing_ok=True)


class Tracer:
    """Records complete events for a Chrome trace file (opens in Perfetto / chrome://tracing).

    Each worker and each device gets its own track. Timestamps are CLOCK_MONOTONIC, which
    every process on the machine shares, so spans measured in worker processes line up.
    An event costs 40 bytes until the file is written (four int64 and a reference to its
    name); the first ``max_events`` are kept (40 MB), the rest are not recorded.
    """

    def __init__(self, path: str | os.PathLike[str], max_events: int = 1_000_000) -> None:
        self.path = Path(path)
        self.max_events = max_events
        self._names: list[str] = []
        self._nums = array.array("q")  # track, start ns, end ns, item (-1: none) an event
        self._tracks: dict[str, int] = {}
        self._lock = threading.Lock()
        self._t0 = time.monotonic_ns()
        self.pid = os.getpid()

    def track(self, name: str) -> int:
        """The id of the track called ``name`` (made on first use)."""
        with self._lock:
            tid = self._tracks.get(name)
            if tid is None:
                tid = self._tracks[name] = len(self._tracks) + 1
            return tid

    def span(self, track: int, name: str, start_ns: int, end_ns: int, item: int = -1) -> None:
        """Add a complete event on ``track`` from ``start_ns`` to ``end_ns``, about input
        item ``item`` (-1: none)."""
        with self._lock:
            if len(self._names) >= self.max_events:
                return
            self._names.append(name)
            self._nums.extend((track, start_ns, end_ns, item))

    def events(self) -> list[dict[str, Any]]:
        """The recorded events as trace-event dicts (complete events, ``ph`` "X")."""
        with self._lock:
            return [self._event(i) for i in range(len(self._names))]

    def _event(self, i: int) -> dict[str, Any]:
        track, start, end, item = self._nums[4 * i : 4 * i + 4]
        return {"name": self._names[i], "ph": "X", "pid": self.pid, "tid": track,
                "ts": (start - self._t0) / 1e3, "dur": max(end - start, 0) / 1e3,
                "args": {} if item < 0 else {"item": item}}

    def check(self) -> None:
        """Raise now the ``OSError`` that writing the file at close would meet (see
        :func:`probe_writable`)."""
        probe_writable(self.path)

    def write(self) -> Path:
        """Write the trace file, an event at a time (no second copy of them all in
        memory); returns its path."""
        with self._lock:
            meta: list[dict[str, Any]] = [
                {"name": "process_name", "ph": "M", "pid": self.pid, "args": {"name": "conveyor"}}
            ]
            for name, tid in self._tracks.items():
                meta.append({"name": "thread_name", "ph": "M", "pid": self.pid, "tid": tid,
                             "args": {"name": name}})
                meta.append({"name": "thread_sort_index", "ph": "M", "pid": self.pid,
                             "tid": tid, "args": {"sort_index": tid}})
            quoted: dict[str, str] = {}  # a name as a JSON string, made once
            nums, t0, pid = self._nums, self._t0, self.pid
            with open(self.path, "w") as f:
                f.write('{"displayTimeUnit": "ms", "traceEvents": [')
                f.write(", ".join(json.dumps(m) for m in meta))
                for first in range(0, len(self._names), 10_000):
                    chunk = []
                    for i, name in enumerate(self._names[first : first + 10_000], first):
                        q = quoted.get(name)
                        if q is None:
                            q = quoted[name] = json.dumps(name)
                        track, start, end, item = nums[4 * i : 4 * i + 4]
                        args = "{}" if item < 0 else f'{{"item": {item}}}'
                        chunk.append(f', {{"name": {q}, "ph": "X", "pid": {pid}, "tid": {track}, '
                                     f'"ts": {(start - t0) / 1e3!r}, '
                                     f'"dur": {max(end - start, 0) / 1e3!r}, "args": {args}}}')
                    f.write("".join(chunk))
                f.write("]}")
        return self.path
