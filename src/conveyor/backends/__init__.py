"""Backends behind one interface: LiteRT on the CPU, the Edge TPU, ONNX Runtime, a simulation.

Use :func:`open_device` with a device spec (see :mod:`conveyor.backends._spec`).
"""

from __future__ import annotations

from ._base import Device, Runner
from ._spec import VALID_FORMS, DeviceSpec, parse_device

__all__ = ["VALID_FORMS", "Device", "DeviceSpec", "Runner", "open_device", "parse_device"]


def open_device(spec: str | DeviceSpec) -> Device:
    """Open the device a spec names.

    Raises:
        DeviceSpecError: a malformed spec (the message lists the valid forms).
        DeviceNotFoundError, DeviceBusyError, EdgeTPURuntimeMissingError: see each backend.
    """
    parsed = parse_device(spec)
    if parsed.kind == "cpu":
        from .litert import LiteRTDevice

        return LiteRTDevice(parsed)
    if parsed.kind == "edgetpu":
        from .edgetpu import EdgeTPUDevice

        return EdgeTPUDevice(parsed)
    if parsed.kind == "sim-edgetpu":
        from .sim import SimEdgeTPUDevice

        return SimEdgeTPUDevice(parsed)
    if parsed.kind == "onnx":
        from .onnx import OnnxDevice

        return OnnxDevice(parsed)
    from .auto import AutoDevice

    return AutoDevice(parsed)
