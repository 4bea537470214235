"""Which thread of a device server does the I/O, and how it waits for it.

Exactly one thread at a time holds the *I/O role*: it alone polls the sockets, reads
messages, queues requests and sends what the others hand it. Who holds it:

- **An idle device thread**, by preference. A request that reaches an idle device is read
  and run by the same thread, so it costs no thread switch and wakes nobody in the server.
  The device keeps the role while it runs that request (nothing else is queued, so there
  is nothing to overlap).
- **The serve_forever thread** while the devices are busy: a device that starts a request
  with more work queued hands the role over at once (the I/O then overlaps the runs); a
  device that has run one request for longer than ``grace_s`` while holding the role has
  it taken over (so a slow or stuck device never stalls the I/O for long). While devices
  are active the serve_forever thread looks every ``grace_s``; while the server has been
  idle for a second it sleeps until a device starts work.
- **Another idle device**, at once, when the holder starts running.

When the serve_forever thread holds the role and a device becomes idle, the device asks
for it: the holder's poll is woken, it finishes its round and hands the role over.

All of this state is guarded by the scheduler's lock: idle devices wait on the
scheduler's condition (for work or for the role), the serve_forever thread on its own.
"""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Callable, Iterator

from .._runtime._run import SIGNAL_CHECK_S, poll_ms
from ._scheduler import DeviceState, Request, Scheduler

__all__ = ["MAIN", "IORole", "Poller"]

#: The serve_forever thread, as holder of the role (devices are 0, 1, ...).
MAIN = -1
_IDLE_NS = 1_000_000_000


