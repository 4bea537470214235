"""What a TFLite model costs an accelerator: parameter bytes, multiply-accumulates, I/O bytes.

Read straight from the flatbuffer (the schema module that ships with ``ai-edge-litert``), so
nothing is run and no interpreter is built. The simulated Edge TPU turns these numbers into
a latency (see :mod:`conveyor.backends.sim`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from .._errors import InvalidModelError
from .litert import check_tflite_file, is_edgetpu_model

__all__ = ["ModelCost", "model_cost"]

# MACs per parameter of MobileNet v2 (300 M multiply-adds, 3.47 M parameters: Sandler et al.,
# "MobileNetV2", 2018, table 4). Used only for Edge TPU-compiled models, whose graph is hidden
# inside the custom op so that their MACs cannot be counted.
_MACS_PER_PARAM_COMPILED = 300e6 / 3.47e6


@dataclass(frozen=True)
class ModelCost:
    """The work one invoke of a model asks of an 8-bit accelerator.

    Attributes:
        name: the model's file stem.
        param_bytes: bytes of constant tensors (weights, biases) as an 8-bit build stores
            them: one byte per element, four for 32/64-bit integer constants (biases, shapes).
        macs: multiply-accumulates per invoke: convolutions, depthwise convolutions,
            fully-connected and batch matmul exactly; every other op counts one per output
            element.
        input_bytes: bytes of all inputs at one byte per element (an Edge TPU build has
            8-bit I/O, whatever the float model's dtypes are).
        output_bytes: the same for the outputs.
        compiled: True for an Edge TPU-compiled model (MACs estimated from its size).
    """

    name: str
    param_bytes: int
    macs: int
    input_bytes: int
    output_bytes: int
    compiled: bool = False


def _shape(tensor: Any) -> tuple[int, ...]:
    return tuple(max(int(tensor.Shape(j)), 1) for j in range(tensor.ShapeLength()))


def _elements(shape: tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 1


def _opcodes(model: Any) -> list[int]:
    # Old converters wrote only deprecated_builtin_code (values < 127); newer ones both.
    return [
        max(
            int(model.OperatorCodes(i).BuiltinCode()),
            int(model.OperatorCodes(i).DeprecatedBuiltinCode()),
        )
        for i in range(model.OperatorCodesLength())
    ]


def _operators(subgraph: Any) -> Iterator[Any]:
    for i in range(subgraph.OperatorsLength()):
        yield subgraph.Operators(i)


def _op_macs(op: Any, code: int, subgraph: Any, ops: Any) -> int:
    """Multiply-accumulates of one operator (see :class:`ModelCost`)."""
    ins = [int(op.Inputs(j)) for j in range(op.InputsLength())]
    outs = [int(op.Outputs(j)) for j in range(op.OutputsLength())]
    out_elems = sum(_elements(_shape(subgraph.Tensors(t))) for t in outs if t >= 0)
    weight = _shape(subgraph.Tensors(ins[1])) if len(ins) > 1 and ins[1] >= 0 else ()
    if code in (ops.CONV_2D, ops.CONV_3D) and len(weight) >= 4:
        # filter [out_c, kh, kw, in_c]: each output element sums kh * kw * in_c products
        return out_elems * _elements(weight[1:])
    if code == ops.DEPTHWISE_CONV_2D and len(weight) == 4:
        # filter [1, kh, kw, out_c]: each output element sums kh * kw products
        return out_elems * weight[1] * weight[2]
    if code == ops.TRANSPOSE_CONV and len(ins) > 2:
        # inputs: output shape, filter [out_c, kh, kw, in_c], input
        filt = _shape(subgraph.Tensors(ins[1]))
        return _elements(_shape(subgraph.Tensors(ins[2]))) * _elements(filt[:3])
    if code in (ops.FULLY_CONNECTED, ops.BATCH_MATMUL) and len(weight) >= 2:
        depth = weight[-1] if code == ops.FULLY_CONNECTED else weight[-2]
        return out_elems * depth
    return out_elems


def _param_bytes(model: Any, subgraph: Any, schema: Any) -> int:
    wide = {schema.TensorType.INT32, schema.TensorType.INT64, schema.TensorType.UINT32}
    total = 0
    for i in range(subgraph.TensorsLength()):
        tensor = subgraph.Tensors(i)
        index = int(tensor.Buffer())
        if index <= 0 or index >= model.BuffersLength():
            continue
        buf = model.Buffers(index)
        if buf.DataLength() == 0 and int(buf.Size()) == 0:
            continue
        per = 4 if tensor.Type() in wide else 1
        total += _elements(_shape(tensor)) * per
    return total


@lru_cache(maxsize=64)
def _cost_cached(path: str, mtime_ns: int, size: int) -> ModelCost:
    from ai_edge_litert import schema_py_generated as schema

    p = Path(path)
    data = check_tflite_file(p)
    try:
        model = schema.Model.GetRootAs(data, 0)
        subgraph = model.Subgraphs(0)
        codes = _opcodes(model)
        ops = schema.BuiltinOperator
        io = [
            sum(_elements(_shape(subgraph.Tensors(int(get(j))))) for j in range(length()))
            for get, length in (
                (subgraph.Inputs, subgraph.InputsLength),
                (subgraph.Outputs, subgraph.OutputsLength),
            )
        ]
        if is_edgetpu_model(data):
            params = len(data)
            return ModelCost(
                p.stem, params, int(params * _MACS_PER_PARAM_COMPILED), io[0], io[1], True
            )
        macs = sum(
            _op_macs(op, codes[int(op.OpcodeIndex())], subgraph, ops) for op in _operators(subgraph)
        )
        return ModelCost(p.stem, _param_bytes(model, subgraph, schema), macs, io[0], io[1])
    except Exception as exc:  # a damaged flatbuffer fails in many ways (struct.error...)
        raise InvalidModelError(f"cannot read the graph of {p}: {exc!r}") from exc


def model_cost(path: Path) -> ModelCost:
    """The :class:`ModelCost` of the TFLite model at ``path`` (cached per file version).

    Reads the file; does not build an interpreter.

    Raises:
        InvalidModelError: the file is not a readable TFLite model.
        OSError: the file cannot be read.
    """
    st = path.stat()
    return _cost_cached(str(path.resolve()), st.st_mtime_ns, st.st_size)
