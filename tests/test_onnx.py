"""ONNX Runtime backend: the bundled .onnx conversions agree with LiteRT on real images.

Tolerance (measured 2.1e-4 at most, on outputs up to about 260 in magnitude):
``|onnx - litert| <= 5e-4 + 1e-5 * |litert|`` for every output of every bundled float model on
every bundled sample image.
"""

from __future__ import annotations

import platform
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from conftest import wait_for
from PIL import Image

from conveyor._errors import DeviceNotFoundError, InvalidModelError, ModelNotFoundError
from conveyor._models import BUNDLED_DIR
from conveyor.backends import open_device
from conveyor.backends.onnx import OnnxDevice, resolve_onnx_model

SAMPLES = BUNDLED_DIR.parent / "samples"
MODELS = {  # name -> (input size, value range)
    "face_detection_short_range": (128, (-1.0, 1.0)),
    "face_detection_full_range": (192, (-1.0, 1.0)),
    "face_landmark": (192, (0.0, 1.0)),
}
ATOL, RTOL = 5e-4, 1e-5
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def image_tensor(name: str, size: int, lo: float, hi: float) -> np.ndarray:
    image = Image.open(SAMPLES / f"{name}.png").convert("RGB").resize((size, size))
    return (lo + np.asarray(image, np.float32) / 255.0 * (hi - lo))[np.newaxis]


def sample_names() -> list[str]:
    return sorted(p.stem for p in SAMPLES.glob("*.png"))


@pytest.fixture(scope="module")
def onnx_cpu() -> Any:
    device = open_device("onnx:cpu")
    yield device
    device.close()


@pytest.mark.parametrize("model", sorted(MODELS))
def test_onnx_cpu_agrees_with_litert_on_real_images(model: str, onnx_cpu: Any) -> None:
    onnx_runner = onnx_cpu.load(model)
    litert_runner = open_device("cpu").load(model)
    assert [(s.name, s.shape, s.dtype) for s in onnx_runner.inputs] == [
        (s.name, s.shape, s.dtype) for s in litert_runner.inputs
    ]
    assert [(s.name, s.shape, s.dtype) for s in onnx_runner.outputs] == [
        (s.name, s.shape, s.dtype) for s in litert_runner.outputs
    ]
    size, (lo, hi) = MODELS[model]
    for name in sample_names():
        x = image_tensor(name, size, lo, hi)
        got, want = onnx_runner.run([x]), litert_runner.run([x])
        for g, w, spec in zip(got, want, onnx_runner.outputs):
            assert g.dtype == spec.dtype and g.shape == spec.shape
            np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL, err_msg=f"{model} {name}")


def test_face_detector_on_onnx_finds_the_same_face(onnx_cpu: Any) -> None:
    from conveyor.apps.faces import FaceDetector, load_image

    image = load_image(SAMPLES / "astronaut.png")
    with FaceDetector("short", device="cpu") as cpu:
        want = cpu.detect(image)
    with FaceDetector("short", device=onnx_cpu) as onnx:
        got = onnx.detect(image)
    assert len(got) == len(want) == 1
    assert got[0].iou(want[0]) > 0.999
    assert got[0].score == pytest.approx(want[0].score, abs=1e-4)


def test_model_resolution(tmp_path: Path) -> None:
    bundled = BUNDLED_DIR / "face_landmark.onnx"
    assert resolve_onnx_model("face_landmark") == bundled
    assert resolve_onnx_model("face_landmark.tflite") == bundled
    assert resolve_onnx_model(BUNDLED_DIR / "face_landmark.tflite") == bundled
    assert resolve_onnx_model(bundled) == bundled
    mine = tmp_path / "mine.tflite"
    shutil.copy(BUNDLED_DIR / "face_landmark.tflite", mine)
    with pytest.raises(ModelNotFoundError, match="face_landmark"):
        resolve_onnx_model(mine)  # no mine.onnx beside it, none bundled: lists the bundled
    shutil.copy(bundled, tmp_path / "mine.onnx")
    assert resolve_onnx_model(mine) == tmp_path / "mine.onnx"
    # A path of the user's is never swapped for the bundled model of the same name.
    other = tmp_path / "other" / "face_landmark.tflite"
    other.parent.mkdir()
    shutil.copy(BUNDLED_DIR / "face_detection_short_range.tflite", other)
    for given in (other, other.with_suffix(".onnx")):
        with pytest.raises(ModelNotFoundError):
            resolve_onnx_model(given)


