"""Helpers for the device-server tests (no tests here): servers in a subprocess or in a
thread, scripted fake devices, client subprocesses, and descriptor/mapping counts."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from conveyor import DeviceError
from conveyor._device._server import DeviceServer
from conveyor._tensors import TensorSpec
from conveyor.backends import Device, Runner, parse_device

SRC = Path(__file__).resolve().parents[1] / "src"
MODEL = "face_detection_short_range"
SHAPE = (1, 128, 128, 3)
#: A server whose requests take a while (~4 ms each): face_landmark on a USB 2 Edge TPU
#: (simulated), with its 1x192x192x3 float32 input.
SLOW = ("--device", "sim-edgetpu:usb2", "--model", "face_landmark")
LANDMARK_IN = (1, 192, 192, 3)


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(SRC) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return e


@contextlib.contextmanager
def socket_dir() -> Iterator[Path]:
    """A fresh directory for sockets (short: AF_UNIX paths are limited to 107 bytes);
    on exit, fails if a socket was left in it, and removes it."""
    path = Path(tempfile.mkdtemp(prefix="cvs-"))
    try:
        yield path
        left = [p.name for p in path.iterdir() if p.is_socket()]
        assert not left, f"sockets left behind: {left}"
    finally:
        shutil.rmtree(path, ignore_errors=True)


def wait_until(pred: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``pred`` (state of another process) until truthy; AssertionError on timeout."""
    end = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


# --- a `conveyor serve` subprocess --------------------------------------------------------


