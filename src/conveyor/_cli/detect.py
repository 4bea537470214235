"""Detect faces in images, animated GIFs and videos (every frame).

Frames go through a conveyor pipeline: pre-processing in worker processes, the detector on
the device, post-processing (and, with --landmarks, the landmark model on the same device)
in a thread. A folder is searched recursively, in sorted order, for image and video files.
Boxes and keypoints are relative to the image (0..1 inside it; for a face cut by the
image's edge they reach past it, below 0 or above 1, as the model estimates). A file that
cannot be read is reported on stderr (conveyor: cannot read PATH: reason) and the others
are still processed; the exit status is then 1, as it is when a folder given holds no
image or video file. Photos and phone videos are read upright (EXIF orientation, a video's
display matrix), and a pipe works as a file: cat clip.mkv | conveyor detect /dev/stdin.

--json prints one line per frame:
  {"source": PATH, "frame": N, "width": W, "height": H,
   "faces": [{"xmin", "ymin", "xmax", "ymax", "score",
              "keypoints": [[x, y] x6], "landmarks": [[x, y, z] x468] (--landmarks)}]}
(boxes, keypoints and landmarks relative to the image, 0..1 inside it; faces best first;
frame 0 for a still image). With --out, an annotated image never replaces an input: it is
named NAME-2.png instead.

examples:
  conveyor detect photo.jpg
  conveyor detect photos/ --json > faces.jsonl
  conveyor detect clip.mp4 --model full --landmarks --out annotated/
  conveyor detect party.gif --device edgetpu --json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import stat
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .._device._client import DeviceClient, InferFuture
from .._errors import ConveyorError, StageError
from .._pipeline import Pipeline, infer, stage
from ..apps.faces import (
    DETECTORS,
    LANDMARK_MODEL,
    MEDIA_SUFFIXES,
    Face,
    FaceRoi,
    FrameMeta,
    ImageReadError,
    annotate,
    get_config,
    iter_frames,
    landmarks_preprocess,
    postprocess,
    preprocess,
    save_image,
    with_landmarks,
)
from ..backends import open_device, parse_device

__all__ = [
    "FrameResult",
    "SharedDevice",
    "add_arguments",
    "face_pipeline",
    "pre_workers",
    "prepare",
    "run",
]

Frame = npt.NDArray[np.uint8]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``conveyor detect``'s arguments on ``parser``."""
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image, GIF, video or folder")
    parser.add_argument(
        "--model",
        choices=sorted(DETECTORS),
        default="short",
        help="short: faces within ~2 m (128x128 input, default); full: up to ~5 m (192x192)",
    )
    parser.add_argument(
        "--landmarks", action="store_true", help="also find the 468 face-mesh landmarks"
    )
    parser.add_argument("--json", action="store_true", help="one JSON line per frame on stdout")
    parser.add_argument("--out", metavar="DIR", type=Path, help="write annotated images here")
    parser.add_argument("--device", metavar="SPEC", default="cpu", help="device (default: cpu)")


# --- the per-frame work, as a pipeline: preprocess -> model -> postprocess ---------------


@dataclass(frozen=True)
class FrameResult:
    """What the detector found in one frame."""

    width: int
    height: int
    faces: list[Face]


def pre_workers() -> int:
    """Worker processes for pre-processing: the CPU count, bounded to 1..4."""
    return max(1, min(4, os.cpu_count() or 1))


def prepare(
    frame: Frame, model: str, keep_frame: bool = False
) -> tuple[npt.NDArray[np.float32], tuple[FrameMeta, Frame | None]]:
    """The pre-processing stage (runs in a worker process): the detector's input tensor,
    and the context post-processing needs: the frame's meta, and the frame itself when
    ``keep_frame`` (the landmark model crops faces out of it)."""
    tensor, meta = preprocess(frame, model)
    return tensor, (meta, frame if keep_frame else None)


class _Finish:
    """The post-processing stage (a thread): faces from the detector's outputs, then each
    face's landmarks from the landmark model when a client to the device is given."""

    def __init__(self, model: str, landmarks: DeviceClient | None) -> None:
        self.model = model
        self.landmarks = landmarks

    def __call__(
        self, item: tuple[list[npt.NDArray[Any]], tuple[FrameMeta, Frame | None]]
    ) -> FrameResult:
        outputs, (meta, frame) = item
        faces = postprocess(outputs, meta, self.model)
        if self.landmarks is not None and faces:
            assert frame is not None
            # Every face's crop is queued on the device before waiting for the first.
            jobs: list[tuple[Face, FaceRoi, InferFuture]] = []
            for face in faces:
                tensor, roi = landmarks_preprocess(frame, face)
                jobs.append(
                    (face, roi, self.landmarks.submit(LANDMARK_MODEL, tensor, dequantize=True))
                )
            faces = [with_landmarks(face, fut.result(), roi) for face, roi, fut in jobs]
        return FrameResult(meta.width, meta.height, faces)


