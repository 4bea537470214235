"""conveyor bench: a tiny run on each device gives the object the issue describes."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

import conveyor.cli
from conveyor._bench import _designs
from conveyor._bench._measure import Result, Timeline, busy_within, percentiles_ms
from conveyor._bench._plot import _gaps
from conveyor._bench._report import as_json, table
from conveyor._cli.bench import _realtime
from conveyor._runtime._sched import probe_realtime

SCENARIOS = [
    "sequential",
    "asyncio",
    "threads",
    "threads_queues",
    "conveyor",
    "server_1",
    "server_4",
    "two_programs",
]
TOP = {"device", "model", "machine", "device_alone_items_per_s", "scenarios"}
FIELDS = ["items_per_s", "duty_cycle", "p50_ms", "p99_ms", "cpu_cores", "ratio_to_device_alone"]


def bench(capsys: pytest.CaptureFixture[str], *argv: str | os.PathLike[str],
          progress: bool = False) -> tuple[dict[str, Any], str]:
    """The bench's JSON and what it wrote on stderr."""
    quiet = [] if progress else ["--no-progress"]
    code = conveyor.cli.main(["bench", "--json", *quiet, *map(os.fspath, argv)])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    data: dict[str, Any] = json.loads(out)  # stdout is the JSON object and nothing else
    return data, err


def check_shape(data: dict[str, Any], device: str, items: int) -> None:
    assert set(data) == TOP
    assert data["device"] == device
    assert data["model"] == "face_detection_full_range"
    machine = data["machine"]
    assert machine["cpus_usable"] >= 1 and machine["python"] and machine["litert"]
    alone = data["device_alone_items_per_s"]
    assert alone > 0
    assert list(data["scenarios"]) == SCENARIOS
    for name, s in data["scenarios"].items():
        for field in FIELDS:
            assert isinstance(s[field], (int, float)), (name, field)
        assert s["items"] == items, name
        assert s["items_per_s"] > 0, name
        assert 0.0 < s["duty_cycle"] <= 1.0 + 1e-3, name
        assert s["duty_cycle"] <= s["duty_cycle_calls"] + 1e-3, name
        assert 0.0 < s["p50_ms"] <= s["p99_ms"], name
        assert s["cpu_cores"] >= 0.0, name
        # Each ratio is the scenario's items/s over the device alone (both rounded).
        assert s["ratio_to_device_alone"] == pytest.approx(s["items_per_s"] / alone, rel=1e-2)
    # Its speed beside conveyor over its speed alone (0.2 s of it in a short run, so other
    # load on the machine can push it over 1; a gross error in either rate would not pass).
    assert 0.0 <= data["scenarios"]["two_programs"]["other_program_speed"] <= 3.0


