""":class:`FaceDetector`: detection (and optionally landmarks) run in this thread."""

from __future__ import annotations

import os
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt

from ..._errors import DeviceError
from ..._tensors import dequantize, prepare_inputs
from ...backends import Device, Runner, open_device
from ._config import DetectorConfig, get_config
from ._detection import postprocess, preprocess
from ._face import Face
from ._io import load_image
from ._landmarks import LANDMARK_MODEL, landmarks_preprocess, with_landmarks

__all__ = ["FaceDetector", "run_model"]


def run_model(runner: Runner, inputs: Any) -> list[npt.NDArray[Any]]:
    """Check ``inputs`` against ``runner``'s model and run it once; the outputs in model order.

    Float inputs of a quantised model are quantised, and quantised outputs are returned as
    float32 (dequantised), so the same post-processing serves float and int8 builds.
    Blocks for the inference.

    Raises:
        InputError: the inputs do not match the model.
        DeviceError: the device failed.
    """
    arrays = prepare_inputs(runner.inputs, inputs, runner.model)
    outputs: list[npt.NDArray[Any]] = runner.run(arrays)
    return [
        dequantize(out, spec) if spec.quantized else out
        for out, spec in zip(outputs, runner.outputs, strict=True)
    ]


def _pixels(image: npt.ArrayLike | str | os.PathLike[str]) -> npt.NDArray[Any]:
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    return np.asarray(image)


class FaceDetector:
    """MediaPipe face detection on one device, run synchronously in the calling thread.

    ``model`` is ``"short"`` (faces within about 2 m, 128x128 input) or ``"full"`` (up to
    about 5 m, 192x192). With ``landmarks=True`` each face also gets the 468-point face mesh
    from the landmark model. ``device`` is a device spec (``"cpu"``, ``"edgetpu"``...) or an
    opened :class:`~conveyor.backends.Device`; a device opened here is closed by
    :meth:`close` (also on leaving a ``with`` block).

    Not thread-safe: one call at a time. For throughput, run :func:`preprocess` and
    :func:`postprocess` in a :class:`conveyor.Pipeline` instead.

    Raises:
        UnknownFaceModelError: ``model`` is not ``"short"`` or ``"full"``.
        DeviceError, ModelError: the device or a model could not be opened.
    """

    def __init__(
        self,
        model: str | DetectorConfig = "short",
        device: str | Device = "cpu",
        landmarks: bool = False,
    ) -> None:
        self.config = get_config(model)
        self._own_device = isinstance(device, str)
        self._closed = False
        self.device: Device = open_device(device) if isinstance(device, str) else device
        try:
            self.runner: Runner = self.device.load(self.config.model)
            self.landmark_runner: Runner | None = (
                self.device.load(LANDMARK_MODEL) if landmarks else None
            )
        except BaseException:
            if self._own_device:
                self.device.close()
            raise

    def detect(self, image: npt.ArrayLike | str | os.PathLike[str]) -> list[Face]:
        """The faces in ``image``, best first, relative to its size.

        ``image`` is a uint8 array (grayscale, RGB or RGBA) or the path of an image file.
        Blocks for the inference(s).

        Raises:
            ImageReadError: a path that cannot be read as an image.
            InputError: an array that is not a supported image.
            DeviceError: the device failed, or the detector is closed.
        """
        if self._closed:
            raise DeviceError("this FaceDetector is closed")
        pixels = _pixels(image)
        tensor, meta = preprocess(pixels, self.config)
        faces = postprocess(run_model(self.runner, tensor), meta, self.config)
        if self.landmark_runner is None:
            return faces
        return [self.add_landmarks(pixels, face) for face in faces]

    def add_landmarks(self, image: npt.ArrayLike, face: Face) -> Face:
        """``face`` with its landmarks from the landmark model; needs ``landmarks=True``.

        Raises:
            RuntimeError: the detector was made without ``landmarks=True``.
            InputError, DeviceError: as :meth:`detect`.
        """
        if self.landmark_runner is None:
            raise RuntimeError("this FaceDetector was made without landmarks=True")
        if self._closed:
            raise DeviceError("this FaceDetector is closed")
        tensor, roi = landmarks_preprocess(image, face)
        return with_landmarks(face, run_model(self.landmark_runner, tensor), roi)

    def close(self) -> None:
        """Release the models, and the device if this detector opened it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.runner.close()
        if self.landmark_runner is not None:
            self.landmark_runner.close()
        if self._own_device:
            self.device.close()

    def __enter__(self) -> FaceDetector:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        marks = ", landmarks=True" if self.landmark_runner is not None else ""
        return f"FaceDetector(model={self.config.name!r}, device={str(self.device.spec)!r}{marks})"
