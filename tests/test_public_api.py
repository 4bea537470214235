"""The public surface: __all__ and the module agree (anyio's test_all_attributes habit)."""

from __future__ import annotations

import types

import conveyor


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
