"""Clocks and counters for the bench: device busy spans, CPU time, latency percentiles.

All times are ``time.monotonic_ns()``, which every process on the machine shares, so spans
recorded in worker processes and in the device worker line up with the parent's.

The device's duty cycle is the same figure for every design: the time the device spent
running the model inside the measured window, divided by the window. A span is the device's
own account where it gives one (the simulated Edge TPU reports each run's latency; a device
worker or server reports the time around ``Runner.run`` in its own process); otherwise the
time around the call, which for a thread sharing a GIL also counts the wait to get the GIL
back afterwards, so it can only flatter that design.
"""

from __future__ import annotations

import os
import platform
import resource
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from ..backends import Device, Runner

__all__ = [
    "DeviceClock",
    "Result",
    "Span",
    "Timeline",
    "busy_within",
    "cpu_seconds",
    "machine_busy_seconds",
    "machine_facts",
    "percentiles_ms",
]

Span = tuple[int, int]


class Timeline:
    """Named tracks of (start_ns, end_ns) spans; appending is safe from any thread."""

    def __init__(self) -> None:
        self.tracks: dict[str, list[Span]] = {}

    def track(self, name: str) -> list[Span]:
        """The span list of track ``name`` (made on first use, in creation order)."""
        return self.tracks.setdefault(name, [])

    def add(self, name: str, spans: Iterable[Span]) -> None:
        """Append ``spans`` to track ``name``."""
        self.track(name).extend(spans)


class DeviceClock:
    """Runs a model on a device opened in this process and records each run's busy span.

    Two tracks of ``timeline``: ``"device calls"``, the time around :meth:`Runner.run`, and
    ``"device"``, the device's own account: for the simulated Edge TPU, the simulated
    latency (read from the device after the run); for other devices, the same as the call.
    One thread at a time.
    """

    def __init__(self, device: Device, runner: Runner, timeline: Timeline) -> None:
        self.runner = runner
        self.spans = timeline.track("device")
        self.calls = timeline.track("device calls")
        self.simulated = bool(getattr(device, "simulated", False))
        timing = getattr(device, "timing", None)
        self._sim_timing = timing if self.simulated else None

    def run(self, tensor: npt.NDArray[Any]) -> list[npt.NDArray[Any]]:
        """Run the model once on ``tensor`` and record the spans. Blocks for the run."""
        start = time.monotonic_ns()
        outputs = self.runner.run([tensor])
        end = time.monotonic_ns()
        self.calls.append((start, end))
        if self._sim_timing is not None:
            last = self._sim_timing().last
            if last is not None:
                end = min(end, start + int(last.latency_s * 1e9))
        self.spans.append((start, end))
        return outputs

    def forget(self) -> None:
        """Drop the spans recorded so far (after a warm-up)."""
        self.spans.clear()
        self.calls.clear()


def busy_within(spans: Iterable[Span], start_ns: int, end_ns: int) -> int:
    """Nanoseconds of ``spans`` (not overlapping each other) inside [start_ns, end_ns]."""
    total = 0
    for s, e in spans:
        lo, hi = max(s, start_ns), min(e, end_ns)
        if hi > lo:
            total += hi - lo
    return total


def percentiles_ms(latencies_ns: Sequence[int]) -> tuple[float, float]:
    """(p50, p99) of ``latencies_ns`` in milliseconds; (0, 0) when empty."""
    if not latencies_ns:
        return 0.0, 0.0
    p50, p99 = np.percentile(np.asarray(latencies_ns, np.float64), [50, 99]) / 1e6
    return float(p50), float(p99)


