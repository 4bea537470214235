"""The one scheduler: which queued request a device runs next.

Policy, in order:

1. **Priority.** A request of a higher ``priority`` runs before any of a lower one.
2. **Fair share.** Among clients with work at that priority, the one that has used the
   least device time (its *virtual time*, in nanoseconds of compute) goes first. A client
   that was idle rejoins at the smallest virtual time of the active clients, so idling
   banks no credit. Equal busy clients therefore get equal device time.
3. **Model grouping.** Switching models on an Edge TPU reloads its parameter cache, so a
   request for the model the device already holds may jump ahead, but only from a client
   whose virtual time is within ``group_slack_ns`` of the least: fairness bounds how long
   grouping can delay anyone. Each device counts its model switches.
4. **Deadlines.** A request whose deadline has passed is answered ``DEADLINE_EXCEEDED``
   without running, both when a device would pick it and when the server's loop wakes at
   the earliest deadline.
5. **Bounded admission.** At most ``max_queue`` requests wait in total; past that a
   request is refused with ``BUSY`` at once.

All state changes happen under one lock; no I/O is done under it.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ._protocol import Status

__all__ = ["ClientState", "DeviceState", "Request", "Scheduler"]

QUEUED, RUNNING, DONE = 0, 1, 2


@dataclass(eq=False)
class Request:
    """One inference request waiting for, or running on, a device."""

    client: ClientState
    req_id: int
    model_id: int
    offset: int
    segment: Any
    deadline_ns: int
    priority: int
    enqueued_ns: int = 0
    seq: int = 0
    retried: bool = False
    state: int = QUEUED
    conn: Any = None


@dataclass(eq=False)
class ClientState:
    """A client's queues and accounting."""

    id: int
    name: str = ""
    pid: int = 0
    uid: int = -1
    vtime: int = 0
    queues: dict[int, deque[Request]] = field(default_factory=dict)
    queued: int = 0
    running: int = 0
    completed: int = 0
    failed: int = 0
    busy: int = 0
    expired: int = 0
    device_ns: int = 0
    connected_at: float = field(default_factory=time.time)

    @property
    def outstanding(self) -> int:
        return self.queued + self.running


@dataclass(eq=False)
class DeviceState:
    """What the scheduler needs to know of a device."""

    index: int
    models: frozenset[int]
    current_model: int | None = None
    switches: int = 0
    failed: str | None = None


