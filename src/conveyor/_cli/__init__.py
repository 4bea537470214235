"""Sub-commands of the ``conveyor`` command, one module each."""

from __future__ import annotations

import signal

__all__ = ["terminated"]


def terminated(signum: int, frame: object) -> None:
    """A SIGTERM handler that ends a command as Ctrl-C does (``KeyboardInterrupt("SIGTERM")``,
    which ``conveyor`` reports as exit code 143), so that its clean-up runs. Once: a second
    SIGTERM (timeout(1) sends one to the program and one to its process group) must not
    interrupt the clean-up the first one started."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt("SIGTERM")
