"""Face detection split into picklable steps: :func:`preprocess`, the model, :func:`postprocess`.

Both steps are module-level functions taking only picklable arguments, so a pipeline can run
them in worker processes::

    tensor, meta = preprocess(image, model="short")        # CPU
    outputs = runner.run([tensor])                          # the device
    faces = postprocess(outputs, meta, model="short")       # CPU
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ._config import DetectorConfig, get_config
from ._decode import decode, split_outputs
from ._face import Face
from ._nms import weighted_nms
from ._transform import Letterbox, as_rgb, letterbox, letterbox_for

__all__ = ["FrameMeta", "frame_meta", "postprocess", "preprocess"]


@dataclass(frozen=True)
class FrameMeta:
    """What :func:`postprocess` needs to know about the frame :func:`preprocess` saw.

    Attributes:
        letterbox: the original size and the padding added to fit the model input.
    """

    letterbox: Letterbox

    @property
    def width(self) -> int:
        """The original image width in pixels."""
        return self.letterbox.width

    @property
    def height(self) -> int:
        """The original image height in pixels."""
        return self.letterbox.height


def frame_meta(width: int, height: int, model: str | DetectorConfig = "short") -> FrameMeta:
    """The meta :func:`preprocess` gives for a ``width`` x ``height`` image, without pixels.

    Lets a caller that keeps only each frame's size post-process outputs that came back
    without their meta (for instance from a pipeline stage that passes tensors only).

    Raises:
        InputError: a size that is not positive.
        UnknownFaceModelError: ``model`` is not ``"short"`` or ``"full"``.
    """
    return FrameMeta(letterbox_for(width, height, get_config(model).input_size))


def preprocess(
    image: npt.ArrayLike, model: str | DetectorConfig = "short"
) -> tuple[npt.NDArray[np.float32], FrameMeta]:
    """The detector's input tensor for ``image`` and the meta to post-process its outputs.

    As MediaPipe's ``ImageToTensorCalculator`` with ``keep_aspect_ratio``: the image (uint8
    grayscale, RGB or RGBA, converted to RGB) is resized into the model input (shrunk by
    halving, then averaging by area; enlarged bilinearly: see ``_transform._resize``, whose
    resampling is not MediaPipe's: on variants of the bundled samples scores differed
    from MediaPipe's by up to about 0.2, and a face near the threshold can be found by
    one and not the other; given the same tensor, they agree), centred, the padding
    filled with zeros, then mapped to ``x / 127.5 - 1`` (so padding becomes -1). Returns
    a float32 array of shape (1, H, W, 3).

    Raises:
        InputError: ``image`` is not a uint8 image of a supported shape.
        UnknownFaceModelError: ``model`` is not ``"short"`` or ``"full"``.
    """
    config = get_config(model)
    pixels, box = letterbox(as_rgb(image), config.input_size)
    tensor = (pixels / np.float32(127.5) - np.float32(1.0)).astype(np.float32)
    return tensor[np.newaxis], FrameMeta(box)


def postprocess(
    outputs: list[npt.NDArray[Any]], meta: FrameMeta, model: str | DetectorConfig = "short"
) -> list[Face]:
    """The faces in the detector's ``outputs``, relative to the original image.

    Decodes boxes and keypoints against the anchors, keeps those scoring at least the model's
    threshold, merges overlaps by weighted NMS in the model's frame, and finally removes the
    letterbox. Faces come in descending score order.

    Raises:
        InputError: ``outputs`` are not the two arrays the detector gives.
        UnknownFaceModelError: ``model`` is not ``"short"`` or ``"full"``.
    """
    config = get_config(model)
    raw_boxes, raw_scores = split_outputs(outputs, config)
    found = decode(raw_boxes, raw_scores, config)
    if not len(found):
        return []  # the common frame: nothing scores
    dets = weighted_nms(found, config.min_suppression_threshold)
    box = meta.letterbox
    corners = box.to_image(dets.boxes.reshape(-1, 2, 2)).reshape(-1, 4)
    keypoints = box.to_image(dets.keypoints)
    faces = []
    for i in range(len(dets)):
        xmin, ymin, xmax, ymax = (float(v) for v in corners[i])
        faces.append(
            Face(
                xmin=xmin,
                ymin=ymin,
                xmax=xmax,
                ymax=ymax,
                score=float(dets.scores[i]),
                keypoints=tuple((float(x), float(y)) for x, y in keypoints[i]),
            )
        )
    return faces
