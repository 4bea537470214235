"""Tensor specs and the conversions done at a model's boundary.

A :class:`TensorSpec` describes one input or output tensor: name, shape, dtype and
affine quantisation (``real = scale * (q - zero_point)``; ``scale == 0`` means not quantised).
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ._errors import InputError

__all__ = ["MAX_RANK", "Inputs", "TensorSpec", "dequantize", "prepare_inputs", "quantize"]

#: Lists of names in messages: their first few, each cut short (a dict of 100,000 wrong
#: names made a message of megabytes).
_SHORT = reprlib.Repr()
_SHORT.maxlist = _SHORT.maxtuple = 8
_SHORT.maxstring = _SHORT.maxother = 80

Inputs = npt.ArrayLike | Sequence[npt.ArrayLike] | Mapping[str, npt.ArrayLike]


#: The most dimensions a tensor may have to travel between a client and a device worker.
MAX_RANK = 8

@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a model."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    scale: float = 0.0
    zero_point: int = 0

    @property
    def quantized(self) -> bool:
        """True for an integer tensor with an affine quantisation."""
        return self.scale != 0.0 and self.dtype.kind in "iu"

    @property
    def nbytes(self) -> int:
        """Size of the tensor in bytes."""
        return math.prod(self.shape) * self.dtype.itemsize

    def describe(self) -> str:
        """``name float32[1, 128, 128, 3]`` and the quantisation, if any."""
        text = f"{self.name} {self.dtype.name}{list(self.shape)}"
        if self.quantized:
            text += f" (scale={self.scale:g}, zero_point={self.zero_point})"
        return text

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of this spec."""
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype.name,
            "scale": self.scale,
            "zero_point": self.zero_point,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TensorSpec:
        """The inverse of :meth:`to_json`; raises ValueError on a malformed dict."""
        try:
            dims, name = data["shape"], data["name"]
            if not isinstance(name, str) or not isinstance(dims, list) or not all(
                    type(d) is int and d >= 0 for d in dims) or len(dims) > MAX_RANK:
                raise TypeError(f"a name of text and a shape of at most {MAX_RANK} whole "
                                f"numbers")
            dtype = np.dtype(str(data["dtype"]))
            if dtype.kind not in "biufc":  # what shared memory can carry as it is
                raise TypeError(f"a numeric dtype, not {dtype}")
            return cls(
                name=name,
                shape=tuple(dims),
                dtype=dtype,
                scale=float(data.get("scale", 0.0)),
                zero_point=int(data.get("zero_point", 0)),
            )
        except (KeyError, TypeError, AttributeError) as exc:  # a missing key, a wrong type
            raise ValueError(f"not a tensor spec: {data!r:.200} ({exc})") from exc


def quantize(values: npt.NDArray[Any], spec: TensorSpec) -> npt.NDArray[Any]:
    """Float values to ``spec``'s integer dtype, rounding and saturating."""
    info = np.iinfo(spec.dtype)
    q = np.round(np.asarray(values, dtype=np.float32) / spec.scale) + spec.zero_point
    out: npt.NDArray[Any] = np.clip(q, info.min, info.max).astype(spec.dtype)
    return out


def dequantize(values: npt.NDArray[Any], spec: TensorSpec) -> npt.NDArray[np.float32]:
    """Integer values of a quantised tensor to float32."""
    shifted = values.astype(np.float32) - np.float32(spec.zero_point)
    out: npt.NDArray[np.float32] = (shifted * np.float32(spec.scale)).astype(np.float32)
    return out


def _as_list(specs: Sequence[TensorSpec], inputs: Inputs, model: str) -> list[Any]:
    if isinstance(inputs, Mapping):
        names = [s.name for s in specs]
        unknown = sorted((k for k in inputs if k not in names), key=repr)
        missing = [n for n in names if n not in inputs]
        if unknown or missing:
            short = _SHORT.repr
            raise InputError(
                f"model {model!r} expects inputs named {short(names)}; got {len(inputs)} "
                f"input{'s' * (len(inputs) != 1)} (missing {short(missing)}, unknown "
                f"{short(unknown)})"
            )
        return [inputs[n] for n in names]
    if isinstance(inputs, np.ndarray) or not isinstance(inputs, (list, tuple)):
        return [inputs]
    return list(inputs)


def prepare_inputs(
    specs: Sequence[TensorSpec], inputs: Inputs, model: str = "model"
) -> list[npt.NDArray[Any]]:
    """Check ``inputs`` against ``specs`` and return arrays in the model's dtypes.

    ``inputs`` is one array (single-input model), a list in model order, or a dict by
    input name. Float data given for a quantised input is quantised here; any other dtype
    mismatch is an error, as is a wrong count or shape. A missing leading batch dimension
    of 1 is added.

    Raises:
        InputError: saying what the model expects and what came.
    """
    arrays = _as_list(specs, inputs, model)
    if len(arrays) != len(specs):
        raise InputError(
            f"model {model!r} expects {len(specs)} input(s) "
            f"({', '.join(s.describe() for s in specs)}); got {len(arrays)}"
        )
    out: list[npt.NDArray[Any]] = []
    for spec, value in zip(specs, arrays):
        if value is None:  # (as an array, a 0-d object: "got shape []")
            raise InputError(f"input {spec.name!r} of model {model!r}: expected an array of "
                             f"shape {list(spec.shape)}, got None")
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError) as exc:  # a ragged nested list, for one
            raise InputError(
                f"input {spec.name!r} of model {model!r}: expected an array of shape "
                f"{list(spec.shape)}; {type(value).__name__} is not one ({exc})"
            ) from exc
        if arr.shape != spec.shape and (1, *arr.shape) == spec.shape:
            arr = arr[np.newaxis]
        if arr.shape != spec.shape:
            raise InputError(
                f"input {spec.name!r} of model {model!r}: expected shape {list(spec.shape)}, "
                f"got {list(arr.shape)}"
            )
        if arr.dtype != spec.dtype and arr.dtype.newbyteorder("=") == spec.dtype:
            arr = arr.astype(spec.dtype)  # the same type in the other byte order
        if arr.dtype != spec.dtype:
            if spec.quantized and arr.dtype.kind == "f":
                if not np.isfinite(arr).all():  # NaN has no integer: it came out anything
                    raise InputError(
                        f"input {spec.name!r} of model {model!r}: float data for a quantised "
                        f"({spec.dtype.name}) input must be finite; it holds NaN or inf")
                arr = quantize(arr, spec)
            else:
                expected = spec.dtype.name
                if spec.quantized:
                    expected += " (or float, quantised with scale/zero point)"
                raise InputError(
                    f"input {spec.name!r} of model {model!r}: expected dtype {expected}, "
                    f"got {arr.dtype.name}"
                )
        out.append(np.asarray(arr, order="C"))  # (ascontiguousarray makes 0-d arrays 1-d)
    return out