def face_pipeline(
    model: str,
    device: str,
    *,
    server: str | None = None,
    landmarks: DeviceClient | None = None,
    workers: int | None = None,
) -> Pipeline:
    """The face detection pipeline, not yet started: frames in, :class:`FrameResult` out.

    ``server`` is the socket of a device server to run the detector on (instead of a
    private device worker); ``landmarks`` a client to a server that has the landmark model;
    ``workers`` the pre-processing processes (default :func:`pre_workers`). A failed frame
    gives a :class:`StageError` in its place.
    """
    config = get_config(model)
    pre = partial(prepare, model=config.name, keep_frame=landmarks is not None)
    return Pipeline(
        stage(pre, workers=workers or pre_workers(), kind="process", name="preprocess"),
        infer(
            config.model,
            device=device,
            server=server,
            with_context=True,
            dequantize=True,
            name="detect",
        ),
        stage(_Finish(config.name, landmarks), name="postprocess"),
        maxsize=8,
        on_error="return",
    )


class SharedDevice:
    """One device opened in this process and served on a private socket, so that the
    pipeline's detector and the landmark model share it: a device such as an Edge TPU
    serves one process at a time.

    Raises:
        DeviceError, ModelError: the device or a model could not be opened.
    """

    def __init__(self, spec: str, models: Sequence[str]) -> None:
        from .._device._server import DeviceServer

        device = open_device(spec)
        try:
            self._server = DeviceServer([device], models)
        except BaseException:
            device.close()
            raise
        self._dir = tempfile.mkdtemp(prefix="conveyor-detect-")
        self.path = os.path.join(self._dir, "device.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        listener.listen()
        self._server.add_listener(listener)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="conveyor-detect-device", daemon=True
        )
        self._thread.start()
        try:
            self.client = DeviceClient(path=self.path, name="conveyor detect landmarks")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop serving and close the device."""
        client = getattr(self, "client", None)
        if client is not None:
            client.close()
        self._server.shutdown(drain=False)
        self._thread.join(timeout=5.0)
        shutil.rmtree(self._dir, ignore_errors=True)


# --- sources and outputs -----------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One file to read: ``display`` as shown to the user, ``name`` for output files."""

    path: Path
    display: str
    name: str


def expand_sources(paths: Sequence[str], empty: list[str] | None = None,
                   unreadable: list[str] | None = None) -> list[Source]:
    """The files named by ``paths``: files as given, folders searched recursively (sorted).

    Inside a folder only files with an image or video suffix are taken, and only regular
    files (a named pipe or a device would block the read for ever: it goes to
    ``unreadable``); a path that does not exist is kept so that reading it reports the
    error. Folders with no such file are added to ``empty``, and folders that could not
    be listed (with why) to ``unreadable``, if given.
    """
    sources: list[Source] = []
    for given in paths:
        if not given:  # Path("") is the current folder: an unset "$FILE" must not mean it
            if unreadable is not None:
                unreadable.append("'' (an empty path)")
            continue
        root = Path(given)
        if not root.is_dir():
            sources.append(Source(root, given, root.stem or "image"))
            continue
        found: list[str] = []
        errors: list[OSError] = []
        for folder, dirs, files in os.walk(root, onerror=errors.append):
            dirs.sort()
            rel = os.path.relpath(folder, root)
            for f in sorted(files):
                if Path(f).suffix.lower() not in MEDIA_SUFFIXES:
                    continue
                if _special(os.path.join(folder, f)):
                    if unreadable is not None:
                        unreadable.append(f"{os.path.join(folder, f)}: not a regular file "
                                          f"(a named pipe, socket or device)")
                    continue
                found.append(f if rel == "." else os.path.join(rel, f))
        for rel_file in sorted(found):
            name = str(Path(rel_file).with_suffix(""))
            sources.append(Source(root / rel_file, os.path.join(given, rel_file), name))
        if unreadable is not None:
            unreadable.extend(f"the folder {e.filename}: {e.strerror or e}" for e in errors)
        if not found and not errors and empty is not None:
            empty.append(given)
    return sources


