"""The designs made of several programs: clients of a device server, and a device program
with an unrelated CPU-bound program beside it.

Each helper program is a child Python process spoken to by lines: it prints ``ready`` when
set up, acts on a line from its standard input, prints one JSON line of results, and exits
when its standard input closes. Every wait on one has a deadline; on any failure every
program started here is killed and reaped before the error propagates.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

from .._device._client import SOCKET_PATH_MAX
from .._errors import ConveyorError
from ._designs import Setup, conveyor_design
from ._hog import chunks_per_s
from ._measure import Result, Span, Timeline, cpu_seconds

__all__ = ["BenchProgramError", "server_design", "two_programs"]

#: Seconds a helper program may take to start (imports, model load) or to answer.
START_TIMEOUT = 60.0


class BenchProgramError(ConveyorError):
    """A helper program of the bench failed; the message has the end of its stderr."""


class _Program:
    """A child ``python -m MODULE`` with line-based stdin/stdout and stderr kept aside.

    A reader thread moves stdout lines into a queue; lines ``+N`` are progress reports and
    go to ``on_progress`` instead. It is stopped by closing its standard input.
    """

    def __init__(
        self,
        module: str,
        args: list[str],
        on_progress: Callable[[int], None] | None = None,
    ) -> None:
        self.module = module
        # Kept open for the child's whole life; closed by close().
        self._err: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        # The child imports conveyor from where this process found it.
        here = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": path}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            env=env,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._progress = on_progress
        self._reader = threading.Thread(target=self._read, name=f"bench-{module}", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode().strip()
            if line.startswith("+") and line[1:].isdigit():
                if self._progress is not None:
                    self._progress(int(line[1:]))
                continue
            self._lines.put(line)
        self._lines.put(None)

    def _fail(self, why: str) -> BenchProgramError:
        self._err.seek(0)
        tail = self._err.read().decode(errors="replace").strip().splitlines()[-15:]
        return BenchProgramError(
            f"bench helper {self.module} (pid {self.pid}) {why}"
            + ("\n" + "\n".join(tail) if tail else "")
        )

    def line(self, timeout: float = START_TIMEOUT) -> str:
        """The next line it printed. Blocks at most ``timeout`` seconds.

        Raises:
            BenchProgramError: it exited first or did not answer in time.
        """
        try:
            got = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise self._fail(f"did not answer within {timeout:.0f} s") from None
        if got is None:
            self.proc.wait(timeout=5.0)
            raise self._fail(f"exited with status {self.proc.returncode}")
        return got

    def expect_ready(self, prefix: str = "ready") -> None:
        """Wait for a line starting with ``prefix``; raises BenchProgramError otherwise."""
        got = self.line()
        if not got.startswith(prefix):
            raise self._fail(f"said {got[:200]!r} instead of {prefix!r}")

    def send(self, text: str) -> None:
        """Write one line to its standard input."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def last_words(self, timeout: float = START_TIMEOUT) -> Any:
        """Close its standard input and return the JSON line it prints before exiting."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return json.loads(self.line(timeout))

    def close(self, timeout: float = 5.0) -> None:
        """Close its standard input so that it exits, wait ``timeout``, then
        kill; reaps it. Idempotent."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=timeout)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._err.close()


def _start(
    stack: ExitStack,
    module: str,
    args: list[str],
    on_progress: Callable[[int], None] | None = None,
) -> _Program:
    program = _Program(module, args, on_progress)
    stack.callback(program.close)
    return program


def _start_server(stack: ExitStack, setup: Setup, path: Path) -> _Program:
    """``conveyor serve`` for the design's device and model on ``path``, once it listens."""
    args = [
        "serve",
        "--device",
        setup.device,
        "--model",
        setup.work.model,
        "--socket",
        str(path),
        "--log-level",
        "warning",
        "--exit-with-stdin",  # it stops when the bench closes the pipe, or dies
    ]
    if setup.realtime:
        args += ["--realtime", str(setup.realtime)]
    server = _start(stack, "conveyor", args)
    server.expect_ready("conveyor serve: listening on")
    return server


