"""Watch a device server live: the conveyor status view, refreshed in place.

Shows devices (requests/s, duty cycle, latency, model switches), models, and each client
with its own request rate. Press q (or Ctrl-C) to quit. If the server goes away, top
waits for it to come back. To a pipe or a file, the frames follow one another.

examples:
  conveyor top
  conveyor top --socket /run/conveyor/tpu.sock --interval 0.5
  conveyor top --once
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

from .._errors import ConveyorError
from .status import positive_seconds, render, socket_path, socket_to_use

__all__ = ["add_arguments", "frame", "run"]

_CLEAR = "\x1b[H\x1b[2J"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``conveyor top``'s arguments on ``parser``."""
    parser.add_argument("--socket", metavar="PATH", type=socket_path,
                        help="the server's socket (default: as for conveyor serve)")
    parser.add_argument("--interval", metavar="S", type=positive_seconds, default=1.0,
                        help="seconds between refreshes (default 1)")
    parser.add_argument("--once", action="store_true",
                        help="print one frame and exit (no screen control)")


def frame(status: dict[str, Any], previous: dict[str, Any] | None, dt: float) -> list[str]:
    """The lines of one frame. Per-client rates are the server's own (over its window);
    from a server that does not give them, the change since ``previous``."""
    rates: dict[int, float] = {}
    if previous is not None and dt > 0:
        before = {c["id"]: c["completed"] for c in previous["clients"]}
        for c in status["clients"]:
            rates[c["id"]] = max(c["completed"] - before.get(c["id"], c["completed"]), 0) / dt
    for c in status["clients"]:
        if "requests_per_s" in c:
            rates[c["id"]] = float(c["requests_per_s"])
    stamp = time.strftime("%H:%M:%S")
    return [f"conveyor top  {stamp}  (q quits)", *render(status, rates)]


@contextlib.contextmanager
def _keys() -> Iterator[bool]:
    """Put the terminal in cbreak mode (keys arrive one at a time, unechoed) while inside;
    yields whether keys can be read."""
    if not sys.stdin.isatty():
        yield False
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)

    def ended(signum: int, frame: object) -> None:
        raise _Ended(128 + signum)

    # kill, or the terminal closing: end as q does, so that the terminal gets its echo
    # back (it was left in cbreak mode).
    previous = {sig: signal.signal(sig, ended) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        tty.setcbreak(fd)
        yield True
    finally:
        with contextlib.suppress(termios.error):  # a terminal that has gone (SIGHUP)
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Ended(Exception):
    """A signal ended top; ``args[0]``: the exit code (128 + its number)."""


def _wait_for_key(seconds: float, keys: bool) -> bool:
    """Sleep up to ``seconds``; True if q was pressed. Blocks in select on stdin."""
    if not keys:
        time.sleep(seconds)
        return False
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        ready, _, _ = select.select([sys.stdin], [], [], left)
        if ready:
            ch = os.read(sys.stdin.fileno(), 1)
            if ch in (b"q", b"Q", b"\x03", b""):
                return True
    return False


def run(args: argparse.Namespace) -> int:
    """Run ``conveyor top``: 0 when quit, 1 if ``--once`` finds no server, 2 if the socket
    path cannot be one."""
    from .._device._client import DeviceClient

    path = socket_to_use(args.socket, "top")
    if path is None:
        return 2
    if args.once:
        try:
            once = DeviceClient(path=path, name="conveyor top", monitor=True, timeout=5.0)
            try:
                print("\n".join(frame(once.status(5.0), None, 0.0)))
            finally:
                once.close()
        except ConveyorError as exc:
            print(f"conveyor top: {exc}", file=sys.stderr)
            return 1
        return 0
    interval = max(args.interval, 0.05)
    client: DeviceClient | None = None
    previous: dict[str, Any] | None = None
    last = time.monotonic()
    out = sys.stdout
    # To a file or a pipe, frames follow one another (as top -b), without screen control.
    clear = _CLEAR if out.isatty() else "\n"
    try:
        with _keys() as keys:
            while True:
                try:
                    if client is None:
                        client = DeviceClient(path=path, name="conveyor top", monitor=True,
                                              timeout=2.0)
                    status = client.status(5.0)
                    now = time.monotonic()
                    lines = frame(status, previous, now - last)
                    previous, last = status, now
                except ConveyorError as exc:
                    if client is not None:
                        client.close()
                        client = None
                    previous = None
                    lines = [f"conveyor top  {time.strftime('%H:%M:%S')}  (q quits)", "",
                             f"waiting for a server at {path}: {exc}"]
                out.write(clear + "\n".join(lines) + "\n")
                out.flush()
                if _wait_for_key(interval, keys):
                    return 0
    except KeyboardInterrupt:
        return 0
    except _Ended as exc:
        return int(exc.args[0])
    finally:
        if client is not None:
            client.close()
