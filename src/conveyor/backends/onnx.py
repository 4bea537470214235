"""ONNX Runtime: the CPU execution provider, or CUDA on a GPU (``onnx:cpu``, ``onnx:cuda:N``).

The bundled models ship as ``.onnx`` too, converted from their ``.tflite`` at build time with
the same input and output names and order (``tools/convert_models.py``; the tool, version and
measured agreement with LiteRT are in ``models/NOTICE``). ``onnxruntime`` is the optional extra
``conveyor[onnx]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .._errors import (
    DeviceError,
    DeviceNotFoundError,
    DeviceSpecError,
    InvalidModelError,
    ModelNotFoundError,
)
from .._models import BUNDLED_DIR, base_name
from .._tensors import Inputs, TensorSpec
from ._base import Device, Runner
from ._spec import DeviceSpec

__all__ = ["OnnxDevice", "OnnxRunner", "bundled_onnx_models", "resolve_onnx_model"]

_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
#: ONNX Runtime's exceptions that say the model file itself is bad, whatever the device.
_BAD_MODEL = ("InvalidProtobuf", "InvalidGraph")

# ONNX Runtime's tensor type strings -> numpy dtypes.
_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(int16)": np.int16,
    "tensor(uint16)": np.uint16,  # 16-bit depth images, say
    "tensor(int32)": np.int32,
    "tensor(uint32)": np.uint32,
    "tensor(int64)": np.int64,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise DeviceNotFoundError(
            "ONNX Runtime is not installed: pip install 'conveyor[onnx]' (or onnxruntime-gpu "
            "for CUDA)"
        ) from exc
    return onnxruntime


def _ort_errors(ort: Any) -> tuple[type[BaseException], ...]:
    """ONNX Runtime's own exception types (they derive from Exception only)."""
    state = ort.capi.onnxruntime_pybind11_state
    names = (
        "Fail",
        "InvalidArgument",
        "NoSuchFile",
        "NoModel",
        "EngineError",
        "RuntimeException",
        "InvalidProtobuf",
        "ModelLoaded",
        "NotImplemented",
        "InvalidGraph",
        "EPFail",
    )
    found = tuple(getattr(state, n) for n in names if isinstance(getattr(state, n, None), type))
    return (*found, RuntimeError, ValueError)


def bundled_onnx_models() -> dict[str, Path]:
    """Names of the bundled ``.onnx`` models mapped to their paths, sorted by name."""
    return {p.stem: p for p in sorted(BUNDLED_DIR.glob("*.onnx"))}


def resolve_onnx_model(model: str | Path) -> Path:
    """The ``.onnx`` file for ``model``.

    ``model`` is an ``.onnx`` path, a bundled model name (with or without ``.tflite`` or
    ``.onnx``), or a ``.tflite`` path, for which the ``.onnx`` of the same name beside it
    is used. A path (with a folder in it) is never swapped for a bundled model that
    happens to have the same name.

    Raises:
        ModelNotFoundError: no such ``.onnx`` file (the message lists the bundled ones).
    """
    path = Path(model)
    suffix = path.suffix.lower()
    if suffix == ".onnx" and path.is_file():
        return path
    candidates = []
    if suffix == ".tflite":
        candidates.append(path.with_suffix(".onnx"))
    stem = path.stem if suffix in (".tflite", ".onnx") else path.name
    bundled = bundled_onnx_models()
    bare = len(path.parts) == 1 and not path.exists()
    if stem in bundled and (bare or path.parent.resolve() == BUNDLED_DIR.resolve()):
        candidates.append(bundled[stem])
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(
        f"no ONNX model for {str(model)!r}: give an .onnx path, or a .tflite path with the "
        f".onnx beside it, or a bundled name (bundled .onnx: {', '.join(bundled) or 'none'})"
    )


def _spec(arg: Any, path: Path) -> TensorSpec:
    """A tensor's spec. A symbolic leading dimension (a batch named "N", or None) is taken
    as 1; any other dimension must be fixed: shared-memory slots are sized at load."""
    dims = list(arg.shape) if arg.shape is not None else None
    fixed = [isinstance(d, int) and d >= 0 for d in dims or ()]
    # (A tensor with no declared shape shows as [], as a scalar does: taken as a scalar.)
    if dims is None or not all(fixed[1:]):
        raise InvalidModelError(
            f"{path}: tensor {arg.name!r} has shape {dims}: conveyor runs models whose tensors "
            f"have fixed shapes (only a leading batch dimension may be symbolic: it is "
            f"taken as 1); export the model with fixed sizes, or fix them with "
            f"`python3 -m onnxruntime.tools.make_dynamic_shape_fixed` (it needs the onnx "
            f"package)")
    shape = tuple(d if ok else 1 for d, ok in zip(dims, fixed))
    dtype = _DTYPES.get(arg.type)
    if dtype is None:
        raise InvalidModelError(
            f"{path}: tensor {arg.name!r} has type {arg.type}, which conveyor does not "
            f"pass (numeric and bool tensors only: {', '.join(_DTYPES)})")
    return TensorSpec(name=str(arg.name), shape=shape, dtype=np.dtype(dtype))


