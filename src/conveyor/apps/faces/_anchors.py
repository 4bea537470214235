"""SSD anchors, generated the way MediaPipe's ``SsdAnchorsCalculator`` defines them.

An anchor is a (x_center, y_center, width, height) box relative to the model input. Layers
that share a stride are merged into one feature map whose cells carry the anchors of every
merged layer, in layer order; within a layer, one anchor per aspect ratio and, when
``interpolated_scale_aspect_ratio > 0``, one more at the geometric mean of this layer's
scale and the next one's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import numpy.typing as npt

__all__ = ["SsdAnchorOptions", "generate_anchors"]


@dataclass(frozen=True)
class SsdAnchorOptions:
    """The options of MediaPipe's ``SsdAnchorsCalculator`` that face detection uses."""

    input_width: int
    input_height: int
    num_layers: int
    min_scale: float
    max_scale: float
    strides: tuple[int, ...]
    aspect_ratios: tuple[float, ...] = (1.0,)
    anchor_offset_x: float = 0.5
    anchor_offset_y: float = 0.5
    fixed_anchor_size: bool = True
    interpolated_scale_aspect_ratio: float = 1.0
    reduce_boxes_in_lowest_layer: bool = False


def _scale(min_scale: float, max_scale: float, index: int, count: int) -> float:
    """The scale of the ``index``-th of ``count`` strides, linear between min and max."""
    if count == 1:
        return (min_scale + max_scale) * 0.5
    return min_scale + (max_scale - min_scale) * index / (count - 1)


def _cell_shapes(opts: SsdAnchorOptions, first: int, stop: int) -> list[tuple[float, float]]:
    """(width, height) of the anchors of one cell for the merged layers ``first..stop-1``."""
    n = len(opts.strides)
    ratios: list[float] = []
    scales: list[float] = []
    for layer in range(first, stop):
        scale = _scale(opts.min_scale, opts.max_scale, layer, n)
        if layer == 0 and opts.reduce_boxes_in_lowest_layer:
            ratios += [1.0, 2.0, 0.5]
            scales += [0.1, scale, scale]
            continue
        for ratio in opts.aspect_ratios:
            ratios.append(ratio)
            scales.append(scale)
        if opts.interpolated_scale_aspect_ratio > 0.0:
            following = (
                1.0 if layer == n - 1 else _scale(opts.min_scale, opts.max_scale, layer + 1, n)
            )
            scales.append(math.sqrt(scale * following))
            ratios.append(opts.interpolated_scale_aspect_ratio)
    return [(s * math.sqrt(r), s / math.sqrt(r)) for s, r in zip(scales, ratios, strict=True)]


@lru_cache(maxsize=8)
def _generate(opts: SsdAnchorOptions) -> npt.NDArray[np.float32]:
    groups: list[npt.NDArray[np.float32]] = []
    layer = 0
    while layer < opts.num_layers:
        stride = opts.strides[layer]
        stop = layer
        while stop < len(opts.strides) and opts.strides[stop] == stride:
            stop += 1
        shapes = _cell_shapes(opts, layer, stop)
        fm_h = math.ceil(opts.input_height / stride)
        fm_w = math.ceil(opts.input_width / stride)
        ys, xs = np.meshgrid(np.arange(fm_h), np.arange(fm_w), indexing="ij")
        x_center = (xs.reshape(-1) + opts.anchor_offset_x) / fm_w
        y_center = (ys.reshape(-1) + opts.anchor_offset_y) / fm_h
        per_cell = len(shapes)
        group = np.empty((fm_h * fm_w, per_cell, 4), np.float32)
        group[:, :, 0] = x_center[:, None]
        group[:, :, 1] = y_center[:, None]
        if opts.fixed_anchor_size:
            group[:, :, 2:] = 1.0
        else:
            group[:, :, 2:] = np.asarray(shapes, np.float32)[None, :, :]
        groups.append(group.reshape(-1, 4))
        layer = stop
    anchors = np.concatenate(groups) if groups else np.zeros((0, 4), np.float32)
    anchors.setflags(write=False)
    return anchors


def generate_anchors(opts: SsdAnchorOptions) -> npt.NDArray[np.float32]:
    """The anchors for ``opts`` as a read-only float32 array of shape (N, 4).

    Columns are x_center, y_center, width, height, relative to the model input; the order is
    the order of the model's output rows (feature map by feature map, row-major cells,
    anchors of a cell together). Results are cached per ``opts``.
    """
    return _generate(opts)