def test_auto_runs_an_onnx_file_on_onnx_runtime_and_cpu_says_where(
    tmp_path: Path, no_leaks: None
) -> None:
    import conveyor
    from conveyor._errors import InvalidModelError

    model = tmp_path / "mine.onnx"
    shutil.copy(BUNDLED_DIR / "face_detection_short_range.onnx", model)
    auto = open_device("auto")
    try:
        runner = auto.load(model)
        choice = auto.describe()["choices"]["mine"]
        assert choice["device"] == "onnx:cpu" and "ONNX" in choice["why"]
        size, (lo, hi) = MODELS["face_detection_short_range"]
        x = image_tensor("astronaut", size, lo, hi)
        want = open_device("cpu").load("face_detection_short_range").run([x])
        for got, w in zip(runner.run([x]), want):
            np.testing.assert_allclose(got, w, rtol=RTOL, atol=ATOL)
    finally:
        auto.close()
    with pytest.raises(InvalidModelError, match="device 'onnx'"):
        open_device("cpu").load(model)
    # The pipeline's default stage device does the same through its worker.
    with conveyor.Pipeline(conveyor.infer(model, device="auto")) as pipe:
        (outs,) = list(pipe.map([x]))
        assert pipe.stats()["device"]["runs_on"] == "onnx:cpu"
    np.testing.assert_allclose(outs[0], want[0], rtol=RTOL, atol=ATOL)


def test_describe(onnx_cpu: Any) -> None:
    facts = onnx_cpu.describe()
    assert facts["backend"] == "onnxruntime" and facts["provider"] == "CPUExecutionProvider"
    assert facts["version"] == ort.__version__ and facts["simulated"] is False


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has CUDAExecutionProvider")
def test_onnx_cuda_missing_lists_the_providers() -> None:
    with pytest.raises(DeviceNotFoundError) as info:
        open_device("onnx:cuda")
    message = str(info.value)
    assert "CUDAExecutionProvider" in message
    for provider in ort.get_available_providers():
        assert provider in message


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="onnxruntime has no CUDAExecutionProvider here")
def test_onnx_cuda_agrees_with_onnx_cpu(onnx_cpu: Any) -> None:
    cuda: OnnxDevice = open_device("onnx:cuda:0")  # type: ignore[assignment]
    assert cuda.describe()["device_id"] == 0 and cuda.describe()["use_tf32"] == 0
    for model, (size, (lo, hi)) in MODELS.items():
        gpu_runner, cpu_runner = cuda.load(model), onnx_cpu.load(model)
        for name in sample_names():
            x = image_tensor(name, size, lo, hi)
            for g, c in zip(gpu_runner.run([x]), cpu_runner.run([x])):
                # TF32 off (conveyor's default on CUDA): the tolerance of CPU against LiteRT
                np.testing.assert_allclose(g, c, rtol=RTOL, atol=ATOL, err_msg=f"{model} {name}")


@pytest.mark.parametrize("content", [b"hello, not a model\n", b"truncated", b"", b"\x08\x07"])
def test_corrupt_onnx_file_is_an_invalid_model(tmp_path: Path, content: bytes) -> None:
    from conveyor import InvalidModelError

    data = content
    if content == b"truncated":
        data = (BUNDLED_DIR / "face_landmark.onnx").read_bytes()[:5000]
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(data)
    with pytest.raises(InvalidModelError, match=str(bad)):
        open_device("onnx:cpu").load(bad)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="onnxruntime has no CUDAExecutionProvider here")
