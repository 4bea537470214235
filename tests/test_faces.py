"""conveyor.apps.faces: MediaPipe face detection, NMS, anchors, landmarks and image reading."""

from __future__ import annotations

import dataclasses
import math
import pickle
import re
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

import conveyor.apps.faces as faces_pkg
from conveyor._errors import ConveyorError, InputError
from conveyor.apps.faces import (
    DETECTORS,
    NUM_LANDMARKS,
    Detections,
    Face,
    FaceDetector,
    FrameMeta,
    ImageReadError,
    SsdAnchorOptions,
    UnknownFaceModelError,
    annotate,
    frame_meta,
    generate_anchors,
    iter_frames,
    load_image,
    postprocess,
    preprocess,
    run_model,
    sample_images,
    weighted_nms,
)

# MediaPipe's short-range detector on astronaut.png.
REFERENCE = Face(xmin=0.346, ymin=0.157, xmax=0.531, ymax=0.342, score=0.92)

Image8 = npt.NDArray[np.uint8]


def sample(name: str) -> Path:
    (path,) = [p for p in sample_images() if p.name == name]
    return path


@pytest.fixture(scope="module")
def astronaut() -> Image8:
    return load_image(sample("astronaut.png"))


@pytest.fixture(scope="module")
def face_crop(astronaut: Image8) -> Image8:
    """The astronaut's head enlarged to 512x512: the face fills about 40% of the width,
    which leaves the short-range model room when the image is shrunk into a larger canvas."""
    head = Image.fromarray(astronaut[40:260, 120:340])
    return np.asarray(head.resize((512, 512), Image.Resampling.BILINEAR))


@pytest.fixture(scope="module")
def short() -> Iterator[FaceDetector]:
    with FaceDetector("short") as detector:
        yield detector


@pytest.fixture(scope="module")
def full() -> Iterator[FaceDetector]:
    with FaceDetector("full") as detector:
        yield detector


def only_face(found: list[Face]) -> Face:
    assert len(found) == 1, found
    return found[0]


# --- the reference and geometric consistency ---------------------------------------------


def test_astronaut_matches_mediapipe_reference(short: FaceDetector, astronaut: Image8) -> None:
    face = only_face(short.detect(astronaut))
    assert face.iou(REFERENCE) >= 0.95
    assert face.score == pytest.approx(0.92, abs=0.01)
    assert len(face.keypoints) == 6
    # Keypoints 0 and 1 are the person's right and left eye: image left, then right.
    (rx, ry), (lx, ly) = face.keypoints[:2]
    assert face.xmin < rx < lx < face.xmax
    assert face.ymin < ry < face.ymax
    assert face.ymin < ly < face.ymax


def test_detect_accepts_a_path(short: FaceDetector) -> None:
    assert only_face(short.detect(sample("astronaut.png"))).iou(REFERENCE) >= 0.95


def test_mirrored_image_gives_mirrored_box(short: FaceDetector, astronaut: Image8) -> None:
    face = only_face(short.detect(astronaut))
    mirrored = only_face(short.detect(np.ascontiguousarray(astronaut[:, ::-1])))
    expected = Face(1 - face.xmax, face.ymin, 1 - face.xmin, face.ymax, face.score)
    assert mirrored.iou(expected) >= 0.95
    # The eyes swap sides in the mirror: the new right eye is where the left eye was.
    assert mirrored.keypoints[0][0] == pytest.approx(1 - face.keypoints[1][0], abs=0.02)


@pytest.mark.parametrize(
    ("canvas", "offset"),
    [((900, 700), (250, 100)), ((700, 900), (100, 300))],
    ids=["wide", "tall"],
)
def test_padded_image_box_follows_the_transform(
    short: FaceDetector, face_crop: Image8, canvas: tuple[int, int], offset: tuple[int, int]
) -> None:
    (w, h), (ox, oy) = canvas, offset
    base = only_face(short.detect(face_crop))
    big = np.zeros((h, w, 3), np.uint8)
    big[oy : oy + 512, ox : ox + 512] = face_crop
    moved = only_face(short.detect(big))
    expected = Face(
        (base.xmin * 512 + ox) / w,
        (base.ymin * 512 + oy) / h,
        (base.xmax * 512 + ox) / w,
        (base.ymax * 512 + oy) / h,
        base.score,
    )
    assert moved.iou(expected) >= 0.9


