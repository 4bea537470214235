"""Reading images, animated GIFs and videos as RGB frames; the bundled sample images.

Still images and GIFs are read with Pillow, anything Pillow does not recognise with PyAV
(FFmpeg). Frames are decoded one at a time, so a long video never sits in memory.
"""

from __future__ import annotations

import io
import os
import stat
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
# on an image over its decompression-bomb limit (Image.MAX_IMAGE_PIXELS). Its decoders
# raise other errors too on corrupt data (IndexError, struct.error, TypeError... from a cut
# GIF or TIFF): while a file is decoded, any Exception is taken as the file's fault.
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
    top = int(np.max(wide)) if wide.size else 0
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
    if not isinstance(exc, (OSError, ValueError, SyntaxError, EOFError)):
        # A decoder's own error on corrupt data (IndexError, struct.error, ...).
        return f"corrupt or truncated ({type(exc).__name__}: {exc})"
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
    except Exception as exc:  # see _PIL_ERRORS
        raise ImageReadError(path, _reason(exc)) from exc


def iter_frames(path: StrPath) -> Generator[tuple[int, npt.NDArray[np.uint8]], None, None]:
    """``(frame_index, RGB frame)`` for every frame of an image, animated GIF or video.

    A still image gives one frame (index 0), turned upright by its EXIF orientation (a
    phone's MPO JPEG too: its first image); an animated image every frame, composited
    as displayed; a video every decoded frame of its first video stream, turned upright
    by its display matrix as players do. A pipe (``/dev/stdin``) works too. Frames are uint8
    HxWx3 RGB arrays, decoded lazily. The file is closed when the generator is exhausted or
    closed (``contextlib.closing`` makes that happen on an early exit).

    Raises:
        ImageReadError: on the first ``next()`` if the file is missing or neither Pillow nor
            FFmpeg can decode it; later if decoding fails part way (frames before were given).
    """
    source: StrPath | io.BytesIO | _Prefixed = path
    if not _seekable(path):
        source = _read_pipe(path)
    try:
        img = Image.open(source) if not isinstance(source, _Prefixed) else None
    except UnidentifiedImageError:
        img = None  # not an image format: try FFmpeg
    except Exception as exc:  # see _PIL_ERRORS
        raise ImageReadError(path, _reason(exc)) from exc
    if img is None:
        try:
            yield from _iter_video(path, source)
        finally:
            if isinstance(source, _Prefixed):
                source.close()
        return
    with img:
        yield from _image_frames(path, img)


def _image_frames(path: StrPath, img: Image.Image
                  ) -> Generator[tuple[int, npt.NDArray[np.uint8]], None, None]:
    """The frames of an image Pillow opened; decoding errors as ImageReadError (not an
    error thrown in at a ``yield``)."""
    try:
        # An MPO (a phone's JPEG holding a preview or a second view after the photo)
        # is a still: its first image, turned upright as a JPEG is.
        if getattr(img, "n_frames", 1) <= 1 or img.format == "MPO":
            still = _rgb(ImageOps.exif_transpose(img))
        else:
            still = None
            frames = ImageSequence.Iterator(img)
    except Exception as exc:  # see _PIL_ERRORS
        raise ImageReadError(path, _reason(exc)) from exc
    if still is not None:
        yield 0, still
        return
    index = 0
    while True:
        try:
            frame = _rgb(next(frames))
        except StopIteration:
            return
        except Exception as exc:  # see _PIL_ERRORS
            raise ImageReadError(path, _reason(exc)) from exc
        yield index, frame
        index += 1


