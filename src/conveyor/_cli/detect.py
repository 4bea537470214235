"""Detect faces in images, animated GIFs and videos (every frame).

A folder is searched recursively, in sorted order, for image and video files. Boxes and
keypoints are relative to the image (0..1). A file that cannot be read is reported on stderr
(conveyor: cannot read PATH: reason) and the others are still processed; the exit status is
then 1.

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
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .._errors import ConveyorError
from ..apps.faces import (
    DETECTORS,
    MEDIA_SUFFIXES,
    Face,
    FaceDetector,
    ImageReadError,
    annotate,
    iter_frames,
    postprocess,
    preprocess,
    run_model,
    save_image,
)

__all__ = ["FrameStep", "add_arguments", "frame_step", "run"]


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


# --- the per-frame work: preprocess -> model -> postprocess --------------------------------


@dataclass(frozen=True)
class FrameResult:
    """What the detector found in one frame."""

    width: int
    height: int
    faces: list[Face]


FrameStep = Callable[[npt.NDArray[np.uint8]], FrameResult]


def frame_step(detector: FaceDetector) -> FrameStep:
    """The per-frame work on ``detector``'s device, as three separable steps.

    ``pre`` and ``post`` are picklable module-level functions (a pipeline can run them in
    worker processes); only the model call needs the device.
    """
    pre = partial(preprocess, model=detector.config.name)
    post = partial(postprocess, model=detector.config.name)

    def step(frame: npt.NDArray[np.uint8]) -> FrameResult:
        tensor, meta = pre(frame)
        outputs = run_model(detector.runner, tensor)
        faces = post(outputs, meta)
        if detector.landmark_runner is not None:
            faces = [detector.add_landmarks(frame, face) for face in faces]
        return FrameResult(meta.width, meta.height, faces)

    return step


# --- sources and outputs -----------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One file to read: ``display`` as shown to the user, ``name`` for output files."""

    path: Path
    display: str
    name: str


def expand_sources(paths: Sequence[str]) -> list[Source]:
    """The files named by ``paths``: files as given, folders searched recursively (sorted).

    Inside a folder only files with an image or video suffix are taken; a path that does
    not exist is kept so that reading it reports the error.
    """
    sources: list[Source] = []
    for given in paths:
        root = Path(given)
        if not root.is_dir():
            sources.append(Source(root, given, root.stem or "image"))
            continue
        found: list[str] = []
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            rel = os.path.relpath(folder, root)
            for f in sorted(files):
                if Path(f).suffix.lower() in MEDIA_SUFFIXES:
                    found.append(f if rel == "." else os.path.join(rel, f))
        for rel_file in sorted(found):
            name = str(Path(rel_file).with_suffix(""))
            sources.append(Source(root / rel_file, os.path.join(given, rel_file), name))
    return sources


class OutputNames:
    """Unique output paths under a folder: ``NAME.png`` for a still, ``NAME/NNNNNN.png``
    for each frame of an animation or video."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self._used: set[str] = set()

    def base(self, name: str) -> str:
        """A name not given out before: ``name``, else ``name-2``, ``name-3``..."""
        candidate, n = name, 1
        while candidate in self._used:
            n += 1
            candidate = f"{name}-{n}"
        self._used.add(candidate)
        return candidate

    def path(self, base: str, frame: int, single: bool) -> Path:
        """Where frame ``frame`` of the source given ``base`` goes."""
        return self.out / f"{base}.png" if single else self.out / base / f"{frame:06d}.png"


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
    second = next(frames, None)
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


def _process(
    source: Source,
    step: FrameStep,
    args: argparse.Namespace,
    console: Console,
    names: OutputNames | None,
) -> None:
    base = names.base(source.name) if names is not None else ""
    with closing(iter_frames(source.path)) as frames:
        for index, frame, single in frames_with_lookahead(frames):
            result = step(frame)
            line = json_line if args.json else text_line
            console.out(line(source.display, index, result))
            if names is not None:
                save_image(annotate(frame, result.faces), names.path(base, index, single))


def run(args: argparse.Namespace) -> int:
    """Run ``conveyor detect``; 0 if every file was read, 1 if any failed, 2 on a setup error."""
    try:
        detector = FaceDetector(args.model, device=args.device, landmarks=args.landmarks)
    except ConveyorError as exc:
        print(f"conveyor: {exc}", file=sys.stderr)
        return 2
    sources = expand_sources(args.paths)
    names = OutputNames(args.out) if args.out is not None else None
    failed = 0
    console = Console(len(sources))
    try:
        step = frame_step(detector)
        for source in sources:
            try:
                _process(source, step, args, console, names)
            except BrokenPipeError:
                # The reader went away (``| head``): stop quietly, as Unix tools do. Point
                # stdout at devnull so the interpreter's final flush does not fail again.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                return 1
            except ImageReadError as exc:
                failed += 1
                console.err(f"conveyor: cannot read {source.display}: {exc.reason}")
            except OSError as exc:
                failed += 1
                console.err(f"conveyor: cannot write the output for {source.display}: {exc}")
            except ConveyorError as exc:
                failed += 1
                console.err(f"conveyor: failed on {source.display}: {exc}")
            console.advance()
    finally:
        console.close()
        detector.close()
    return 1 if failed else 0
