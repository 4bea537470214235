"""One request of a device client: its Future, its timing, its entry while in flight, and
the arrays its outputs are copied into."""

from __future__ import annotations

import sys
from collections import deque
from concurrent.futures import Future
from concurrent.futures._base import FINISHED, RUNNING
from typing import Any, Protocol, cast
from weakref import getweakrefcount

import numpy as np
import numpy.typing as npt

from .. import _errors
from .._errors import (
    Busy,
    ConveyorError,
    DeadlineExceeded,
    DeviceError,
    InputError,
    ModelNotFoundError,
    ProtocolError,
    ServerError,
    ServerGone,
)
from ._catalog import ModelInfo
from ._protocol import Status

__all__ = [
    "STATUS_ERRORS",
    "InferFuture",
    "OutputPool",
    "Outputs",
    "Pending",
    "Timing",
    "error_from_name",
]

Outputs = list[npt.NDArray[Any]]


class _Waiter(Protocol):
    def _wait(self, p: Pending, timeout: float | None) -> None: ...


class Timing:
    """Where a request spent its time, as the server measured it (CLOCK_MONOTONIC ns)."""

    __slots__ = ("compute_ns", "device", "queue_ns", "start_ns")

    def __init__(self, device: int, queue_ns: int, compute_ns: int, start_ns: int) -> None:
        self.device = device
        self.queue_ns = queue_ns
        self.compute_ns = compute_ns
        self.start_ns = start_ns


