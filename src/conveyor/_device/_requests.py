"""One request of a device client: its Future, its timing, and its entry while in flight."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Protocol

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

__all__ = ["STATUS_ERRORS", "InferFuture", "Outputs", "Pending", "Timing", "error_from_name"]

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

    def result(self, timeout: float | None = None) -> Outputs:
        """The outputs; blocks until they arrive, at most ``timeout`` seconds.

        Raises TimeoutError, or the request's error (Busy, DeadlineExceeded,
        DeviceError, ServerGone...).
        """
        client, entry = self._client, self._entry
        if client is not None and entry is not None and not self.done():
            client._wait(entry, timeout)
        return super().result(timeout=0 if client is not None else timeout)


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

    __slots__ = ("dequantize", "error", "finished", "future", "gone", "info", "outputs",
                 "slot", "waited")

    def __init__(self, info: ModelInfo | None, slot: int, deq: bool, waited: bool,
                 future: InferFuture | None = None) -> None:
        self.info = info
        self.slot = slot
        self.dequantize = deq
        self.waited = waited
        self.future = future
        self.gone = False
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
        self.finished = True


