"""The LiteRT backend: tensors, quantisation at the boundary, and each typed error."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import conveyor
from conveyor._models import resolve_model
from conveyor._tensors import TensorSpec, dequantize, prepare_inputs, quantize
from conveyor.backends import open_device


@pytest.fixture(scope="module")
def runner() -> conveyor.Runner:
    return conveyor.open_device("cpu:1").load("face_detection_short_range")


def test_tensors_are_described(runner: conveyor.Runner) -> None:
    (inp,) = runner.inputs
    assert (inp.name, inp.shape, inp.dtype) == ("input", (1, 128, 128, 3), np.dtype("float32"))
    assert [o.shape for o in runner.outputs] == [(1, 896, 16), (1, 896, 1)]
    assert not inp.quantized and inp.scale == 0.0


def test_inputs_as_array_list_dict_and_without_batch(runner: conveyor.Runner) -> None:
    x = np.random.default_rng(0).uniform(-1, 1, (1, 128, 128, 3)).astype(np.float32)
    ref = runner.run(prepare_inputs(runner.inputs, x))
    for form in ([x], {"input": x}, x[0]):
        out = runner.run(prepare_inputs(runner.inputs, form))
        np.testing.assert_array_equal(out[0], ref[0])


def test_missing_file() -> None:
    with pytest.raises(conveyor.ModelNotFoundError, match=r"no model file at '/nope/m\.tflite'"):
        conveyor.open_device("cpu").load("/nope/m.tflite")


def test_not_a_tflite_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not a model")
    with pytest.raises(conveyor.InvalidModelError, match=r"expected the identifier b'TFL3'"):
        conveyor.open_device("cpu").load(bad)


def test_truncated_model_is_invalid(tmp_path: Path) -> None:
    data = conveyor.resolve_model("face_detection_short_range").read_bytes()
    bad = tmp_path / "cut.tflite"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(conveyor.InvalidModelError, match="could not load"):
        conveyor.open_device("cpu").load(bad)


def _passthrough_model(name: bytes, tensor_type: str) -> bytes:
    """A TFLite flatbuffer with no ops whose one tensor, ``name``, is input and output."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    tensor = schema.TensorT()
    tensor.name, tensor.shape, tensor.buffer = name, [1, 4], 0
    tensor.type = getattr(schema.TensorType, tensor_type)
    graph = schema.SubGraphT()
    graph.tensors, graph.inputs, graph.outputs, graph.operators = [tensor], [0], [0], []
    model = schema.ModelT()
    model.version, model.subgraphs, model.buffers = 3, [graph], [schema.BufferT()]
    builder = flatbuffers.Builder(256)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


@pytest.mark.parametrize("device", ["cpu", "sim-edgetpu"])
@pytest.mark.parametrize(("name", "tensor_type", "why"), [
    # a flipped bit in a tensor name: an untyped UnicodeDecodeError reached the caller
    (b"\xe9nput", "FLOAT32", r"LiteRT could not (load|read) .*m\.tflite: 'utf-8' codec"),
    # a string tensor loaded, then every item failed "expected dtype bytes, got bytes8"
    (b"x", "STRING", r"m\.tflite: tensor 'x' holds strings or objects \(dtype \|S0\), "
                     r"which conveyor does not pass"),
])
def test_a_model_conveyor_cannot_read_or_feed_is_invalid(
        tmp_path: Path, device: str, name: bytes, tensor_type: str, why: str) -> None:
    path = tmp_path / "m.tflite"
    path.write_bytes(_passthrough_model(name, tensor_type))
    with pytest.raises(conveyor.InvalidModelError, match=why):
        conveyor.open_device(device).load(path)
    path.write_bytes(_passthrough_model(b"x", "FLOAT32"))  # the same model, well formed
    assert conveyor.open_device("cpu").load(path).inputs[0].name == "x"


