"""The face-landmark cascade: a rotated crop around each detection, 468 mesh points back.

The crop follows MediaPipe's face landmark front end: the detection's box, rotated so the
line from keypoint 0 (right eye) to keypoint 1 (left eye) is horizontal (target angle 0),
squared on its long side and scaled by 1.5. It is cut to the landmark model's 192x192 input
with a bilinear warp, values in [0, 1]. The model's points, in crop pixels, are mapped back
through the same rotation to coordinates relative to the original image.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ..._errors import InputError
from ._face import Face
from ._transform import as_rgb, warp_affine

__all__ = [
    "LANDMARK_MODEL",
    "NUM_LANDMARKS",
    "FaceRoi",
    "face_roi",
    "landmarks_postprocess",
    "landmarks_preprocess",
    "with_landmarks",
]

LANDMARK_MODEL = "face_landmark"
NUM_LANDMARKS = 468
_INPUT = 192  # the landmark model's input width and height
_SCALE = 1.5


@dataclass(frozen=True)
class FaceRoi:
    """A rotated square region of an image, in pixels.

    Attributes:
        center_x, center_y: the centre, in pixels (continuous coordinates).
        size: the side of the square, in pixels.
        angle: the rotation in radians; positive turns the square's x axis towards +y.
        width, height: the size of the whole image.
    """

    center_x: float
    center_y: float
    size: float
    angle: float
    width: int
    height: int

    def to_image(self, uv: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
        """Points (..., 2) relative to the square (0..1) as pixel positions in the image."""
        pts = np.asarray(uv, np.float64) - 0.5
        c, s = math.cos(self.angle), math.sin(self.angle)
        out = np.empty_like(pts)
        out[..., 0] = self.center_x + self.size * (c * pts[..., 0] - s * pts[..., 1])
        out[..., 1] = self.center_y + self.size * (s * pts[..., 0] + c * pts[..., 1])
        return out


def _normalize_radians(angle: float) -> float:
    return angle - 2 * math.pi * math.floor((angle + math.pi) / (2 * math.pi))


def face_roi(face: Face, width: int, height: int) -> FaceRoi:
    """The region the landmark model looks at for ``face`` in a ``width`` x ``height`` image.

    Raises:
        InputError: ``face`` has fewer than two keypoints (the eyes set the rotation).
    """
    if len(face.keypoints) < 2:
        raise InputError("the landmark cascade needs a face with its eye keypoints (0 and 1)")
    (x0, y0), (x1, y1) = face.keypoints[0], face.keypoints[1]
    angle = _normalize_radians(0.0 - math.atan2(-(y1 - y0) * height, (x1 - x0) * width))
    long_side = max(face.width * width, face.height * height)
    return FaceRoi(
        center_x=(face.xmin + face.xmax) / 2 * width,
        center_y=(face.ymin + face.ymax) / 2 * height,
        size=long_side * _SCALE,
        angle=angle,
        width=width,
        height=height,
    )


def landmarks_preprocess(
    image: npt.ArrayLike, face: Face
) -> tuple[npt.NDArray[np.float32], FaceRoi]:
    """The landmark model's input (1, 192, 192, 3) float32 in [0, 1] for ``face``, and its ROI.

    Outside the image the crop repeats the edge pixels.

    Raises:
        InputError: ``image`` is not a uint8 image of a supported shape, or ``face`` lacks
            eye keypoints.
    """
    rgb = as_rgb(image)
    h, w = rgb.shape[:2]
    roi = face_roi(face, w, h)
    step = roi.size / _INPUT
    c, s = math.cos(roi.angle), math.sin(roi.angle)
    # The output index (i, j) has crop position ((i + 0.5) / 192, (j + 0.5) / 192); take the
    # image position of the crop's first pixel centre and the steps along i and j.
    x00, y00 = roi.to_image(np.array([0.5 / _INPUT, 0.5 / _INPUT]))
    inverse = [[step * c, -step * s, x00 - 0.5], [step * s, step * c, y00 - 0.5]]
    pixels = warp_affine(rgb, inverse, (_INPUT, _INPUT), border="replicate")
    return (pixels / np.float32(255.0)).astype(np.float32)[np.newaxis], roi


def landmarks_postprocess(
    outputs: list[npt.NDArray[Any]], roi: FaceRoi
) -> tuple[tuple[tuple[float, float, float], ...], float]:
    """The 468 (x, y, z) landmarks relative to the image, and the face presence score.

    x and y are relative to the image width and height; z is scaled like x (relative to the
    image width). The presence score is the sigmoid of the model's face flag.

    Raises:
        InputError: ``outputs`` are not the landmark model's 1404 values and one flag.
    """
    points = flag = None
    for arr in outputs:
        a = np.asarray(arr, np.float64)
        if a.size == NUM_LANDMARKS * 3:
            points = a.reshape(NUM_LANDMARKS, 3)
        elif a.size == 1:
            flag = float(a.reshape(()))
    if points is None or flag is None or len(outputs) != 2:
        raise InputError(
            f"the face landmark model gives {NUM_LANDMARKS * 3} landmark values and one face "
            f"flag; got outputs of shapes {[list(np.shape(a)) for a in outputs]}"
        )
    xy = roi.to_image(points[:, :2] / _INPUT)
    xs = xy[:, 0] / roi.width
    ys = xy[:, 1] / roi.height
    zs = points[:, 2] / _INPUT * roi.size / roi.width
    rows = np.stack([xs, ys, zs], axis=1).tolist()
    landmarks = tuple((float(x), float(y), float(z)) for x, y, z in rows)
    score = 1.0 / (1.0 + math.exp(-max(-100.0, min(100.0, flag))))
    return landmarks, score


def with_landmarks(face: Face, outputs: list[npt.NDArray[Any]], roi: FaceRoi) -> Face:
    """``face`` with the landmarks and presence score from the landmark model's ``outputs``.

    Raises:
        InputError: see :func:`landmarks_postprocess`.
    """
    landmarks, score = landmarks_postprocess(outputs, roi)
    return dataclasses.replace(face, landmarks=landmarks, landmark_score=score)
