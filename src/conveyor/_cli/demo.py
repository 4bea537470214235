"""Detect faces in the bundled sample images and write annotated copies.

Runs MediaPipe's short-range face detector on each sample image, prints the faces found
(box relative to the image, and score) and the throughput, and writes each image with its
boxes and keypoints drawn into the output folder.

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

from .._errors import ConveyorError
from ..apps.faces import FaceDetector, annotate, load_image, sample_images, save_image
from .detect import frame_step

__all__ = ["add_arguments", "run"]


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


def run(args: argparse.Namespace) -> int:
    """Run ``conveyor demo``; 0 on success, 2 if the device or model cannot be opened, 1 if
    the output cannot be written."""
    if args.repeat < 1:
        print("conveyor: --repeat must be at least 1", file=sys.stderr)
        return 2
    try:
        detector = FaceDetector("short", device=args.device)
    except ConveyorError as exc:
        print(f"conveyor: {exc}", file=sys.stderr)
        return 2
    with detector:
        images = [(path, load_image(path)) for path in sample_images()]
        step = frame_step(detector)
        print(f"face detection ({detector.config.model}) on {args.device}:")
        results = []
        for path, image in images:
            result = step(image)
            results.append(result)
            faces = result.faces
            print(f"  {path.name} ({result.width}x{result.height}): {len(faces)} face(s)")
            for face in faces:
                print(
                    f"    box ({face.xmin:.3f}, {face.ymin:.3f})-({face.xmax:.3f}, {face.ymax:.3f})"
                    f"  score {face.score:.2f}"
                )
        start = time.perf_counter()
        for _ in range(args.repeat):
            for _path, image in images:
                step(image)
        elapsed = time.perf_counter() - start
    count = args.repeat * len(images)
    print(
        f"throughput: {count / elapsed:.1f} images/s "
        f"({count} images, {1000 * elapsed / count:.2f} ms each: "
        f"pre-processing, inference and post-processing, one after another)"
    )
    try:
        for (path, image), result in zip(images, results, strict=True):
            save_image(annotate(image, result.faces), args.out / f"{path.stem}.png")
    except OSError as exc:
        print(f"conveyor: cannot write to {args.out}: {exc}", file=sys.stderr)
        return 1
    print(f"annotated images written to {args.out.resolve()}")
    return 0
