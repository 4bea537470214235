"""Rebuild the derived bundled models: the ONNX conversions and the int8 face detector.

This runs once, by a maintainer, at build time; conveyor never converts at run time. It
needs tools that are not conveyor dependencies; install them in a throw-away environment::

    python3 -m venv /tmp/convenv
    /tmp/convenv/bin/pip install tf2onnx==1.17.0 tensorflow-cpu==2.21.0 onnx==1.23.2 \\
        onnxruntime==1.32.0 ai-edge-quantizer==0.10.0 ai-edge-litert==2.3.0 pillow numpy
    /tmp/convenv/bin/python tools/convert_models.py            # both steps
    /tmp/convenv/bin/python tools/convert_models.py onnx       # or one of them
    /tmp/convenv/bin/python tools/convert_models.py int8

Step ``onnx``: for each bundled float model ``name.tflite``, runs
``python -m tf2onnx.convert --tflite name.tflite --output name.onnx --opset 13``, checks that
the ONNX inputs and outputs have the TFLite names in the TFLite order, records the source in
the ONNX metadata, and compares ONNX Runtime with LiteRT on the bundled sample images.

Step ``int8``: builds ``face_detection_short_range_int8.tflite`` with ai-edge-quantizer's
static int8 recipe (int8 weights per channel, int8 activations per tensor, int8 input and
outputs). Before quantising, the float16 weights of the MediaPipe model are folded into
float32 constants (the quantizer would otherwise take the DEQUANTIZE outputs for
activations), the operator codes get their ``builtin_code`` field (the model only has the
deprecated one, which the quantizer does not read) and a ``serving_default`` signature is
added (the calibrator runs signatures). Calibration takes true min/max over the bundled
sample images, each whole and in 8 seeded random crops (50-100 % of the side, every second
one mirrored), resized to 128x128 and scaled to [-1, 1]; the input range is set to exactly
[-1, 1]; the classifier logits' lower range is clipped at -16 (sigmoid(-16) = 1e-7; without
the clip the range reaches -297 and one int8 step is 1.2 logits).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "src" / "conveyor" / "models"
SAMPLES = ROOT / "src" / "conveyor" / "samples"
FLOAT_MODELS = {  # name -> (input size, input range)
    "face_detection_short_range": (128, (-1.0, 1.0)),
    "face_detection_full_range": (192, (-1.0, 1.0)),
    "face_landmark": (192, (0.0, 1.0)),
}
INT8_SOURCE = "face_detection_short_range"
INT8_NAME = "face_detection_short_range_int8"
LOGIT_FLOOR = -16.0
OPSET = 13
ONNX_IR_VERSION = 7  # what tf2onnx writes for opset 13; loads in every onnxruntime >= 1.8


def sample_tensor(name: str, size: int, lo: float, hi: float) -> np.ndarray:
    """A bundled sample image resized to ``size`` and scaled to [lo, hi], batch of 1."""
    from PIL import Image

    image = (
        Image.open(SAMPLES / f"{name}.png")
        .convert("RGB")
        .resize((size, size), Image.Resampling.BILINEAR)
    )
    pixels = np.asarray(image, np.float32) / 255.0
    return (lo + pixels * (hi - lo))[np.newaxis].astype(np.float32)


def sample_names() -> list[str]:
    return sorted(p.stem for p in SAMPLES.glob("*.png"))


def litert_outputs(model: bytes, x: np.ndarray) -> list[np.ndarray]:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=model)
    interp.allocate_tensors()
    detail = interp.get_input_details()[0]
    if detail["dtype"] != np.float32:
        scale, zero = detail["quantization"]
        info = np.iinfo(detail["dtype"])
        x = np.clip(np.round(x / scale) + zero, info.min, info.max).astype(detail["dtype"])
    interp.set_tensor(detail["index"], x)
    interp.invoke()
    outs = []
    for d in interp.get_output_details():
        value = interp.get_tensor(d["index"])
        if d["dtype"] != np.float32:
            scale, zero = d["quantization"]
            value = (value.astype(np.float32) - zero) * scale
        outs.append(value)
    return outs


def tflite_io_names(model: bytes) -> tuple[list[str], list[str]]:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=model)
    return (
        [d["name"] for d in interp.get_input_details()],
        [d["name"] for d in interp.get_output_details()],
    )


# --- ONNX ---------------------------------------------------------------------------------


def canonical_names(model: Any) -> None:
    """Make tf2onnx's output byte-for-byte reproducible.

    tf2onnx numbers the tensors and nodes it creates (``const_fold_opt__509``) in an order
    that changes from run to run, and when it merges equal constants or duplicate nodes,
    which name survives varies too. So every node is named by its position and op
    (``n012_Conv``), its outputs after it (``n012_Conv:0``), every initializer after its
    first consumer and input slot (``n012_Conv/in1``), and initializers are listed in that
    order. Graph input and output names are kept (they are the TFLite model's).
    """
    graph = model.graph
    keep = {v.name for v in [*graph.input, *graph.output]}
    constants = {t.name for t in graph.initializer}
    mapping: dict[str, str] = {}
    order: dict[str, tuple[int, int]] = {}
    for position, node in enumerate(graph.node):
        node.name = f"n{position:03d}_{node.op_type}"
        for slot, name in enumerate(node.input):
            if name in constants and name not in order:
                order[name] = (position, slot)
                mapping[name] = f"{node.name}/in{slot}"
        for slot, name in enumerate(node.output):
            if name and name not in keep:
                mapping[name] = f"{node.name}:{slot}"
    for node in graph.node:
        node.input[:] = [mapping.get(n, n) for n in node.input]
        node.output[:] = [mapping.get(n, n) for n in node.output]
    ordered = sorted(graph.initializer, key=lambda t: order.get(t.name, (len(graph.node), 0)))
    copies = []
    for original in ordered:
        copy = type(original)()
        copy.CopyFrom(original)
        copy.name = mapping.get(original.name, original.name)
        copies.append(copy)
    del graph.initializer[:]
    graph.initializer.extend(copies)
    del graph.value_info[:]  # shape hints only; onnxruntime infers them


def convert_onnx(name: str) -> None:
    import onnx
    import onnxruntime as ort
    import tf2onnx

    src = MODELS / f"{name}.tflite"
    dst = MODELS / f"{name}.onnx"
    command = [
        sys.executable,
        "-m",
        "tf2onnx.convert",
        "--tflite",
        str(src),
        "--output",
        str(dst),
        "--opset",
        str(OPSET),
    ]
    print("$", " ".join(command[1:]), flush=True)
    # A fixed hash seed makes tf2onnx pick the same survivor when it merges duplicate nodes.
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    subprocess.run(command, check=True, capture_output=True, env=env)

    data = src.read_bytes()
    want_in, want_out = tflite_io_names(data)
    model = onnx.load(str(dst))
    got_in = [i.name for i in model.graph.input]
    got_out = [o.name for o in model.graph.output]
    if (got_in, got_out) != (want_in, want_out):
        raise SystemExit(f"{name}: ONNX I/O {got_in} {got_out} != TFLite {want_in} {want_out}")
    canonical_names(model)
    model.ir_version = ONNX_IR_VERSION
    # tf2onnx writes the source's absolute path here: the machine it ran on, not the model
    model.graph.doc_string = f"converted from {src.name}"
    del model.metadata_props[:]
    for key, value in (
        ("converted_from", src.name),
        ("source_sha256", hashlib.sha256(data).hexdigest()),
        ("converter", f"tf2onnx {tf2onnx.__version__} --tflite --opset {OPSET}"),
    ):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))

    size, (lo, hi) = FLOAT_MODELS[name]
    session = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    worst = 0.0
    for sample in sample_names():
        x = sample_tensor(sample, size, lo, hi)
        ref = litert_outputs(data, x)
        got = session.run(None, {want_in[0]: x})
        for r, g in zip(ref, got):
            worst = max(worst, float(np.abs(r - g).max()))
    print(f"{dst.name}: {dst.stat().st_size} bytes, max |ONNX - LiteRT| = {worst:.3g}")


# --- int8 ---------------------------------------------------------------------------------


def fold_float16_weights(data: bytes) -> bytes:
    """The model with float16 constants + DEQUANTIZE ops replaced by float32 constants,
    ``builtin_code`` filled from ``deprecated_builtin_code``, unused tensors removed, and a
    ``serving_default`` signature over the graph's inputs and outputs."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
    for code in model.operatorCodes:
        code.builtinCode = max(code.builtinCode, code.deprecatedBuiltinCode)
    graph = model.subgraphs[0]
    kept = []
    for op in graph.operators:
        if model.operatorCodes[op.opcodeIndex].builtinCode == schema.BuiltinOperator.DEQUANTIZE:
            src, dst = graph.tensors[op.inputs[0]], graph.tensors[op.outputs[0]]
            buf = model.buffers[src.buffer]
            if src.type == schema.TensorType.FLOAT16 and buf.data is not None:
                values = np.frombuffer(bytes(bytearray(buf.data)), np.float16).astype(np.float32)
                buf.data = np.frombuffer(values.tobytes(), np.uint8)
                dst.buffer = src.buffer
                continue
        kept.append(op)
    graph.operators = kept
    used = sorted(
        {i for op in kept for i in [*op.inputs, *op.outputs] if i >= 0}
        | set(graph.inputs)
        | set(graph.outputs)
    )
    new = {old: i for i, old in enumerate(used)}
    graph.tensors = [graph.tensors[i] for i in used]
    for op in kept:
        op.inputs = [new[i] if i >= 0 else i for i in op.inputs]
        op.outputs = [new[i] for i in op.outputs]
    graph.inputs = [new[i] for i in graph.inputs]
    graph.outputs = [new[i] for i in graph.outputs]

    def tensor_map(index: int) -> Any:
        entry = schema.TensorMapT()
        entry.name = graph.tensors[index].name.decode()
        entry.tensorIndex = index
        return entry

    signature = schema.SignatureDefT()
    signature.signatureKey = "serving_default"
    signature.subgraphIndex = 0
    signature.inputs = [tensor_map(i) for i in graph.inputs]
    signature.outputs = [tensor_map(i) for i in graph.outputs]
    model.signatureDefs = [signature]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def calibration_inputs(size: int, seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in sample_names():
        image = Image.open(SAMPLES / f"{name}.png").convert("RGB")
        w, h = image.size
        views = [image]
        for k in range(8):
            s = rng.uniform(0.5, 1.0)
            cw, ch = int(w * s), int(h * s)
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            view = image.crop((x0, y0, x0 + cw, y0 + ch))
            views.append(view.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if k % 2 else view)
        for view in views:
            pixels = np.asarray(view.resize((size, size), Image.Resampling.BILINEAR), np.float32)
            yield {"input": (pixels / 127.5 - 1.0)[np.newaxis].astype(np.float32)}


def logit_chain(model_bytes: bytes, output: str) -> list[str]:
    """The output tensor and, back through RESHAPE / CONCATENATION, the tensors feeding it."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(model_bytes), 0)
    graph = model.subgraphs[0]
    names = [t.name.decode() for t in graph.tensors]
    producer = {o: op for op in graph.operators for o in op.outputs}
    passthrough = (schema.BuiltinOperator.RESHAPE, schema.BuiltinOperator.CONCATENATION)
    chain, todo = [], [names.index(output)]
    while todo:
        index = todo.pop()
        chain.append(names[index])
        op = producer.get(index)
        if op is not None and model.operatorCodes[op.opcodeIndex].builtinCode in passthrough:
            todo += [
                i
                for i in op.inputs
                if i >= 0 and model.buffers[graph.tensors[i].buffer].data is None
            ]
    return chain


def build_int8() -> None:
    from ai_edge_quantizer import calibrator, quantizer, recipe

    src = MODELS / f"{INT8_SOURCE}.tflite"
    dst = MODELS / f"{INT8_NAME}.tflite"
    size = FLOAT_MODELS[INT8_SOURCE][0]
    folded = fold_float16_weights(src.read_bytes())

    def min_max(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
        if not old:
            return new
        return {
            "min": np.minimum(old["min"], new["min"]),
            "max": np.maximum(old["max"], new["max"]),
        }

    qt = quantizer.Quantizer(folded)
    qt.load_quantization_recipe(recipe.static_wi8_ai8())
    calib = calibrator.Calibrator(folded, num_threads=1, qsv_update_func=min_max)
    # The public Quantizer.calibrate averages min/max over samples (a moving average); a
    # face seen in one sample would then be clipped. The calibrator with min/max keeps it.
    calib.calibrate({"serving_default": list(calibration_inputs(size))}, qt._recipe_manager)
    ranges = calib.get_model_qsvs()
    ranges["input"] = {
        "min": np.full_like(ranges["input"]["min"], -1.0),
        "max": np.full_like(ranges["input"]["max"], 1.0),
    }
    for tensor in logit_chain(folded, "classificators"):
        ranges[tensor]["min"] = np.maximum(ranges[tensor]["min"], LOGIT_FLOOR)
    result = qt.quantize(ranges, enable_progress_report=False)
    dst.write_bytes(bytes(result.quantized_model))

    # Compare with the float model on every sample.
    for sample in sample_names():
        x = sample_tensor(sample, size, -1.0, 1.0)
        ref = litert_outputs(src.read_bytes(), x)
        got = litert_outputs(dst.read_bytes(), x)
        score_ref = 1 / (1 + np.exp(-np.clip(ref[1], -80, 80)))
        score_got = 1 / (1 + np.exp(-np.clip(got[1], -80, 80)))
        print(
            f"{dst.name} {sample}: max score {score_ref.max():.3f} -> {score_got.max():.3f}, "
            f"max |score diff| {np.abs(score_ref - score_got).max():.3f}"
        )
    print(f"{dst.name}: {dst.stat().st_size} bytes")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", nargs="?", choices=("all", "onnx", "int8"), default="all")
    args = parser.parse_args()
    if args.step in ("all", "onnx"):
        for name in FLOAT_MODELS:
            convert_onnx(name)
    if args.step in ("all", "int8"):
        build_int8()
    return 0


if __name__ == "__main__":
    sys.exit(main())
