"""Run every design in order on one device and gather the results."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._runtime._sched import probe_realtime
from ..apps.faces import DETECTORS
from ._designs import (
    Setup,
    asyncio_design,
    conveyor_design,
    device_alone,
    sequential,
    threads,
    threads_queues,
    usable_cores,
)
from ._measure import Result, cpu_seconds, machine_busy_seconds, machine_facts
from ._programs import server_design, two_programs
from ._report import as_json
from ._workload import Workload, calibrate_python_loops

__all__ = ["SCENARIOS", "Options", "Outcome", "detector_name", "run_suite"]

#: Every scenario, in the order they run and are reported.
SCENARIOS: dict[str, Callable[[Setup], Result]] = {
    "sequential": sequential,
    "asyncio": asyncio_design,
    "threads": threads,
    "threads_queues": threads_queues,
    "conveyor": conveyor_design,
    "server_1": lambda setup: server_design(setup, 1),
    "server_4": lambda setup: server_design(setup, 4),
    "two_programs": two_programs,
}


def detector_name(model: str) -> str:
    """``"short"`` or ``"full"`` for a detector's short name or its bundled model's name.

    Raises:
        ValueError: any other model (the message lists the choices).
    """
    for name, config in DETECTORS.items():
        if model in (name, config.model):
            return name
    choices = ", ".join(f"{n} ({c.model})" for n, c in DETECTORS.items())
    raise ValueError(
        f"the bench runs face detection: --model must be one of {choices}; got {model!r}"
    )


@dataclass(frozen=True)
class Options:
    """What to run: see ``conveyor bench --help`` for each."""

    device: str = "cpu"
    model: str = "full"
    items: int = 2000
    python_ms: float = 1.0
    workers: int = 0  # 0: the usable cores
    nice: int = 0
    background: bool = True
    realtime: int = 1
    trace: Path | None = None
    warmup: int = 16


@dataclass
class Outcome:
    """The device alone, every scenario's result, and the JSON object."""

    alone: Result
    results: list[Result]
    data: dict[str, Any]


def run_suite(opts: Options, *, progress: bool = True) -> Outcome:
    """Run the device alone and every scenario, with a progress bar on stderr.

    Blocks for the whole bench (about a minute at the default size).

    Raises:
        ValueError: a bad option.
        ConveyorError: the device or model cannot be opened, or a scenario failed.
    """
    from tqdm import tqdm

    if opts.items < 1:
        raise ValueError(f"--items must be at least 1, got {opts.items}")
    detector = detector_name(opts.model)
    loops = calibrate_python_loops(opts.python_ms)
    work = Workload(detector, loops, opts.python_ms, opts.nice)
    workers = opts.workers or usable_cores()
    runs = max(100, opts.items // 4)
    bar = tqdm(
        total=runs + opts.items * len(SCENARIOS),
        unit="item",
        file=sys.stderr,
        disable=not progress or None,
        leave=False,
        dynamic_ncols=True,
    )
    # Without a terminal (CI, a pipe) tqdm stays silent: say each step in a line instead.
    lines = progress and bar.disable
    steps = len(SCENARIOS) + 1

    def said(step: int, name: str, result: Result) -> None:
        if lines:
            print(f"conveyor bench: [{step}/{steps}] {name}: {result.items_per_s:.1f} "
                  f"items/s, device busy {100 * result.duty_cycle:.0f}%",
                  file=sys.stderr, flush=True)
    setup = Setup(
        opts.device,
        work,
        opts.items,
        workers,
        warmup=opts.warmup,
        progress=bar.update,
        trace=opts.trace,
        background=opts.background,
        realtime=opts.realtime,
    )
    machine = machine_facts()
    scheduling = probe_realtime(opts.realtime)  # what the device threads get
    busy0, mine0, t0 = machine_busy_seconds(), cpu_seconds(), time.monotonic()
    try:
        bar.set_description("device alone")
        alone = device_alone(setup, runs)
        bar.update(runs)
        said(1, "device alone", alone)
        results = []
        for step, (name, design) in enumerate(SCENARIOS.items(), 2):
            bar.set_description(name)
            results.append(design(setup))
            said(step, name, results[-1])
    finally:
        bar.close()
    wall = time.monotonic() - t0
    other = (machine_busy_seconds() - busy0) - (cpu_seconds() - mine0)
    machine["other_load_cores"] = round(max(other, 0.0) / wall, 3)
    machine["bench"] = {
        "items": opts.items,
        "detector": detector,
        "prepare_python_ms": opts.python_ms,
        "prepare_python_loops": loops,
        "cpu_workers": workers,
        "nice": opts.nice,
        "background": opts.background,
        "realtime": scheduling,
        "wall_s": round(wall, 1),
        "device_run_ms": None if setup.run_ns is None else round(setup.run_ns / 1e6, 4),
    }
    data = as_json(opts.device, work.model, machine, alone, results)
    return Outcome(alone, results, data)
