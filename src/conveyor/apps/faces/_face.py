"""The :class:`Face` result type."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Face"]

_DIGITS = 6


@dataclass(frozen=True)
class Face:
    """One detected face; every coordinate is relative (0..1) to the original image.

    Attributes:
        xmin, ymin, xmax, ymax: the bounding box (may reach slightly outside 0..1).
        score: the detection confidence, 0..1.
        keypoints: six (x, y) points: right eye, left eye, nose tip, mouth centre, right ear
            tragion, left ear tragion (the person's right and left).
        landmarks: 468 (x, y, z) face-mesh points when the landmark cascade ran, else None;
            z is in the scale of x (relative to the image width), smaller is nearer. Left out
            of ``repr``.
        landmark_score: the landmark model's face presence score (0..1), or None.
    """

    xmin: float
    ymin: float
    xmax: float
    ymax: float
    score: float
    keypoints: tuple[tuple[float, float], ...] = ()
    landmarks: tuple[tuple[float, float, float], ...] | None = field(default=None, repr=False)
    landmark_score: float | None = None

    @property
    def width(self) -> float:
        """Box width, relative to the image width."""
        return self.xmax - self.xmin

    @property
    def height(self) -> float:
        """Box height, relative to the image height."""
        return self.ymax - self.ymin

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: the box, score and keypoints, plus ``landmarks`` when present.

        Values are rounded to 6 decimals.
        """

        def r(v: float) -> float:
            return round(float(v), _DIGITS)

        data: dict[str, Any] = {
            "xmin": r(self.xmin),
            "ymin": r(self.ymin),
            "xmax": r(self.xmax),
            "ymax": r(self.ymax),
            "score": r(self.score),
            "keypoints": [[r(x), r(y)] for x, y in self.keypoints],
        }
        if self.landmarks is not None:
            data["landmarks"] = [[r(x), r(y), r(z)] for x, y, z in self.landmarks]
        return data

    def iou(self, other: Face) -> float:
        """Intersection over union of the two boxes (0 when they do not overlap)."""
        ix = min(self.xmax, other.xmax) - max(self.xmin, other.xmin)
        iy = min(self.ymax, other.ymax) - max(self.ymin, other.ymin)
        if ix <= 0 or iy <= 0:
            return 0.0
        inter = ix * iy
        union = self.width * self.height + other.width * other.height - inter
        return inter / union if union > 0 else 0.0