def test_pipeline_on_onnx_cuda_finds_the_faces_litert_finds(no_leaks: None) -> None:
    import conveyor
    from conveyor.apps.faces import load_image, postprocess, preprocess, sample_images

    images = [load_image(p) for p in sample_images()]

    def detect(device: str) -> tuple[list[Any], dict[str, Any]]:
        with conveyor.Pipeline(
            conveyor.stage(preprocess, workers=2, kind="process"),
            conveyor.infer("face_detection_short_range", device=device, with_context=True),
            conveyor.stage(lambda pair: postprocess(*pair)),
        ) as pipe:
            return list(pipe.map(images)), pipe.stats()["device"]

    on_gpu, stats = detect("onnx:cuda")
    on_cpu, _ = detect("cpu")
    assert stats["items"] == len(images)
    assert sum(map(len, on_cpu)) > 0
    for gpu_faces, cpu_faces in zip(on_gpu, on_cpu, strict=True):
        assert len(gpu_faces) == len(cpu_faces)
        for g, c in zip(gpu_faces, cpu_faces):
            for field in ("xmin", "ymin", "xmax", "ymax", "score"):
                assert getattr(g, field) == pytest.approx(getattr(c, field), abs=1e-3)


# --- models built here: y = x, with a chosen element type and shape ----------------------


def _field(number: int, value: int | bytes | str) -> bytes:
    """One protobuf field: a varint for an int, else length-delimited bytes."""

    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)

    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    data = value.encode() if isinstance(value, str) else value
    return varint(number << 3 | 2) + varint(len(data)) + data


def _identity_model(elem_type: int, shape: list[int | str],
                    declared: list[int | str] | None = None, x: str = "x",
                    y: str = "y") -> bytes:
    """An ONNX ModelProto (opset 17) of one Identity node, y = x; ``elem_type`` is ONNX's
    TensorProto.DataType (1 float, 8 string), a str in ``shape`` a symbolic dimension;
    ``declared``: the shape the model claims for y (else ``shape``)."""

    def value_info(name: str, dims_of: list[int | str]) -> bytes:
        dims = b"".join(_field(1, _field(1 if isinstance(d, int) else 2, d))
                        for d in dims_of)
        tensor_type = _field(1, elem_type) + _field(2, dims)
        return _field(1, name) + _field(2, _field(1, tensor_type))

    node = _field(1, x) + _field(2, y) + _field(4, "Identity")
    graph = (_field(1, node) + _field(2, "identity") + _field(11, value_info(x, shape))
             + _field(12, value_info(y, shape if declared is None else declared)))
    return _field(1, 8) + _field(8, _field(2, 17)) + _field(7, graph)


def test_a_symbolic_batch_dimension_is_taken_as_one(tmp_path: Path) -> None:
    path = tmp_path / "batch.onnx"
    path.write_bytes(_identity_model(1, ["N", 3]))
    runner = OnnxDevice().load(path)
    assert runner.inputs[0].shape == (1, 3)
    np.testing.assert_array_equal(runner.run([np.arange(3, dtype=np.float32)])[0], [[0, 1, 2]])


@pytest.mark.parametrize(("elem_type", "dtype"), [(4, np.uint16), (12, np.uint32),
                                                   (13, np.uint64), (1, np.float32)])
@pytest.mark.parametrize("shape", [[], [1, 4]])
def test_unsigned_and_rank_0_tensors_pass_as_they_are(
        tmp_path: Path, elem_type: int, dtype: Any, shape: list[int | str]) -> None:
    # uint16/32/64 were refused as "numeric and bool tensors only"; a rank-0 input came
    # out of Runner.run with shape (1,), and run_into() then refused it.
    import conveyor

    path = tmp_path / "m.onnx"
    path.write_bytes(_identity_model(elem_type, shape))
    x = np.full(shape, np.iinfo(dtype).max if dtype != np.float32 else 2.5, dtype)
    runner = OnnxDevice().load(path)
    for form in (x, [x], {"x": x}):
        (y,) = runner.run(form)
        assert y.dtype == dtype and y.shape == tuple(shape) and (y == x).all()
    out = [np.empty(tuple(shape), dtype)]
    runner.run_into(x, out)
    assert (out[0] == x).all()
    with conveyor.Pipeline(conveyor.infer(str(path), device="onnx")) as pipe:
        ((y,),) = pipe.map([x])
    assert y.dtype == dtype and y.shape == tuple(shape) and (y == x).all()


