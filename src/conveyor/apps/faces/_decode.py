"""Raw detector outputs to detections, as MediaPipe's ``TensorsToDetectionsCalculator`` does.

Each anchor's row holds (with ``reverse_output_order``) x_center, y_center, width, height and
then the keypoints as x, y pairs, all in input pixels relative to the anchor. The score is
the sigmoid of the clipped logit.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from ..._errors import InputError
from ._anchors import generate_anchors
from ._config import DetectorConfig
from ._nms import Detections

__all__ = ["decode", "split_outputs"]


def split_outputs(
    outputs: list[npt.NDArray[Any]], config: DetectorConfig
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """The regressor (N, num_coords) and score (N,) arrays among a detector's outputs.

    They are told apart by shape, so the output order does not matter.

    Raises:
        InputError: the outputs are not two arrays of N x num_coords and N x 1 values.
    """
    n = len(generate_anchors(config.anchors))
    boxes = scores = None
    for arr in outputs:
        a = np.asarray(arr)
        if a.size == n * config.num_coords and a.shape[-1] == config.num_coords:
            boxes = a.reshape(n, config.num_coords).astype(np.float32, copy=False)
        elif a.size == n:
            scores = a.reshape(n).astype(np.float32, copy=False)
    if boxes is None or scores is None or len(outputs) != 2:
        shapes = [list(np.shape(a)) for a in outputs]
        raise InputError(
            f"face detector {config.name!r} ({config.model}) expects two outputs of shapes "
            f"[1, {n}, {config.num_coords}] and [1, {n}, 1]; got {shapes}"
        )
    return boxes, scores


def _logit(p: float) -> float:
    """The logit whose sigmoid is ``p`` (-inf for 0, inf for 1)."""
    if p <= 0:
        return -math.inf
    if p >= 1:
        return math.inf
    return math.log(p / (1 - p))


def decode(
    raw_boxes: npt.NDArray[np.float32], raw_scores: npt.NDArray[np.float32], config: DetectorConfig
) -> Detections:
    """Detections scoring at least ``config.min_score_thresh``, relative to the model input.

    Detections with a negative or NaN width or height are dropped, as MediaPipe does.
    """
    anchors = generate_anchors(config.anchors)
    # The sigmoid is monotonic: only logits near or above the threshold's logit can pass,
    # so the exact score is computed for those alone (most anchors score nothing).
    cut = _logit(config.min_score_thresh) - 1e-4
    candidates = np.flatnonzero(raw_scores >= cut)
    # float64: exp(100) overflows float32, and an overflow warning is noise here.
    logits = np.clip(
        raw_scores[candidates].astype(np.float64),
        -config.score_clipping_thresh,
        config.score_clipping_thresh,
    )
    exact = (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    passed = exact >= config.min_score_thresh
    keep = candidates[passed]
    scores = exact[passed]
    if not len(keep):
        k = config.num_keypoints
        return Detections(np.zeros((0, 4), np.float32), scores, np.zeros((0, k, 2), np.float32))
    raw = raw_boxes[keep]
    anc = anchors[keep]
    scale = np.float32(config.scale)
    off = config.box_coord_offset
    xc = raw[:, off + 0] / scale * anc[:, 2] + anc[:, 0]
    yc = raw[:, off + 1] / scale * anc[:, 3] + anc[:, 1]
    w = raw[:, off + 2] / scale * anc[:, 2]
    h = raw[:, off + 3] / scale * anc[:, 3]
    boxes = np.stack([xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2], axis=1)
    k0 = config.keypoint_coord_offset
    kp = raw[:, k0 : k0 + 2 * config.num_keypoints].reshape(-1, config.num_keypoints, 2)
    keypoints = np.empty_like(kp)
    keypoints[:, :, 0] = kp[:, :, 0] / scale * anc[:, None, 2] + anc[:, None, 0]
    keypoints[:, :, 1] = kp[:, :, 1] / scale * anc[:, None, 3] + anc[:, None, 1]
    valid = np.flatnonzero((w >= 0) & (h >= 0))  # NaN compares false: dropped too
    return Detections(
        boxes[valid].astype(np.float32),
        scores[valid],
        keypoints[valid].astype(np.float32),
    )
