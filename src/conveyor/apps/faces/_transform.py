"""Image geometry: RGB normalisation, letterboxing, bilinear affine warps.

:func:`warp_affine` samples like OpenCV's ``warpAffine`` with ``INTER_LINEAR`` (no
anti-aliasing); it cuts the rotated face crops for the landmark model. Coordinates follow the
continuous convention: pixel ``i`` covers ``[i, i + 1)`` and its centre is ``i + 0.5``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np
import numpy.typing as npt

from ..._errors import InputError

__all__ = ["Letterbox", "as_rgb", "letterbox", "letterbox_for", "warp_affine"]

Border = Literal["zero", "replicate"]


def as_rgb(image: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    """``image`` as a contiguous uint8 HxWx3 RGB array.

    Accepts uint8 HxW or HxWx1 (grayscale, replicated), HxWx3 (RGB) and HxWx4 (RGBA, alpha
    dropped).

    Raises:
        InputError: another dtype or shape, or an empty image.
    """
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise InputError(f"expected a uint8 image, got dtype {arr.dtype.name}")
    if arr.ndim >= 2 and (arr.shape[0] == 0 or arr.shape[1] == 0):
        raise InputError(f"expected a non-empty image, got shape {list(arr.shape)}")
    if arr.ndim == 2:
        arr = arr[:, :, np.newaxis]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise InputError(
            f"expected an image of shape HxW, HxWx1, HxWx3 or HxWx4, got {list(arr.shape)}"
        )
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        arr = arr[:, :, :3]
    return np.ascontiguousarray(arr)


def warp_affine(
    image: npt.NDArray[np.uint8],
    inverse: npt.ArrayLike,
    size: tuple[int, int],
    border: Border = "zero",
) -> npt.NDArray[np.float32]:
    """Sample ``image`` (HxWxC) into a ``size = (width, height)`` float32 array, bilinearly.

    ``inverse`` is a 2x3 matrix mapping an output pixel's *index* (x, y) to the source
    position in index coordinates, as ``cv2.warpAffine`` with ``WARP_INVERSE_MAP`` takes it.
    Outside the source, ``border="zero"`` reads zeros and ``"replicate"`` the nearest edge.
    Values stay in the source range (0..255); they are not rounded.
    """
    m = np.asarray(inverse, np.float64).reshape(2, 3)
    width, height = size
    h, w = image.shape[:2]
    ys, xs = np.meshgrid(
        np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij"
    )
    sx = m[0, 0] * xs + m[0, 1] * ys + m[0, 2]
    sy = m[1, 0] * xs + m[1, 1] * ys + m[1, 2]
    x0 = np.floor(sx)
    y0 = np.floor(sy)
    fx = (sx - x0)[..., None].astype(np.float32)
    fy = (sy - y0)[..., None].astype(np.float32)
    x0i = x0.astype(np.int64)
    y0i = y0.astype(np.int64)

    def tap(yi: npt.NDArray[np.int64], xi: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        # Gather from the uint8 source (no full-size float copy), then convert the taps.
        values = image[np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)].astype(np.float32)
        if border == "zero":
            values *= ((xi >= 0) & (xi < w) & (yi >= 0) & (yi < h))[..., None]
        return values

    top = tap(y0i, x0i) * (1 - fx) + tap(y0i, x0i + 1) * fx
    bottom = tap(y0i + 1, x0i) * (1 - fx) + tap(y0i + 1, x0i + 1) * fx
    out: npt.NDArray[np.float32] = (top * (1 - fy) + bottom * fy).astype(np.float32)
    return out


@dataclass(frozen=True)
class Letterbox:
    """How an image was fitted into a model input, keeping its aspect ratio.

    Attributes:
        width, height: the original image size in pixels.
        left, top, right, bottom: the padding on each side as a fraction of the input size.
    """

    width: int
    height: int
    left: float
    top: float
    right: float
    bottom: float

    def to_image(self, xy: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        """Points (..., 2) relative to the model input, made relative to the original image."""
        pts = np.asarray(xy, np.float32)
        sx = 1.0 - self.left - self.right
        sy = 1.0 - self.top - self.bottom
        out = np.empty_like(pts)
        out[..., 0] = (pts[..., 0] - self.left) / sx
        out[..., 1] = (pts[..., 1] - self.top) / sy
        return out


def letterbox(
    image: npt.NDArray[np.uint8], size: tuple[int, int]
) -> tuple[npt.NDArray[np.float32], Letterbox]:
    """Fit ``image`` into ``size = (width, height)``, centred, keeping its aspect ratio.

    The image is resized (averaged when shrunk, so a large frame is not point-sampled: see
    :func:`_resize`) to the largest whole-pixel size that fits; the rest is zero padding,
    split evenly (the odd pixel goes right or bottom). Returns the float32 HxWx3 result in
    0..255 and the :class:`Letterbox` recording the padding actually used, which maps
    model-relative points back to the image.
    """
    h, w = image.shape[:2]
    tw, th = size
    box = letterbox_for(w, h, size)
    left, top = round(box.left * tw), round(box.top * th)
    cw, ch = tw - left - round(box.right * tw), th - top - round(box.bottom * th)
    content = image if (cw, ch) == (w, h) else _resize(image, cw, ch)
    pixels = np.zeros((th, tw, 3), np.float32)
    pixels[top : top + ch, left : left + cw] = content
    return pixels, box


def _resize(image: npt.NDArray[np.uint8], width: int, height: int) -> npt.NDArray[np.uint8]:
    """``image`` resized to ``width`` x ``height``, averaged (not point-sampled) when shrunk.

    While the image is at least twice the target it is halved (a bilinear sample exactly
    between four pixels: their mean), then the last step, under 2x, averages by pixel area;
    an enlargement is bilinear. On the 2-core CI machine a 512x512 frame into 192x192 takes
    0.15 ms this way against 1.3 ms for Pillow's anti-aliased ``BILINEAR`` (the filter that
    reproduces MediaPipe's reference box to three decimals); the detections agree with it to
    an IoU of 0.98 or more for the full-range model on the bundled samples at 0.5x to 3.7x.
    """
    img: npt.NDArray[Any] = image
    while img.shape[1] >= 2 * width and img.shape[0] >= 2 * height:
        img = cv2.resize(img, (img.shape[1] // 2, img.shape[0] // 2),
                         interpolation=cv2.INTER_LINEAR)
    if img.shape[:2] != (height, width):
        shrink = img.shape[1] >= width and img.shape[0] >= height
        img = cv2.resize(img, (width, height),
                         interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return np.asarray(img, np.uint8)


def letterbox_for(width: int, height: int, size: tuple[int, int]) -> Letterbox:
    """The :class:`Letterbox` that :func:`letterbox` uses for a ``width`` x ``height`` image.

    It depends only on the sizes, so it can be recomputed anywhere without the pixels.

    Raises:
        InputError: a size that is not positive.
    """
    tw, th = size
    if width < 1 or height < 1 or tw < 1 or th < 1:
        raise InputError(f"expected positive sizes, got {width}x{height} into {tw}x{th}")
    scale = min(tw / width, th / height)
    cw = min(tw, max(1, round(width * scale)))
    ch = min(th, max(1, round(height * scale)))
    left = (tw - cw) // 2
    top = (th - ch) // 2
    return Letterbox(
        width=width,
        height=height,
        left=left / tw,
        top=top / th,
        right=(tw - cw - left) / tw,
        bottom=(th - ch - top) / th,
    )