def test_edgetpu_model_on_cpu_is_refused(tmp_path: Path) -> None:
    data = conveyor.resolve_model("face_detection_short_range").read_bytes()
    # A compiled model carries the custom op's name in its operator codes.
    compiled = tmp_path / "m_edgetpu.tflite"
    compiled.write_bytes(data + b"\x00edgetpu-custom-op\x00")
    with pytest.raises(conveyor.EdgeTPUModelError, match="compiled for the Edge TPU"):
        conveyor.open_device("cpu").load(compiled)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([], "expects 1 input(s) (input float32[1, 128, 128, 3]); got 0"),
        ([np.zeros((1, 128, 128, 3), np.float32)] * 2, "got 2"),
        (
            np.zeros((1, 96, 96, 3), np.float32),
            "expected shape [1, 128, 128, 3], got [1, 96, 96, 3]",
        ),
        (np.zeros((1, 128, 128, 3), np.uint8), "expected dtype float32, got uint8"),
        ({"image": np.zeros((1, 128, 128, 3), np.float32)}, "expects inputs named ['input']"),
        (None, "expected an array of shape [1, 128, 128, 3], got None"),  # was "got []"
        ({"input": None}, "expected an array of shape [1, 128, 128, 3], got None"),
    ],
)
def test_wrong_inputs_say_what_was_expected(runner: conveyor.Runner, value, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(conveyor.InputError) as info:
        prepare_inputs(runner.inputs, value, runner.model)
    assert message in str(info.value)


def test_quantise_and_dequantise_at_the_boundary() -> None:
    spec = TensorSpec("x", (4,), np.dtype("int8"), scale=0.5, zero_point=-3)
    q = prepare_inputs([spec], np.array([0.0, 1.0, -70.0, 70.0], np.float32))[0]
    assert q.dtype == np.int8
    assert q.tolist() == [-3, -1, -128, 127]  # rounded and saturated
    np.testing.assert_allclose(dequantize(quantize(np.array([1.5, -2.0]), spec), spec), [1.5, -2.0])
    with pytest.raises(conveyor.InputError, match="int8 \\(or float"):
        prepare_inputs([spec], np.zeros(4, np.int32))
    for bad in (np.nan, np.inf):  # quantised to whatever the cast gave, with a warning
        with pytest.raises(conveyor.InputError, match=r"input 'x' of model 'model': float "
                           r"data for a quantised \(int8\) input must be finite"):
            prepare_inputs([spec], np.array([0.0, bad, 1.0, 2.0], np.float32))


def test_thread_count_is_used() -> None:
    dev = conveyor.open_device("cpu:2")
    assert dev.spec.threads == 2
    assert dev.load("face_landmark").outputs[0].shape == (1, 1, 1, 1404)


def test_run_into_writes_what_run_returns(runner: conveyor.Runner) -> None:
    rng = np.random.default_rng(3)
    for _ in range(2):  # twice: no view of the interpreter's buffers outlives a run
        x = prepare_inputs(runner.inputs, rng.uniform(-1, 1, (1, 128, 128, 3)).astype(np.float32))
        dst = [np.full(o.shape, np.nan, o.dtype) for o in runner.outputs]
        runner.run_into(x, dst)
        for got, want in zip(dst, runner.run(x)):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("spec", ["cpu", "sim-edgetpu", "onnx:cpu"])
def test_runner_checks_its_inputs(spec: str) -> None:
    """Runner.run and run_into, the public per-device API: input that does not fit is an
    InputError saying what the model expects, and the runner goes on working; input
    conveyor.infer would accept (one array, a dict, a non-contiguous array) is converted."""
    dev = conveyor.open_device(spec)
    try:
        runner = dev.load("face_detection_short_range")
        good = np.zeros(runner.inputs[0].shape, np.float32)
        want = runner.run([good])
        bad: list[Any] = [
            [], [good, good], [good.astype(np.float64)], [good[..., :2]], {"nope": good},
            None, "input", [[1.0, 2.0]],
            {"input": good, 0: good}, {None: good},  # keys that do not sort with names
            [[[1.0, 2.0], [3.0]]],  # ragged: numpy cannot make an array of it
        ]
        outs = [np.empty(s.shape, s.dtype) for s in runner.outputs]
        for value in bad:
            with pytest.raises(conveyor.InputError, match="expect"):
                runner.run(value)
            with pytest.raises(conveyor.InputError, match="expect"):
                runner.run_into(value, outs)
        wide = np.zeros((1, 128, 256, 3), np.float32)[:, :, ::2]  # not contiguous
        for value in (good, {runner.inputs[0].name: good}, [wide], good[0]):
            for got, ref in zip(runner.run(value), want):
                np.testing.assert_array_equal(got, ref)
    finally:
        dev.close()


def test_a_failing_run_reports_liteRTs_message_once(runner: conveyor.Runner) -> None:
    """LiteRT's error reporter repeats every earlier message in the next exception; the
    DeviceError of each failure carries that failure's text once, and at most a bounded
    amount of it (a server logs every one)."""
    failed = runner._failed  # type: ignore[attr-defined]
    one = "Input tensor 71 lacks data"
    texts = [str(failed(RuntimeError(one * n))) for n in range(1, 5)]
    assert all(t.endswith(f": {one}") and t.count(one) == 1 for t in texts), texts
    other = str(failed(RuntimeError("something else")))
    assert other.endswith(": something else")
    long = str(failed(RuntimeError("x" * 50_000)))
    assert len(long) < 1200 and "more)" in long


@pytest.mark.parametrize("device", ["cpu", "auto", "sim-edgetpu"])
def test_an_unreadable_model_file_is_invalid_on_every_device(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    # auto read the file to look for the Edge TPU's custom op and let PermissionError out
    path = tmp_path / "m.tflite"
    path.write_bytes(_passthrough_model(b"x", "FLOAT32"))
    real = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(conveyor.InvalidModelError,
                       match=rf"cannot read model {path}: \[Errno 13\] Permission denied"):
        conveyor.open_device(device).load(path)


def test_an_edgetpu_named_file_is_served_by_its_plain_name_on_the_cpu_too(
        tmp_path: Path) -> None:
    # The CPU named it x_edgetpu and the Edge TPU x: which one a server with both
    # devices served depended on the order of its --device options.
    path = tmp_path / "x_edgetpu.tflite"
    shutil.copy(resolve_model("face_detection_short_range"), path)
    assert open_device("cpu").load(path).model == "x"


def test_litert_s_xnnpack_notice_is_held_back_and_other_stderr_kept() -> None:
    # LiteRT's C++ core prints "INFO: Created ... XNNPACK delegate for CPU." once per
    # process, into whatever the program prints (the demo, a progress bar).
    code = (
        "import os, sys\n"
        "from conveyor.backends import litert\n"
        "with litert.without_xnnpack_notice():\n"
        "    os.write(2, b'before\\n')\n"
        "    conveyor_runner = litert.LiteRTRunner('face_detection_short_range', threads=1)\n"
        "    print('python text', file=sys.stderr)\n"
        "litert.LiteRTRunner('face_landmark', threads=1)\n"
        "print('done', file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60,
                          check=True)
    assert proc.stderr.decode() == "before\npython text\ndone\n"


def test_a_dict_of_many_wrong_names_gives_a_short_message(runner: conveyor.Runner) -> None:
    # Every name was listed, twice: 100,000 of them made a message of 2.4 MB.
    wrong = {f"key{i}": np.zeros(1, np.float32) for i in range(100_000)}
    with pytest.raises(conveyor.InputError) as info:
        runner.run(prepare_inputs(runner.inputs, wrong))
    text = str(info.value)
    assert len(text) < 300, text
    assert text.startswith("model 'model' expects inputs named "
                           "['input']; got 100000 inputs (missing ['input'], unknown "
                           "['key0', 'key1', ")


@pytest.mark.parametrize("case", ["failing load", "no sys.stderr", "no temporary folder"])
def test_holding_back_the_notice_keeps_a_load_working_and_its_stderr(
        case: str, tmp_path: Path) -> None:
    # What was written to stderr while a load failed was lost; with sys.stderr None (as
    # under pythonw) every load raised AttributeError.
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(resolve_model("face_detection_short_range").read_bytes()[:200])
    model = str(bad) if case == "failing load" else "face_landmark"
    code = (
        "import os, sys, tempfile\n"
        "from conveyor.backends import litert\n"
        f"case = {case!r}\n"
        "if case == 'no sys.stderr':\n"
        "    sys.stderr = None\n"
        "if case == 'no temporary folder':\n"
        "    tempfile.tempdir = '/nonexistent/folder'\n"
        "try:\n"
        "    with litert.without_xnnpack_notice():\n"
        "        os.write(2, b'kept\\n')\n"
        f"        litert.LiteRTRunner({model!r})\n"
        "except Exception as exc:\n"
        "    os.write(2, type(exc).__name__.encode() + b'\\n')\n"
        "litert.LiteRTRunner('face_detection_short_range', threads=1)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    lines = [line for line in err.splitlines() if "XNNPACK" not in line]
    assert lines == (["kept", "InvalidModelError"] if case == "failing load" else ["kept"])
    if case == "no temporary folder":  # nowhere to hold it: the notice goes through
        assert "XNNPACK" in err
    else:
        assert "XNNPACK" not in err