@dataclass
class Result:
    """What one design did in its measured window.

    Attributes:
        name: the scenario's name.
        items: items completed in the window.
        start_ns, end_ns: the window: from feeding the first item to the last result.
        latencies_ns: per item, from entering the design to its result.
        cpu_s: CPU time (user + system) of this process and its children in the window.
        timeline: the device track ``"device"`` and one track per CPU worker.
        notes: how the design was configured, in a few words.
        extra: further figures for the JSON (numbers only).
    """

    name: str
    items: int
    start_ns: int
    end_ns: int
    latencies_ns: list[int]
    cpu_s: float
    timeline: Timeline
    notes: str = ""
    extra: dict[str, float] = field(default_factory=dict)
    trace: bytes | None = None  # the design's Chrome trace file, when asked for

    @property
    def wall_s(self) -> float:
        """The window's length in seconds."""
        return max(self.end_ns - self.start_ns, 1) / 1e9

    @property
    def items_per_s(self) -> float:
        """Throughput over the window."""
        return self.items / self.wall_s

    def busy_fraction(self, track: str) -> float:
        """Time covered by ``track``'s spans in the window, over the window."""
        spans = self.timeline.tracks.get(track, [])
        return busy_within(spans, self.start_ns, self.end_ns) / max(self.end_ns - self.start_ns, 1)

    @property
    def duty_cycle(self) -> float:
        """Device busy time in the window over the window (the device's own account)."""
        return self.busy_fraction("device")

    def summary(self, device_alone: float) -> dict[str, Any]:
        """The scenario's JSON object: throughput, duty cycle, latency, CPU, ratio."""
        p50, p99 = percentiles_ms(self.latencies_ns)
        out: dict[str, Any] = {
            "items_per_s": round(self.items_per_s, 2),
            "duty_cycle": round(self.duty_cycle, 4),
            "duty_cycle_calls": round(self.busy_fraction("device calls"), 4),
            "p50_ms": round(p50, 3),
            "p99_ms": round(p99, 3),
            "cpu_cores": round(self.cpu_s / self.wall_s, 3),
            "ratio_to_device_alone": round(self.items_per_s / device_alone, 4)
            if device_alone > 0
            else 0.0,
            "items": self.items,
            "wall_s": round(self.wall_s, 3),
            "design": self.notes,
        }
        out.update({k: round(v, 4) for k, v in self.extra.items()})
        return out


# --- CPU time of a process tree ---------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, CPU seconds of it and of the children it has reaped), from /proc."""
    table: dict[int, tuple[int, float]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue  # the process ended while we looked
        # The command name may hold spaces and parentheses: split after the last ')'.
        fields = raw[raw.rfind(b")") + 2 :].split()
        ppid = int(fields[1])
        utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
        table[int(name)] = (ppid, (utime + stime + cutime + cstime) / _TICK)
    return table


def cpu_seconds(exclude: Iterable[int] = ()) -> float:
    """CPU seconds used so far by this process and its descendants (reaped ones included).

    Processes in ``exclude`` and their descendants are left out. Reads ``/proc``; elsewhere
    falls back to ``getrusage`` (which counts only children already waited for).
    """
    if not os.path.isdir("/proc/self/task"):
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    skip = set(exclude)
    total = 0.0
    stack = [os.getpid()]
    while stack:
        pid = stack.pop()
        if pid in skip or pid not in table:
            continue
        total += table[pid][1]
        stack.extend(children.get(pid, ()))
    return total


def machine_busy_seconds() -> float:
    """CPU seconds every process on the machine has used since boot (0.0 without /proc)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return 0.0
    # user nice system idle iowait irq softirq steal: all but idle and iowait are busy.
    ticks = [int(v) for v in fields[:8]]
    return (sum(ticks) - ticks[3] - ticks[4]) / _TICK


# --- the machine ------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_facts() -> dict[str, Any]:
    """The machine the bench runs on: cores, CPU model, OS, Python and library versions."""
    from .._version import __version__

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "cpus": os.cpu_count(),
        "cpus_usable": usable,
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "litert": _version("ai-edge-litert"),
        "numpy": _version("numpy"),
        "conveyor": __version__,
        "load_average_1m": round(load[0], 2),
    }
