"""Pipeline runtime benchmark (issue 3): conveyor against threads + queues, same run.

A CPU-bound Python pre-processing stage feeds the face detection model; post-processing
decodes anchors and merges detections. The same work runs twice, one design after the
other, for each amount of pure-Python work per item (``--python-ms``, holding the GIL):

- ``threads_queues``: one CPU thread per core prepares items into a bounded queue, one
  device thread runs the model, the caller finishes;
- ``conveyor``: a process stage with one worker per core, the inference stage in its
  device worker process, the caller finishes.

It prints items/s of each, the ratio, and the device's duty cycle, and checks the targets:
conveyor at least 1.5x threads + queues, and the device busy at least 95% of the time
when the CPU stages can keep up (their capacity, one worker per core, is at least the
device's rate; measured here, not assumed). Not a test: it reports what it measures.

    PYTHONPATH=src python3 benchmarks/bench_pipeline.py
    PYTHONPATH=src python3 benchmarks/bench_pipeline.py --device cpu --python-ms 0 2
    PYTHONPATH=src python3 benchmarks/bench_pipeline.py --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from conveyor._bench._designs import (
    Setup,
    conveyor_design,
    device_alone,
    threads_queues,
    usable_cores,
)
from conveyor._bench._measure import cpu_seconds, machine_busy_seconds, machine_facts
from conveyor._bench._suite import detector_name
from conveyor._bench._workload import Workload, calibrate_python_loops, prepare
from conveyor._runtime._sched import probe_realtime

RATIO_TARGET = 1.5
DUTY_TARGET = 0.95


def prepare_ms(work: Workload, probe: int = 200) -> float:
    """Median milliseconds of one item's preparing step on this thread (machine idle)."""
    for i in range(8):
        prepare(work, i)
    times = []
    for i in range(probe):
        start = time.perf_counter()
        prepare(work, i)
        times.append(time.perf_counter() - start)
    return sorted(times)[probe // 2] * 1e3


def one(
    device: str, detector: str, python_ms: float, items: int, workers: int, realtime: int
) -> dict[str, Any]:
    """Both designs for one amount of Python work; a JSON-ready dict."""
    work = Workload(detector, calibrate_python_loops(python_ms), python_ms)
    setup = Setup(device, work, items, workers, realtime=realtime)
    alone = device_alone(setup)
    cost = prepare_ms(work)
    tq = threads_queues(setup)
    cv = conveyor_design(setup)
    capacity = workers / cost * 1e3
    keeps_up = capacity >= alone.items_per_s
    ratio = cv.items_per_s / tq.items_per_s
    return {
        "python_ms": python_ms,
        "prepare_ms": round(cost, 3),
        "device_alone_items_per_s": round(alone.items_per_s, 1),
        "cpu_capacity_items_per_s": round(capacity, 1),
        "cpu_keeps_up": keeps_up,
        "threads_queues": {
            "items_per_s": round(tq.items_per_s, 1),
            "duty_cycle": round(tq.duty_cycle, 3),
        },
        "conveyor": {
            "items_per_s": round(cv.items_per_s, 1),
            "duty_cycle": round(cv.duty_cycle, 3),
        },
        "ratio": round(ratio, 3),
        "ratio_target_met": ratio >= RATIO_TARGET,
        "duty_target_met": (cv.duty_cycle >= DUTY_TARGET) if keeps_up else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="sim-edgetpu", help="default: sim-edgetpu")
    parser.add_argument("--model", default="full", help="face detector: full or short")
    parser.add_argument("--items", type=int, default=1500)
    parser.add_argument("--python-ms", type=float, nargs="+", default=[0.0, 1.0, 3.0])
    parser.add_argument("--workers", type=int, default=0, help="default: the usable cores")
    parser.add_argument("--no-realtime", action="store_true",
                        help="device threads at normal priority in both designs (default: "
                        "SCHED_FIFO 1 where the OS allows it, as conveyor bench does)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    workers = args.workers or usable_cores()
    detector = detector_name(args.model)
    machine = machine_facts()
    realtime = 0 if args.no_realtime else 1
    machine["device_threads"] = probe_realtime(realtime)
    busy0, mine0, t0 = machine_busy_seconds(), cpu_seconds(), time.monotonic()
    rows = [one(args.device, detector, ms, args.items, workers, realtime)
            for ms in args.python_ms]
    other = (machine_busy_seconds() - busy0) - (cpu_seconds() - mine0)
    machine["other_load_cores"] = round(max(other, 0.0) / (time.monotonic() - t0), 3)
    if args.json:
        out = {
            "device": args.device,
            "model": detector,
            "workers": workers,
            "machine": machine,
            "runs": rows,
        }
        print(json.dumps(out, indent=2))
        return 0
    print(
        f"{args.device}, face detector {detector!r}, {workers} CPU workers, "
        f"{args.items} items per design; {machine['cpus_usable']} cores "
        f"({machine['cpu_model']}), Python {machine['python']}, LiteRT {machine['litert']}; "
        f"other programs used {machine['other_load_cores']} cores meanwhile; "
        f"device threads {machine['device_threads']}"
    )
    head = (
        "python ms",
        "prepare ms",
        "alone/s",
        "CPU cap/s",
        "thr+q/s",
        "busy",
        "conveyor/s",
        "busy",
        "ratio",
    )
    print("  ".join(f"{h:>10}" for h in head))
    for r in rows:
        cells = (
            r["python_ms"],
            r["prepare_ms"],
            r["device_alone_items_per_s"],
            r["cpu_capacity_items_per_s"],
            r["threads_queues"]["items_per_s"],
            f"{r['threads_queues']['duty_cycle']:.0%}",
            r["conveyor"]["items_per_s"],
            f"{r['conveyor']['duty_cycle']:.0%}",
            f"{r['ratio']:.2f}x",
        )
        print("  ".join(f"{c:>10}" for c in cells))
    for r in rows:
        duty = {None: "n/a (the CPU stages cannot keep up)", True: "met", False: "NOT met"}
        print(
            f"python {r['python_ms']:g} ms: ratio >= {RATIO_TARGET}x "
            f"{'met' if r['ratio_target_met'] else 'NOT met'}; device busy >= "
            f"{DUTY_TARGET:.0%} {duty[r['duty_target_met']]}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