@pytest.mark.parametrize("factor", [0.5, 1.5])
def test_scaled_image_gives_the_same_relative_box(
    short: FaceDetector, astronaut: Image8, factor: float
) -> None:
    size = round(512 * factor)
    scaled = np.asarray(Image.fromarray(astronaut).resize((size, size), Image.Resampling.BILINEAR))
    assert only_face(short.detect(scaled)).iou(REFERENCE) >= 0.95


def test_two_faces_side_by_side(short: FaceDetector, face_crop: Image8) -> None:
    base = only_face(short.detect(face_crop))
    found = sorted(
        short.detect(np.concatenate([face_crop, face_crop], axis=1)), key=lambda f: f.xmin
    )
    assert len(found) == 2
    for half, face in enumerate(found):
        expected = Face(
            (half + base.xmin) / 2, base.ymin, (half + base.xmax) / 2, base.ymax, base.score
        )
        # Each face is ~30 model pixels wide here: a one-pixel shift costs ~0.05 of IoU.
        assert face.iou(expected) >= 0.85


def test_full_range_finds_the_astronaut(full: FaceDetector, astronaut: Image8) -> None:
    face = only_face(full.detect(astronaut))
    assert face.score >= DETECTORS["full"].min_score_thresh
    # The full-range model draws a taller box than the short-range one; same face.
    assert face.iou(REFERENCE) >= 0.7


def test_full_range_finds_two_small_faces(full: FaceDetector, astronaut: Image8) -> None:
    found = full.detect(np.concatenate([astronaut, astronaut], axis=1))
    centers = sorted((f.xmin + f.xmax) / 2 for f in found)
    assert len(found) == 2
    ref_center = (REFERENCE.xmin + REFERENCE.xmax) / 2
    assert centers == pytest.approx([ref_center / 2, 0.5 + ref_center / 2], abs=0.02)


def test_grayscale_and_rgba_images(short: FaceDetector, astronaut: Image8) -> None:
    gray = np.asarray(Image.open(sample("camera.png")))
    assert gray.ndim == 2
    face = only_face(short.detect(gray))
    assert face == only_face(short.detect(np.repeat(gray[:, :, None], 3, axis=2)))
    assert face == only_face(short.detect(gray[:, :, None]))
    rgba = np.dstack([astronaut, np.full(astronaut.shape[:2], 255, np.uint8)])
    assert only_face(short.detect(rgba)) == only_face(short.detect(astronaut))


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_deep_grayscale_files_load_as_their_8_bit_picture(
        tmp_path: Path, short: FaceDetector, mode: str) -> None:
    gray = np.asarray(Image.open(sample("camera.png")))
    if mode == "F":
        deep = Image.fromarray(gray.astype(np.float32) / 255, mode="F")
        path = tmp_path / "camera.tiff"
    else:
        deep = Image.fromarray(gray.astype(np.uint16) * 257).convert(mode)
        path = tmp_path / ("camera.png" if mode == "I;16" else "camera.tiff")
    deep.save(path)
    loaded = load_image(path)
    assert loaded.shape == (*gray.shape, 3) and loaded.dtype == np.uint8
    assert np.abs(loaded[:, :, 0].astype(int) - gray).max() <= 1
    assert only_face(short.detect(loaded)) == only_face(short.detect(gray))


def test_no_face_in_the_cat(short: FaceDetector) -> None:
    assert short.detect(sample("chelsea.png")) == []


# --- pre-processing, decoding and pickling -----------------------------------------------


