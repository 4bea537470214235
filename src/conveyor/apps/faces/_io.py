"""Reading images, animated GIFs and videos as RGB frames; the bundled sample images.

Still images and GIFs are read with Pillow, anything Pillow does not recognise with PyAV
(FFmpeg). Frames are decoded one at a time, so a long video never sits in memory.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, ImageSequence, UnidentifiedImageError

from ..._errors import ConveyorError

__all__ = [
    "IMAGE_SUFFIXES",
    "MEDIA_SUFFIXES",
    "VIDEO_SUFFIXES",
    "ImageReadError",
    "iter_frames",
    "load_image",
    "sample_images",
]

SAMPLES_DIR = Path(__file__).resolve().parents[2] / "samples"

#: File name suffixes that :func:`iter_frames` is meant for (lower case).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg"})
MEDIA_SUFFIXES = IMAGE_SUFFIXES | VIDEO_SUFFIXES

# What Pillow raises on a truncated or malformed file, besides UnidentifiedImageError, and
# on an image over its decompression-bomb limit (Image.MAX_IMAGE_PIXELS).
_PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)

StrPath = str | os.PathLike[str]


class ImageReadError(ConveyorError):
    """A file could not be read as an image or video; the message names the file.

    Attributes:
        path: the file, as given.
        reason: why, in a few words.
    """

    def __init__(self, path: StrPath, reason: str) -> None:
        super().__init__(f"cannot read {os.fspath(path)}: {reason}")
        self.path = os.fspath(path)
        self.reason = reason

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.path, self.reason))


def sample_images() -> list[Path]:
    """The bundled sample images (PNG), sorted by name."""
    return sorted(SAMPLES_DIR.glob("*.png"))


def _rgb(image: Image.Image) -> npt.NDArray[np.uint8]:
    if image.mode.startswith("I") or image.mode == "F":
        # One channel deeper than 8 bits (16-bit PNGs open as "I;16" or "I"): Pillow's
        # convert("RGB") clips it at 255, which turns most of the picture white.
        gray = _to_8_bits(np.asarray(image), sixteen=image.mode.startswith("I;16"))
        return np.repeat(gray[:, :, np.newaxis], 3, axis=2)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _to_8_bits(values: npt.NDArray[Any], sixteen: bool = False) -> npt.NDArray[np.uint8]:
    """Scale 16-bit samples (``sixteen``), other integers (16 bits if any is over 255),
    or floats in [0, 1], to uint8."""
    if values.dtype.kind == "f":
        top = float(np.nanmax(values)) if values.size else 0.0
        scaled = values * 255.0 if top <= 1.0 else values
        return np.clip(np.nan_to_num(scaled), 0, 255).astype(np.uint8)
    wide = values.astype(np.int64)
    top = int(wide.max()) if wide.size else 0
    if top > 65535:  # deeper still: scale the brightest sample to 255
        return (np.clip(wide, 0, None) * 255 // top).astype(np.uint8)
    if sixteen or top > 255:
        return ((np.clip(wide, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
    return np.clip(wide, 0, 255).astype(np.uint8)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not an image or video file conveyor can decode"
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, IsADirectoryError):
        return "is a directory"
    if isinstance(exc, PermissionError):
        return "permission denied"
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return str(text)


def load_image(path: StrPath) -> npt.NDArray[np.uint8]:
    """The still image at ``path`` (its first frame) as a uint8 HxWx3 RGB array.

    The EXIF orientation of a photo is applied.

    Raises:
        ImageReadError: the file is missing or not an image Pillow can decode.
    """
    try:
        with Image.open(path) as img:
            return _rgb(ImageOps.exif_transpose(img))
    except UnidentifiedImageError as exc:
        # iter_frames would try FFmpeg next; this reads still images only.
        raise ImageReadError(path, "not an image Pillow can decode (for a video's frames "
                             "use iter_frames)") from exc
    except _PIL_ERRORS as exc:
        raise ImageReadError(path, _reason(exc)) from exc


def iter_frames(path: StrPath) -> Generator[tuple[int, npt.NDArray[np.uint8]], None, None]:
    """``(frame_index, RGB frame)`` for every frame of an image, animated GIF or video.

    A still image gives one frame (index 0), turned upright by its EXIF orientation (a
    phone's MPO JPEG too: its first image); an animated image every frame, composited
    as displayed; a video every decoded frame of its first video stream. Frames are uint8
    HxWx3 RGB arrays, decoded lazily. The file is closed when the generator is exhausted or
    closed (``contextlib.closing`` makes that happen on an early exit).

    Raises:
        ImageReadError: on the first ``next()`` if the file is missing or neither Pillow nor
            FFmpeg can decode it; later if decoding fails part way (frames before were given).
    """
    try:
        img = Image.open(path)
    except UnidentifiedImageError:
        img = None  # not an image format: try FFmpeg
    except _PIL_ERRORS as exc:
        raise ImageReadError(path, _reason(exc)) from exc
    if img is None:
        yield from _iter_video(path)
        return
    with img:
        try:
            # An MPO (a phone's JPEG holding a preview or a second view after the
            # photo) is a still: its first image, turned upright as a JPEG is.
            if getattr(img, "n_frames", 1) <= 1 or img.format == "MPO":
                yield 0, _rgb(ImageOps.exif_transpose(img))
                return
            for index, frame in enumerate(ImageSequence.Iterator(img)):
                yield index, _rgb(frame)
        except _PIL_ERRORS as exc:
            raise ImageReadError(path, _reason(exc)) from exc


def _ffmpeg_reason(exc: BaseException) -> str:
    return str(getattr(exc, "strerror", None) or exc)


def _iter_video(path: StrPath) -> Generator[tuple[int, npt.NDArray[np.uint8]], None, None]:
    import av
    import av.error

    undecodable = "not an image or video file conveyor can decode"
    try:
        container = av.open(os.fspath(path))
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise ImageReadError(path, f"{undecodable} ({_ffmpeg_reason(exc)})") from exc
    with container:
        if not container.streams.video:
            raise ImageReadError(path, "no video stream")
        index = 0
        try:
            for frame in container.decode(video=0):
                rgb: npt.NDArray[np.uint8] = np.asarray(frame.to_ndarray(format="rgb24"), np.uint8)
                yield index, rgb
                index += 1
        except (av.error.FFmpegError, OSError, ValueError) as exc:
            if index == 0:
                raise ImageReadError(path, f"{undecodable} ({_ffmpeg_reason(exc)})") from exc
            raise ImageReadError(
                path, f"decoding failed after frame {index - 1} ({_ffmpeg_reason(exc)})"
            ) from exc
        if index == 0:
            raise ImageReadError(path, "no video frames")