class InferFuture(Future[Outputs]):
    """A Future of one inference's outputs; ``timing`` is set once it is done.

    It cannot be cancelled (the request is already on its way); a result nobody wants
    is dropped when it arrives. :meth:`result` lets the waiting thread read the reply
    itself (see :mod:`conveyor._device._client`).
    """

    timing: Timing | None = None
    _client: _Waiter | None = None
    _entry: Pending | None = None

    # FINISHED is final, and set under the Future's lock after the outcome: a thread
    # that sees it needs no lock to read the outcome (and nothing here is ever
    # cancelled), which saves the reply callback a lock round per call.

    def result(self, timeout: float | None = None) -> Outputs:
        """The outputs; blocks until they arrive, at most ``timeout`` seconds.

        Raises TimeoutError, or the request's error (Busy, DeadlineExceeded,
        DeviceError, ServerGone...).
        """
        if self._state == FINISHED and self._exception is None:
            return cast(Outputs, self._result)
        client, entry = self._client, self._entry
        if client is not None and entry is not None and self._state != FINISHED:
            client._wait(entry, timeout)
        return super().result(timeout=0 if client is not None else timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The request's error, or None once the outputs are in; blocks until then, at
        most ``timeout`` seconds (TimeoutError after)."""
        if self._state == FINISHED:
            return self._exception
        client, entry = self._client, self._entry
        if client is not None and entry is not None:
            client._wait(entry, timeout)  # as result(): a forked child's is refused there
            return super().exception(timeout=0)
        return super().exception(timeout)

    def done(self) -> bool:
        return self._state == FINISHED or super().done()

    def _start(self) -> None:
        # A new Future nobody else has seen yet: running, so it cannot be cancelled.
        self._state = RUNNING


STATUS_ERRORS: dict[int, type[ConveyorError]] = {
    Status.BUSY: Busy,
    Status.DEADLINE_EXCEEDED: DeadlineExceeded,
    Status.INPUT_ERROR: InputError,
    Status.DEVICE_ERROR: DeviceError,
    Status.UNKNOWN_MODEL: ModelNotFoundError,
    Status.BAD_REQUEST: ProtocolError,
    Status.SHUTTING_DOWN: ServerGone,
}


def error_from_name(name: str, message: str) -> ConveyorError:
    """Rebuild a conveyor error from its class name (a fixed table: nothing is evaluated)."""
    cls = getattr(_errors, name, None) if name in _errors.__all__ else None
    if isinstance(cls, type) and issubclass(cls, ConveyorError) and name != "StageError":
        return cls(message)
    return ServerError(f"{name}: {message}")


class Pending:
    """A request in flight. ``waited``: a thread waits on it (so the background reader
    need not); ``gone``: no longer in the pending table (answered or lost). Both change
    under the client's lock. :meth:`finish` fills in the outcome (outside the lock)."""

    __slots__ = ("dequantize", "error", "expired", "finished", "future", "gone", "info",
                 "outputs", "slot", "waited")

    def __init__(self, info: ModelInfo | None, slot: int, deq: bool, waited: bool,
                 future: InferFuture | None = None) -> None:
        self.info = info
        self.slot = slot
        self.dequantize = deq
        self.waited = waited
        self.future = future
        self.gone = False
        self.expired = False  # failed by the client itself: no reply came in time
        self.finished = False
        self.outputs: Any = None
        self.error: BaseException | None = None

    def finish(self, outputs: Any, error: BaseException | None,
               timing: Timing | None = None) -> None:
        self.outputs = outputs
        self.error = error
        fut = self.future
        if fut is not None:  # the future first: "finished" must imply "done"
            fut.timing = timing
            if error is None:
                fut.set_result(outputs)
            else:
                fut.set_exception(error)
            # Done: the future no longer needs its entry. Breaking the cycle lets both go
            # when their last user does, not at the next garbage collection.
            fut._entry = None
        self.finished = True


#: Outputs smaller than this are copied into plain new arrays: the allocator serves them
#: from its free lists without touching the kernel.
POOL_MIN_BYTES = 32 << 10
#: Memory that one pool keeps in output arrays, at most.
POOL_BYTES = 2 << 20
#: Sets of output arrays one pool keeps, at most.
POOL_SETS = 16


def _unshared(arrays: tuple[npt.NDArray[Any], ...], alone: int) -> bool:
    """True if nothing but their tuple refers to ``arrays`` (no list, view, memoryview,
    Future or weak reference): ``alone`` is the reference count that means so here."""
    return all(sys.getrefcount(a) <= alone and not getweakrefcount(a) for a in arrays)


def _alone() -> int:
    # The count _unshared sees for arrays held by their tuple alone: the interpreter's
    # own temporaries differ between Python versions, so measure them once.
    return next(n for n in range(1, 16) if _unshared((np.empty(0),), n))


_ALONE = _alone()
#: Reference counts say nothing reliable without the GIL (free-threaded builds).
_POOLING = bool(getattr(sys, "_is_gil_enabled", lambda: True)())


class OutputPool:
    """The arrays one model's outputs are copied into, reused once their user let go.

    Each reply's outputs are copied out of the shared slot into arrays of their own. New
    arrays of a hundred kilobytes and more come from memory that the C allocator has
    just given back to the kernel (it trims its heaps as they are freed), so filling one
    costs a page fault per 4 kB, tens per reply. This pool keeps the last sets it handed
    out and refills the oldest when nothing but the pool refers to any of its arrays
    (no list, view, memoryview, Future or weak reference: the reference count says so),
    and when it is still as it was made (shape, strides, dtype, writeable). Otherwise it
    makes a new set, so the pool grows only as far as its sets are still in use when the
    next reply comes (few, when replies are used in order: the memory stays in cache),
    to at most :data:`POOL_BYTES` and at most :data:`POOL_SETS` sets, after which it
    forgets the oldest. Outputs smaller than :data:`POOL_MIN_BYTES` are not pooled.

    One thread at a time (the client's reader).
    """

    __slots__ = ("_make", "_ring", "_size")

    def __init__(self, views: list[npt.NDArray[Any]]) -> None:
        nbytes = sum(v.nbytes for v in views)
        size = min(POOL_SETS, POOL_BYTES // max(nbytes, 1)) if _POOLING else 0
        self._size = size if nbytes >= POOL_MIN_BYTES else 0
        self._make = [(v.shape, v.dtype) for v in views]
        self._ring: deque[tuple[npt.NDArray[Any], ...]] = deque()

    def fill(self, views: list[npt.NDArray[Any]]) -> Outputs:
        """Copies of ``views`` (in the shapes and dtypes the pool was made for)."""
        if not self._size:
            return [v.copy() for v in views]
        ring = self._ring
        if ring and self._reusable(ring[0]):
            arrays = ring.popleft()
        else:
            if len(ring) >= self._size:
                ring.popleft()  # still in use: forget it
            arrays = tuple(np.empty(shape, dtype) for shape, dtype in self._make)
        for dst, src in zip(arrays, views):
            np.copyto(dst, src)
        ring.append(arrays)
        return list(arrays)

    def _reusable(self, arrays: tuple[npt.NDArray[Any], ...]) -> bool:
        return _unshared(arrays, _ALONE) and all(
            a.shape == shape and a.dtype == dtype and a.flags.writeable
            and a.flags.c_contiguous for a, (shape, dtype) in zip(arrays, self._make)
        )
