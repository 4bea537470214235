"""Scale out with Ray Data when one machine is not enough.

Ray Data already pipelines CPU and accelerator stages across machines with
backpressure; conveyor does not build a second distributed engine. On each node, an actor
runs one conveyor :class:`~conveyor.Pipeline` (process pre-processing, the device worker,
post-processing), so the node's accelerator stays busy exactly as on one machine::

    import ray, conveyor.ray
    from conveyor.apps.faces import preprocess, postprocess

    def faces_of(pair):            # with_context: (outputs, letterbox of the frame)
        return [face.to_json() for face in postprocess(*pair)]

    # a column "image"; mode="RGB": a batch mixing grey and colour frames would not stack
    ds = ray.data.read_images("s3://bucket/frames/", mode="RGB")
    faces = conveyor.ray.map_batches(
        ds, "face_detection_short_range", device="edgetpu",
        preprocess=preprocess, postprocess=faces_of, with_context=True,
        column="image", concurrency=4, resources={"edgetpu": 1},
    )

Start each Ray node with ``--resources='{"edgetpu": N}'`` (N accelerators on it) so that
one actor lands per accelerator: an Edge TPU serves one process, and an actor given one
without a number (``edgetpu``, ``sim-edgetpu``) opens the first that no other actor
holds. To share a node's devices with other programs, run ``conveyor serve`` there and
pass ``server=PATH`` instead of ``device``. Each actor takes one CPU: keep
``concurrency`` below the cluster's CPUs, or Ray Data's reading has none left and the job
waits. ``preprocess`` may be a function of the driver script (Ray's actors cannot import
it by name): it is carried to the workers by value. Needs ``pip install 'conveyor[ray]'``.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from ._pipeline import Pipeline, infer, stage

__all__ = ["Predictor", "map_batches"]


class _ByValue:
    """A function carried by value (Ray's cloudpickle) to a process stage's workers.

    Ray sends the functions of a driver's script to its actors by value; in the actor
    they belong to a ``__main__`` that is Ray's worker, not the script, so pickling them
    by reference for conveyor's worker processes fails. This carries the code instead,
    and is itself picklable by reference (it is importable from here).
    """

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        from ray import cloudpickle

        self.blob: bytes = cloudpickle.dumps(fn)  # type: ignore[no-untyped-call]
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)
        self._fn: Callable[[Any], Any] | None = fn

    def __call__(self, item: Any) -> Any:
        if self._fn is None:
            self._fn = pickle.loads(self.blob)
        return self._fn(item)

    def __getstate__(self) -> dict[str, Any]:
        return {"blob": self.blob, "__name__": self.__name__}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.blob = state["blob"]
        self.__name__ = state["__name__"]
        self._fn = None


#: How many Edge TPUs (or simulated ones) an actor tries for a device given without a number.
_MAX_DEVICES = 16


def _on_a_free_device(device: str, build: Callable[[str], Pipeline]) -> Pipeline:
    """``build(device)``; for an Edge TPU given without a number (``edgetpu``,
    ``edgetpu:usb``, ``sim-edgetpu``), the first of the node's devices that no other
    actor holds: two actors on a node with two accelerators get one each."""
    from ._errors import DeviceBusyError, DeviceNotFoundError
    from .backends import parse_device

    if device.startswith("server:"):  # a device server's socket: it picks the device
        return build(device)
    spec = parse_device(device)
    if spec.kind not in ("edgetpu", "sim-edgetpu") or spec.index is not None:
        return build(device)
    first: DeviceBusyError | None = None
    for index in range(_MAX_DEVICES):
        try:
            return build(str(replace(spec, index=index)))
        except DeviceBusyError as exc:
            first = first or exc  # held by another actor: try the next one
        except DeviceNotFoundError:
            if first is None:
                raise
            break  # no more devices here
    assert first is not None
    raise first


def _for_workers(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``fn`` as it can reach a worker process: itself if it pickles by reference (an
    importable function), else carried by value (:class:`_ByValue`)."""
    try:
        pickle.dumps(fn, protocol=5)
    except Exception:
        return _ByValue(fn)
    return fn


class Predictor:
    """A callable class for ``Dataset.map_batches``: one conveyor pipeline per actor.

    Each batch's ``column`` is fed through ``preprocess`` (in ``workers`` processes),
    the model, and ``postprocess``; the results go into the ``output`` column (an object
    array when they are not arrays of one shape). A failed item raises
    :class:`~conveyor.StageError` and fails the Ray task, as any error in map_batches.
    ``device`` (also ``"server:PATH"``), ``server``, ``dequantize`` (float32 outputs from
    a quantised model, as an Edge TPU's are), ``deadline``, ``priority`` and ``realtime``
    are :func:`conveyor.infer`'s. The pipeline lives as long as the actor and is closed
    with it.
    """

    def __init__(
        self,
        model: str,
        *,
        device: str = "cpu",
        server: str | None = None,
        preprocess: Callable[[Any], Any] | None = None,
        postprocess: Callable[[Any], Any] | None = None,
        with_context: bool = False,
        workers: int = 1,
        column: str = "item",
        output: str = "output",
        maxsize: int = 8,
        dequantize: bool = False,
        deadline: float | None = None,
        priority: int = 0,
        realtime: bool | int = False,
    ) -> None:
        def build(spec: str) -> Pipeline:
            stages = []
            if preprocess is not None:
                stages.append(stage(_for_workers(preprocess), workers=workers, kind="process"))
            stages.append(infer(model, device=spec, server=server, with_context=with_context,
                                dequantize=dequantize, deadline=deadline, priority=priority,
                                realtime=realtime))
            if postprocess is not None:
                stages.append(stage(postprocess))
            return Pipeline(*stages, maxsize=maxsize).start()

        self.column = column
        self.output = output
        self.pipeline = _on_a_free_device(device, build) if server is None else build(device)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        results = list(self.pipeline.map(list(batch[self.column])))
        column = np.empty(len(results), dtype=object)
        for i, r in enumerate(results):
            column[i] = r
        return {**batch, self.output: column}

    def __del__(self) -> None:
        pipeline = getattr(self, "pipeline", None)
        if pipeline is not None:
            pipeline.close()


def map_batches(
    dataset: Any,
    model: str,
    *,
    concurrency: int = 1,
    batch_size: int = 32,
    resources: dict[str, float] | None = None,
    **kwargs: Any,
) -> Any:
    """``dataset.map_batches`` with a :class:`Predictor` per actor.

    ``concurrency`` actors run at once (one per accelerator); ``resources`` (for
    example ``{"edgetpu": 1}``) pins each actor to a node that has one. Other keyword
    arguments go to :class:`Predictor`. Returns the lazy Ray Dataset.
    """
    try:
        from ray.data import ActorPoolStrategy
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(f"conveyor.ray needs Ray Data ({exc}): pip install "
                                  "'conveyor[ray]'", name=exc.name) from exc

    options: dict[str, Any] = {}
    if resources:
        options["resources"] = resources
    return dataset.map_batches(
        Predictor, fn_constructor_kwargs={"model": model, **kwargs},
        # A fixed pool of actors; Ray 2.51 deprecates concurrency= for this.
        compute=ActorPoolStrategy(size=concurrency), batch_size=batch_size,
        batch_format="numpy", num_cpus=1, **options,
    )
