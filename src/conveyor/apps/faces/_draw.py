"""Drawing faces onto images: boxes, scores, keypoints and landmarks."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw

from ..._errors import InputError
from ._face import Face
from ._transform import as_rgb

__all__ = ["annotate", "save_image"]

_BOX = (0, 255, 0)
_KEYPOINT = (255, 40, 40)
_LANDMARK = (0, 200, 255)


def annotate(image: npt.ArrayLike, faces: Sequence[Face]) -> npt.NDArray[np.uint8]:
    """A copy of ``image`` (uint8, grayscale, RGB or RGBA) as RGB with ``faces`` drawn on it.

    Each face gets its box, its score above the box, its six keypoints as dots and, when
    present, its landmarks as single pixels. Line widths follow the image size.

    Raises:
        InputError: ``image`` is not a uint8 image of a supported shape.
    """
    rgb = as_rgb(image)
    h, w = rgb.shape[:2]
    canvas = Image.fromarray(rgb)
    draw = ImageDraw.Draw(canvas)
    line = max(1, round(min(w, h) / 200))
    dot = max(2, line + 1)
    for face in faces:
        box = (face.xmin * w, face.ymin * h, face.xmax * w, face.ymax * h)
        draw.rectangle(box, outline=_BOX, width=line)
        draw.text((box[0], max(0.0, box[1] - 12)), f"{face.score:.2f}", fill=_BOX)
        if face.landmarks is not None:
            draw.point([(x * w, y * h) for x, y, _ in face.landmarks], fill=_LANDMARK)
        for x, y in face.keypoints:
            cx, cy = x * w, y * h
            draw.ellipse((cx - dot, cy - dot, cx + dot, cy + dot), fill=_KEYPOINT)
    return np.asarray(canvas, dtype=np.uint8)


def save_image(image: npt.ArrayLike, path: str | os.PathLike[str]) -> Path:
    """Write a uint8 image to ``path`` (format from the suffix), creating parent folders.

    Raises:
        OSError: the file cannot be written.
        InputError: ``image`` is not a uint8 image of a supported shape, or the suffix
            names no format Pillow writes (checked before any folder is made).
    """
    out = Path(path)
    rgb = Image.fromarray(as_rgb(image))
    Image.init()
    if out.suffix.lower() not in Image.EXTENSION or Image.EXTENSION[
            out.suffix.lower()] not in Image.SAVE:
        raise InputError(f"cannot write {out}: no image format Pillow writes has the suffix "
                         f"{out.suffix or '(none)'!r} (try .png or .jpg)")
    out.parent.mkdir(parents=True, exist_ok=True)
    rgb.save(out)
    return out
