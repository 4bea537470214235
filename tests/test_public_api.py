"""The public surface: __all__ and the module agree (anyio's test_all_attributes habit)."""

from __future__ import annotations

import ast
import subprocess
import sys
import types
from pathlib import Path

import conveyor
from conveyor.apps.faces import sample_images


def test_all_lists_exactly_the_public_names() -> None:
    public = {
        name for name, value in vars(conveyor).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public | {"__version__"} == set(conveyor.__all__)
    for name in conveyor.__all__:
        assert hasattr(conveyor, name), name


def test_every_error_is_a_conveyor_error() -> None:
    for name in conveyor.__all__:
        obj = getattr(conveyor, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, conveyor.ConveyorError), name


def _readme_block(heading: str) -> str:
    """The first ```python block after ``heading`` in the README."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    after = text[text.index(heading):]
    start = after.index("```python\n") + len("```python\n")
    return after[start:after.index("```", start)]


def test_readme_pipeline_example_runs_as_written(tmp_path: Path) -> None:
    """The README's first example, copied into a file of its own and run: it finds a face
    in each bundled sample that has one, and ends by printing the device's stats."""
    script = tmp_path / "example.py"
    script.write_text(_readme_block("## A pipeline"))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    faces = [ast.literal_eval(line) for line in lines[:-1]]
    assert len(faces) == len(sample_images()) and any(faces), proc.stdout
    stats = ast.literal_eval(lines[-1])
    assert stats["items"] == len(sample_images()) and 0 < stats["duty_cycle"] <= 1


def test_the_types_public_functions_return_can_be_named() -> None:
    # A typed user helper could not annotate what stage()/infer(), model_info(),
    # InferFuture.timing and parse_device() return without a private import.
    assert isinstance(conveyor.infer("face_detection_short_range"), conveyor.StageDef)
    assert isinstance(conveyor.parse_device("cpu"), conveyor.DeviceSpec)
    assert {"ModelInfo", "Timing"} <= set(conveyor.__all__)


def test_a_runner_is_typed_to_take_what_it_accepts() -> None:
    # Runner.run took "anything conveyor.infer accepts" (an array, a dict by name), but
    # its hint said Sequence[ndarray]: correct calls failed mypy --strict.
    import typing

    from conveyor._tensors import Inputs

    for method in (conveyor.Runner.run, conveyor.Runner.run_into):
        assert typing.get_type_hints(method)["arrays"] == Inputs


def test_a_malformed_tensor_spec_is_a_value_error() -> None:
    import pytest

    good = {"name": "a", "shape": [1, 3], "dtype": "float32"}
    assert conveyor.TensorSpec.from_json(good).shape == (1, 3)
    # a shape of 1.5 was taken as 1, an object dtype (no place in shared memory) and a
    # name of 5 were taken as they came
    for data in ({}, {**good, "shape": 5}, {**good, "dtype": "no-such-dtype"}, [1],
                 {**good, "shape": [1.5]}, {**good, "shape": [True]}, {**good, "shape": [-1]},
                 {**good, "dtype": "object"}, {**good, "name": 5}):
        with pytest.raises(ValueError, match="not a tensor spec"):  # KeyError, TypeError
            conveyor.TensorSpec.from_json(data)  # type: ignore[arg-type]


def test_the_models_notice_gives_each_bundled_files_sha256() -> None:
    # The .onnx files were rewritten and the NOTICE kept the old sums.
    import hashlib
    import re
    from pathlib import Path

    models = Path(conveyor.__file__).parent / "models"
    sums = dict((name, digest) for digest, name in re.findall(
        r"^  ([0-9a-f]{64})  (\S+)$", (models / "NOTICE").read_text(), re.M))
    bundled = {p.name for p in models.iterdir() if p.suffix in (".tflite", ".onnx")}
    assert set(sums) == bundled
    for name, digest in sums.items():
        assert hashlib.sha256((models / name).read_bytes()).hexdigest() == digest, name