def test_preprocess_letterboxes_with_minus_one_padding() -> None:
    image = np.full((400, 600, 3), 255, np.uint8)
    tensor, meta = preprocess(image, model="short")
    assert tensor.shape == (1, 128, 128, 3)
    assert tensor.dtype == np.float32
    # 600x400 fits as 128x85: 21 rows of padding above, 22 below.
    rows = tensor[0, :, 64, 0]
    assert np.all(rows[:21] == -1.0)
    assert np.all(rows[22:105] == 1.0)
    assert np.all(rows[107:] == -1.0)
    box = meta.letterbox
    assert (meta.width, meta.height) == (600, 400)
    assert (box.left, box.right) == (0.0, 0.0)
    assert box.top == pytest.approx(21 / 128)
    assert box.bottom == pytest.approx(22 / 128)
    assert frame_meta(600, 400, "short") == meta
    corners = box.to_image(np.array([[0.0, 21 / 128], [1.0, 106 / 128]]))
    assert corners == pytest.approx(np.array([[0.0, 0.0], [1.0, 1.0]]))


def test_preprocess_value_range() -> None:
    image = np.zeros((128, 128, 3), np.uint8)
    image[:, 64:] = 255
    tensor, _ = preprocess(image)
    assert tensor.min() == -1.0
    assert tensor.max() == 1.0
    assert tensor.shape == (1, 128, 128, 3)


def test_decode_one_anchor_by_hand() -> None:
    config = DETECTORS["short"]
    anchors = generate_anchors(config.anchors)
    index = 600
    ax, ay = float(anchors[index, 0]), float(anchors[index, 1])
    raw = np.zeros((1, 896, 16), np.float32)
    raw[0, index, :4] = [6.4, -12.8, 32.0, 16.0]  # dx, dy, w, h in input pixels
    raw[0, index, 4:6] = [-12.8, 0.0]  # keypoint 0
    logits = np.full((1, 896, 1), -100.0, np.float32)
    logits[0, index, 0] = 2.0
    meta = preprocess(np.zeros((64, 64, 3), np.uint8))[1]
    face = only_face(postprocess([logits, raw], meta))  # output order does not matter
    cx, cy = ax + 0.05, ay - 0.1
    assert (face.xmin, face.ymin, face.xmax, face.ymax) == pytest.approx(
        (cx - 0.125, cy - 0.0625, cx + 0.125, cy + 0.0625), abs=1e-6
    )
    assert face.score == pytest.approx(1 / (1 + math.exp(-2.0)))
    assert face.keypoints[0] == pytest.approx((ax - 0.1, ay), abs=1e-6)


def test_scores_below_threshold_and_negative_sizes_are_dropped() -> None:
    raw = np.zeros((1, 896, 16), np.float32)
    raw[0, 10, 2:4] = [-5.0, 10.0]  # negative width
    logits = np.full((1, 896, 1), -0.1, np.float32)  # sigmoid 0.475 < 0.5
    logits[0, 10, 0] = 50.0
    meta = preprocess(np.zeros((8, 8), np.uint8))[1]
    assert postprocess([raw, logits], meta) == []


def test_postprocess_rejects_wrong_outputs() -> None:
    meta = preprocess(np.zeros((8, 8), np.uint8))[1]
    with pytest.raises(InputError, match="expects two outputs"):
        postprocess([np.zeros((1, 10, 16), np.float32)], meta)


def test_steps_are_picklable(short: FaceDetector, astronaut: Image8) -> None:
    pre = pickle.loads(pickle.dumps(partial(preprocess, model="short")))
    post = pickle.loads(pickle.dumps(partial(postprocess, model="short")))
    tensor, meta = pre(astronaut)
    meta = pickle.loads(pickle.dumps(meta))
    assert isinstance(meta, FrameMeta)
    found = post(short.runner.run([tensor]), meta)
    assert pickle.loads(pickle.dumps(found)) == found == short.detect(astronaut)


