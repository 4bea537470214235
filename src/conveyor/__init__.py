"""conveyor: keep an edge accelerator busy while the CPU works, and share it.

The public API is what this module exports; everything else is private.
"""

from ._device._catalog import ModelInfo
from ._device._client import DeviceClient, InferFuture, connect, default_socket_path
from ._device._requests import Timing
from ._errors import (
    Busy,
    ConveyorError,
    DeadlineExceeded,
    DeviceBusyError,
    DeviceError,
    DeviceNotFoundError,
    DeviceSpecError,
    EdgeTPUModelError,
    EdgeTPURuntimeMissingError,
    InputError,
    InvalidModelError,
    ModelError,
    ModelNotFoundError,
    PermissionDenied,
    PipelineClosedError,
    ProtocolError,
    RemoteError,
    ServerError,
    ServerGone,
    StageError,
    WorkerDiedError,
    WorkerStartError,
)
from ._models import bundled_models, resolve_model
from ._pipeline import Pipeline, infer, stage
from ._runtime._core import StageDef
from ._tensors import TensorSpec
from ._version import __version__
from .backends import Device, DeviceSpec, Runner, open_device, parse_device

__all__ = [
    "Busy",
    "ConveyorError",
    "DeadlineExceeded",
    "Device",
    "DeviceBusyError",
    "DeviceClient",
    "DeviceError",
    "DeviceNotFoundError",
    "DeviceSpec",
    "DeviceSpecError",
    "EdgeTPUModelError",
    "EdgeTPURuntimeMissingError",
    "InferFuture",
    "InputError",
    "InvalidModelError",
    "ModelError",
    "ModelInfo",
    "ModelNotFoundError",
    "PermissionDenied",
    "Pipeline",
    "PipelineClosedError",
    "ProtocolError",
    "RemoteError",
    "Runner",
    "ServerError",
    "ServerGone",
    "StageDef",
    "StageError",
    "TensorSpec",
    "Timing",
    "WorkerDiedError",
    "WorkerStartError",
    "__version__",
    "bundled_models",
    "connect",
    "default_socket_path",
    "infer",
    "open_device",
    "parse_device",
    "resolve_model",
    "stage",
]
