"""A run: the items one caller put into a pipeline, and their outcomes.

Every admitted item ends as exactly one outcome: a result, an error, a counted drop, or
(only when the caller has gone) a cancellation. A run bounds its items in flight with
tokens, taken when an item is admitted and given back when the caller consumes its
outcome, so the reorder buffer never holds more than ``max_in_flight`` entries.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["CANCEL", "DROP", "ERR", "OK", "Run", "poll_ms"]

OK, ERR, DROP, CANCEL = "ok", "err", "drop", "cancel"
#: The longest a caller waits at a time without looking for a signal's handler to run.
SIGNAL_CHECK_S = 0.5
#: The longest one poll() waits (ms): its argument is a C int, and a wait until a far
#: deadline (a month ahead) overflowed it; a caller that waits longer polls again.
_POLL_MAX_MS = 3_600_000


def poll_ms(timeout: float | None) -> int | None:
    """``timeout`` (seconds, None: no end) as poll()'s milliseconds, rounded up, at most
    an hour."""
    if timeout is None:
        return None
    return min(max(0, math.ceil(timeout * 1000)), _POLL_MAX_MS)
Outcome = tuple[str, Any]


class Run:
    """Outcomes of one ``map``/``amap`` call (or of all ``submit`` calls)."""

    def __init__(
        self, ordered: bool, max_in_flight: int, notify: Callable[[], None] | None = None,
        *, drop_errors: bool = False,
    ) -> None:
        self.ordered = ordered
        # Live mode: a stale error may be dropped like a stale result (the caller takes
        # errors as results, on_error="return"); else errors are kept for the caller.
        self.drop_errors = drop_errors
        # One lock; the feeder waits for tokens, the consumer for outcomes, and each is
        # woken only by what it waits for.
        self._lock = threading.Lock()
        self._tokens_cv = threading.Condition(self._lock)
        self._ready_cv = threading.Condition(self._lock)
        self.cancelled = False
        self.total: int | None = None
        self.admitted = 0
        self.consumed = 0
        self.tokens = max_in_flight
        self.next_index = 0
        self._by_index: dict[int, Outcome] = {}
        self._arrived: deque[tuple[int, Outcome]] = deque()
        self._skip: set[int] = set()
        self.dropped = 0
        # Unordered runs: the input iterator's error, held back until every item admitted
        # before it has its outcome (ordered runs get that from the order itself).
        self._last: tuple[int, Outcome] | None = None
        self._notify = notify
        self.on_outcome: Callable[[int, str, Any], None] | None = None

    # --- producer side --------------------------------------------------------------

    def acquire(self, block: bool = True) -> bool:
        """Take a token for one more item in flight. Blocks while none is free (unless
        ``block`` is False); returns False if the run is cancelled or no token is free.
        """
        with self._lock:
            while self.tokens <= 0:
                if self.cancelled or not block:
                    return False
                self._tokens_cv.wait()
            if self.cancelled:
                return False
            self.tokens -= 1
            self.admitted += 1
            return True

    def deliver(self, index: int, kind: str, value: Any = None) -> None:
        """Record an item's outcome (thread-safe)."""
        hook = self.on_outcome
        if hook is not None:
            # submit()'s run: the hook hands the outcome to its Future, which consumes it.
            with self._lock:
                if kind == DROP:
                    self.dropped += 1
                self._discard_locked()
            hook(index, kind, value)
            return
        with self._lock:
            if kind == DROP:
                # A drop is accounted at once and gives its token back, so a stalled
                # consumer never blocks a live source; ordered runs skip the index.
                self.dropped += 1
                if self.ordered:
                    self._skip.add(index)
                self._discard_locked()
            elif self.cancelled:
                self._discard_locked()
                return
            elif self.ordered:
                self._by_index[index] = (kind, value)
                # Out of order: the consumer cannot use it yet, so it sleeps on.
                if index == self.next_index or self._skip:
                    self._ready_cv.notify()
            else:
                self._arrived.append((index, (kind, value)))
                self._ready_cv.notify()
        if self._notify is not None:
            self._notify()

    def deliver_last(self, index: int, kind: str, value: Any = None) -> None:
        """Record the outcome of the run's last item (the input iterator's error), to be
        taken after every other admitted item's outcome, in unordered runs too."""
        if self.ordered or self.on_outcome is not None:
            self.deliver(index, kind, value)
            return
        with self._lock:
            if self.cancelled:
                self._discard_locked()
                return
            self._last = (index, (kind, value))
            self._ready_cv.notify()
        if self._notify is not None:
            self._notify()

    def _discard_locked(self) -> None:
        """An outcome nobody will take (a drop, or a run whose caller has gone): its
        token comes back at once."""
        self.tokens += 1
        self.consumed += 1
        self._tokens_cv.notify()
        self._ready_cv.notify()

    def _stale(self, outcome: Outcome) -> bool:
        """Whether live mode may drop this ready outcome: a result, or with
        ``drop_errors`` an item's error (never the input iterator's, which ends the run)."""
        kind, value = outcome
        return kind == OK or (self.drop_errors and kind == ERR
                              and getattr(value, "stage", None) != "source")

    def drop_oldest_result(self) -> bool:
        """Live mode, every token taken and no item waiting to enter: drop the oldest
        outcome that is ready but not taken yet (the consumer is behind, and a new frame
        is worth more than a stale one), counted as a drop: a result, or an error where
        ``drop_errors`` (else errors are kept). True if one was dropped: its token is
        free."""
        with self._lock:
            if self.cancelled or self.on_outcome is not None:
                return False
            if self.ordered:
                ready = [i for i, outcome in self._by_index.items() if self._stale(outcome)]
                if not ready:
                    return False
                index = min(ready)
                del self._by_index[index]
                self._skip.add(index)
            else:
                for n, (_, outcome) in enumerate(self._arrived):
                    if self._stale(outcome):
                        del self._arrived[n]
                        break
                else:
                    return False
            self.dropped += 1
            self._discard_locked()
            return True

    def release_token(self) -> None:
        """Give back a token taken for an item that never came (the source ended)."""
        with self._lock:
            self.tokens += 1
            self.admitted -= 1
            self._tokens_cv.notify()

    def force_admit(self) -> None:
        """Count an item admitted without a free token (live mode; it is dropped at once
        or replaces a dropped one)."""
        with self._lock:
            self.tokens -= 1
            self.admitted += 1

    def finish(self, total: int) -> None:
        """The source is exhausted (or failed) after ``total`` items."""
        with self._lock:
            self.total = total
            self._ready_cv.notify_all()
        if self._notify is not None:
            self._notify()

    def cancel(self) -> None:
        """The caller has gone, or the pipeline closed under it: outcomes still to come
        are discarded, and a consumer waiting for one is woken (:meth:`take` then gives
        what was ready, then None)."""
        with self._lock:
            self.cancelled = True
            self._tokens_cv.notify_all()
            self._ready_cv.notify_all()
        if self._notify is not None:
            self._notify()

    # --- consumer side --------------------------------------------------------------

    def _ready_locked(self) -> tuple[int, Outcome] | None:
        if self.ordered:
            while self.next_index in self._skip:
                self._skip.discard(self.next_index)
                self.next_index += 1
            outcome = self._by_index.pop(self.next_index, None)
            if outcome is None:
                return None
            index = self.next_index
            self.next_index += 1
        elif self._arrived:
            index, outcome = self._arrived.popleft()
        elif (self._last is not None and not self.cancelled
              and self.consumed + 1 >= self.admitted):
            # Not after a cancel: the items before it were cancelled, not answered.
            index, outcome = self._last
            self._last = None
        else:
            return None
        self.tokens += 1
        self.consumed += 1
        self._tokens_cv.notify()
        return index, outcome

    def done_locked(self) -> bool:
        return self.total is not None and self.consumed >= self.total

    def take(self, block: bool = True) -> tuple[int, Outcome] | None:
        """The next outcome (in input order if ordered); None when the run is complete
        or cancelled, or, with ``block`` False, when nothing is ready yet. Blocks until one
        is ready. Interruptible (KeyboardInterrupt) in the main thread.
        """
        with self._lock:
            while True:
                ready = self._ready_locked()
                if ready is not None:
                    return ready
                if self.done_locked() or self.cancelled or not block:
                    return None
                # Bounded: a Ctrl-C the kernel hands another thread interrupts no wait
                # here, and Python runs its handler only when this (main) thread wakes.
                self._ready_cv.wait(SIGNAL_CHECK_S)

    @property
    def complete(self) -> bool:
        with self._lock:
            return self.done_locked()
