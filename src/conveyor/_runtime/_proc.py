"""Child processes that cannot outlive their parent.

Each child gets a *lifeline*: the read end of a pipe whose write end only the parent
holds. A thread in the child blocks reading it; when the parent dies, for any reason,
SIGKILL included, the read returns end-of-file and the child exits at once. No polling,
and no dependence on which parent thread spawned the child (PR_SET_PDEATHSIG's trap).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable, Sequence

__all__ = ["ChildProcess", "Spawning", "describe_exit", "on_eof", "watch_lifeline",
           "worker_bootstrap"]

#: True in a stage worker while it imports the program's main module (to find the stage
#: function): a pipeline started then is the program's own, run again by the import
#: because the main module lacks ``if __name__ == "__main__":``.
_bootstrapping = False


def worker_bootstrap(on: bool | None = None) -> bool:
    """Whether this process is a stage worker importing the main module; ``on`` sets it."""
    global _bootstrapping
    if on is not None:
        _bootstrapping = on
    return _bootstrapping


#: A worker's exit status when its link to the parent failed on its own side (it could
#: not map the parent's shared memory, say); it says why on its stderr first.
LINK_BROKEN_EXIT = 121  # (a code user code is unlikely to exit with)


def describe_exit(returncode: int | None) -> str:
    """``killed by signal SIGKILL`` / ``exited with code 4`` / ``still running``."""
    if returncode is None:
        return "still running"
    if returncode == LINK_BROKEN_EXIT:
        return (f"exited with code {returncode}, conveyor's code for a link to this process "
                f"that failed on the worker's side (the worker said why on stderr)")
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by signal {name}"
    return f"exited with code {returncode}"


class Spawning:
    """The child processes a scope (a pipeline) is starting, still in their handshake.

    :meth:`abort` (the scope's close) kills each of them, and any started from then on,
    so that a start-up never outlives the close: a handshake waits up to a minute (an
    import that hangs, a stopped child), and nothing else could reach the child yet.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._procs: set[ChildProcess] = set()
        self.aborted = False

    def add(self, child: ChildProcess) -> None:
        with self._lock:
            if not self.aborted:
                self._procs.add(child)
                return
        child.proc.kill()  # the starter's handshake fails at once; it reaps the child

    def discard(self, child: ChildProcess) -> None:
        """``child`` is started (or its start failed): no longer the scope's to kill."""
        with self._lock:
            self._procs.discard(child)

    def abort(self) -> None:
        """Kill every child still starting (SIGKILL; their starters reap them)."""
        with self._lock:
            self.aborted = True
            procs, self._procs = list(self._procs), set()
        for child in procs:
            with contextlib.suppress(OSError):
                child.proc.kill()


class ChildProcess:
    """A ``python -m MODULE`` child with a lifeline; the parent must :meth:`stop` it.

    ``pass_fds`` are inherited by the child (the lifeline's fd is appended to ``args`` as
    ``--lifeline N``). Nothing else is inherited. With ``spawning``, the child is in that
    scope's care until the starter calls ``spawning.discard(child)``.
    """

    def __init__(self, module: str, args: Sequence[str], pass_fds: Sequence[int] = (),
                 spawning: Spawning | None = None) -> None:
        life_r, life_w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", module, *args, "--lifeline", str(life_r)],
                pass_fds=(*pass_fds, life_r),
                stdin=subprocess.DEVNULL,
                close_fds=True,
                # A session (so a process group) of its own: Ctrl-C at a terminal signals
                # the parent's group, and the parent ends its children (the lifeline). A
                # child still importing would otherwise die of it with a traceback.
                start_new_session=True,
            )
        except BaseException:
            os.close(life_w)
            raise
        finally:
            os.close(life_r)
        self._lifeline = life_w
        _holding.add(self)
        self.pid = self.proc.pid
        if spawning is not None:
            spawning.add(self)

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def describe_exit(self) -> str:
        return describe_exit(self.proc.poll())

    def stop(self, timeout: float = 0.5) -> None:
        """Cut the lifeline (the child exits), wait up to ``timeout``, then SIGKILL; reap."""
        if self._lifeline >= 0:
            os.close(self._lifeline)
            self._lifeline = -1
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._end_group()

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._end_group()
        if self._lifeline >= 0:
            os.close(self._lifeline)
            self._lifeline = -1

    def _end_group(self) -> None:
        """SIGKILL what is left of the child's process group: processes its work started
        (a stage function's own subprocess) that would outlive it as orphans. The child
        led the group, and a group's id is not reused while it has a member."""
        with contextlib.suppress(OSError):  # none left (ESRCH), or not ours (EPERM)
            os.killpg(self.pid, signal.SIGKILL)


#: The children whose lifelines this process holds (see _let_go_after_fork).
_holding: weakref.WeakSet[ChildProcess] = weakref.WeakSet()


def _let_go_after_fork() -> None:
    """In a child made by ``os.fork()``: close the copies of the parent's lifelines. While
    this child lived (a fork-started pool: for ever) the parent's workers did not notice
    the parent's death, each lifeline still held open here."""
    for child in list(_holding):
        fd, child._lifeline = child._lifeline, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
    _holding.clear()


os.register_at_fork(after_in_child=_let_go_after_fork)


def watch_lifeline(fd: int) -> None:
    """In a child: exit at once when the parent's end of the lifeline closes.

    Also ignores SIGINT: Ctrl-C reaches the whole process group, and the parent decides
    how its children end.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    on_eof(fd, lambda: os._exit(0), "conveyor-lifeline")


def on_eof(fd: int, action: Callable[[], object], name: str) -> None:
    """Run ``action`` in a daemon thread (called ``name``) once ``fd`` reads end of file,
    or fails; what is read is ignored."""

    def watch() -> None:
        try:
            while os.read(fd, 4096):
                pass
        except OSError:
            pass
        action()

    threading.Thread(target=watch, name=name, daemon=True).start()