def _special(path: str) -> bool:
    """A named pipe, socket or device (what a link points to, too); False for a regular
    file and for what cannot be looked at (reading it reports why)."""
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def writable_folder(path: Path) -> str | None:
    """Make the folder ``path`` if need be; None if it can be written in, else why not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        return "it is a file, not a folder"
    except OSError as exc:
        return exc.strerror or str(exc)
    if not os.access(path, os.W_OK | os.X_OK):
        return f"no permission to write in {path}"
    return None


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_dev, info.st_ino


class OutputNames:
    """Unique output paths under a folder: ``NAME.png`` for a still, ``NAME/NNNNNN.png``
    for each frame of an animation or video."""

    def __init__(self, out: Path, inputs: Sequence[Path] = ()) -> None:
        self.out = out
        self._used: set[str] = set()
        self._paths: set[Path] = set()  # every output path given out
        self._inputs = {ident for p in inputs if (ident := _file_id(p)) is not None}

    def _taken(self, path: Path) -> bool:
        return path in self._paths or _file_id(path) in self._inputs

    def base(self, name: str) -> str:
        """A name not given out before: ``name``, else ``name-2``, ``name-3``...; never
        one whose still would overwrite an input (``--out`` on the inputs' own folder) or
        another output."""
        candidate, n = name, 1
        while candidate in self._used or self._taken(self.out / f"{candidate}.png"):
            n += 1
            candidate = f"{name}-{n}"
        self._used.add(candidate)
        return candidate

    def path(self, base: str, frame: int, single: bool) -> Path:
        """Where frame ``frame`` of the source given ``base`` goes: ``BASE.png``, or
        ``BASE/NNNNNN.png``, with ``-2``, ``-3``... before the suffix where that is an input
        or another output already (a photo ``clip/000000.png`` beside ``clip.gif``)."""
        stem, folder = (base, self.out) if single else (f"{frame:06d}", self.out / base)
        path, n = folder / f"{stem}.png", 1
        while self._taken(path):
            n += 1
            path = folder / f"{stem}-{n}.png"
        self._paths.add(path)
        return path


def frames_with_lookahead(
    frames: Iterator[tuple[int, npt.NDArray[np.uint8]]],
) -> Iterator[tuple[int, npt.NDArray[np.uint8], bool]]:
    """``(index, frame, single)``: ``single`` is True for a source with exactly one frame.

    Reads one frame ahead to know; a read error on the second frame surfaces after the
    first frame was given.
    """
    first = next(frames, None)
    if first is None:
        return
    try:
        second = next(frames, None)
    except Exception:
        yield first[0], first[1], False  # a source of frames whose second is unreadable
        raise
    yield first[0], first[1], second is None
    if second is not None:
        yield second[0], second[1], False
        for index, frame in frames:
            yield index, frame, False


# --- output lines ------------------------------------------------------------------------


def json_line(display: str, index: int, result: FrameResult) -> str:
    """The ``--json`` line for one frame."""
    record: dict[str, Any] = {
        "source": display,
        "frame": index,
        "width": result.width,
        "height": result.height,
        "faces": [face.to_json() for face in result.faces],
    }
    return json.dumps(record)


def text_line(display: str, index: int, result: FrameResult) -> str:
    """The human-readable line for one frame."""
    n = len(result.faces)
    head = f"{display} frame {index} ({result.width}x{result.height}): {n} face{'s' * (n != 1)}"
    parts = [head]
    for face in result.faces:
        part = (
            f"({face.xmin:.3f}, {face.ymin:.3f})-({face.xmax:.3f}, {face.ymax:.3f}) "
            f"score {face.score:.2f}"
        )
        if face.landmarks is not None:
            part += f", {len(face.landmarks)} landmarks"
        parts.append(part)
    return "; ".join(parts)


class Console:
    """Writes lines to stdout/stderr, around a tqdm progress bar when stderr is a terminal."""

    def __init__(self, total: int) -> None:
        self._bar: Any = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="file", file=sys.stderr, leave=False)

    def out(self, text: str) -> None:
        """A line on stdout."""
        self._write(text, sys.stdout)

    def err(self, text: str) -> None:
        """A line on stderr."""
        self._write(text, sys.stderr)

    def _write(self, text: str, file: Any) -> None:
        # A file name that is not valid UTF-8 holds lone surrogates: a strict output
        # encoding would fail on it (and the run with it). Written escaped instead.
        encoding = getattr(file, "encoding", None) or "utf-8"
        try:
            text.encode(encoding)
        except UnicodeEncodeError:
            text = text.encode(encoding, "backslashreplace").decode(encoding)
        if self._bar is not None:
            self._bar.write(text, file=file)
        else:
            print(text, file=file, flush=True)

    def advance(self) -> None:
        """One more file done."""
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        """Remove the bar."""
        if self._bar is not None:
            self._bar.close()


# --- the command -------------------------------------------------------------------------


# Suffixes of files that hold one frame (GIF, WebP and TIFF may hold many).
_STILL_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp"})


class _File:
    """One source being read: its output base name; ``failed`` once an error was reported."""

    def __init__(self, source: Source, base: str) -> None:
        self.source = source
        self.base = base
        self.failed = False


@dataclass(frozen=True)
class _FrameIn:
    """A frame given to the pipeline; ``frame`` is kept only to draw on it (``--out``)."""

    file: _File
    index: int
    single: bool
    frame: Frame | None


@dataclass(frozen=True)
class _FileEnd:
    """The end of a file, with the error that ended it early, if any."""

    file: _File
    error: ImageReadError | None


def _frame_source(
    sources: Sequence[Source],
    names: OutputNames | None,
    events: deque[_FrameIn | _FileEnd],
) -> Iterator[Frame]:
    """Every frame of every source, for the pipeline (it runs in the pipeline's feeder thread).

    Each frame and each file's end is also recorded in ``events``, in order, for the
    consumer to match with the pipeline's ordered results. A file that cannot be read does
    not end the run: its error is recorded and the next file is read. ``events`` stays
    bounded: the pipeline takes a new frame only when it has room for it.
    """
    keep = names is not None
    for source in sources:
        file = _File(source, names.base(source.name) if names is not None else "")
        error = None
        try:
            with closing(iter_frames(source.path)) as frames:
                for index, frame, single in frames_with_lookahead(frames):
                    events.append(_FrameIn(file, index, single, frame if keep else None))
                    yield frame
        except ImageReadError as exc:
            error = exc
        events.append(_FileEnd(file, error))


def run(args: argparse.Namespace) -> int:
    """Run ``conveyor detect``; 0 if every file was read, 1 if any failed, 2 on a setup error."""
    empty: list[str] = []
    unreadable: list[str] = []
    sources = expand_sources(args.paths, empty, unreadable)
    for folder in empty:  # counted as failed: the caller named nothing to detect in there
        print(f"conveyor: no image or video files in {folder} (looked for "
              f"{', '.join(sorted(MEDIA_SUFFIXES))})", file=sys.stderr)
    for why in unreadable:  # failed too: files in there went unseen
        print(f"conveyor: cannot read {why}", file=sys.stderr)
    empty += unreadable
    if args.out is not None:
        why_not = writable_folder(args.out)
        if why_not:  # found out now, not once per input after the work
            print(f"conveyor: cannot write to {args.out}: {why_not}", file=sys.stderr)
            return 2
    # A few still images need no more worker processes than images: fewer to start.
    stills = all(s.path.suffix.lower() in _STILL_SUFFIXES for s in sources)
    workers = max(1, min(pre_workers(), len(sources))) if stills else pre_workers()
    shared: SharedDevice | None = None
    try:
        parse_device(args.device)
        if args.landmarks:
            # Both models on one device opened here; the pipeline reaches it by its socket.
            config = get_config(args.model)
            shared = SharedDevice(args.device, [config.model, LANDMARK_MODEL])
            pipe = face_pipeline(
                args.model,
                args.device,
                server=shared.path,
                landmarks=shared.client,
                workers=workers,
            )
        else:
            pipe = face_pipeline(args.model, args.device, workers=workers)
        pipe.start()
    except BaseException as exc:
        if shared is not None:
            shared.close()
        if not isinstance(exc, ConveyorError):
            raise
        print(f"conveyor: {exc}", file=sys.stderr)
        return 2
    names = OutputNames(args.out, [s.path for s in sources]) if args.out is not None else None
    events: deque[_FrameIn | _FileEnd] = deque()
    console = Console(len(sources))
    line = json_line if args.json else text_line
    failed = 0

    def fail(file: _File, message: str) -> None:
        nonlocal failed
        failed += 1
        file.failed = True
        console.err(message)

    def file_end(event: _FileEnd) -> None:
        if event.error is not None and not event.file.failed:
            fail(
                event.file,
                f"conveyor: cannot read {event.file.source.display}: {event.error.reason}",
            )
        console.advance()

    def frame_done(event: _FrameIn, result: FrameResult | StageError) -> None:
        file = event.file
        if file.failed:
            return  # the rest of a file that failed is not reported
        display = file.source.display
        if isinstance(result, StageError):
            fail(file, f"conveyor: failed on {display}: {result.__cause__ or result}")
            return
        console.out(line(display, event.index, result))
        if names is not None and event.frame is not None:
            path = names.path(file.base, event.index, event.single)
            try:
                save_image(annotate(event.frame, result.faces), path)
            except OSError as exc:
                fail(file, f"conveyor: cannot write the output for {display}: {exc}")

    try:
        with pipe:
            for result in pipe.map(_frame_source(sources, names, events)):
                event = events.popleft()
                while isinstance(event, _FileEnd):
                    file_end(event)
                    event = events.popleft()
                frame_done(event, result)
        while events:
            event = events.popleft()
            assert isinstance(event, _FileEnd)
            file_end(event)
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly, as Unix tools do. Point stdout
        # at devnull so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:
        console.close()
        if shared is not None:
            shared.close()
    return 1 if failed or empty else 0