class ServeProcess:
    """``python -m conveyor serve`` with the given arguments; stderr goes to a file.

    Waits (bounded) for the ready line; the context exit kills it if it is still running.
    """

    def __init__(self, path: Path, *args: str, ready_timeout: float = 30.0) -> None:
        self.path = path
        where = path.parent if path.parent.exists() else path.parent.parent  # it makes one
        self.log_path = where / f"{path.name}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "conveyor", "serve", "--socket", str(path), *args],
            stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL, env=env(),
            text=True,
        )
        self.pid = self.proc.pid
        self.ready_line = ""
        if ready_timeout:
            self.wait_ready(ready_timeout)

    def wait_ready(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            if not sel.select(timeout):
                self.kill()
                raise AssertionError(f"conveyor serve not ready in {timeout} s: {self.log()}")
        finally:
            sel.close()
        self.ready_line = self.proc.stdout.readline()
        if not self.ready_line:
            self.proc.wait(10)
            raise AssertionError(f"conveyor serve exited ({self.proc.returncode}): {self.log()}")
        return self.ready_line

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def close(self) -> None:
        """Stop it as a user would (SIGTERM), or kill it if that takes too long."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- a DeviceServer in a thread of the test process ----------------------------------------


class ThreadServer:
    """A DeviceServer serving ``path`` from a thread; stopped (at once) on exit."""

    def __init__(self, path: Path, devices: Sequence[Device], models: Sequence[str],
                 **kwargs: Any) -> None:
        self.path = path
        self.server = DeviceServer(devices, models, **kwargs)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(64)
        self.server.add_listener(listener)
        self.server.socket_path = str(path)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="test-server", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.server.serve_forever()
        except BaseException as exc:
            self.error = exc

    def stop(self, drain: bool = False) -> None:
        self.server.shutdown(drain=drain)
        self.thread.join(10)
        assert not self.thread.is_alive(), "the server thread did not stop"
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def __enter__(self) -> ThreadServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        assert self.error is None, self.error


# --- scripted fake devices ---------------------------------------------------------------


def spec(name: str, shape: tuple[int, ...], dtype: str = "float32") -> TensorSpec:
    return TensorSpec(name, shape, np.dtype(dtype))


class FakeRunner(Runner):
    """Adds 1 to the input and sums it; sleeps ``delay`` s; records its runs on the device."""

    def __init__(self, device: FakeDevice, model: str) -> None:
        self.device = device
        self.model = model
        self.path = Path(model)
        self.inputs = (spec("x", (1, 4)),)
        self.outputs = (spec("y", (1, 4)), spec("s", (1,)))

    def run(self, arrays: Sequence[npt.NDArray[Any]]) -> list[npt.NDArray[Any]]:
        dev = self.device
        dev.started.set()
        with dev.lock:
            dev.runs.append((self.model, time.monotonic_ns(), float(arrays[0][0, 0])))
            n = len(dev.runs)
        if dev.gate is not None:
            assert dev.gate.wait(30), "gate never opened"
        if dev.fail_from is not None and n >= dev.fail_from:
            raise DeviceError(f"{dev.name} fell off the bus")
        delay = dev.delays.get(self.model, dev.delay)
        if delay:
            time.sleep(delay)
        x = np.asarray(arrays[0], dtype=np.float32)
        return [x + 1, np.array([x.sum()], dtype=np.float32)]


class FakeDevice(Device):
    """A device that knows ``models`` (any names), runs them with a delay, and can be made
    to hold its first run until ``gate`` is set, or to fail from its ``fail_from``-th run."""

    def __init__(self, name: str = "fake", models: Sequence[str] | None = None,
                 delay: float = 0.0, fail_from: int | None = None,
                 gate: threading.Event | None = None) -> None:
        self.spec = parse_device("cpu")
        self.name = name
        self.known = None if models is None else set(models)
        self.delay = delay
        self.delays: dict[str, float] = {}
        self.fail_from = fail_from
        self.gate = gate
        self.lock = threading.Lock()
        self.runs: list[tuple[str, int, float]] = []
        self.started = threading.Event()
        self.closed = False

    def load(self, model: str | Path) -> Runner:
        if self.known is not None and str(model) not in self.known:
            from conveyor import ModelNotFoundError

            raise ModelNotFoundError(f"{self.name} has no {model}")
        return FakeRunner(self, str(model))

    def describe(self) -> dict[str, Any]:
        return {"spec": self.name, "simulated": True}

    def close(self) -> None:
        self.closed = True


def x(value: float) -> npt.NDArray[np.float32]:
    return np.full((1, 4), value, np.float32)


# --- client subprocesses -------------------------------------------------------------------


def python(code: str, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
    """A Python subprocess running ``code`` (with this checkout's conveyor)."""
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def finish(procs: Sequence[subprocess.Popen[str]], timeout: float = 30.0) -> list[str]:
    """Wait for the processes (killing any left after ``timeout``); their stdout."""
    outs = []
    for p in procs:
        if p.stdin is not None and p.stdin.closed:
            p.stdin = None
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        assert p.returncode == 0, f"client failed ({p.returncode}): {err}"
        outs.append(out)
    return outs


# --- what a process holds --------------------------------------------------------------------


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_table(pid: int) -> dict[str, str]:
    """What each of the process's descriptors refers to (``socket:[...]``, a path...)."""
    table = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            table[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
    return table


def new_fds(pid: int, before: dict[str, str]) -> list[str]:
    """What ``pid`` holds now that it did not hold in ``before`` (by what each descriptor
    refers to, counted: numbers are reused; descriptors closed meanwhile by others do not
    matter)."""
    extra = Counter(fd_table(pid).values()) - Counter(before.values())
    return sorted(extra.elements())


def wait_no_new_fds(pid: int, before: dict[str, str], timeout: float = 5.0) -> None:
    """Wait until ``pid`` holds nothing :func:`new_fds` would name (collecting garbage, for
    the test process itself); on timeout the error names what is left."""
    end = time.monotonic() + timeout
    while True:
        gc.collect()
        left = new_fds(pid, before)
        if not left:
            return
        if time.monotonic() > end:
            raise AssertionError(f"descriptors left after {timeout} s: {left}")
        time.sleep(0.01)


def wait_for_fds(pid: int, before: dict[str, str], timeout: float = 10.0) -> None:
    """Wait until ``pid`` holds as many descriptors as in ``before``; on timeout the
    error names the ones that differ."""
    end = time.monotonic() + timeout
    while True:
        now = fd_table(pid)
        if len(now) == len(before):
            return
        if time.monotonic() > end:
            extra = {fd: what for fd, what in now.items() if before.get(fd) != what}
            gone = {fd: what for fd, what in before.items() if now.get(fd) != what}
            raise AssertionError(f"pid {pid} holds {len(now)} descriptors, had "
                                 f"{len(before)}: new {extra}, gone {gone}")
        time.sleep(0.01)


def socket_count(pid: int) -> int:
    """Sockets the process holds (a server with no connection holds its listener only)."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return n


def memfd_maps(pid: int) -> int:
    with open(f"/proc/{pid}/maps") as f:
        return sum(1 for line in f if "memfd:" in line)


class LogLines(logging.Handler):
    """Collects the records of the ``conveyor.server`` logger while installed."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    @contextlib.contextmanager
    def installed(self) -> Iterator[LogLines]:
        logger = logging.getLogger("conveyor.server")
        old = logger.level
        logger.addHandler(self)
        logger.setLevel(logging.DEBUG)
        try:
            yield self
        finally:
            logger.removeHandler(self)
            logger.setLevel(old)
