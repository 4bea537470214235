"""Detect faces in the bundled sample images, through a conveyor pipeline.

Runs MediaPipe's short-range face detector on each sample image in a conveyor.Pipeline
(pre-processing in worker processes, the model on the device, post-processing in a thread),
prints the faces found (box relative to the image, and score), then the throughput of the
pipeline over several passes and how busy it kept the device, and writes each image with
its boxes and keypoints drawn into the output folder.

examples:
  conveyor demo
  conveyor demo --out /tmp/faces
  conveyor demo --device edgetpu --repeat 50
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from .._errors import ConveyorError, StageError
from ..apps.faces import annotate, get_config, load_image, sample_images, save_image
from ..backends import parse_device
from .detect import FrameResult, face_pipeline, pre_workers, writable_folder

__all__ = ["add_arguments", "run"]

MODEL = "short"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``conveyor demo``'s arguments on ``parser``."""
    parser.add_argument(
        "--out",
        metavar="DIR",
        type=Path,
        default=Path("conveyor-demo"),
        help="folder for the annotated images (default: ./conveyor-demo)",
    )
    parser.add_argument("--device", metavar="SPEC", default="cpu", help="device (default: cpu)")
    parser.add_argument(
        "--repeat",
        metavar="N",
        type=int,
        default=20,
        help="passes over the samples when measuring throughput (default: 20)",
    )


def _device_words(spec: str) -> str:
    kind = parse_device(spec).kind
    if kind == "cpu":
        return "the CPU device (cpu)"
    if kind == "sim-edgetpu":
        return (f"device {spec} (a simulation: it takes an Edge TPU's time but computes "
                f"nothing, so it finds no faces)")
    return f"device {spec}"


def run(args: argparse.Namespace) -> int:
    """Run ``conveyor demo``; 0 on success, 2 if the device or model cannot be opened, 1 if
    an image fails or the output cannot be written."""
    if args.repeat < 1:
        print("conveyor: --repeat must be at least 1", file=sys.stderr)
        return 2
    why_not = writable_folder(args.out)
    if why_not:  # found out now, not after the run
        print(f"conveyor: cannot write to {args.out}: {why_not}", file=sys.stderr)
        return 2  # as detect and bench: a bad argument, refused before any work
    try:
        where = _device_words(args.device)
        pipe = face_pipeline(MODEL, args.device)
        pipe.start()
    except ConveyorError as exc:
        print(f"conveyor: {exc}", file=sys.stderr)
        return 2
    with pipe:
        images = [(path, load_image(path)) for path in sample_images()]
        workers = pre_workers()
        print(
            f"face detection ({get_config(MODEL).model}) on {where}, through the conveyor "
            f"pipeline: pre-processing in {workers} worker process{'es' * (workers != 1)}, "
            f"inference in the device worker, post-processing in a thread"
        )
        results: list[Any] = list(pipe.map(image for _path, image in images))
        error = next((r for r in results if isinstance(r, StageError)), None)
        if error is not None:
            print(f"conveyor: {error}", file=sys.stderr)
            return 1
        for (path, _image), result in zip(images, results, strict=True):
            print(f"  {path.name} ({result.width}x{result.height}): {len(result.faces)} face(s)")
            for face in result.faces:
                print(
                    f"    box ({face.xmin:.3f}, {face.ymin:.3f})-({face.xmax:.3f}, {face.ymax:.3f})"
                    f"  score {face.score:.2f}"
                )
        # Throughput: every pass streams through the same running pipeline.
        before = pipe.stats()["device"]
        start = time.perf_counter()
        passes = (image for _ in range(args.repeat) for _path, image in images)
        count = 0
        for result in pipe.map(passes):
            count += 1
            if isinstance(result, StageError):
                print(f"conveyor: {result}", file=sys.stderr)
                return 1
        elapsed = time.perf_counter() - start
        stats = pipe.stats()
    busy = stats["device"]["busy_s"] - before["busy_s"]
    print(
        f"throughput: {count / elapsed:.1f} images/s through the pipeline "
        f"({args.repeat} passes, {count} images in {elapsed:.2f} s); "
        f"device duty cycle {100 * busy / elapsed:.0f}% "
        f"({1000 * busy / count:.2f} ms of inference per image)"
    )
    print(
        "  stage latency p50/p99: "
        + ", ".join(
            f"{name} {st['p50_ms']:.2f}/{st['p99_ms']:.2f} ms"
            for name, st in stats["stages"].items()
        )
    )
    try:
        for (path, image), result in zip(images, results, strict=True):
            assert isinstance(result, FrameResult)
            save_image(annotate(image, result.faces), args.out / f"{path.stem}.png")
    except OSError as exc:
        print(f"conveyor: cannot write to {args.out}: {exc}", file=sys.stderr)
        return 1
    print(f"annotated images written to {args.out.resolve()}")
    return 0