def test_bad_inputs_raise_typed_errors() -> None:
    with pytest.raises(InputError, match="uint8"):
        preprocess(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(InputError, match="HxW"):
        preprocess(np.zeros((8, 8, 2), np.uint8))
    with pytest.raises(UnknownFaceModelError, match="'medium'"):
        preprocess(np.zeros((8, 8, 3), np.uint8), model="medium")
    with pytest.raises(UnknownFaceModelError):
        FaceDetector("medium")


# --- anchors ------------------------------------------------------------------------------


def test_anchor_counts_and_first_centres() -> None:
    short = generate_anchors(DETECTORS["short"].anchors)
    full = generate_anchors(DETECTORS["full"].anchors)
    assert short.shape == (896, 4)
    assert full.shape == (2304, 4)
    # Short: 16x16 cells with 2 anchors (stride 8), then 8x8 cells with 6 (3 layers x 2).
    assert short[0].tolist() == short[1].tolist() == [0.03125, 0.03125, 1.0, 1.0]
    assert short[2].tolist() == [0.09375, 0.03125, 1.0, 1.0]
    assert short[512].tolist() == short[517].tolist() == [0.0625, 0.0625, 1.0, 1.0]
    assert short[518].tolist() == [0.1875, 0.0625, 1.0, 1.0]
    assert short[-1].tolist() == [0.9375, 0.9375, 1.0, 1.0]
    # Full: 48x48 cells, one anchor each.
    assert full[0].tolist() == pytest.approx([0.5 / 48, 0.5 / 48, 1.0, 1.0])
    assert full[1].tolist() == pytest.approx([1.5 / 48, 0.5 / 48, 1.0, 1.0])
    assert full[48].tolist() == pytest.approx([0.5 / 48, 1.5 / 48, 1.0, 1.0])


def test_anchor_sizes_when_not_fixed() -> None:
    opts = dataclasses.replace(DETECTORS["short"].anchors, fixed_anchor_size=False)
    anchors = generate_anchors(opts)
    s0, s1, s2, s3 = (0.1484375 + (0.75 - 0.1484375) * i / 3 for i in range(4))
    assert anchors[0, 2:].tolist() == pytest.approx([s0, s0])
    assert anchors[1, 2:].tolist() == pytest.approx([math.sqrt(s0 * s1)] * 2)
    cell = anchors[512:518, 2].tolist()
    expected = [s1, math.sqrt(s1 * s2), s2, math.sqrt(s2 * s3), s3, math.sqrt(s3 * 1.0)]
    assert cell == pytest.approx(expected)


def test_anchor_aspect_ratios_and_odd_sizes() -> None:
    opts = SsdAnchorOptions(
        input_width=100,
        input_height=60,
        num_layers=1,
        min_scale=0.2,
        max_scale=0.8,
        strides=(16,),
        aspect_ratios=(1.0, 4.0),
        fixed_anchor_size=False,
        interpolated_scale_aspect_ratio=0.0,
    )
    anchors = generate_anchors(opts)
    assert anchors.shape == (7 * 4 * 2, 4)  # ceil(100/16) x ceil(60/16) cells, 2 ratios
    scale = 0.5  # one stride: the mean of min and max
    assert anchors[1, 2:].tolist() == pytest.approx([scale * 2, scale / 2])
    assert anchors[-1, :2].tolist() == pytest.approx([6.5 / 7, 3.5 / 4])


# --- weighted NMS --------------------------------------------------------------------------


def dets(boxes: list[list[float]], scores: list[float]) -> Detections:
    b = np.asarray(boxes, np.float32)
    kp = np.stack([b[:, :2], b[:, 2:]], axis=1)  # two keypoints: the corners
    return Detections(b, np.asarray(scores, np.float32), kp)


def test_nms_weighted_average() -> None:
    found = weighted_nms(dets([[0, 0, 10, 10], [1, 1, 11, 11]], [0.6, 0.9]), 0.3)
    assert len(found) == 1
    # Weights 0.6/1.5 = 0.4 and 0.9/1.5 = 0.6: top left 0.4*(0, 0) + 0.6*(1, 1) = (0.6, 0.6).
    expected = [0.4 * 0 + 0.6 * 1, 0.4 * 0 + 0.6 * 1, 0.4 * 10 + 0.6 * 11, 0.4 * 10 + 0.6 * 11]
    assert found.boxes[0].tolist() == pytest.approx(expected)
    assert found.keypoints[0] == pytest.approx(np.array([expected[:2], expected[2:]]))
    assert found.scores.tolist() == pytest.approx([0.9])  # the best score is kept


def test_nms_keeps_separate_groups_in_score_order() -> None:
    found = weighted_nms(
        dets(
            [[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 9], [21, 20, 31, 30]],
            [0.7, 0.8, 0.5, 0.6],
        ),
        0.3,
    )
    assert found.scores.tolist() == pytest.approx([0.8, 0.7])
    assert found.boxes[0].tolist() == pytest.approx([20 + 6 / 14, 20, 30 + 6 / 14, 30])
    assert found.boxes[1].tolist() == pytest.approx([0, 0, 10, 10 - 5 / 12])


def test_nms_threshold_is_strict() -> None:
    # IoU of [0,0,2,1] and [1,0,3,1] is 1/3: merged at 0.3, not at 1/3 or above.
    pair = dets([[0, 0, 2, 1], [1, 0, 3, 1]], [0.9, 0.8])
    assert len(weighted_nms(pair, 0.3)) == 1
    assert len(weighted_nms(pair, 0.34)) == 2


def test_nms_edge_cases() -> None:
    empty = weighted_nms(dets([[0, 0, 1, 1]], [0.5]).take(np.zeros(0, np.intp)), 0.3)
    assert len(empty) == 0
    # An empty box has IoU 0 even with itself; it still forms its own group.
    found = weighted_nms(dets([[5, 5, 5, 5], [0, 0, 1, 1]], [0.9, 0.8]), 0.3)
    assert found.boxes.tolist() == [[5, 5, 5, 5], [0, 0, 1, 1]]


# --- landmarks ----------------------------------------------------------------------------


def test_landmark_cascade(astronaut: Image8) -> None:
    with FaceDetector("short", landmarks=True) as detector:
        face = only_face(detector.detect(astronaut))
        rotated = np.asarray(
            Image.fromarray(astronaut).rotate(25, resample=Image.Resampling.BILINEAR)
        )
        turned = only_face(detector.detect(rotated))
    for f in (face, turned):
        assert f.landmarks is not None
        assert len(f.landmarks) == NUM_LANDMARKS
        assert f.landmark_score is not None
        assert f.landmark_score > 0.9
        pts = np.asarray(f.landmarks)
        inside = (
            (pts[:, 0] >= f.xmin)
            & (pts[:, 0] <= f.xmax)
            & (pts[:, 1] >= f.ymin)
            & (pts[:, 1] <= f.ymax)
        )
        assert inside.mean() >= 0.9
    # Mesh point 1 is the nose tip: near the detector's nose keypoint (2).
    nose = np.asarray(face.landmarks[1][:2]) if face.landmarks else np.zeros(2)
    assert np.abs(nose - np.asarray(face.keypoints[2])).max() < 0.03
    data = face.to_json()
    assert len(data["landmarks"]) == NUM_LANDMARKS
    assert len(data["landmarks"][0]) == 3


def test_add_landmarks_needs_the_model(short: FaceDetector, astronaut: Image8) -> None:
    with pytest.raises(RuntimeError, match="landmarks=True"):
        short.add_landmarks(astronaut, REFERENCE)


# --- results, drawing and reading -----------------------------------------------------------


def test_face_to_json_shape() -> None:
    face = Face(0.1, 0.2, 0.3, 0.4, 0.9, keypoints=((0.15, 0.25),) * 6)
    data = face.to_json()
    assert list(data) == ["xmin", "ymin", "xmax", "ymax", "score", "keypoints"]
    assert data["keypoints"] == [[0.15, 0.25]] * 6
    with_marks = dataclasses.replace(face, landmarks=((0.1, 0.2, 0.0),), landmark_score=0.99)
    assert list(with_marks.to_json()) == [*data, "landmarks"]
    assert "landmarks=" not in repr(with_marks)


def test_annotate_draws_on_a_copy(astronaut: Image8) -> None:
    drawn = annotate(astronaut, [REFERENCE])
    assert drawn.shape == astronaut.shape
    assert not np.array_equal(drawn, astronaut)
    assert np.array_equal(annotate(astronaut, []), astronaut)


def test_sample_images() -> None:
    names = [p.name for p in sample_images()]
    assert names == ["astronaut.png", "camera.png", "chelsea.png", "coffee.png"]
    gray = load_image(sample("camera.png"))
    assert gray.shape == (512, 512, 3)
    assert gray.dtype == np.uint8


def test_iter_frames_of_a_gif(tmp_path: Path, astronaut: Image8) -> None:
    frames = [Image.fromarray(astronaut).rotate(a) for a in (0, 10, 20)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    got = list(iter_frames(path))
    assert [i for i, _ in got] == [0, 1, 2]
    assert all(f.shape == (512, 512, 3) and f.dtype == np.uint8 for _, f in got)


def test_unreadable_files_raise_image_read_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x00garbage" * 50)
    for path in (bad, tmp_path / "missing.jpg"):
        with pytest.raises(ImageReadError, match=str(path)) as info:
            list(iter_frames(path))
        assert isinstance(info.value, ConveyorError)
        with pytest.raises(ImageReadError, match=str(path)):
            load_image(path)
    with pytest.raises(ImageReadError, match="not an image Pillow can decode"):
        load_image(bad)  # it says what it reads: a video's frames are iter_frames' work
    err = pickle.loads(pickle.dumps(ImageReadError("x.png", "broken")))
    assert (err.path, err.reason, str(err)) == ("x.png", "broken", "cannot read x.png: broken")


def test_public_names_match_all() -> None:
    exported = set(faces_pkg.__all__)
    public = {n for n in dir(faces_pkg) if not n.startswith("_")}
    assert exported <= public
    # Every public object of the package is listed (submodules aside).
    modules = {n for n in public if type(getattr(faces_pkg, n)).__name__ == "module"}
    assert public - modules - {"annotations"} == exported


@pytest.mark.parametrize("size", [(1, 1), (1, 300), (300, 1), (451, 300), (129, 127), (128, 128)])
@pytest.mark.parametrize("model", ["short", "full"])
def test_frame_meta_matches_preprocess(size: tuple[int, int], model: str) -> None:
    w, h = size
    tensor, meta = preprocess(np.full((h, w), 200, np.uint8), model=model)
    assert frame_meta(w, h, model) == meta
    # Content where the letterbox says, padding (-1) elsewhere.
    n = tensor.shape[1]
    box = meta.letterbox
    left, top = round(box.left * n), round(box.top * n)
    right, bottom = n - round(box.right * n), n - round(box.bottom * n)
    assert np.all(tensor[0, top:bottom, left:right] > 0.5)
    assert np.count_nonzero(tensor[0, :, :, 0] == -1.0) == n * n - (right - left) * (bottom - top)


def test_quantised_detector_outputs_are_dequantised(astronaut: Image8) -> None:
    from conveyor._models import bundled_models
    from conveyor.backends import open_device

    name = "face_detection_short_range_int8"
    if name not in bundled_models():
        pytest.skip(f"{name} is not bundled")
    runner = open_device("cpu").load(name)
    try:
        tensor, meta = preprocess(astronaut)
        face = only_face(postprocess(run_model(runner, tensor), meta))
    finally:
        runner.close()
    assert face.iou(REFERENCE) >= 0.9
    assert face.score == pytest.approx(0.92, abs=0.05)


def test_a_closed_detector_says_so(astronaut: Image8) -> None:
    from conveyor import DeviceError
    from conveyor import open_device as conveyor_open

    detector = FaceDetector("short", device="cpu")
    assert detector.detect(astronaut)
    detector.close()
    with pytest.raises(DeviceError, match="closed"):
        detector.detect(astronaut)
    runner = conveyor_open("cpu").load("face_detection_short_range")
    runner.close()
    with pytest.raises(DeviceError, match="closed"):
        runner.run([np.zeros(runner.inputs[0].shape, np.float32)])


def test_save_image_refuses_an_unknown_suffix_before_making_folders(tmp_path: Path) -> None:
    from conveyor._errors import InputError
    from conveyor.apps.faces import save_image

    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(InputError, match=r"suffix '\.xyz'"):
        save_image(image, tmp_path / "new" / "x.xyz")
    assert not (tmp_path / "new").exists()
    assert save_image(image, tmp_path / "new" / "x.JPG").exists()


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 5, 3)])
def test_an_empty_image_is_refused_with_the_shape_given(shape: tuple[int, ...]) -> None:
    # A 2-D one was reported with the axis added inside: "got shape [0, 5, 1]".
    from conveyor.apps.faces import preprocess

    with pytest.raises(InputError, match=re.escape(f"non-empty image, got shape {list(shape)}")):
        preprocess(np.zeros(shape, np.uint8))