@pytest.mark.slow
def test_sim_edgetpu(capsys: pytest.CaptureFixture[str], tmp_path: Path, no_leaks: None,
                    monkeypatch: pytest.MonkeyPatch) -> None:
    from conveyor._bench import _programs

    png, trace = tmp_path / "bench", tmp_path / "trace.json"  # no extension: PNG
    traced: list[Path | None] = []  # where two_programs' pipeline wrote its trace

    def two_programs_pipeline(setup: Any, name: str) -> Any:
        traced.append(setup.trace)
        return _designs.conveyor_design(setup, name=name)

    monkeypatch.setattr(_programs, "conveyor_design", two_programs_pipeline)
    data, _ = bench(
        capsys, "--device", "sim-edgetpu", "--items", "40", "--plot", png, "--trace", trace
    )
    # --trace is the conveyor design's: two_programs wrote over it, the last design run
    assert traced == [None]
    check_shape(data, "sim-edgetpu", 40)
    assert data["machine"]["bench"]["device_run_ms"] > 0  # the simulation's own busy time
    assert data["machine"]["bench"]["background"] is True
    assert "(background)" in data["scenarios"]["conveyor"]["design"]
    assert "(background)" not in data["scenarios"]["two_programs"]["design"]
    # Device threads at SCHED_FIFO 1 where this machine allows it, and the JSON says which.
    assert data["machine"]["bench"]["realtime"] == probe_realtime(1)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # where the command said
    assert not list(tmp_path.glob("bench.*"))  # not renamed by matplotlib
    events = json.loads(trace.read_text())["traceEvents"]
    tracks = {e["tid"]: e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    assert any(t.startswith("preprocess") for t in tracks.values())
    # The measured items' runs only: the warm-up's are left out.
    (device,) = [tid for tid, t in tracks.items() if t.startswith("device")]
    assert sum(1 for e in events if e.get("ph") == "X" and e["tid"] == device) == 40


@pytest.mark.slow
def test_cpu(capsys: pytest.CaptureFixture[str], no_leaks: None, tmp_path: Path,
             monkeypatch: pytest.MonkeyPatch) -> None:
    # A temporary folder too deep for a Unix socket's path: the server's goes elsewhere.
    deep = tmp_path / ("d" * 90)
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    data, err = bench(capsys, "--device", "cpu", "--items", "24", "--python-ms", "0",
                      progress=True)
    check_shape(data, "cpu", 24)
    # No terminal here: progress comes as a line per step on stderr, not a bar.
    steps = [line for line in err.splitlines() if line.startswith("conveyor bench: [")]
    assert len(steps) == len(SCENARIOS) + 1 and "[1/9] device alone:" in steps[0]
    assert all(f"] {name}: " in line for name, line in zip(SCENARIOS, steps[1:]))
    # The CPU's device thread computes: no real-time priority unless asked for.
    assert data["machine"]["bench"]["realtime"] == "normal"
    # On the CPU the device's own account is the time around each call.
    for s in data["scenarios"].values():
        assert s["duty_cycle"] == pytest.approx(s["duty_cycle_calls"], abs=1e-3)


def test_realtime_by_default_only_where_the_device_thread_waits() -> None:
    assert [_realtime("auto", d) for d in ("cpu", "cpu:1", "onnx:cpu", "auto")] == [0] * 4
    assert [_realtime("auto", d) for d in ("sim-edgetpu", "edgetpu:usb", "onnx:cuda")] == [1] * 3
    assert (_realtime("on", "cpu"), _realtime("off", "sim-edgetpu")) == (1, 0)


@pytest.mark.parametrize(("option", "where", "why"), [
    ("--plot", "missing/b.png", "no such directory"),
    ("--trace", "missing/t.json", "no such directory"),
    ("--plot", ".", "is a directory"),
    ("--plot", "b.txt", "cannot write .txt images"),
])
def test_unwritable_output_is_refused_before_the_run(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, option: str, where: str,
        why: str) -> None:
    t0 = time.monotonic()
    assert conveyor.cli.main(["bench", option, str(tmp_path / where)]) == 2
    assert time.monotonic() - t0 < 5  # refused at once, not after the benchmark
    assert why in capsys.readouterr().err


def test_a_trace_on_a_file_system_that_refuses_files_is_refused_before_the_run(
        capsys: pytest.CaptureFixture[str]) -> None:
    # /proc has the folder and lets root "write" it, yet no file can be made there: the
    # run used to end in a traceback when the conveyor design closed, and print nothing
    t0 = time.monotonic()
    assert conveyor.cli.main(["bench", "--trace", "/proc/conveyor-trace.json"]) == 2
    assert time.monotonic() - t0 < 5
    assert "--trace /proc/conveyor-trace.json: No such file or directory" in (
        capsys.readouterr().err)


def test_checking_an_output_path_leaves_no_file_and_keeps_one_there(tmp_path: Path) -> None:
    from conveyor._cli.bench import _unwritable

    new, old = tmp_path / "new.json", tmp_path / "old.json"
    old.write_text("kept")
    assert _unwritable(new) == "" and not new.exists()
    assert _unwritable(old) == "" and old.read_text() == "kept"


@pytest.mark.parametrize(("argv", "says"), [
    (["--items", "0"], "--items must be a number of at least 1, got 0"),
    (["--workers", "-2"], "--workers must be a number of at least 0, got -2"),
    (["--python-ms", "-0.5"], "--python-ms must be a number of at least 0, got -0.5"),
    (["--python-ms", "nan"], "--python-ms must be a number of at least 0, got nan"),
    (["--python-ms", "inf"], "--python-ms must be a number of at least 0, got inf"),
    (["--device", "sim-edgetpu:nosuch"], "unknown simulation profile"),
    (["--device", "cpu:0"], "invalid device spec 'cpu:0'"),
    (["--nice", "-5"], "--nice must be 0 to 19, got -5"),  # was run, and reported, as is
    (["--nice", "20"], "--nice must be 0 to 19, got 20"),
])
def test_bad_numbers_name_the_option(capsys: pytest.CaptureFixture[str], argv: list[str],
                                     says: str) -> None:
    assert conveyor.cli.main(["bench", *argv]) == 2
    assert says in capsys.readouterr().err


def test_a_device_that_cannot_be_opened_exits_2_as_detect_does(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from conveyor.backends import open_device

    held = open_device("sim-edgetpu")  # the bench cannot open it: it is in use
    try:
        assert conveyor.cli.main(["bench", "--device", "sim-edgetpu", "--items", "10",
                                  "--no-progress"]) == 2
    finally:
        held.close()
    assert "already open" in capsys.readouterr().err


def test_bad_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert conveyor.cli.main(["bench", "--model", "face_landmark"]) == 2
    assert "--model must be one of" in capsys.readouterr().err


def test_busy_within_clips_to_the_window() -> None:
    spans = [(0, 10), (20, 30), (40, 50)]
    assert busy_within(spans, 5, 45) == 5 + 10 + 5
    assert busy_within(spans, 60, 70) == 0
    assert _gaps([(2.0, 3.0), (7.0, 1.0)], 10.0) == [(0.0, 2.0), (5.0, 2.0), (8.0, 2.0)]


def test_summary_and_table() -> None:
    timeline = Timeline()
    timeline.add("device", [(0, 500_000_000)])
    timeline.add("device calls", [(0, 600_000_000)])
    result = Result(
        "conveyor", 100, 0, 1_000_000_000, [1_000_000] * 99 + [9_000_000], 1.5, timeline
    )
    alone = Result("device_alone", 200, 0, 1_000_000_000, [], 0.5, Timeline())
    data = as_json("sim-edgetpu", "m", {}, alone, [result])
    s = data["scenarios"]["conveyor"]
    assert s["items_per_s"] == 100 and s["ratio_to_device_alone"] == 0.5
    assert s["duty_cycle"] == 0.5 and s["duty_cycle_calls"] == 0.6
    assert s["cpu_cores"] == 1.5
    assert percentiles_ms([1_000_000] * 99 + [9_000_000]) == pytest.approx((1.0, 1.08))
    text = table(data)
    assert text.splitlines()[0].split()[:2] == ["scenario", "items/s"]
    assert "device alone" in text and "conveyor" in text and "50%" in text


@pytest.mark.parametrize("where", ["prepare", "finish"])
def test_thread_design_error_stops_every_thread(
    monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """An error in a CPU thread or in the caller ends the design with that error, no hang."""
    import threading

    from conveyor._bench import _designs
    from conveyor._bench._workload import Workload

    real = getattr(_designs, where)
    calls = 0

    def flaky(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 30:
            raise ValueError(f"{where} broke")
        return real(*args)

    monkeypatch.setattr(_designs, where, flaky)
    setup = _designs.Setup("cpu", Workload("short"), items=200, workers=2, warmup=0)
    before = set(threading.enumerate())
    with pytest.raises(ValueError, match=f"{where} broke"):
        _designs.threads_queues(setup)
    assert set(threading.enumerate()) <= before


@pytest.mark.slow
def test_sigterm_ends_a_bench_at_once_with_143_and_leaves_nothing() -> None:
    import signal
    import subprocess
    import sys

    import psutil

    proc = subprocess.Popen(
        [sys.executable, "-m", "conveyor", "bench", "--device", "sim-edgetpu", "--items",
         "100000", "--no-progress"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(3.0)  # well inside its first design
        helpers = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.01)  # timeout(1) sends a second one, to the process group
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 143  # 128 + SIGTERM, as a shell reports it
        _, alive = psutil.wait_procs(helpers, timeout=5)
        assert not alive
        assert proc.stderr is not None
        err = proc.stderr.read().decode()
        assert "Traceback" not in err and "Exception ignored" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def test_an_unknown_option_is_refused_with_the_sub_commands_usage(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        conveyor.cli.main(["bench", "--bogus", "1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: conveyor bench") and "unrecognized arguments: --bogus 1" in err


def test_an_interrupt_inside_a_coroutine_is_not_logged_as_never_retrieved(
        caplog: pytest.LogCaptureFixture) -> None:
    # The bench's SIGTERM raises KeyboardInterrupt in whichever task runs: under
    # asyncio.run the asyncio design's end printed "Task exception was never retrieved"
    # and a traceback, though the bench then stopped cleanly.
    import asyncio
    import gc

    tasks: list[asyncio.Task[None]] = []

    async def worker(n: int) -> None:
        await asyncio.sleep(0.01 * n)
        if n == 1:
            raise KeyboardInterrupt("SIGTERM")
        await asyncio.sleep(10)

    async def main() -> None:
        tasks.extend(asyncio.ensure_future(worker(n)) for n in range(3))
        await asyncio.gather(*tasks)

    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        _designs._run_loop(main(), tasks)
    assert time.monotonic() - t0 < 5  # the others were cancelled, not waited for
    tasks.clear()
    gc.collect()
    assert "never retrieved" not in caplog.text


@pytest.mark.parametrize("argv", [["models"], ["devices"], ["models", "face_landmark"]])
def test_output_to_a_full_disk_is_one_line_not_a_traceback(argv: list[str]) -> None:
    # `conveyor models > /dev/full` said "cannot read None"; bench and others gave a
    # traceback after the whole run.
    import subprocess
    import sys

    with open("/dev/full", "w") as full:
        out = subprocess.run([sys.executable, "-m", "conveyor", *argv], stdout=full,
                             stderr=subprocess.PIPE, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.splitlines()[-1] == (
        "conveyor: cannot write the output: No space left on device"), out.stderr
    assert "Traceback" not in out.stderr


def test_a_pipe_as_the_trace_is_not_opened_to_check_it(tmp_path: Path) -> None:
    # The check opened the path: a FIFO with no reader yet blocked the bench for good,
    # and a pipe's reader saw its input end before the trace was written. A device or a
    # socket is still tried (a socket cannot be opened at all).
    import socket

    from conveyor._cli.bench import _unwritable

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    assert _unwritable(fifo) == "" and _unwritable(Path("/dev/null")) == ""
    assert time.monotonic() - t0 < 1
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "sock"))
        assert _unwritable(tmp_path / "sock") == "No such device or address"


@pytest.mark.parametrize("option", ["--trace", "--plot"])
def test_an_empty_output_path_is_refused_as_such(option: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # Path("") is ".": "--trace .: is a directory".
    with pytest.raises(SystemExit) as info:
        conveyor.cli.main(["bench", option, ""])
    assert info.value.code == 2
    assert "an empty path names no file" in capsys.readouterr().err


@pytest.mark.slow
def test_a_trace_that_cannot_be_written_leaves_the_results(tmp_path: Path) -> None:
    # The bench wrote its trace where --trace said and read it back from there: from a
    # pipe that hung, /dev/null gave a JSONDecodeError, and a full disk ended the run
    # with "cannot write the output" and no results.
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "conveyor", "bench", "--device", "sim-edgetpu", "--items",
         "10", "--json", "--no-progress", "--trace", "/dev/full"],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr
    assert "cannot write the trace /dev/full: No space left on device" in out.stderr
    assert set(json.loads(out.stdout)["scenarios"]) >= {"conveyor", "threads_queues"}


def test_a_device_that_cannot_be_opened_exits_2(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    # libedgetpu failing to open a present device raises a plain DeviceError: the bench
    # exited 1 where detect, demo and serve exit 2.
    from conveyor import DeviceError
    from conveyor._bench import _suite

    def cannot_open(*args: Any, **kwargs: Any) -> Any:
        raise DeviceError("libedgetpu could not open Edge TPU usb:0")

    monkeypatch.setattr(_suite, "run_suite", cannot_open)
    assert conveyor.cli.main(["bench", "--device", "cpu"]) == 2
    assert "libedgetpu could not open" in capsys.readouterr().err
