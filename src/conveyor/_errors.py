"""The exception hierarchy: every error conveyor raises is a ConveyorError.

Backend exceptions never leak: they are translated at the boundary and chained with
``raise ... from exc`` so the original stays visible in ``__cause__``.
"""

from __future__ import annotations

__all__ = [
    "Busy",
    "ConveyorError",
    "DeadlineExceeded",
    "DeviceBusyError",
    "DeviceError",
    "DeviceNotFoundError",
    "DeviceSpecError",
    "EdgeTPUModelError",
    "EdgeTPURuntimeMissingError",
    "InputError",
    "InvalidModelError",
    "ModelError",
    "ModelNotFoundError",
    "PermissionDenied",
    "PipelineClosedError",
    "ProtocolError",
    "ServerError",
    "ServerGone",
    "StageError",
    "WorkerDiedError",
    "WorkerStartError",
]


def describe_exception(exc: BaseException) -> str:
    """``Type: message`` for ``exc``, even when its ``__str__`` itself raises."""
    try:
        text = str(exc)
    except Exception as inner:
        text = f"<str() of the exception failed: {type(inner).__name__}>"
    return f"{type(exc).__name__}: {text}"


class ConveyorError(Exception):
    """Base class of every error conveyor raises."""


# --- models -------------------------------------------------------------------------------


class ModelError(ConveyorError):
    """A model could not be found, read or run as asked."""


class ModelNotFoundError(ModelError, FileNotFoundError):
    """No model file at the path, and no bundled model of that name."""


class InvalidModelError(ModelError):
    """The file exists but is not a model the backend can load."""


class EdgeTPUModelError(ModelError):
    """A model compiled for the Edge TPU was opened without the Edge TPU delegate."""


class InputError(ConveyorError, ValueError):
    """Inputs do not match the model: wrong count, name, shape or dtype."""


# --- devices ------------------------------------------------------------------------------


class DeviceError(ConveyorError):
    """A device could not be opened or failed while running."""


class DeviceSpecError(DeviceError, ValueError):
    """A device spec string is not of a valid form."""


class DeviceNotFoundError(DeviceError):
    """The device named by a spec is not present on this machine."""


class DeviceBusyError(DeviceError):
    """The device is held by another process."""


class EdgeTPURuntimeMissingError(DeviceError):
    """libedgetpu (the Edge TPU runtime library) is not installed."""


# --- pipelines ----------------------------------------------------------------------------


class StageError(ConveyorError):
    """An item failed in a pipeline stage.

    Attributes:
        stage: the name of the stage that failed (``"source"`` for the input iterator).
        index: the item's position in the input, counted from 0.
        traceback_text: the formatted traceback of the original error, kept across processes.

    ``__cause__`` is the original exception.
    """

    def __init__(self, stage: str, index: int, message: str, traceback_text: str = "") -> None:
        super().__init__(f"stage {stage!r} failed on item {index}: {message}")
        self.stage = stage
        self.index = index
        self.traceback_text = traceback_text

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild_stage_error,
            (self.stage, self.index, str(self), self.traceback_text, self.__cause__),
        )


def _rebuild_stage_error(
    stage: str, index: int, text: str, tb: str, cause: BaseException | None
) -> StageError:
    err = StageError.__new__(StageError)
    Exception.__init__(err, text)
    err.stage, err.index, err.traceback_text = stage, index, tb
    err.__cause__ = cause
    return err


class RemoteError(ConveyorError):
    """Stands in for an exception raised in a worker process that could not be sent to
    this one (it, or an attribute of it, cannot be pickled): ``str()`` is its type's name
    and message, and ``type_name`` its type's name. The worker's traceback is in the
    :class:`StageError`'s ``traceback_text``."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.type_name, str(self).partition(": ")[2]))


class WorkerDiedError(ConveyorError):
    """A worker process died while it held an item (for instance killed by a signal)."""


class WorkerStartError(ConveyorError):
    """A worker process failed to start or to finish its start-up handshake in time."""


class PipelineClosedError(ConveyorError, RuntimeError):
    """The pipeline was closed; no more items can be submitted."""


# --- device server ------------------------------------------------------------------------


class ServerError(ConveyorError):
    """An error reported by, or about, a device server."""


class ServerGone(ServerError, ConnectionError):
    """The device server (or device worker) went away; in-flight requests are lost."""


class PermissionDenied(ServerError, PermissionError):
    """This user may not use the device server: the socket's permissions, or the server's
    check of the peer's credentials (``--allow-user``, ``--group``), refused it."""


class Busy(ServerError):
    """The server refused the request at once: its queue is full (``--max-queue``), or
    this client had more requests in flight than its credit (a raw client's doing:
    conveyor's client waits for a free slot instead)."""


class DeadlineExceeded(ServerError, TimeoutError):
    """The request's deadline passed before it could run; it was not run."""


class ProtocolError(ServerError):
    """A message on the socket was malformed, truncated, oversized or of another version."""
