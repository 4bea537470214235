"""Weighted non-maximum suppression, as MediaPipe's ``NonMaxSuppressionCalculator`` runs it.

With the WEIGHTED algorithm, detections are taken in descending score order; the best
remaining one and every remaining detection overlapping it by more than the threshold
(itself included) are merged into one: box corners and keypoints averaged, weighted by
score, and the best score kept. The merged ones are removed and the loop repeats.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["Detections", "iou_matrix", "weighted_nms"]


@dataclass(frozen=True)
class Detections:
    """Detections as arrays: boxes (N, 4) xmin, ymin, xmax, ymax; scores (N,);
    keypoints (N, K, 2) x, y. All float32, in one coordinate frame."""

    boxes: npt.NDArray[np.float32]
    scores: npt.NDArray[np.float32]
    keypoints: npt.NDArray[np.float32]

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def take(self, index: npt.NDArray[np.intp]) -> Detections:
        """The detections at ``index``, in that order."""
        return Detections(self.boxes[index], self.scores[index], self.keypoints[index])


def iou_matrix(
    box: npt.NDArray[np.float32], boxes: npt.NDArray[np.float32]
) -> npt.NDArray[np.float32]:
    """IoU of one box (4,) against each of ``boxes`` (N, 4); 0 where they do not overlap."""
    ix = np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0])
    iy = np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1])
    inter = np.where((ix > 0) & (iy > 0), ix * iy, 0.0)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    out = np.zeros_like(inter, dtype=np.float32)
    np.divide(inter, union, out=out, where=(union > 0) & (inter > 0))
    return out


def weighted_nms(dets: Detections, threshold: float) -> Detections:
    """Merge overlapping detections (IoU > ``threshold``) by score-weighted averaging.

    Returns the merged detections in descending order of their (kept) best score. The best
    detection of each round is always part of its own group, even when its box is empty.
    """
    order = np.argsort(-dets.scores, kind="stable")
    remaining = dets.take(order)
    boxes: list[npt.NDArray[np.float32]] = []
    scores: list[np.float32] = []
    keypoints: list[npt.NDArray[np.float32]] = []
    while len(remaining):
        overlap = iou_matrix(remaining.boxes[0], remaining.boxes) > threshold
        overlap[0] = True
        group = remaining.take(np.flatnonzero(overlap))
        weights = group.scores / group.scores.sum() if group.scores.sum() > 0 else None
        if weights is None:
            boxes.append(group.boxes[0])
            keypoints.append(group.keypoints[0])
        else:
            boxes.append(np.tensordot(weights, group.boxes, axes=1).astype(np.float32))
            keypoints.append(np.tensordot(weights, group.keypoints, axes=1).astype(np.float32))
        scores.append(group.scores[0])
        remaining = remaining.take(np.flatnonzero(~overlap))
    if not scores:
        return dets.take(np.zeros(0, np.intp))
    return Detections(
        np.stack(boxes).astype(np.float32),
        np.asarray(scores, np.float32),
        np.stack(keypoints).astype(np.float32),
    )
