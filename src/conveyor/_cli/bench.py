"""Measure how busy the device stays, and how many items get done, under each design.

The same face-detection workload (MediaPipe BlazeFace: letterbox, resize and normalise,
plus --python-ms of the application's own Python per item; the model; anchor decoding and
weighted NMS) runs under each design, one after another:

  sequential      one loop, one step after another
  asyncio         coroutines in one event loop, the device via run_in_executor
  threads         a CPU thread and a device thread
  threads_queues  a CPU thread per core and a device thread, bounded queues
  conveyor        conveyor's pipeline: a process per core prepares, a device worker runs
  server_1        one client program of a device server (conveyor serve)
  server_4        four client programs sharing the device through the server
  two_programs    conveyor beside a separate CPU-bound Python program

For each: items/s, the device's duty cycle (its busy time over the run), p50 and p99
latency per item, and CPU use in cores; and the device alone (the model back to back:
the physical bound) with each design's ratio to it. A progress bar runs on stderr (a
line per design where stderr is not a terminal); a table is printed at the end, or with
--json the JSON object only:

  {"device", "model", "machine", "device_alone_items_per_s",
   "scenarios": {NAME: {"items_per_s", "duty_cycle", "p50_ms", "p99_ms", "cpu_cores",
                        "ratio_to_device_alone", ...}}}

For the simulated Edge TPU the duty cycle is the simulated chip's own busy time; a late
wake-up of the program after a run counts as idle. The device is opened by one design at
a time: close other programs that hold it first.

On an accelerator, every design's device thread runs under SCHED_FIFO 1 where the OS
allows it (root, CAP_SYS_NICE or `ulimit -r`), so that none waits for a core after a run;
the title line says what was in force. --no-realtime compares without.

examples:
  conveyor bench --device sim-edgetpu
  conveyor bench --device sim-edgetpu --json > bench.json
  conveyor bench --device cpu --items 500 --plot bench.png
  conveyor bench --device edgetpu --model short --trace conveyor.json
  conveyor bench --device sim-edgetpu:rpi4 --python-ms 3
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .._errors import ConveyorError, DeviceError, ModelError
from ..backends._spec import parse_device

#: What makes the bench exit 2, as detect and demo do: the device or model cannot be opened.
_CANNOT_OPEN = (DeviceError, ModelError)  # DeviceError: libedgetpu could not open it too

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``conveyor bench``'s arguments on ``parser``."""
    parser.add_argument(
        "--device",
        metavar="SPEC",
        default="cpu",
        help="device to measure (default: cpu); e.g. sim-edgetpu, edgetpu",
    )
    parser.add_argument(
        "--model",
        metavar="NAME",
        default="full",
        help="face detector: full (192x192, default) or short (128x128), or its bundled model name",
    )
    parser.add_argument(
        "--items",
        metavar="N",
        type=int,
        default=2000,
        help="items per design (default: 2000; a minute or so in all)",
    )
    parser.add_argument(
        "--python-ms",
        metavar="MS",
        type=float,
        default=1.0,
        help="pure-Python work per item in the preparing step, holding the "
        "GIL, as application code does (default: 1.0; 0 for none)",
    )
    parser.add_argument(
        "--workers",
        metavar="N",
        type=int,
        default=0,
        help="CPU workers of the designs that have several (default, or 0: the usable cores)",
    )
    parser.add_argument(
        "--nice",
        metavar="N",
        type=int,
        default=0,
        help="lower the priority of CPU-only workers by N in every design (default: 0)",
    )
    parser.add_argument(
        "--no-background",
        action="store_true",
        help="run conveyor's preparing processes at normal priority (default: idle "
        "priority, stage(..., background=True), so the device worker never waits for a "
        "core behind them)",
    )
    when = parser.add_mutually_exclusive_group()
    when.add_argument(
        "--realtime",
        dest="realtime",
        action="store_const",
        const="on",
        default="auto",
        help="run every design's device thread under SCHED_FIFO 1 where the OS allows it "
        "(default for accelerators; the JSON's machine.bench.realtime says what was in "
        "force). Not the default for the CPU device, whose device thread computes: at "
        "real-time priority it crowds the other threads off its core",
    )
    when.add_argument(
        "--no-realtime",
        dest="realtime",
        action="store_const",
        const="off",
        help="every design's device thread at normal priority",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON only")
    parser.add_argument(
        "--trace",
        metavar="FILE",
        type=_file_path,
        help="write a Chrome trace of the conveyor design's measured items, without the "
             "warm-up (open in Perfetto)",
    )
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        type=_file_path,
        help="draw the timelines of the device and the CPU workers (sequential, asyncio, "
             "threads, threads_queues, conveyor) and a bar chart of items/s into an image "
             "(PNG; .svg or .pdf by extension)",
    )
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar or progress lines")