class IORole:
    """The I/O role of one server (see the module docstring)."""

    def __init__(self, sched: Scheduler, grace_s: float) -> None:
        self.sched = sched
        self.grace_s = grace_s
        self._grace_ns = int(grace_s * 1e9)
        self._cv = threading.Condition(sched.lock)  # the serve_forever thread waits here
        self.holder: int | None = None
        self.exiting = False
        self.handover = False  # a device asked the serve_forever thread for the role
        self._wanted = 0  # idle devices waiting (for work or the role)
        self._busy_since = 0  # when the holder, a device, started running (0: it polls)
        self._last_run_ns = 0
        self._main_asleep = False

    # --- the serve_forever thread ----------------------------------------------------------

    def main_turn(self) -> bool:
        """Block until the serve_forever thread should hold the role, and take it; False
        when the server is exiting instead."""
        with self.sched.lock:
            while not self.exiting:
                holder, busy = self.holder, self._busy_since
                now = time.monotonic_ns()
                if holder is None and not self._wanted:
                    break
                if holder is not None and holder != MAIN and busy and now - busy >= self._grace_ns:
                    break  # a device has been running long: take the I/O over
                active = holder is not None and holder != MAIN and (
                    busy or now - self._last_run_ns < _IDLE_NS)
                self._main_asleep = not active
                # Asleep, still never for long: Python runs signal handlers in this (the
                # main) thread only, and a SIGTERM the kernel hands another thread (seen
                # after SIGSTOP and SIGCONT) does not interrupt this wait.
                self._cv.wait(self.grace_s if active else SIGNAL_CHECK_S)
                self._main_asleep = False
            else:
                return False
            self.holder = MAIN
            self._busy_since = 0
            self.handover = False
            return True

    def main_keeps(self) -> bool:
        """After a round of I/O by the serve_forever thread: True if it may go on with the
        next round without giving the role up and taking it again (no device asked for
        it, the server is not exiting). Read without the lock, as a hint: a device that
        asks meanwhile sets :attr:`handover` and wakes the poll, which ends the next
        round at once."""
        return not (self._wanted or self.handover or self.exiting)

    def reclaim(self, timeout: float) -> None:
        """Take the role for the end (after :meth:`exit`): wait, at most ``timeout``, for a
        device in the middle of an I/O round to finish it."""
        end = time.monotonic() + timeout
        with self.sched.lock:
            while (self.holder not in (None, MAIN) and not self._busy_since
                   and (left := end - time.monotonic()) > 0):
                self._cv.wait(left)
            self.holder = MAIN

    # --- any thread -------------------------------------------------------------------------

    def release(self, holder: int) -> None:
        """``holder`` gives the role up (if it has it); everyone waiting looks again."""
        with self.sched.lock:
            if self.holder == holder:
                self._drop_locked()
            self._cv.notify_all()

    def _drop_locked(self) -> None:
        self.holder = None
        self._busy_since = 0
        self.sched.cv.notify_all()
        self._cv.notify_all()

    def exit(self) -> None:
        """Everyone stops taking the role: the server is exiting."""
        with self.sched.lock:
            self.exiting = True
            self.sched.cv.notify_all()
            self._cv.notify_all()

    # --- device threads -------------------------------------------------------------------

    def device_next(
        self, dev: DeviceState, wake_holder: Callable[[], None],
        before_wait: Callable[[], None] | None = None,
    ) -> tuple[Request | None, list[Request], bool] | None:
        """Block until device ``dev`` has something to do: ``(request, expired, False)`` to
        run a request and answer expired ones, ``(None, [], True)`` to do one round of
        I/O (the caller then holds the role), or None when the device is done (drained,
        stopped or taken out). ``wake_holder`` wakes the role holder's poll;
        ``before_wait`` is called (under the lock) each time before the device waits."""
        sched = self.sched
        me = dev.index
        with sched.lock:
            while True:
                req, expired = sched.take_locked(dev)
                if req is not None or expired:
                    if req is not None and self.holder == me:
                        if self._wanted or sched.queued:
                            # Another device is idle, or more work waits (a client keeps
                            # several requests in flight): let another thread do the I/O
                            # while this one runs.
                            self._drop_locked()
                        else:
                            self._busy_since = time.monotonic_ns()
                            if self._main_asleep:
                                self._cv.notify_all()
                    return req, expired, False
                if dev.failed is not None or sched.closed or self.exiting:
                    if self.holder == me:
                        self._drop_locked()
                    if dev.failed is not None or sched.closed:
                        return None
                elif self.holder in (None, me) or (self.holder != MAIN and self._busy_since):
                    self.holder = me  # free, or held by a device that is busy running
                    self._busy_since = 0
                    return None, [], True
                elif self.holder == MAIN and not self.handover:
                    self.handover = True
                    wake_holder()  # its poll returns and it hands the role over
                if before_wait is not None:
                    before_wait()
                self._wanted += 1
                dev.waiting = True  # a device declining work for this one's model wakes it
                try:
                    sched.cv.wait()
                finally:
                    dev.waiting = False
                self._wanted -= 1
                if not self._wanted and self.holder is None:
                    # The serve_forever thread may be waiting for an idle device to take
                    # the role, and this one might not (it may have work): let it look.
                    self._cv.notify_all()

    def device_ran(self, index: int) -> None:
        """Device ``index`` finished a request. Plain stores, no lock: the serve_forever
        thread reads them only as hints."""
        self._last_run_ns = time.monotonic_ns()
        if self.holder == index:
            self._busy_since = 0


READABLE = select.POLLIN | select.POLLHUP | select.POLLERR


class Poller:
    """poll(2), with the object each descriptor stands for. Used by the role holder only.

    For the few hundred descriptors a server has at most, one poll call costs less than
    keeping an epoll set in step.
    """

    def __init__(self) -> None:
        self._poll = select.poll()
        self._objs: dict[int, object] = {}

    def register(self, fd: int, obj: object) -> None:
        self._poll.register(fd, select.POLLIN)
        self._objs[fd] = obj

    def modify(self, fd: int, *, write: bool, read: bool = True) -> None:
        self._poll.modify(fd, (select.POLLIN if read else 0)
                          | (select.POLLOUT if write else 0))

    def unregister(self, fd: int) -> None:
        del self._objs[fd]
        self._poll.unregister(fd)

    def poll(self, timeout: float | None) -> Iterator[tuple[object, int]]:
        """The ready descriptors' objects and events; blocks up to ``timeout`` seconds
        (None: until one is ready). A descriptor unregistered meanwhile yields None."""
        objs = self._objs
        for fd, mask in self._poll.poll(poll_ms(timeout)):
            yield objs.get(fd), mask

    def close(self) -> None:
        self._objs.clear()
