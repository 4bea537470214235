"""The two face detection models and the options MediaPipe's graphs run them with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..._errors import ConveyorError
from ._anchors import SsdAnchorOptions

__all__ = ["DETECTORS", "DetectorConfig", "ModelChoice", "UnknownFaceModelError", "get_config"]

ModelChoice = Literal["short", "full"]


class UnknownFaceModelError(ConveyorError, ValueError):
    """A face detection model other than ``"short"`` or ``"full"`` was asked for."""


@dataclass(frozen=True)
class DetectorConfig:
    """One face detection model with its anchors and ``TensorsToDetections`` options.

    Attributes:
        name: the short name (``"short"`` or ``"full"``).
        model: the bundled model's name.
        anchors: the ``SsdAnchorsCalculator`` options.
        num_coords: values per anchor in the regressor output.
        box_coord_offset: where the box values start in a row.
        keypoint_coord_offset: where the keypoints start in a row.
        num_keypoints: keypoints per detection (x, y each).
        score_clipping_thresh: raw scores are clipped to +- this before the sigmoid.
        scale: x, y, w and h scale (the input size in pixels).
        min_score_thresh: detections scoring below this are dropped.
        min_suppression_threshold: the IoU above which detections are merged by NMS.
    """

    name: str
    model: str
    anchors: SsdAnchorOptions
    num_coords: int = 16
    box_coord_offset: int = 0
    keypoint_coord_offset: int = 4
    num_keypoints: int = 6
    score_clipping_thresh: float = 100.0
    scale: float = 128.0
    min_score_thresh: float = 0.5
    min_suppression_threshold: float = 0.3

    @property
    def input_size(self) -> tuple[int, int]:
        """(width, height) of the model input in pixels."""
        return (self.anchors.input_width, self.anchors.input_height)


DETECTORS: dict[str, DetectorConfig] = {
    "short": DetectorConfig(
        name="short",
        model="face_detection_short_range",
        anchors=SsdAnchorOptions(
            input_width=128,
            input_height=128,
            num_layers=4,
            min_scale=0.1484375,
            max_scale=0.75,
            strides=(8, 16, 16, 16),
            interpolated_scale_aspect_ratio=1.0,
        ),
        scale=128.0,
        min_score_thresh=0.5,
    ),
    "full": DetectorConfig(
        name="full",
        model="face_detection_full_range",
        anchors=SsdAnchorOptions(
            input_width=192,
            input_height=192,
            num_layers=1,
            min_scale=0.1484375,
            max_scale=0.75,
            strides=(4,),
            interpolated_scale_aspect_ratio=0.0,
        ),
        scale=192.0,
        min_score_thresh=0.6,
    ),
}


def get_config(model: str | DetectorConfig) -> DetectorConfig:
    """The configuration for ``"short"`` or ``"full"`` (a DetectorConfig is returned as is).

    Raises:
        UnknownFaceModelError: any other name.
    """
    if isinstance(model, DetectorConfig):
        return model
    try:
        return DETECTORS[model]
    except KeyError:
        raise UnknownFaceModelError(
            f"unknown face detection model {model!r}: expected one of {sorted(DETECTORS)}"
        ) from None