def _socket_dir(stack: ExitStack) -> Path:
    """A private folder for the server's socket, removed when ``stack`` closes: in the
    temporary folder, unless a socket path there would be too long for ``AF_UNIX`` (a
    long ``TMPDIR``); then in ``/tmp``."""
    prefix = "conveyor-bench-"
    base = tempfile.gettempdir()
    # TemporaryDirectory adds 8 characters to the prefix; the socket is "device.sock".
    longest = len(os.fsencode(os.path.join(base, prefix + "x" * 8, "device.sock")))
    where = base if longest <= SOCKET_PATH_MAX else "/tmp"
    return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix, dir=where)))


def server_design(setup: Setup, clients: int) -> Result:
    """``clients`` separate programs share the device through a device server.

    The server is ``conveyor serve``. Each client prepares and finishes its own items and
    keeps two requests in flight (see :mod:`._client`). The window runs from telling every
    client to go to the last client's last result.
    """
    name = f"server_{clients}"
    work = json.dumps(dataclasses.asdict(setup.work))
    shares = [
        setup.items // clients + (1 if c < setup.items % clients else 0) for c in range(clients)
    ]
    with ExitStack() as stack:
        path = _socket_dir(stack) / "device.sock"
        _start_server(stack, setup, path)
        programs = []
        for c, share in enumerate(shares):
            programs.append(
                _start(
                    stack,
                    "conveyor._bench._client",
                    [
                        "--socket",
                        str(path),
                        "--work",
                        work,
                        "--first",
                        str(c * 1_000_003),
                        "--items",
                        str(share),
                        "--warmup",
                        str(max(2, setup.warmup // clients)),
                    ],
                    setup.progress,
                )
            )
        for p in programs:
            p.expect_ready()
        cpu0 = cpu_seconds(setup.exclude)
        start = time.monotonic_ns()
        for p in programs:
            p.send("go")
        reports = [json.loads(p.line(timeout=START_TIMEOUT + setup.items)) for p in programs]
        end = max(r["end"] for r in reports)
        cpu = cpu_seconds(setup.exclude) - cpu0
    timeline = Timeline()
    device: list[Span] = []
    latencies: list[int] = []
    for c, r in enumerate(reports):
        device.extend((s, e) for s, e in r["device"])
        timeline.add(f"client {c}", [(s, e) for s, e in r["cpu"]])
        latencies.extend(r["latencies"])
    device.sort()
    timeline.add("device", setup.cap(device))
    timeline.add("device calls", device)
    return Result(
        name,
        len(latencies),
        start,
        end,
        latencies,
        cpu,
        timeline,
        f"{clients} client process{'es' if clients > 1 else ''} "
        f"(prepare, 2 requests in flight, finish) + device server process",
    )


def _hog_rate(stack: ExitStack) -> tuple[_Program, int]:
    hog = _start(stack, "conveyor._bench._hog", [])
    hog.expect_ready()
    return hog, time.monotonic_ns()


def two_programs(setup: Setup, alone_s: float | None = None) -> Result:
    """conveyor's design while a separate CPU-bound Python program runs beside it.

    First the other program runs alone for ``alone_s`` seconds (default: 1, or 0.3 for a
    run of fewer than 500 items) to learn its speed; then
    again while the conveyor scenario runs. Reports the device program's figures (its
    CPU time excludes the other program's) and, as ``other_program_speed``, the other
    program's speed in the window relative to its speed alone.
    """
    if alone_s is None:
        alone_s = 1.0 if setup.items >= 500 else 0.3
    with ExitStack() as stack:
        hog, started = _hog_rate(stack)
        # Measuring a rate needs a stretch of time: this sleep is the measurement.
        time.sleep(alone_s)
        stop = time.monotonic_ns()
        alone = chunks_per_s(hog.last_words(), started + 100_000_000, stop)
    with ExitStack() as stack:
        hog, _ = _hog_rate(stack)
        # Normal priority: at idle priority the preparing processes would leave every
        # core to the other program.
        # Its own trace, not the one --trace names: that is the conveyor design's.
        mine = dataclasses.replace(setup, exclude=(*setup.exclude, hog.pid), background=False,
                                   trace=None)
        result = conveyor_design(mine, name="two_programs")
        ends: list[int] = hog.last_words()
    during = chunks_per_s(ends, result.start_ns, result.end_ns)
    result.extra["other_program_speed"] = during / alone if alone > 0 else 0.0
    result.notes = (
        "conveyor as above (preparing at normal priority), beside a separate pure-Python "
        "CPU-bound program; "
        "other_program_speed: its speed then / alone"
    )
    return result
