"""Bounded channels between pipeline stages.

A :class:`Channel` holds at most ``maxsize`` items. ``put`` blocks while it is full
(backpressure) unless the channel drops the oldest item instead (live mode); ``get``
blocks while it is empty. :meth:`Channel.abort` wakes every blocked caller at once:
``put`` and ``get`` then raise :class:`Aborted`. That is the only cancellation path, so
shutdown never waits on a timeout.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Aborted", "Channel"]

T = TypeVar("T")


class Aborted(Exception):
    """The channel was aborted (the pipeline is shutting down)."""


class Channel(Generic[T]):
    """A bounded, abortable FIFO shared by threads.

    Args:
        maxsize: the most items it holds (>= 1).
        drop_oldest: when full, ``put`` removes the oldest item and returns it instead of
            blocking.
        refill_at: a blocked ``put`` is woken once the channel is down to this many items
            (default ``maxsize - 1``: as soon as there is room). A lower mark lets a
            producer that only feeds the channel (the pipeline's feeder) wake once per
            several items instead of once per item.
    """

    def __init__(
        self, maxsize: int, *, drop_oldest: bool = False, refill_at: int | None = None
    ) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.maxsize = maxsize
        self.drop_oldest = drop_oldest
        self.refill_at = maxsize - 1 if refill_at is None else max(0, min(refill_at, maxsize - 1))
        self._items: deque[T] = deque()
        # One lock, two conditions (as queue.Queue): a put wakes one getter and a get one
        # putter, never every thread waiting on the channel.
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._aborted = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: T, cancelled: Callable[[], bool] | None = None,
            own: Callable[[T], bool] | None = None) -> T | None:
        """Add an item; returns the item dropped to make room (live mode), else None.

        Blocks while full (not in drop-oldest mode). In drop-oldest mode the oldest item
        for which ``own`` is true makes room; with none such (the room is taken by other
        callers' items, each bounded by its own caller) the item is added over the bound.
        Cancellation: raises Aborted when the channel is aborted, or when ``cancelled()``
        turns true and :meth:`wake` is called.
        """
        with self._lock:
            dropped = None
            while len(self._items) >= self.maxsize:
                if self._aborted or (cancelled is not None and cancelled()):
                    raise Aborted
                if self.drop_oldest:
                    if own is None:
                        dropped = self._items.popleft()
                    else:
                        dropped = next((it for it in self._items if own(it)), None)
                        if dropped is not None:
                            self._items.remove(dropped)
                    break
                self._not_full.wait()
            if self._aborted:
                raise Aborted
            self._items.append(item)
            self._not_empty.notify()
            return dropped

    def get(self) -> T:
        """Take the oldest item; blocks while empty. Raises Aborted when aborted."""
        with self._lock:
            while not self._items:
                if self._aborted:
                    raise Aborted
                self._not_empty.wait()
            item = self._items.popleft()
            if len(self._items) <= self.refill_at:
                self._not_full.notify()
            return item

    def get_within(self, timeout: float) -> T | None:
        """As :meth:`get`, but None once ``timeout`` seconds pass with nothing to take."""
        end = time.monotonic() + timeout
        with self._lock:
            while not self._items:
                if self._aborted:
                    raise Aborted
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self._not_empty.wait(left)
            item = self._items.popleft()
            if len(self._items) <= self.refill_at:
                self._not_full.notify()
            return item

    def try_get(self) -> T | None:
        """Take the oldest item if there is one, else None at once. Raises Aborted."""
        with self._lock:
            if self._aborted:
                raise Aborted
            if not self._items:
                return None
            item = self._items.popleft()
            if len(self._items) <= self.refill_at:
                self._not_full.notify()
            return item

    def remove_if(self, pred: Callable[[T], bool]) -> list[T]:
        """Remove and return the waiting items for which ``pred`` is true."""
        with self._lock:
            keep: deque[T] = deque()
            out: list[T] = []
            for it in self._items:
                (out if pred(it) else keep).append(it)
            self._items = keep
            if out and len(self._items) <= self.refill_at:
                self._not_full.notify(len(out))
            return out

    def pop_oldest_if(self, pred: Callable[[T], bool]) -> T | None:
        """Remove and return the oldest waiting item for which ``pred`` is true."""
        with self._lock:
            for it in self._items:
                if pred(it):
                    self._items.remove(it)
                    if len(self._items) <= self.refill_at:
                        self._not_full.notify()
                    return it
            return None

    def wake(self) -> None:
        """Wake blocked callers so they re-check their ``cancelled`` predicate."""
        with self._lock:
            self._not_empty.notify_all()
            self._not_full.notify_all()

    def abort(self) -> list[T]:
        """Wake everyone with Aborted from now on; returns the items left inside."""
        with self._lock:
            self._aborted = True
            left = list(self._items)
            self._items.clear()
            self._not_empty.notify_all()
            self._not_full.notify_all()
            return left