@pytest.mark.parametrize(("elem_type", "shape", "why"), [
    (1, [1, 3, "H", "W"], r"tensor 'x' has shape \[1, 3, 'H', 'W'\]: conveyor runs models "
                          r"whose tensors have fixed shapes"),
    (8, [1, 4], r"tensor 'x' has type tensor\(string\), which conveyor does not pass"),
])
def test_a_model_conveyor_cannot_feed_is_refused_at_load(
        tmp_path: Path, elem_type: int, shape: list[int | str], why: str) -> None:
    # Symbolic height and width were taken as 1: every real input was then refused as
    # "expected shape [1, 3, 1, 1]", though the model takes it.
    path = tmp_path / "m.onnx"
    path.write_bytes(_identity_model(elem_type, shape))
    ort.InferenceSession(str(path))  # a model ONNX Runtime itself loads
    with pytest.raises(InvalidModelError, match=rf"^{path}: {why}"):
        OnnxDevice().load(path)


def test_an_output_of_another_shape_than_declared_fails_its_run(tmp_path: Path) -> None:
    # A run's output of another shape than declared was broadcast into it where it
    # could be (a NonZero's one row into three: other values than the runner's own run,
    # and no error), else failed as "could not broadcast input array".
    import conveyor

    def value_info(name: str, elem_type: int, shape: list[int]) -> bytes:
        dims = b"".join(_field(1, _field(1, d)) for d in shape)
        return _field(1, name) + _field(2, _field(1, _field(1, elem_type) + _field(2, dims)))

    # y = transpose(nonzero(x)): one row per non-zero value of x, declared as three
    perm = _field(1, "perm") + _field(8, 1) + _field(8, 0) + _field(20, 7)
    graph = (_field(1, _field(1, "x") + _field(2, "nz") + _field(4, "NonZero"))
             + _field(1, _field(1, "nz") + _field(2, "y") + _field(4, "Transpose")
                      + _field(5, perm))
             + _field(2, "nonzero") + _field(11, value_info("x", 1, [5]))
             + _field(12, value_info("y", 7, [3, 1])))
    path = tmp_path / "lying.onnx"
    path.write_bytes(_field(1, 8) + _field(8, _field(2, 17)) + _field(7, graph))
    x = np.array([0, 0, 7, 0, 0], np.float32)
    assert OnnxDevice().load(path).run([x])[0].tolist() == [[2]]  # one row, not three
    with conveyor.Pipeline(conveyor.infer(str(path), device="onnx"),
                           on_error="return") as pipe:
        (err,) = pipe.map([x])
    assert isinstance(err, conveyor.StageError)
    assert "output 'y' came out with shape [1, 1], but the model declares [3, 1]" in str(err)


def test_a_tensor_of_more_dimensions_than_the_wire_carries_is_refused_at_start(
        tmp_path: Path) -> None:
    # It loaded, then every client's handshake failed ("bad handshake"), for the server's
    # other models too.
    import conveyor

    path = tmp_path / "deep.onnx"
    path.write_bytes(_identity_model(1, [1] * 9))
    with pytest.raises(InvalidModelError, match="'x' has 9 dimensions, more than the 8"), \
            conveyor.Pipeline(conveyor.infer(str(path), device="onnx")):
        pytest.fail("the pipeline started")


def test_models_too_large_to_describe_to_a_client_are_refused_at_start(
        tmp_path: Path) -> None:
    # Tensor names of 600,000 characters: the server started, then every client's
    # handshake failed (a WELCOME over the 1 MiB a message may hold), for its other
    # models too, and `conveyor status` as well.
    from conveyor._device._server import DeviceServer

    path = tmp_path / "long.onnx"
    path.write_bytes(_identity_model(1, [1, 3], x="x" * 300_000, y="y" * 300_000))
    assert OnnxDevice().load(path).inputs[0].name == "x" * 300_000  # it loads
    with pytest.raises(InvalidModelError, match=r"the models' descriptions take \d+ bytes, "
                       r"more than the 524288 .*\('long': \d+ bytes; are its tensor names"):
        DeviceServer([OnnxDevice()], [str(path)])


