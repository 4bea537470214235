"""The int8 build of the short-range face detector, through LiteRT, against the float model.

The int8 model has int8 input and outputs: float input is quantised at the boundary by
``prepare_inputs``, outputs come back raw and are dequantised by the caller (FaceDetector's
``run_model`` does it). Tolerances on the astronaut sample (measured in brackets):

- one face from each model; box IoU >= 0.9 [0.94]; |score difference| <= 0.05 [0.017];
  keypoints within 0.02 of the image size [0.007];
- raw outputs, anchors the float model scores >= 0.1: |sigmoid score difference| <= 0.1 [0.08].
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from conveyor._models import BUNDLED_DIR, bundled_models
from conveyor._tensors import dequantize, prepare_inputs
from conveyor.apps.faces import DETECTORS, FaceDetector, load_image, preprocess
from conveyor.backends import open_device

FLOAT, INT8 = "face_detection_short_range", "face_detection_short_range_int8"
ASTRONAUT = BUNDLED_DIR.parent / "samples" / "astronaut.png"


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -80.0, 80.0)))


def test_int8_model_is_bundled_with_the_float_models_tensors() -> None:
    assert INT8 in bundled_models()
    cpu = open_device("cpu")
    q, f = cpu.load(INT8), cpu.load(FLOAT)
    assert [(s.name, s.shape) for s in q.inputs] == [(s.name, s.shape) for s in f.inputs]
    assert [(s.name, s.shape) for s in q.outputs] == [(s.name, s.shape) for s in f.outputs]
    assert all(s.quantized and s.dtype == np.int8 for s in (*q.inputs, *q.outputs))
    # the input's range is the float model's [-1, 1], to within one step
    (spec,) = q.inputs
    assert spec.scale == pytest.approx(2 / 255, rel=1e-6)
    lo, hi = spec.scale * (-128 - spec.zero_point), spec.scale * (127 - spec.zero_point)
    assert lo <= -1 + spec.scale and hi >= 1 - spec.scale


def test_raw_outputs_agree_with_the_float_model() -> None:
    cpu = open_device("cpu")
    q, f = cpu.load(INT8), cpu.load(FLOAT)
    tensor, _ = preprocess(load_image(ASTRONAUT), DETECTORS["short"])
    raw = q.run(prepare_inputs(q.inputs, tensor, q.model))  # float in, quantised here
    assert all(r.dtype == np.int8 for r in raw)
    got = [dequantize(r, s) for r, s in zip(raw, q.outputs)]
    want = f.run(prepare_inputs(f.inputs, tensor, f.model))
    score_q, score_f = sigmoid(got[1].ravel()), sigmoid(want[1].ravel())
    seen = score_f >= 0.1
    assert seen.sum() >= 5
    assert np.abs(score_q - score_f)[seen].max() <= 0.1
    # The best anchors of the two models are neighbours with near-equal scores: each
    # model's best is among the other's top three.
    assert int(np.argmax(score_q)) in np.argsort(-score_f)[:3]
    assert int(np.argmax(score_f)) in np.argsort(-score_q)[:3]


def test_face_detector_with_the_int8_model() -> None:
    image = load_image(ASTRONAUT)
    with FaceDetector("short") as detector:
        (want,) = detector.detect(image)
    config = dataclasses.replace(DETECTORS["short"], model=INT8)
    with FaceDetector(config) as detector:
        (got,) = detector.detect(image)
    assert got.iou(want) >= 0.9
    assert abs(got.score - want.score) <= 0.05
    for (gx, gy), (wx, wy) in zip(got.keypoints, want.keypoints):
        assert abs(gx - wx) <= 0.02 and abs(gy - wy) <= 0.02
