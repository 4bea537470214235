"""The one scheduler: which queued request a device runs next.

Policy, in order:

1. **Priority.** A request of a higher ``priority`` runs before any of a lower one
   (strict: a steady stream of high-priority work delays lower priorities indefinitely).
2. **Fair share.** Among clients with work at that priority, the one that has used the
   least device time (its *virtual time*, in nanoseconds of compute) goes first. A
   request is charged its model's usual time when a device takes it and set right when
   it ends, so that with several devices a client already being served does not also
   look owed the next free one, and a client with a request running on another device
   gets this one only when every other client with work has one running too. Virtual
   time is kept per priority, and only while the client has work at that priority: one
   that comes to a priority (new, back from idle, or moving its work from another
   priority) starts at the smallest virtual time of the clients with work there, so
   idling banks no credit, and time used at another priority, or while nobody else
   wanted the device, is not held against it. Equal busy clients therefore get equal
   device time.
3. **Model grouping.** Switching models on an Edge TPU reloads its parameter cache, so a
   request for the model the device already holds may jump ahead of the fair choice, but
   only from a client whose virtual time is within ``group_slack_ns`` of the least (so
   grouping moves at most that much device time between clients), and at most
   ``group_limit`` times in a row (so a request for another model waits at most that many
   extra inferences) unless another device holds the other model (it serves that
   model's requests without a switch, so two devices serving two models each keep one,
   as fairness allows). A device does not switch to a model that another device waiting
   for work holds: that one takes the request (woken), and this one runs work for its
   own model meanwhile, of any priority. Within one client, requests for the current model
   may overtake older requests for another model; results are matched by request id, so
   callers see no difference but timing. Each device counts its model switches.
4. **Deadlines.** A request whose deadline has passed is answered ``DEADLINE_EXCEEDED``
   without running: at admission, when a device would pick it, and when the server's
   I/O loop wakes at the earliest deadline.
5. **Bounded admission.** At most ``max_queue`` requests wait in total; past that a
   request is refused with ``BUSY`` at once. (Each client is further limited to its
   in-flight credit by the server.)
6. **Several devices.** Devices pull work when free, so a request goes to a free device
   that has its model. A request retried after its run failed goes to a device other
   than those it failed on, for ``SHUN_NS`` (then to any: the others may hang) or while
   one in service has its model; the server decides from the retry's outcome which was
   at fault. A device taken out of service no longer pulls; requests for models no
   remaining device has are failed.

All state changes happen under one lock (a Condition, on which idle devices wait); no I/O
is done under it.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .._runtime._stats import RecentWindow
from ._protocol import Status

__all__ = ["ClientState", "DeviceState", "Request", "Scheduler"]

QUEUED, RUNNING, DONE = 0, 1, 2
#: A run this much past its model's usual time, and at least STUCK_MIN_NS, is taken as
#: stuck (a hung device): see _pick_locked.
STUCK_FACTOR = 10
STUCK_MIN_NS = 1_000_000_000
#: How long a retried request is kept from the devices it failed on (see requeue).
SHUN_NS = 1_000_000_000


class Request:
    """One inference request waiting for, or running on, a device.

    ``inputs`` and ``outputs`` are numpy views of the client's shared memory.
    """

    __slots__ = (
        "charged", "client", "conn", "deadline_ns", "enqueued_ns", "failed_on", "inputs",
        "model_id", "outputs", "priority", "req_id", "seq", "shun", "shun_until",
        "started_ns", "state", "switched",
    )

    def __init__(
        self,
        client: ClientState,
        req_id: int,
        model_id: int,
        inputs: Any,
        outputs: Any,
        deadline_ns: int = 0,
        priority: int = 0,
        conn: Any = None,
    ) -> None:
        self.client = client
        self.req_id = req_id
        self.model_id = model_id
        self.inputs = inputs
        self.outputs = outputs
        self.deadline_ns = deadline_ns
        self.priority = priority
        self.conn = conn
        self.enqueued_ns = 0
        self.seq = 0
        self.failed_on: tuple[DeviceState, ...] = ()  # the devices whose run of it failed
        self.shun: tuple[DeviceState, ...] = ()  # queued again: devices not to take it
        self.shun_until = 0  # ...until then (an older entry of _shun_ends is stale)
        self.charged = 0  # virtual time charged when a device took it (see _pick_locked)
        self.switched = False  # its device switched models for it
        self.started_ns = 0  # when a device took it
        self.state = QUEUED

    def finish(self) -> None:
        """Done with: let go of its views of the client's memory. The deadline heap may
        keep it a while, and with the views it kept a client that had gone mapped (a
        wait as long as the deadlines of the requests ahead of it)."""
        self.state = DONE
        self.inputs = self.outputs = None


@dataclass(eq=False)
class ClientState:
    """A client's queues and accounting."""

    id: int
    name: str = ""
    pid: int = 0
    uid: int = -1
    #: Virtual time (see the module's policy) at each priority it has work at.
    vtimes: dict[int, int] = field(default_factory=dict)
    queues: dict[int, deque[Request]] = field(default_factory=dict)
    queued: int = 0
    running: int = 0
    running_at: dict[int, int] = field(default_factory=dict)  # requests running, by priority
    completed: int = 0
    failed: int = 0
    busy: int = 0
    expired: int = 0
    device_ns: int = 0
    connected_at: float = field(default_factory=time.monotonic)
    recent: RecentWindow = field(default_factory=RecentWindow)  # requests completed

    def rate(self, now_ns: int) -> float:
        """Requests completed per second over the recent window (or since it connected,
        if later)."""
        return self.recent.rates(now_ns, int(self.connected_at * 1e9))[0]

    @property
    def outstanding(self) -> int:
        return self.queued + self.running

    def busy_at(self, priority: int) -> bool:
        """Whether it has a request queued or running at ``priority``."""
        return priority in self.queues or priority in self.running_at

    def settle(self, priority: int) -> None:
        """Forget its virtual time at ``priority`` once it has no work there."""
        if not self.busy_at(priority):
            self.vtimes.pop(priority, None)

    def not_running(self, priority: int) -> None:
        """One of its requests at ``priority`` no longer runs."""
        left = self.running_at[priority] - 1
        if left:
            self.running_at[priority] = left
        else:
            del self.running_at[priority]