def _int_division_model() -> bytes:
    """y = a / b on int32 [1, 3]: INT32_MIN / -1 kills the process with SIGFPE on x86."""

    def value_info(name: str) -> bytes:
        dims = _field(1, _field(1, 1)) + _field(1, _field(1, 3))
        return _field(1, name) + _field(2, _field(1, _field(1, 6) + _field(2, dims)))

    node = _field(1, "a") + _field(1, "b") + _field(2, "y") + _field(4, "Div")
    graph = (_field(1, node) + _field(2, "div") + _field(11, value_info("a"))
             + _field(11, value_info("b")) + _field(12, value_info("y")))
    return _field(1, 8) + _field(8, _field(2, 17)) + _field(7, graph)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                    reason="integer division overflow traps on x86 only")
def test_an_item_that_crashes_the_device_worker_fails_alone(tmp_path: Path,
                                                            no_leaks: None) -> None:
    # The items in flight beside it were retried with it, and its retry killed the
    # new worker under them: all failed, with "the connection to the device server broke".
    import conveyor

    path = tmp_path / "div.onnx"
    path.write_bytes(_int_division_model())
    good = {"a": np.array([[6, 9, 12]], np.int32), "b": np.array([[3, 3, 3]], np.int32)}
    poison = {"a": np.full((1, 3), -2**31, np.int32), "b": np.full((1, 3), -1, np.int32)}
    items = [good, good, poison, good, good, good, poison, good]
    with conveyor.Pipeline(conveyor.stage(lambda x: x, workers=2),
                           conveyor.infer(str(path), device="onnx"),
                           on_error="return") as pipe:
        out = list(pipe.map(items))
        stats = pipe.stats()
    for item, got in zip(items, out):
        if item is poison:
            assert isinstance(got, conveyor.StageError), got
            assert isinstance(got.__cause__, conveyor.WorkerDiedError), repr(got.__cause__)
            assert "died while it ran this item, twice" in str(got)
            assert "SIGFPE" in str(got)
        else:
            assert not isinstance(got, conveyor.StageError), got
            assert got[0].tolist() == [[2, 3, 4]]
    assert stats["device"]["restarts"] == 4  # each poison item killed two workers


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                    reason="integer division overflow traps on x86 only")
def test_closing_while_crashed_items_wait_to_run_again_ends_everything(
        tmp_path: Path, no_leaks: None) -> None:
    # The close of the worker's clients failed the retry in flight; its callback sent the
    # next retry, which waited for the worker's lock that the close held: a thread stuck
    # for good, an unreaped worker, and stage counts that did not add up.
    import threading
    import time

    import conveyor

    path = tmp_path / "div.onnx"
    path.write_bytes(_int_division_model())
    good = {"a": np.array([[6, 9, 12]], np.int32), "b": np.array([[3, 3, 3]], np.int32)}
    poison = {"a": np.full((1, 3), -2**31, np.int32), "b": np.full((1, 3), -1, np.int32)}
    threads = set(threading.enumerate())
    with conveyor.Pipeline(conveyor.infer(str(path), device="onnx"),
                           on_error="return") as pipe:
        for n, _ in enumerate(pipe.map([good, poison, poison, poison, good, good] * 3)):
            if n == 1:
                break
        closing = time.monotonic()
    assert time.monotonic() - closing < 3
    (st,) = pipe.stats()["stages"].values()
    assert st["in"] == st["out"] + st["errors"] + st["cancelled"], st
    assert wait_for(lambda: set(threading.enumerate()) <= threads, timeout=3)


def test_an_upper_case_suffix_is_an_onnx_file(tmp_path: Path) -> None:
    path = tmp_path / "m.ONNX"  # auto took it as ONNX, and onnx then found no model
    path.write_bytes(_identity_model(1, [1, 3]))
    assert resolve_onnx_model(path) == path
    assert open_device("auto").load(path).inputs[0].shape == (1, 3)
