"""Face detection (MediaPipe BlazeFace, short and full range) with optional face landmarks.

Quick use, in this thread::

    from conveyor.apps.faces import FaceDetector, load_image

    with FaceDetector("short") as detector:
        for face in detector.detect(load_image("photo.jpg")):
            print(face.to_json())

For a pipeline, the work is split into picklable steps: :func:`preprocess` (image to tensor
and :class:`FrameMeta`), the model (``DETECTORS[model].model``), and :func:`postprocess`
(outputs and meta to :class:`Face` objects); :func:`landmarks_preprocess` and
:func:`with_landmarks` do the same for the landmark cascade.
"""

from ._anchors import SsdAnchorOptions, generate_anchors
from ._config import DETECTORS, DetectorConfig, ModelChoice, UnknownFaceModelError, get_config
from ._detection import FrameMeta, frame_meta, postprocess, preprocess
from ._detector import FaceDetector, run_model
from ._draw import annotate, save_image
from ._face import Face
from ._io import (
    IMAGE_SUFFIXES,
    MEDIA_SUFFIXES,
    VIDEO_SUFFIXES,
    ImageReadError,
    iter_frames,
    load_image,
    sample_images,
)
from ._landmarks import (
    LANDMARK_MODEL,
    NUM_LANDMARKS,
    FaceRoi,
    face_roi,
    landmarks_postprocess,
    landmarks_preprocess,
    with_landmarks,
)
from ._nms import Detections, weighted_nms

__all__ = [
    "DETECTORS",
    "IMAGE_SUFFIXES",
    "LANDMARK_MODEL",
    "MEDIA_SUFFIXES",
    "NUM_LANDMARKS",
    "VIDEO_SUFFIXES",
    "Detections",
    "DetectorConfig",
    "Face",
    "FaceDetector",
    "FaceRoi",
    "FrameMeta",
    "ImageReadError",
    "ModelChoice",
    "SsdAnchorOptions",
    "UnknownFaceModelError",
    "annotate",
    "face_roi",
    "frame_meta",
    "generate_anchors",
    "get_config",
    "iter_frames",
    "landmarks_postprocess",
    "landmarks_preprocess",
    "load_image",
    "postprocess",
    "preprocess",
    "run_model",
    "sample_images",
    "save_image",
    "weighted_nms",
    "with_landmarks",
]