def run(args: argparse.Namespace) -> int:
    """Run the bench; 0 on success, 2 on a bad argument or a device or model that cannot
    be opened, 1 if it could not run for another reason."""
    from .._bench._suite import Options, detector_name, run_suite

    try:
        detector_name(args.model)
    except ValueError as exc:
        print(f"conveyor bench: {exc}", file=sys.stderr)
        return 2
    for option, value, least in (("--items", args.items, 1), ("--workers", args.workers, 0),
                                 ("--python-ms", args.python_ms, 0)):
        if not (math.isfinite(value) and value >= least):  # nan and inf too
            print(f"conveyor bench: {option} must be a number of at least {least}, "
                  f"got {value:g}", file=sys.stderr)
            return 2
    if not 0 <= args.nice <= 19:  # a lower priority only, as nice(1) gives one
        print(f"conveyor bench: --nice must be 0 to 19, got {args.nice}", file=sys.stderr)
        return 2
    try:
        parse_device(args.device)
    except ConveyorError as exc:
        print(f"conveyor bench: {exc}", file=sys.stderr)
        return 2
    for option, path in (("--trace", args.trace), ("--plot", args.plot)):
        why = _unwritable(path)
        if why:  # found out now, not after a minute of benchmarking
            print(f"conveyor bench: {option} {path}: {why}", file=sys.stderr)
            return 2
    if args.plot is not None:
        try:
            from .._bench._plot import plot_format

            plot_format(args.plot)
        except ModuleNotFoundError:
            print(
                "conveyor bench: --plot needs matplotlib: pip install 'conveyor[plot]'",
                file=sys.stderr,
            )
            return 2
        except ValueError as exc:
            print(f"conveyor bench: --plot {args.plot}: {exc}", file=sys.stderr)
            return 2
    opts = Options(
        device=args.device,
        model=args.model,
        items=args.items,
        python_ms=args.python_ms,
        workers=args.workers,
        nice=args.nice,
        background=not args.no_background,
        realtime=_realtime(args.realtime, args.device),
        trace=args.trace,
    )
    # SIGTERM ends the bench as Ctrl-C does (conveyor.cli sets that up): every helper
    # program and folder it started is stopped and removed on the way out.
    try:
        outcome = run_suite(opts, progress=not args.no_progress)
    except ConveyorError as exc:
        print(f"conveyor bench: {exc}", file=sys.stderr)
        # As detect and demo: 2 when the device or model cannot be opened at all.
        return 2 if isinstance(exc, _CANNOT_OPEN) else 1
    data = outcome.data
    trace_failed = plot_failed = False
    if args.trace is not None:
        recorded = next((r.trace for r in outcome.results if r.trace is not None), None)
        try:
            with open(args.trace, "wb") as f:  # a pipe or a device too
                f.write(recorded or b"")
        except OSError as exc:  # the results are still printed below
            print(f"conveyor bench: cannot write the trace {args.trace}: "
                  f"{exc.strerror or exc}", file=sys.stderr)
            trace_failed = True
    if args.plot is not None:
        from .._bench._plot import plot

        try:
            plot(args.plot, outcome.results, outcome.alone.items_per_s, title=_title(data))
        except (OSError, ValueError) as exc:  # the results are still printed below
            print(f"conveyor bench: cannot write the plot {args.plot}: {exc}", file=sys.stderr)
            plot_failed = True
    if args.json:
        print(json.dumps(data, indent=2))
        return int(trace_failed or plot_failed)
    from .._bench._report import headline, table

    print(_title(data))
    print(table(data))
    line = headline(data)
    if line:
        print(line)
    other = data["machine"].get("other_load_cores", 0.0)
    if other > 0.25:
        print(
            f"note: other programs used {other:.2f} cores while the bench ran; "
            f"the figures are noisier for it",
            file=sys.stderr,
        )
    if args.trace is not None and not trace_failed:
        print(f"trace of the conveyor design: {args.trace}")
    if args.plot is not None and not plot_failed:
        print(f"plot: {args.plot}")
    return int(trace_failed or plot_failed)


def _file_path(text: str) -> Path:
    """An argparse type: a file's path, not empty (Path("") is the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path names no file")
    return Path(text)


def _unwritable(path: Path | None) -> str:
    """Why a file cannot be written at ``path`` ("" if it can, or no path was given).

    The file is opened for appending (and removed again if that created it), so a
    read-only or pseudo file system is found out too, not only a missing folder.
    """
    if path is None:
        return ""
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        return "is a directory"
    if not parent.is_dir():
        return f"no such directory {parent}"
    from .._runtime._stats import probe_writable

    try:
        probe_writable(path)
    except OSError as exc:
        return exc.strerror or str(exc)
    return ""


def _realtime(choice: str, device: str) -> int:
    """The device threads' SCHED_FIFO priority for ``--realtime``/``--no-realtime``/neither."""
    if choice == "auto":
        from ..backends import parse_device

        try:
            spec = parse_device(device)
        except ConveyorError:
            return 0  # the bench reports the bad spec when it opens the device
        on_host = spec.kind in ("cpu", "auto") or (spec.kind == "onnx" and spec.bus == "cpu")
        return 0 if on_host else 1
    return 1 if choice == "on" else 0


def _title(data: dict[str, object]) -> str:
    machine = data["machine"]
    assert isinstance(machine, dict)
    bench = machine["bench"]
    sim = " (simulation)" if str(data["device"]).startswith("sim-") else ""
    # the reason a real-time request was refused is in the JSON; a picture's title has no room
    realtime = str(bench["realtime"]).split(" (", 1)[0]
    if "refused" in str(bench["realtime"]):
        realtime += " (real-time refused)"
    return (
        f"conveyor bench: {data['model']} on {data['device']}{sim}, "
        f"{machine['cpus_usable']} cores ({machine['cpu_model']})\n"
        f"{bench['items']} item{'' if bench['items'] == 1 else 's'} per design; "
        f"prepare = letterbox + "
        f"{bench['prepare_python_ms']:g} ms of Python per item; "
        f"{bench['cpu_workers']} CPU workers; device threads {realtime}"
    )
