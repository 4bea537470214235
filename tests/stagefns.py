"""Importable stage functions for tests (process stages need picklable functions)."""

from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np


class Boom(Exception):
    """Raised on purpose by failing stage functions."""


def double(x: int) -> int:
    return x * 2


def inc(x: int) -> int:
    return x + 1


def square(x: int) -> int:
    return x * x


def fail_on_multiple_of_7(x: int) -> int:
    if x % 7 == 3:
        raise Boom(f"bad item {x}")
    return x + 100


def image_for(i: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    return rng.uniform(-1, 1, size=(1, 128, 128, 3)).astype(np.float32)


def array_roundtrip(i: int) -> np.ndarray:
    return np.full((64, 64, 3), i, dtype=np.float32)


def array_sum(a: np.ndarray) -> float:
    return float(a.sum())


def die_on_5(x: int) -> int:
    if x == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def slow(x: int) -> int:
    time.sleep(0.02)
    return x


def max_score(outputs: list[np.ndarray]) -> float:
    return float(outputs[1].max())


def sched_policy(x: int) -> int:
    """The scheduling policy of the worker that runs the item (os.SCHED_*)."""
    return os.sched_getscheduler(0)


def worker_pid(x: int) -> int:
    """The pid of the process that runs the item."""
    return os.getpid()


def nap(x: int) -> int:
    time.sleep(0.1)
    return x


class CodedError(Exception):
    """An exception whose __init__ takes other arguments than its args: plain pickling
    cannot rebuild it."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code}: {text}")
        self.code = code


def raise_coded(x: int) -> int:
    raise CodedError(x, "bad item")


class BadStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str")


def raise_bad_str(x: int) -> int:
    if x == 2:
        raise BadStr()
    return x


def to_landmark_input(outputs: list[np.ndarray]) -> np.ndarray:
    """Any 1x192x192x3 input for face_landmark, from a detector's outputs."""
    return np.full((1, 192, 192, 3), float(outputs[1].max()) / 100, np.float32)


def sleep_for(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def first_output_as_input(outputs: list[np.ndarray]) -> np.ndarray:
    """A blank frame for the short-range detector (the next stage runs it again)."""
    return np.zeros((1, 128, 128, 3), np.float32)


def fork_then_die_on_5(item: tuple[int, str]) -> int:
    """At item 5: fork a helper that sleeps (holding a copy of the worker's link), note
    its pid in the file ``item[1]``, then die by SIGKILL."""
    x, pidfile = item
    if x == 5:
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        with open(pidfile, "w") as f:
            f.write(str(pid))
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def detection_input(x: int) -> np.ndarray:
    return np.zeros((1, 128, 128, 3), np.float32)


def landmark_input(outputs: list[np.ndarray]) -> np.ndarray:
    return np.zeros((1, 192, 192, 3), np.float32)


def slow_count(outputs: list[np.ndarray]) -> int:
    time.sleep(0.003)
    return len(outputs)


def landmark_input_slowly(outputs: list[np.ndarray]) -> np.ndarray:
    time.sleep(0.005)
    return np.zeros((1, 192, 192, 3), np.float32)


def spawn_then_die_on_5(item: tuple[int, str]) -> int:
    """At item 5: start a program that sleeps and keeps every inheritable descriptor
    (as os.system does), note its pid in the file ``item[1]``, then die by SIGKILL."""
    import subprocess

    x, pidfile = item
    if x == 5:
        helper = subprocess.Popen(["sleep", "60"], close_fds=False)
        with open(pidfile, "w") as f:
            f.write(str(helper.pid))
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def exit_on_2(x: int) -> int:
    if x == 2:
        sys.exit(5)
    if x == 3:
        raise KeyboardInterrupt
    return x


def nap_then_return(x: float) -> float:
    """Sleep 0.1 s (a slow stage), then give ``x`` back."""
    time.sleep(0.1)
    return x


def raise_with_a_lock(x: int) -> int:
    """Raises a ValueError carrying a lock: it cannot be pickled back to the parent."""
    import threading

    err = ValueError(f"bad thing {x}")
    err.lock = threading.Lock()  # type: ignore[attr-defined]
    raise err


def same(x: object) -> object:
    return x


def megabytes(n: int) -> np.ndarray:
    return np.full(n << 20, 7, np.uint8)


def start_sleeper(pidfile: str) -> int:
    """Start a program that sleeps for a minute and is never waited for; note its pid."""
    import subprocess

    helper = subprocess.Popen(["sleep", "60"])
    with open(pidfile, "w") as f:
        f.write(str(helper.pid))
    return helper.pid


def size_in_a_small_worker(x: object) -> object:
    """``"limit"``: cap this worker's address space at what it uses plus 150 MB; an
    array: its size in MB."""
    if isinstance(x, str):
        import resource

        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
        room = vm * 1024 + (150 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (room, resource.RLIM_INFINITY))
        return "limited"
    assert isinstance(x, np.ndarray)
    return x.nbytes >> 20