@dataclass(eq=False)
class DeviceState:
    """What the scheduler needs to know of a device."""

    index: int
    models: frozenset[int]
    current_model: int | None = None
    switches: int = 0
    failed: str | None = None
    grouped: int = 0
    last: Request | None = None  # the request it runs (None once done: it holds memory)
    waiting: bool = False  # its thread waits on the scheduler's condition for work


class Scheduler:
    """Queues per client; devices pull the next request with :meth:`next` or :meth:`pick`.

    Args:
        max_queue: requests waiting in total before new ones are refused with BUSY.
        group_slack_ns: how far ahead of the least-served client (in device time) a client
            may be and still have its request for the current model run first.
        group_limit: how many times in a row grouping may pass over the fair choice.
    """

    def __init__(
        self, max_queue: int = 256, group_slack_ns: int = 2_000_000, group_limit: int = 8
    ) -> None:
        self.max_queue = max_queue
        self.group_slack_ns = group_slack_ns
        self.group_limit = group_limit
        self.lock = threading.Lock()
        self._cv = threading.Condition(self.lock)
        self._clients: dict[int, ClientState] = {}
        self._active: dict[int, ClientState] = {}
        self._devices: list[DeviceState] = []
        self._served: dict[int, int] = {}
        self._queued = 0
        self._running = 0
        self.finished = 0  # requests done (run or failed): a drain watches it for progress
        self._deadlines: list[tuple[int, int, Request]] = []
        self._seq = itertools.count()
        self._shunning: set[Request] = set()  # queued retries with devices to shun
        self._shun_ends: list[tuple[int, int, Request]] = []  # (until, seq, request) heap
        self._cost: dict[int, int] = {}  # a model's usual compute ns (see _pick_locked)
        self._closed = False
        self._idle_waiters = 0

    @property
    def cv(self) -> threading.Condition:
        """The scheduler's lock and condition (idle devices wait on it)."""
        return self._cv

    # --- devices and clients -------------------------------------------------------------

    def add_device(self, dev: DeviceState) -> None:
        with self._cv:
            self._devices.append(dev)
            for m in dev.models:
                self._served[m] = self._served.get(m, 0) + 1

    def take_out(self, dev: DeviceState, why: str,
                 keep_last: bool = False) -> list[Request] | None:
        """Mark a device failed; returns queued requests that no device can run any more
        (removed from their queues: the caller answers them). With ``keep_last``, None
        instead if it is the last device in service for one of its models (looked at
        under the lock: two take-outs at once both saw the other device in service)."""
        with self._cv:
            if dev.failed is not None:
                return []
            if keep_last and any(self._served.get(m, 0) <= 1 for m in dev.models):
                return None
            dev.failed = why
            for m in dev.models:
                self._served[m] -= 1
            orphans = [
                r for c in self._active.values() for q in c.queues.values() for r in q
                if not self._served.get(r.model_id)
            ]
            for r in orphans:
                self._unlink(r)
                r.finish()
                r.client.failed += 1
            for r in list(self._shunning):  # only devices it failed on are left for it
                if not any(d.failed is None and d not in r.shun and r.model_id in d.models
                           for d in self._devices):
                    self._unshun(r)
            self._cv.notify_all()
            return orphans

    def serves(self, model_id: int) -> bool:
        """True if a device in service has the model."""
        return bool(self._served.get(model_id))

    def add_client(self, client: ClientState) -> None:
        with self._cv:
            self._clients[client.id] = client

    def remove_client(self, client: ClientState) -> list[Request]:
        """Forget a client; returns its queued requests, which will not run."""
        with self._cv:
            self._clients.pop(client.id, None)
            self._active.pop(client.id, None)
            dropped = [r for q in client.queues.values() for r in q]
            for r in dropped:
                r.finish()
                self._unshun(r)
            self._queued -= len(dropped)
            client.queues.clear()
            client.queued = 0
            if dropped:
                self._prune_deadlines()
                self._cv.notify_all()
            return dropped

    def clients(self) -> list[ClientState]:
        with self._cv:
            return list(self._clients.values())

    @property
    def queued(self) -> int:
        """Requests waiting for a device."""
        return self._queued

    @property
    def running(self) -> int:
        """Requests on a device now."""
        return self._running

    @property
    def closed(self) -> bool:
        return self._closed

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
            if not self._served.get(req.model_id):
                client.failed += 1
                return Status.DEVICE_ERROR
            # A request that an idle device is about to take does not wait: a burst that
            # reached an idle device was answered Busy within the queue's bound.
            idle = sum(1 for d in self._devices if d.failed is None and d.last is None)
            if self._queued >= self.max_queue + idle:
                client.busy += 1
                return Status.BUSY
            prio = req.priority
            if not client.busy_at(prio):
                # Coming to this priority (new, back from idle, or from another one): at
                # the least virtual time of the clients with work here, up or down. A
                # newcomer at 0, or a time of its own kept, had the device to itself until
                # it caught up with the others' whole history, or waited for them to
                # catch up with its own (time used at a higher priority held a client
                # that lowered its priority back for as long, ~2 s, even with no idle).
                busy = [c.vtimes[prio] for c in self._clients.values()
                        if c is not client and c.busy_at(prio)]
                client.vtimes[prio] = min(busy) if busy else 0
            req.enqueued_ns = now
            req.seq = next(self._seq)
            req.state = QUEUED
            q = client.queues.get(req.priority)
            if q is None:
                q = client.queues[req.priority] = deque()
            q.append(req)
            client.queued += 1
            self._active[client.id] = client
            self._queued += 1
            if req.deadline_ns:
                heapq.heappush(self._deadlines, (req.deadline_ns, req.seq, req))
            self._cv.notify_all()
            return None

    def _forget(self, req: Request) -> None:
        """``req`` no longer runs: no device keeps it (its arrays view a client's shared
        memory, which must go with the client)."""
        for dev in self._devices:
            if dev.last is req:
                dev.last = None

    def requeue(self, req: Request, failed_on: tuple[DeviceState, ...] = ()) -> bool:
        """Put a running request back at the head of its client's queue (a retry
        elsewhere): for :data:`SHUN_NS` no device of ``failed_on`` (those whose run of it
        failed) takes it, then any may (the others may hang). False if its client is gone:
        nothing is queued."""
        with self._cv:
            req.state = QUEUED
            req.failed_on = failed_on
            client = req.client
            client.vtimes[req.priority] -= req.charged
            req.charged = 0
            self._forget(req)
            client.running -= 1
            self._running -= 1
            client.not_running(req.priority)
            if client.id not in self._clients:
                req.finish()
                client.settle(req.priority)
                return False
            if failed_on:
                req.shun = failed_on
                req.shun_until = time.monotonic_ns() + SHUN_NS
                self._shunning.add(req)
                heapq.heappush(self._shun_ends, (req.shun_until, req.seq, req))
            client.queues.setdefault(req.priority, deque()).appendleft(req)
            client.queued += 1
            self._active[client.id] = client
            self._queued += 1
            if req.deadline_ns:
                heapq.heappush(self._deadlines, (req.deadline_ns, req.seq, req))
            self._cv.notify_all()
            return True

    # --- dispatch --------------------------------------------------------------------

    def _shun_current(self, entry: tuple[int, int, Request]) -> bool:
        """An entry of ``_shun_ends`` still in force: its request is queued and shunning,
        and it is of its latest failure (an earlier failure's let the request back within
        milliseconds to the device it had just failed on)."""
        until, _, req = entry
        return req in self._shunning and until == req.shun_until

    def _unshun(self, req: Request) -> None:
        self._shunning.discard(req)
        req.shun = ()

    def _unlink(self, req: Request) -> None:
        if req.shun:
            self._unshun(req)
        client = req.client
        q = client.queues[req.priority]
        if q[0] is req:
            q.popleft()
        else:
            q.remove(req)
        if not q:
            del client.queues[req.priority]
            client.settle(req.priority)
            if not client.queues:
                self._active.pop(client.id, None)
        client.queued -= 1
        self._queued -= 1

    def _prune_deadlines(self) -> None:
        self._deadlines = [e for e in self._deadlines if e[2].state == QUEUED]
        heapq.heapify(self._deadlines)

    def _expire_locked(self, now: int) -> list[Request]:
        while self._shun_ends and self._shun_ends[0][0] <= now:
            entry = heapq.heappop(self._shun_ends)
            if self._shun_current(entry):
                self._unshun(entry[2])
                self._cv.notify_all()
        out = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, req = heapq.heappop(self._deadlines)
            if req.state == QUEUED:
                self._unlink(req)
                req.finish()
                req.client.expired += 1
                out.append(req)
        return out

    def expire(self, now_ns: int | None = None) -> list[Request]:
        """Remove and return the queued requests whose deadline has passed (and let the
        retries that shunned devices long enough go to them)."""
        if not self._deadlines and not self._shun_ends:
            return []
        with self._cv:
            return self._expire_locked(time.monotonic_ns() if now_ns is None else now_ns)

    def next_deadline_ns(self) -> int | None:
        """The earliest deadline among queued requests (or end of a retry's shunning), if
        any: when :meth:`expire` has something to do."""
        if not self._deadlines and not self._shun_ends:
            return None
        with self._cv:
            while self._deadlines and self._deadlines[0][2].state != QUEUED:
                heapq.heappop(self._deadlines)
            while self._shun_ends and not self._shun_current(self._shun_ends[0]):
                heapq.heappop(self._shun_ends)
            ends = [h[0][0] for h in (self._deadlines, self._shun_ends) if h]
            return min(ends) if ends else None

    def _candidates(self, dev: DeviceState) -> tuple[int, list[ClientState]] | None:
        """The highest priority with work ``dev`` can run, and the clients that have it."""
        if not self._shunning and len(self._served) == len(dev.models):  # no filter
            if len(self._active) == 1:  # the common case, in short
                for c in self._active.values():
                    queues = c.queues
                    return (max(queues) if len(queues) > 1 else next(iter(queues))), [c]
            best = max(max(c.queues) for c in self._active.values())
            return best, [c for c in self._active.values() if best in c.queues]
        found: int | None = None
        cands: list[ClientState] = []
        for c in self._active.values():
            for prio, q in c.queues.items():
                if (found is None or prio >= found) and any(
                    r.model_id in dev.models and dev not in r.shun for r in q
                ):
                    if found is None or prio > found:
                        found, cands = prio, []
                    cands.append(c)
        return None if found is None else (found, cands)

    def _pick_locked(self, dev: DeviceState) -> Request | None:
        if not self._active or dev.failed is not None:
            return None
        found = self._candidates(dev)
        if found is None:
            return None
        prio, cands = found
        models = dev.models
        elsewhere: set[int] = set()  # clients with a request running on another device
        if len(cands) == 1:
            fair = cands[0]
        else:
            now = time.monotonic_ns()
            for other in self._devices:
                r = other.last
                # A run far past its usual time (a hung device) no longer counts: its
                # client was last behind every client with work, for as long as it hung.
                if other is not dev and r is not None and now - r.started_ns < max(
                        STUCK_FACTOR * self._cost.get(r.model_id, 0), STUCK_MIN_NS):
                    elsewhere.add(r.client.id)
            # A client already running on another device waits for the others: with
            # several devices both went to whoever was behind, each switching models
            # in step, instead of one device each.
            fair = min(cands, key=lambda c: (c.id in elsewhere, c.vtimes[prio], c.id))
        head = fair.queues[prio][0]
        chosen = head if head.model_id in models and dev not in head.shun else next(
            r for r in fair.queues[prio] if r.model_id in models and dev not in r.shun
        )
        current = dev.current_model
        if (
            current is not None
            and chosen.model_id != current
            and (dev.grouped < self.group_limit or self._held_elsewhere(dev, chosen.model_id))
        ):
            limit = fair.vtimes[prio] + self.group_slack_ns
            # Not from a client running on another device while the fair one is not:
            # that kept both devices on one client's model, switching in step.
            busy = fair.id in elsewhere
            for c in sorted((c for c in cands if c.vtimes[prio] <= limit
                             and (busy or c.id not in elsewhere)),
                            key=lambda c: c.vtimes[prio]):
                alt = next((r for r in c.queues[prio]
                            if r.model_id == current and dev not in r.shun), None)
                if alt is not None:
                    chosen = alt
                    dev.grouped += 1
                    break
        if current is not None and chosen.model_id != current and self._idle_holder(
                dev, chosen):
            # Another device waits for work with that model: it takes it without a
            # switch (woken now). Here, work for this device's own model at any priority,
            # if there is some: a client sending one request at a time had every device
            # switch models.
            self._cv.notify_all()
            alt = self._own_model_work(dev, current)
            if alt is None:
                return None
            chosen = alt
            prio = alt.priority
        if chosen.model_id != current or chosen is head:
            dev.grouped = 0
        client = chosen.client
        client.running_at[prio] = client.running_at.get(prio, 0) + 1  # before: see _unlink
        self._unlink(chosen)
        # Charged now, at its usual cost, and set right when it is done: with several
        # devices, a client whose request is running does not look owed the next device
        # too (both devices then went to whoever was behind, and switched models in step).
        chosen.charged = self._cost.get(chosen.model_id, 0)
        client.vtimes[prio] += chosen.charged
        chosen.switched = current is not None and current != chosen.model_id
        chosen.started_ns = time.monotonic_ns()
        chosen.state = RUNNING
        dev.last = chosen
        chosen.client.running += 1
        self._running += 1
        if current is not None and current != chosen.model_id:
            dev.switches += 1
        dev.current_model = chosen.model_id
        return chosen

    def _held_elsewhere(self, dev: DeviceState, model_id: int) -> bool:
        """Another device in service holds ``model_id``: it serves that model's requests
        without a switch, so ``dev`` keeping its own model delays them by no more than
        that device's run, and the run limit of grouping need not force ``dev`` over."""
        return any(d is not dev and d.failed is None and d.current_model == model_id
                   for d in self._devices)

    def _idle_holder(self, dev: DeviceState, req: Request) -> bool:
        """Another device in service waits for work (on the condition, so a notify wakes
        it), holds ``req``'s model and may run it."""
        return not self._closed and any(
            d is not dev and d.waiting and d.failed is None and d.current_model == req.model_id
            and d not in req.shun for d in self._devices)

    def _own_model_work(self, dev: DeviceState, model: int) -> Request | None:
        """The first request for ``model`` that ``dev`` may run: highest priority first,
        then the client least served there."""
        best: tuple[int, int, int] | None = None
        found = None
        for c in self._active.values():
            for prio, q in c.queues.items():
                key = (-prio, c.vtimes.get(prio, 0), c.id)
                if best is not None and key >= best:
                    continue
                r = next((r for r in q if r.model_id == model and dev not in r.shun), None)
                if r is not None:
                    best, found = key, r
        return found

    def take_locked(self, dev: DeviceState) -> tuple[Request | None, list[Request]]:
        """Like :meth:`next` but never waits: ``(None, [])`` when there is nothing to do.

        The caller holds :attr:`cv` (so it can wait on it for other reasons too).
        """
        expired = (self._expire_locked(time.monotonic_ns())
                   if self._deadlines or self._shun_ends else [])
        return self._pick_locked(dev), expired

    def pick(self, dev: DeviceState) -> tuple[Request | None, list[Request]]:
        """Like :meth:`next` but never waits: ``(None, [])`` when there is nothing to do."""
        with self._cv:
            return self.take_locked(dev)

    def next(self, dev: DeviceState) -> tuple[Request | None, list[Request]]:
        """Block until there is a request ``dev`` can run.

        Returns ``(request, expired)``: ``expired`` are requests whose deadline passed and
        must be answered DEADLINE_EXCEEDED by the caller. ``request`` is None once the
        scheduler is closed and nothing this device can run is left (drained), or the
        device was taken out.
        """
        with self._cv:
            while True:
                req, expired = self.take_locked(dev)
                if req is not None or expired:
                    return req, expired
                if self._closed or dev.failed is not None:
                    return None, []
                dev.waiting = True
                try:
                    self._cv.wait()
                finally:
                    dev.waiting = False

    def done(self, req: Request, compute_ns: int, ok: bool) -> None:
        """Account for a finished request."""
        with self._cv:
            req.finish()
            self.finished += 1
            c = req.client
            c.running -= 1
            self._running -= 1
            self._forget(req)
            c.vtimes[req.priority] += compute_ns - req.charged
            c.not_running(req.priority)
            c.settle(req.priority)
            c.device_ns += compute_ns
            usual = self._cost.get(req.model_id)
            if ok and (usual is None or not req.switched):  # a reload is not its usual
                self._cost[req.model_id] = (compute_ns if usual is None
                                            else usual + (compute_ns - usual) // 8)
            if ok:
                c.completed += 1
                c.recent.add(time.monotonic_ns())
            else:
                c.failed += 1
            if len(self._deadlines) > 64 and len(self._deadlines) > 4 * self._queued:
                self._prune_deadlines()
            if self._closed or self._idle_waiters:
                self._cv.notify_all()

    def close(self) -> None:
        """Refuse new requests; devices drain what is queued, then :meth:`next` returns None."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def abort(self) -> list[Request]:
        """Refuse new requests and drop every queued one; returns the dropped requests."""
        with self._cv:
            self._closed = True
            dropped = [r for c in list(self._active.values()) for q in c.queues.values()
                       for r in q]
            for r in dropped:
                self._unlink(r)
                r.finish()
            self._deadlines.clear()
            self._cv.notify_all()
            return dropped

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until nothing is queued or running; True if so before ``timeout``."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            self._idle_waiters += 1
            try:
                while self._queued or self._running:
                    left = None if end is None else end - time.monotonic()
                    if left is not None and left <= 0:
                        return False
                    self._cv.wait(left)
                return True
            finally:
                self._idle_waiters -= 1
