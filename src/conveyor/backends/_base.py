"""The interface every backend implements.

A :class:`Device` is an opened accelerator (or the CPU); :meth:`Device.load` gives a
:class:`Runner` for one model on it. The device worker only ever talks to these two
classes, so it never knows which backend it drives.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .._tensors import TensorSpec
from ._spec import DeviceSpec

__all__ = ["Device", "Runner"]


class Runner(abc.ABC):
    """One model loaded on one device. Not thread-safe: one ``run`` at a time."""

    model: str
    path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @abc.abstractmethod
    def run(self, arrays: Sequence[npt.NDArray[Any]]) -> list[npt.NDArray[Any]]:
        """Run the model once.

        ``arrays`` are already checked against :attr:`inputs` (see ``prepare_inputs``):
        one per input, in model order, of the model's shapes and dtypes. Returns the
        outputs in model order, in the model's dtypes. Blocks for the inference; the GIL
        is released while the backend computes. Raises DeviceError if the device fails.
        """

    def run_into(
        self, arrays: Sequence[npt.NDArray[Any]], outputs: Sequence[npt.NDArray[Any]]
    ) -> None:
        """Run the model once and write its outputs into ``outputs`` (arrays of the
        model's output shapes and dtypes, in model order, such as shared-memory views).

        The device worker calls this. The default copies what :meth:`run` returns; a
        backend that can read its results in place overrides it to save the
        intermediate arrays (for a 156 kB output, an allocation that faults in fresh
        pages and one copy: about 20 us a run measured here). Blocks and raises as
        :meth:`run` does.
        """
        for dst, src in zip(outputs, self.run(arrays)):
            np.copyto(dst, src)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the model's resources."""


class Device(abc.ABC):
    """An opened device that can load models."""

    spec: DeviceSpec
    #: True for a simulated device: every output that shows it says "simulation".
    simulated: bool = False

    @abc.abstractmethod
    def load(self, model: str | Path) -> Runner:
        """Load a model (bundled name or path) on this device.

        Raises:
            ModelNotFoundError, InvalidModelError, EdgeTPUModelError, DeviceError.
        """

    def describe(self) -> dict[str, Any]:
        """Facts about the device for ``status`` output."""
        return {"spec": str(self.spec), "simulated": self.simulated}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the device."""


def zeros_like_specs(specs: Sequence[TensorSpec]) -> list[npt.NDArray[Any]]:
    """Zero-filled arrays of the given specs (used to warm a model up)."""
    return [np.zeros(s.shape, s.dtype) for s in specs]
