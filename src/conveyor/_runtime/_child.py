"""The main loop of a process-stage worker: ``python -m conveyor._runtime._child``.

Start-up: receive SETUP (the parent's ``__main__`` preparation data, then the pickled
function), prepare like multiprocessing's spawn does, answer READY. Then for each TASK
run the function and answer OK with the result or ERR with the exception and its
traceback text. Exits on end of stream or when the lifeline to the parent breaks.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing.spawn
import os
import pickle
import socket
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

from ._proc import LINK_BROKEN_EXIT, watch_lifeline, worker_bootstrap
from ._sched import run_in_background
from ._wire import (
    ERR,
    OK,
    READY,
    SETUP,
    TASK,
    ByState,
    LinkBroken,
    MsgSocket,
    NotSent,
    PeerClosed,
    Undecodable,
)

__all__ = ["main"]


def _error_payload(exc: BaseException) -> tuple[Any, str, str, str]:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    blob: Any = None
    for form in (exc, ByState(exc)):
        try:
            candidate = pickle.dumps(form, protocol=5)
            if type(pickle.loads(candidate)) is type(exc):
                blob = candidate
                break
        except KeyboardInterrupt:
            raise
        except BaseException:  # (a __reduce__ may raise SystemExit too)
            continue
    try:
        message = str(exc)
    except Exception:
        message = "<str() of the exception failed>"
    return blob, type(exc).__qualname__, message, tb


def _let_go(link: MsgSocket, lifeline: int) -> None:
    """In a process the stage's function forks: close its copies of this worker's link
    and lifeline. A copy of the link kept open would hide the worker's death from the
    parent (no end of stream while the copy lives), and what the copy might send would
    mix with the worker's messages."""
    with contextlib.suppress(OSError):
        os.close(link.sock.detach())
    with contextlib.suppress(OSError):
        os.close(lifeline)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="conveyor-stage-worker")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--lifeline", type=int, required=True)
    args = parser.parse_args(argv)
    # Not inherited by programs the stage's function runs (os.system, a Popen that keeps
    # descriptors): one holding the link would hide this worker's death from the parent.
    os.set_inheritable(args.fd, False)
    os.set_inheritable(args.lifeline, False)
    watch_lifeline(args.lifeline)
    link = MsgSocket(socket.socket(fileno=args.fd))
    os.register_at_fork(after_in_child=lambda: _let_go(link, args.lifeline))
    try:
        kind, _, setup, _, _ = link.recv()
        if kind != SETUP:
            return 2
        worker_bootstrap(True)
        try:
            multiprocessing.spawn.prepare(setup["prep"])
        finally:
            worker_bootstrap(False)
        if setup.get("background"):
            run_in_background()
        fn = pickle.loads(setup["fn"])
        link.send(READY, 0, None)
    except PeerClosed:
        return 0
    except BaseException as exc:
        try:
            link.send(ERR, 0, _error_payload(exc))
        except PeerClosed:
            pass
        return 1
    while True:
        try:
            kind, index, value, _, _ = link.recv()
        except LinkBroken as exc:  # this side failed (no memory to map a segment...)
            with contextlib.suppress(Exception):
                print(f"conveyor worker pid {os.getpid()}: {exc}", file=sys.stderr,
                      flush=True)
            return LINK_BROKEN_EXIT
        except PeerClosed:
            return 0
        except Undecodable as bad:
            # The item arrived whole but cannot be rebuilt here (a class of the parent's
            # __main__ that this process lacks...): its error, and on to the next one.
            if bad.kind != TASK:
                return 2
            now = time.monotonic_ns()
            cause = bad.__cause__ if isinstance(bad.__cause__, Exception) else bad
            try:
                link.send(ERR, bad.index, _error_payload(cause), now, now)
            except PeerClosed:
                return 0
            del bad, cause
            continue
        if kind != TASK:
            return 2
        start = time.monotonic_ns()
        try:
            result = fn(value)
        except BaseException as exc:  # sys.exit() too: the item fails, as in a thread stage
            end = time.monotonic_ns()
            payload = _error_payload(exc)
            del exc
            try:
                link.send(ERR, index, payload, start, end)
            except PeerClosed:
                return 0
            continue
        end = time.monotonic_ns()
        try:
            link.send(OK, index, result, start, end)
        except PeerClosed:
            return 0
        except Exception as exc:  # the result could not be sent, most likely not pickled
            why: BaseException = exc
            if isinstance(exc, NotSent) and exc.__cause__ is not None:
                why = exc.__cause__
            try:
                link.send(ERR, index, _error_payload(why), start, end)
            except PeerClosed:
                return 0
        del result, value


if __name__ == "__main__":
    sys.exit(main())
