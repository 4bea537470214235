"""Models a device worker serves, and where each tensor sits in a request's slot."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .._shm import align
from .._tensors import TensorSpec

__all__ = ["ModelInfo"]


@dataclass(frozen=True)
class ModelInfo:
    """A model as client and server both see it.

    A request's slot holds every input then every output, each at a 64-byte aligned offset;
    both sides compute the same layout from the specs, so requests carry only where the
    slot starts. ``digests``: the SHA-256 (hex) of each file the server loaded the model
    from or was given it as (an Edge TPU build and its plain model, say), by which a
    client told a path tells the server's model of that name from another file.
    """

    id: int
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    digests: tuple[str, ...] = ()
    in_offsets: tuple[int, ...] = field(init=False)
    out_offsets: tuple[int, ...] = field(init=False)
    slot_size: int = field(init=False)

    def __post_init__(self) -> None:
        pos = 0
        offsets = []
        for spec in (*self.inputs, *self.outputs):
            offsets.append(pos)
            pos += align(max(spec.nbytes, 1))
        object.__setattr__(self, "in_offsets", tuple(offsets[: len(self.inputs)]))
        object.__setattr__(self, "out_offsets", tuple(offsets[len(self.inputs) :]))
        object.__setattr__(self, "slot_size", max(pos, 64))

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
            "digests": list(self.digests),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelInfo:
        return cls(
            id=int(data["id"]),
            name=str(data["name"]),
            inputs=tuple(TensorSpec.from_json(s) for s in data["inputs"]),
            outputs=tuple(TensorSpec.from_json(s) for s in data["outputs"]),
            digests=tuple(str(d) for d in data.get("digests", ())),
        )
