"""List the bundled models, or show one model's input and output tensors.

Without an argument, lists the models bundled with conveyor: name, file size and input shape.
With a bundled model's name or a .tflite file's path, shows each input and output tensor:
name, shape, dtype and quantisation (scale and zero point; scale 0 means not quantised).
The tensors are read by loading the model on the CPU, so a model compiled for the Edge TPU
(NAME_edgetpu.tflite) is refused: give the plain model it was compiled from, which has the
same inputs and outputs.

examples:
  conveyor models
  conveyor models face_detection_short_range
  conveyor models path/to/model.tflite --json
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
from pathlib import Path
from typing import Any

from .._errors import ConveyorError
from .._models import bundled_models, resolve_model
from .._tensors import TensorSpec
from ..backends import Runner, open_device

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``conveyor models``' arguments on ``parser``."""
    parser.add_argument(
        "model", nargs="?", metavar="PATH_OR_NAME", help="a bundled model's name or a model file"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB"):
        if size < 1000 or unit == "MB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def _load(model: str | Path) -> Runner:
    """The model loaded on the CPU (to read its tensors). Raises ModelError."""
    return open_device("cpu").load(model)


def _describe(path: Path, runner: Runner) -> dict[str, Any]:
    return {
        "name": path.stem,
        "path": str(path),
        "size": path.stat().st_size,
        "inputs": [spec.to_json() for spec in runner.inputs],
        "outputs": [spec.to_json() for spec in runner.outputs],
    }


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def _tensor_rows(specs: tuple[TensorSpec, ...]) -> list[list[str]]:
    rows = [["NAME", "SHAPE", "DTYPE", "SCALE", "ZERO POINT"]]
    for s in specs:
        rows.append([s.name, str(list(s.shape)), s.dtype.name, f"{s.scale:g}", str(s.zero_point)])
    return rows


def _list(as_json: bool) -> int:
    entries = []
    for _name, path in bundled_models().items():
        runner = _load(path)
        try:
            entries.append(_describe(path, runner))
        finally:
            runner.close()
    if as_json:
        print(json.dumps(entries, indent=2))
        return 0
    rows = [["NAME", "SIZE", "INPUT"]]
    for e in entries:
        inputs = ", ".join(f"{i['dtype']}{i['shape']}" for i in e["inputs"])
        rows.append([e["name"], _size(e["size"]), inputs])
    print("\n".join(_table(rows)))
    return 0


def _show(model: str, as_json: bool) -> int:
    path = resolve_model(model)
    runner = _load(path)
    try:
        info = _describe(path, runner)
        if as_json:
            print(json.dumps(info, indent=2))
            return 0
        lines = [f"{info['name']}  ({path}, {_size(info['size'])})", "inputs:"]
        lines += ["  " + line for line in _table(_tensor_rows(runner.inputs))]
        lines.append("outputs:")
        lines += ["  " + line for line in _table(_tensor_rows(runner.outputs))]
        print("\n".join(lines))
        return 0
    finally:
        runner.close()


def run(args: argparse.Namespace) -> int:
    """Run ``conveyor models``; 0 on success, 2 if the model is missing or not a model."""
    try:
        if args.model is None:
            return _list(args.json)
        return _show(args.model, args.json)
    except ConveyorError as exc:
        print(f"conveyor: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        raise  # the reader went away: conveyor's main ends quietly
    except OSError as exc:
        if args.model is None or exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise  # writing the output failed: conveyor's main says so
        print(f"conveyor: cannot read {args.model}: {exc}", file=sys.stderr)
        return 2
