"""CPU scheduling policies for conveyor's own threads: idle for CPU work that may wait,
real-time for the thread that feeds a device.

Both are Linux policies. Measured on a 2-core VM (kernel 6.18, EEVDF; BENCHMARKS.md,
"Where the time goes"): a device thread at normal priority that wakes up while both cores
run Python waits for the running task's slice to end, 0.05-0.2 ms per device run, and
``nice`` does not change that. ``SCHED_IDLE`` on the CPU workers or ``SCHED_FIFO`` on the
device thread does.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["MAX_REALTIME", "check_realtime", "probe_realtime", "realtime_thread",
           "run_in_background", "set_realtime"]

#: The highest SCHED_FIFO priority Linux accepts.
MAX_REALTIME = 99


def run_in_background() -> bool:
    """Put the calling thread under the idle scheduling policy (Linux ``SCHED_IDLE``): any
    thread of normal policy that wakes up takes its core at once. Lowering one's own policy
    needs no privilege. False where the platform has no such policy or refuses it.
    """
    policy = getattr(os, "SCHED_IDLE", None)
    if policy is None:
        return False
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))
    except OSError:
        return False
    return True


def check_realtime(priority: int | bool) -> int:
    """The SCHED_FIFO priority that ``priority`` asks for: False or 0 for none, True for 1,
    else 1 to 99.

    Raises:
        ValueError: out of range (the message says the range).
    """
    level = int(priority)
    if not 0 <= level <= MAX_REALTIME:
        raise ValueError(f"realtime priority must be 0 (off) to {MAX_REALTIME}, got {priority!r}")
    return level


def set_realtime(priority: int) -> str:
    """Run the calling thread under Linux's ``SCHED_FIFO`` policy at ``priority`` (1-99;
    0 leaves it as it is).

    A SCHED_FIFO thread takes a core from any normal thread the moment it wakes up, so a
    device thread that sleeps through each run and works briefly between runs starts the
    next run without waiting for a core. It needs CAP_SYS_NICE (root has it) or an
    RLIMIT_RTPRIO of at least ``priority`` (``ulimit -r``; systemd ``LimitRTPRIO=``). The
    kernel keeps 5% of each core for normal threads (``sched_rt_runtime_us``), so a busy
    real-time thread cannot lock a machine up.

    Never raises for a refusal: returns what is in force, for status output:
    ``"fifo:N"``, ``"normal"`` (priority 0), or ``"normal (...why...)"``.

    Raises:
        ValueError: ``priority`` out of range.
    """
    level = check_realtime(priority)
    if level == 0:
        return "normal"
    policy = getattr(os, "SCHED_FIFO", None)
    setter = getattr(os, "sched_setscheduler", None)
    if policy is None or setter is None:
        return "normal (this platform has no SCHED_FIFO)"
    try:
        setter(0, policy, os.sched_param(level))
    except PermissionError:
        return (f"normal (SCHED_FIFO {level} refused: it needs CAP_SYS_NICE or an "
                f"RLIMIT_RTPRIO of at least {level}; see `ulimit -r`)")
    except OSError as exc:
        return f"normal (SCHED_FIFO {level} refused: {exc.strerror or exc})"
    return f"fifo:{level}"


@contextmanager
def realtime_thread(priority: int) -> Iterator[str]:
    """Run the calling thread under SCHED_FIFO at ``priority`` inside the ``with`` (see
    :func:`set_realtime`, whose description it yields), and put its policy back after."""
    getter = getattr(os, "sched_getscheduler", None)
    saved = (getter(0), os.sched_getparam(0)) if priority and getter is not None else None
    outcome = set_realtime(priority)
    try:
        yield outcome
    finally:
        if saved is not None and outcome.startswith("fifo"):
            os.sched_setscheduler(0, *saved)


def probe_realtime(priority: int) -> str:
    """What :func:`set_realtime` gives a thread of this process at ``priority``, found
    by setting it on the calling thread and putting it back (for reports)."""
    with realtime_thread(priority) as outcome:
        return outcome
