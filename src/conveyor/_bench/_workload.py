"""The bench's workload: MediaPipe face detection on in-memory frames.

Every design runs the same three steps per item, only arranged differently:

1. :func:`prepare` (CPU): the frame is letterboxed into the model input, resized and
   normalised (the real :func:`conveyor.apps.faces.preprocess`), then the application's own
   Python code runs on it: ``python_loops`` iterations of a pure-Python luma histogram, a
   stand-in for the per-frame Python that real programs carry (tracking, rules, logging).
   Pillow and numpy release the GIL for most of the resize; the histogram never does.
2. The model, on the device.
3. :func:`finish` (CPU): anchor decoding and weighted NMS (the real
   :func:`conveyor.apps.faces.postprocess`).

Frames are the bundled sample images, decoded once per process and kept in memory; item
``i`` is frame ``i % 4``. Items travel as their index (as a path would), so every design
moves the same few bytes into its workers.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import numpy.typing as npt

from ..apps.faces import DETECTORS, FrameMeta, load_image, postprocess, preprocess, sample_images

__all__ = [
    "Workload",
    "calibrate_python_loops",
    "finish",
    "frames",
    "lower_priority",
    "prepare",
    "prepare_in_worker",
]

Outputs = list[npt.NDArray[Any]]


@dataclass(frozen=True)
class Workload:
    """What one item costs. Picklable: process workers get it with the function.

    Attributes:
        detector: ``"short"`` (128x128 input) or ``"full"`` (192x192).
        python_loops: iterations of the pure-Python step per item (0: none).
        python_ms: what those iterations took per item where they were calibrated.
        nice: niceness of the threads and processes that only do CPU work (0: unchanged),
            so that whatever feeds the device wins a core the moment it wakes up.
    """

    detector: str = "short"
    python_loops: int = 0
    python_ms: float = 0.0
    nice: int = 0

    @property
    def model(self) -> str:
        """The bundled model's name."""
        return DETECTORS[self.detector].model


@cache
def frames() -> tuple[npt.NDArray[np.uint8], ...]:
    """The decoded sample frames of this process (decoded on first use, then kept)."""
    return tuple(load_image(p) for p in sample_images())


@cache
def _lumas() -> tuple[list[int], ...]:
    """Each frame's luma (a quarter-size thumbnail) as a Python list, for the Python step."""
    out = []
    for f in frames():
        thumb = f[::4, ::4].astype(np.uint16)
        y = (thumb[..., 0] * 77 + thumb[..., 1] * 150 + thumb[..., 2] * 29) >> 8
        out.append([int(v) for v in y.reshape(-1)])
    return tuple(out)


@cache
def _meta(detector: str, frame: int) -> FrameMeta:
    return preprocess(frames()[frame], model=detector)[1]


def _histogram(luma: list[int], loops: int) -> list[int]:
    """A 16-bin histogram of the first ``loops`` values (cycling): pure Python, GIL held."""
    hist = [0] * 16
    n = len(luma)
    done = 0
    while done < loops:
        take = min(loops - done, n)
        for v in luma[:take]:
            hist[v >> 4] += 1
        done += take
    return hist


def prepare(work: Workload, index: int) -> npt.NDArray[np.float32]:
    """Step 1 for item ``index``: the model's input tensor, shape (1, H, W, 3) float32."""
    which = index % len(frames())
    tensor, _ = preprocess(frames()[which], model=work.detector)
    if work.python_loops:
        _histogram(_lumas()[which], work.python_loops)
    return tensor


_lowered = threading.local()


def lower_priority(nice: int) -> None:
    """Add ``nice`` to the calling thread's niceness, once per thread (Linux: per thread).

    A no-op where the platform has no per-thread priority or refuses the change.
    """
    if nice <= 0 or getattr(_lowered, "done", False):
        return
    _lowered.done = True
    try:
        os.setpriority(
            os.PRIO_PROCESS,
            threading.get_native_id(),
            os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) + nice,
        )
    except (AttributeError, OSError):
        pass


def prepare_in_worker(work: Workload, index: int) -> npt.NDArray[np.float32]:
    """:func:`prepare` for a thread or process that does nothing else: it first lowers its
    own priority by ``work.nice`` (once)."""
    lower_priority(work.nice)
    return prepare(work, index)


def finish(work: Workload, index: int, outputs: Outputs) -> int:
    """Step 3 for item ``index``: decode and merge the detections; the number of faces.

    The letterbox of frame ``index % 4`` is a function of the frame's size alone, so it is
    looked up here rather than carried past the device.
    """
    meta = _meta(work.detector, index % len(frames()))
    return len(postprocess(outputs, meta, model=work.detector))


def calibrate_python_loops(target_ms: float, probe_s: float = 0.05) -> int:
    """How many iterations of the pure-Python step take about ``target_ms`` here.

    Blocks for about ``probe_s`` seconds (2 probes) on the calling thread.
    """
    if target_ms <= 0:
        return 0
    luma = _lumas()[0]
    loops = 20_000
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        count = 0
        while time.perf_counter() - start < probe_s / 2:
            _histogram(luma, loops)
            count += 1
        best = min(best, (time.perf_counter() - start) / (count * loops))
    return max(1, round(target_ms / 1e3 / best))