def _seekable(path: StrPath) -> bool:
    """Whether ``path`` can be read twice (not a pipe or a character device)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return True  # Pillow says what is wrong with it
    return not (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISSOCK(mode))


def _read_pipe(path: StrPath) -> io.BytesIO | _Prefixed:
    """A pipe (``/dev/stdin``, ``<(...)``) can be read only once, and Pillow would read
    all of it to tell whether it is an image (a video from a camera never ends). Its
    first 64 kB tell: an image is then read whole (a BytesIO); anything else goes to
    FFmpeg as a stream of those bytes and the rest (a :class:`_Prefixed`)."""
    try:
        raw = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by the caller's reader
    except OSError as exc:
        raise ImageReadError(path, _reason(exc)) from exc
    try:
        head = bytearray()
        while len(head) < _SNIFF_BYTES:
            chunk = raw.read(_SNIFF_BYTES - len(head))
            if not chunk:
                break
            head += chunk
        try:
            Image.open(io.BytesIO(head)).close()
        except UnidentifiedImageError:
            return _Prefixed(bytes(head), raw)
        except Exception:  # an image, cut short here: read whole, Pillow says the rest
            pass
        head += raw.read()
    except OSError as exc:
        raw.close()
        raise ImageReadError(path, _reason(exc)) from exc
    raw.close()
    return io.BytesIO(head)


_SNIFF_BYTES = 1 << 16


class _Prefixed(io.RawIOBase):
    """``head``, then what is left in ``raw``: a pipe's start read once, given back."""

    def __init__(self, head: bytes, raw: io.RawIOBase) -> None:
        super().__init__()
        self.head = head  # as it came, for what it tells of the format
        self._head = memoryview(head)
        self._raw = raw

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._head:
            n = min(len(view), len(self._head))
            view[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        return self._raw.readinto(view) or 0

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


def _ffmpeg_reason(exc: BaseException) -> str:
    return str(getattr(exc, "strerror", None) or exc)


def _index_at_the_end(head: bytes) -> bool:
    """Whether the start of an ISO media file (MP4, MOV) has no index: its top-level
    boxes (a 4-byte size, a 4-byte type) reach the media data ('mdat') before 'moov'."""
    at = 0
    while at + 8 <= len(head):
        size, kind = int.from_bytes(head[at:at + 4], "big"), head[at + 4:at + 8]
        if at == 0 and kind != b"ftyp":
            return False  # not an ISO media file
        if kind == b"moov":
            return False
        if kind == b"mdat":
            return True
        if size == 1 and at + 16 <= len(head):  # a 64-bit size follows the type
            size = int.from_bytes(head[at + 8:at + 16], "big")
        if size < 8:
            return False
        at += size
    return False


def _iter_video(path: StrPath, source: StrPath | io.BytesIO | _Prefixed
                ) -> Generator[tuple[int, npt.NDArray[np.uint8]], None, None]:
    import av
    import av.error

    def undecodable(exc: BaseException) -> str:
        if isinstance(source, _Prefixed) and _index_at_the_end(source.head):
            return ("an MP4/MOV file with its index (the 'moov' box) at the end cannot be "
                    "read from a pipe: give its path, or move the index to the front with "
                    "`ffmpeg -i IN -c copy -movflags +faststart OUT`")
        return f"not an image or video file conveyor can decode ({_ffmpeg_reason(exc)})"

    try:
        container = av.open(source if isinstance(source, io.IOBase) else os.fspath(source),
                            mode="r")
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise ImageReadError(path, undecodable(exc)) from exc
    with container:
        if not container.streams.video:
            raise ImageReadError(path, "no video stream")
        index = 0
        try:
            for frame in container.decode(video=0):
                rgb: npt.NDArray[np.uint8] = np.asarray(frame.to_ndarray(format="rgb24"), np.uint8)
                # Upright as players show it: a phone's portrait video is stored sideways
                # with a display matrix (its rotation, degrees counterclockwise).
                quarter = round(float(getattr(frame, "rotation", 0) or 0) / 90) % 4
                if quarter:
                    rgb = np.ascontiguousarray(np.rot90(rgb, quarter))
                yield index, rgb
                index += 1
        except (av.error.FFmpegError, OSError, ValueError) as exc:
            if index == 0:
                raise ImageReadError(path, undecodable(exc)) from exc
            raise ImageReadError(
                path, f"decoding failed after frame {index - 1} ({_ffmpeg_reason(exc)})"
            ) from exc
        if index == 0:
            raise ImageReadError(path, "no video frames")
