"""Shared fixtures: leak checks for processes and shared memory."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest


def _shm_entries() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except FileNotFoundError:
        return set()


def wait_for(pred, timeout: float = 5.0, interval: float = 0.01) -> bool:  # type: ignore[no-untyped-def]
    """Poll ``pred`` until true or ``timeout``; for checks of outside state (processes)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())


def children() -> list[psutil.Process]:
    return [
        p
        for p in psutil.Process().children(recursive=True)
        if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    ]


@pytest.fixture(scope="session", autouse=True)
def private_lock_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Device locks in a folder of this test session's own, so that a conveyor program
    running beside the tests (or another test run) cannot make a device look taken."""
    old = os.environ.get("CONVEYOR_LOCK_DIR")
    os.environ["CONVEYOR_LOCK_DIR"] = str(tmp_path_factory.mktemp("locks"))
    yield
    if old is None:
        os.environ.pop("CONVEYOR_LOCK_DIR", None)
    else:
        os.environ["CONVEYOR_LOCK_DIR"] = old


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Fail the test if it leaves child processes or /dev/shm entries behind."""
    shm_before = _shm_entries()
    kids_before = {p.pid for p in children()}
    yield
    assert wait_for(lambda: not ({p.pid for p in children()} - kids_before), timeout=3.0), (
        f"child processes left: {[(p.pid, p.cmdline()) for p in children()]}"
    )
    assert _shm_entries() - shm_before == set(), "leaked /dev/shm entries"


@pytest.fixture
def src_env() -> dict[str, str]:
    """An environment for subprocesses that can import conveyor from this checkout."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def device_worker(pipe: Any) -> Any:
    """The device link of a pipeline with one inference stage (its ``worker.pid`` changes
    when the worker is restarted)."""
    return next(iter(pipe._core.links.values()))


def kill_at(items: Sequence[Any], at: int, pid: int) -> Iterator[Any]:
    """Yield ``items``, killing process ``pid`` with SIGKILL just before item ``at``."""
    for i, item in enumerate(items):
        if i == at:
            os.kill(pid, signal.SIGKILL)
        yield item


def watch_event_loop(period: float = 0.005) -> tuple[Any, list[float]]:
    """In the running event loop, start a task that ticks every ``period`` and notes the
    time between its ticks: the returned list's max is the longest the loop stood still.
    Cancel the returned task when done."""
    import asyncio

    gaps = [0.0]

    async def heartbeat() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    return asyncio.create_task(heartbeat()), gaps