class OnnxRunner(Runner):
    """One model in an ONNX Runtime inference session."""

    def __init__(self, session: Any, path: Path, errors: tuple[type[BaseException], ...]) -> None:
        self._session = session
        self._errors = errors
        self.path = path
        self.model = base_name(path)
        self.inputs = tuple(_spec(a, path) for a in session.get_inputs())
        self.outputs = tuple(_spec(a, path) for a in session.get_outputs())
        self._names = [s.name for s in self.inputs]

    def run(self, arrays: Inputs) -> list[npt.NDArray[Any]]:
        """Run once; blocks (ONNX Runtime releases the GIL) for the inference.

        Raises:
            InputError: the inputs do not fit the model.
            DeviceError: ONNX Runtime failed, or the runner is closed.
        """
        if self._session is None:
            raise DeviceError(f"model {self.model} is closed")
        arrays = self.checked(arrays)
        try:
            outputs = self._session.run(None, dict(zip(self._names, arrays)))
        except self._errors as exc:
            raise DeviceError(f"ONNX Runtime failed running {self.model}: {exc}") from exc
        return [np.asarray(o) for o in outputs]

    def close(self) -> None:
        """Drop the session."""
        self._session = None


class OnnxDevice(Device):
    """ONNX Runtime with one execution provider (``onnx:cpu`` or ``onnx:cuda[:N]``).

    Sessions do not spin-wait (``session.intra_op.allow_spinning = 0``): spinning threads
    would take CPU from the pipeline's other stages. On CUDA, TF32 is off (``use_tf32 = 0``,
    ONNX Runtime's default is on): measured on an H100 with the bundled models, TF32 moved
    outputs by up to 1.2e-3 of their magnitude (0.2 on a box regressor of 258) and saved no
    time, while full float32 agrees with the CPU to 1.5e-6 of it.

    Raises (from the constructor):
        DeviceSpecError: not an ``onnx`` spec.
        DeviceNotFoundError: ONNX Runtime is not installed, or the provider is not available
            (the message lists the available ones).
    """

    def __init__(self, spec: DeviceSpec | None = None) -> None:
        self.spec = spec or DeviceSpec("onnx", bus="cpu")
        if self.spec.kind != "onnx" or self.spec.bus not in _PROVIDERS:
            raise DeviceSpecError(f"OnnxDevice needs onnx:cpu or onnx:cuda[:N], got {self.spec}")
        self._ort = _ort()
        self._errors = _ort_errors(self._ort)
        self.provider = _PROVIDERS[self.spec.bus]
        available = list(self._ort.get_available_providers())
        if self.provider not in available:
            hint = " (install onnxruntime-gpu and CUDA)" if self.spec.bus == "cuda" else ""
            raise DeviceNotFoundError(
                f"onnxruntime {self._ort.__version__} has no {self.provider}{hint}; available "
                f"providers: {', '.join(available)}"
            )
        self._options: dict[str, Any] = (
            {"device_id": self.spec.index or 0, "use_tf32": 0} if self.spec.bus == "cuda" else {}
        )

    def load(self, model: str | Path) -> Runner:
        """Load ``model``'s ONNX file (see :func:`resolve_onnx_model`) in a new session.

        Blocks while ONNX Runtime optimises the graph (and, on CUDA, initialises the GPU).

        Raises:
            ModelNotFoundError: no ``.onnx`` file for ``model``.
            InvalidModelError: the file is not a valid ONNX model (not a protobuf, a
                broken graph).
            DeviceNotFoundError: the provider could not be initialised (no such GPU...).
            DeviceError: ONNX Runtime could not load the model for another reason.
        """
        path = resolve_onnx_model(model)
        ort = self._ort
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(
                str(path), options, providers=[(self.provider, self._options)]
            )
        except self._errors as exc:
            # "Load model from P failed: ..." is a file ONNX Runtime could not read as a
            # model (an empty or graph-less one: "No graph was found", "ModelProto does
            # not have a graph"), whichever type the version at hand gives it.
            if type(exc).__name__ in _BAD_MODEL or "Load model from" in str(exc):
                raise InvalidModelError(
                    f"{path} is not a model ONNX Runtime can load: {exc}"
                ) from exc
            if self.spec.bus == "cuda":
                raise DeviceNotFoundError(
                    f"ONNX Runtime could not start {self.provider} for {self.spec}: {exc}"
                ) from exc
            raise DeviceError(f"ONNX Runtime could not load {path}: {exc}") from exc
        if self.provider not in session.get_providers():
            # ONNX Runtime falls back to the CPU silently when CUDA fails to initialise.
            raise DeviceNotFoundError(
                f"ONNX Runtime fell back to {session.get_providers()} instead of "
                f"{self.provider} for {self.spec}: CUDA or cuDNN libraries are missing or "
                f"GPU {self.spec.index or 0} does not exist"
            )
        return OnnxRunner(session, path, self._errors)

    def describe(self) -> dict[str, Any]:
        """The ONNX Runtime version, provider and device id."""
        return {
            **super().describe(),
            "backend": "onnxruntime",
            "version": self._ort.__version__,
            "provider": self.provider,
            **self._options,
        }