class Scheduler:
    """Queues per client; devices pull the next request with :meth:`next`."""

    def __init__(self, max_queue: int = 256, group_slack_ns: int = 2_000_000) -> None:
        self.max_queue = max_queue
        self.group_slack_ns = group_slack_ns
        self._cv = threading.Condition()
        self._clients: dict[int, ClientState] = {}
        self._queued = 0
        self._deadlines: list[tuple[int, int, Request]] = []
        self._seq = itertools.count()
        self._closed = False

    # --- clients ---------------------------------------------------------------------

    def add_client(self, client: ClientState) -> None:
        with self._cv:
            self._clients[client.id] = client

    def remove_client(self, client: ClientState) -> list[Request]:
        """Forget a client; returns its queued requests, which will not run."""
        with self._cv:
            self._clients.pop(client.id, None)
            dropped = [r for q in client.queues.values() for r in q]
            for r in dropped:
                r.state = DONE
            self._queued -= len(dropped)
            client.queues.clear()
            client.queued = 0
            return dropped

    def clients(self) -> list[ClientState]:
        with self._cv:
            return list(self._clients.values())

    @property
    def queued(self) -> int:
        return self._queued

    # --- admission -------------------------------------------------------------------

    def submit(self, req: Request, now_ns: int | None = None) -> Status | None:
        """Queue a request; returns None if accepted, else the status to answer at once."""
        now = time.monotonic_ns() if now_ns is None else now_ns
        with self._cv:
            client = req.client
            if self._closed:
                return Status.SHUTTING_DOWN
            if req.deadline_ns and req.deadline_ns <= now:
                client.expired += 1
                return Status.DEADLINE_EXCEEDED
            if self._queued >= self.max_queue:
                client.busy += 1
                return Status.BUSY
            if client.queued == 0 and client.running == 0:
                active = [
                    c.vtime for c in self._clients.values() if c.outstanding and c is not client
                ]
                if active:
                    client.vtime = max(client.vtime, min(active))
            req.enqueued_ns = now
            req.seq = next(self._seq)
            req.state = QUEUED
            client.queues.setdefault(req.priority, deque()).append(req)
            client.queued += 1
            self._queued += 1
            if req.deadline_ns:
                heapq.heappush(self._deadlines, (req.deadline_ns, req.seq, req))
            self._cv.notify_all()
            return None

    def requeue(self, req: Request) -> None:
        """Put a request back at the head of its client's queue (a retry elsewhere)."""
        with self._cv:
            req.state = QUEUED
            req.retried = True
            req.client.queues.setdefault(req.priority, deque()).appendleft(req)
            req.client.queued += 1
            req.client.running -= 1
            self._queued += 1
            self._cv.notify_all()

    # --- dispatch --------------------------------------------------------------------

    def _unlink(self, req: Request) -> None:
        q = req.client.queues[req.priority]
        q.remove(req)
        if not q:
            del req.client.queues[req.priority]
        req.client.queued -= 1
        self._queued -= 1

    def _expire_locked(self, now: int) -> list[Request]:
        out = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, req = heapq.heappop(self._deadlines)
            if req.state == QUEUED:
                self._unlink(req)
                req.state = DONE
                req.client.expired += 1
                out.append(req)
        return out

    def expire(self, now_ns: int | None = None) -> list[Request]:
        """Remove and return the queued requests whose deadline has passed."""
        with self._cv:
            return self._expire_locked(time.monotonic_ns() if now_ns is None else now_ns)

    def next_deadline_ns(self) -> int | None:
        """The earliest deadline among queued requests, if any."""
        with self._cv:
            while self._deadlines and self._deadlines[0][2].state != QUEUED:
                heapq.heappop(self._deadlines)
            return self._deadlines[0][0] if self._deadlines else None

    def _pick_locked(self, dev: DeviceState) -> Request | None:
        best: int | None = None
        for c in self._clients.values():
            for prio, q in c.queues.items():
                if (best is None or prio > best) and any(r.model_id in dev.models for r in q):
                    best = prio
        if best is None:
            return None
        cands = [c for c in self._clients.values() if best in c.queues]
        cands = [c for c in cands if any(r.model_id in dev.models for r in c.queues[best])]
        least = min(c.vtime for c in cands)
        chosen: Request | None = None
        if dev.current_model is not None:
            near = sorted(
                (c for c in cands if c.vtime <= least + self.group_slack_ns),
                key=lambda c: c.vtime,
            )
            for c in near:
                chosen = next((r for r in c.queues[best] if r.model_id == dev.current_model), None)
                if chosen is not None:
                    break
        if chosen is None:
            client = min(cands, key=lambda c: (c.vtime, c.id))
            chosen = next(r for r in client.queues[best] if r.model_id in dev.models)
        self._unlink(chosen)
        chosen.state = RUNNING
        chosen.client.running += 1
        if dev.current_model is not None and dev.current_model != chosen.model_id:
            dev.switches += 1
        dev.current_model = chosen.model_id
        return chosen

    def next(self, dev: DeviceState) -> tuple[Request | None, list[Request]]:
        """Block until there is a request ``dev`` can run.

        Returns ``(request, expired)``: ``expired`` are requests whose deadline passed and
        must be answered DEADLINE_EXCEEDED by the caller. ``request`` is None once the
        scheduler is closed and nothing this device can run is left (drained).
        """
        with self._cv:
            while True:
                expired = self._expire_locked(time.monotonic_ns())
                req = self._pick_locked(dev)
                if req is not None or expired:
                    return req, expired
                if self._closed:
                    return None, []
                self._cv.wait()

    def done(self, req: Request, compute_ns: int, ok: bool) -> None:
        """Account for a finished request."""
        with self._cv:
            req.state = DONE
            c = req.client
            c.running -= 1
            c.vtime += compute_ns
            c.device_ns += compute_ns
            if ok:
                c.completed += 1
            else:
                c.failed += 1
            self._cv.notify_all()

    def close(self) -> None:
        """Refuse new requests; devices drain what is queued, then :meth:`next` returns None."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until nothing is queued or running; True if so before ``timeout``."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self._queued or any(c.running for c in self._clients.values()):
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(left)
            return True
