"""Classifier crops cut on the device where the frame is (a GPU), all of a frame's objects in one batched pass: the
device's twin of engines/preprocess.py's `crop_resize`, on the same `crop_plan` (square, padding, letterbox,
black outside the frame).

Each crop resizes the part of its box inside the frame to the output pixels it covers, as OpenCV's `resize` does
on the host: INTER_AREA where the box shrinks (an area average where both axes shrink, read from an integral image
at the corners of each output pixel's source rectangle; OpenCV's two-tap "linear area" weights where one axis
grows), INTER_LINEAR where it grows (two taps per axis, pixel centres aligned). The host works out, in numpy,
which source pixels and weights every output pixel takes (a few KB: objects x output size x 2); the device only
gathers and sums, a fixed handful of kernels whatever the objects, and nothing waits for it. Pixels are within
one level of OpenCV's (its arithmetic is partly fixed point; tests/test_device_crops.py). Nothing here imports
torch at module level.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from engines.preprocess import CropSpec, crop_plan
from engines.torch_boxes import AREA_EPSILON


@dataclass(frozen=True)
class _Axis:
    """One axis of every crop: for each output pixel its two taps and weights, the two corner taps and weights of
    its area span (both edges), whether it lies inside the box's target, and the box's source/target scale."""

    taps: np.ndarray  # (N, size, 2) int64, absolute source pixels
    weights: np.ndarray  # (N, size, 2) float32
    corners: np.ndarray  # (N, 2 * size, 2) int64, integral-image lattice points (absolute)
    corner_weights: np.ndarray  # (N, 2 * size, 2) float64
    inside: np.ndarray  # (N, size) bool
    scale: np.ndarray  # (N,) float64: source pixels per output pixel


def _axis(lo: np.ndarray, hi: np.ndarray, first: np.ndarray, count: np.ndarray, size: int,
          area: np.ndarray) -> _Axis:
    """`lo`..`hi`: each box's source span; `first`, `count`: the output pixels it covers; `area`: the box is
    resized with INTER_AREA (else INTER_LINEAR)."""
    d = np.arange(size, dtype=np.float64)[None, :] - first[:, None]  # output pixel, relative to the box's first
    inside = (d >= 0) & (d < count[:, None])
    d = np.clip(d, 0, None)
    length = np.maximum(hi - lo, 1).astype(np.float64)[:, None]
    inv_scale = np.maximum(count, 1).astype(np.float64)[:, None] / length  # (an empty box: ignored, kept finite)  # dsize / ssize, then its reciprocal, as OpenCV rounds
    scale = 1.0 / inv_scale
    last = length - 1

    # INTER_LINEAR: source = (d + 0.5) * scale - 0.5, two taps, clamped to the span
    source = (d + 0.5) * scale - 0.5
    s0 = np.floor(source)
    fx = np.where(s0 < 0, 0.0, source - s0)
    s0 = np.clip(s0, 0, None)
    fx = np.where(s0 >= last, 0.0, fx)
    s0 = np.minimum(s0, last)
    s1 = np.minimum(s0 + 1, last)
    # INTER_AREA where an axis grows: OpenCV's linear-area taps (sx = floor(d * scale), fx from inv_scale, rounded
    # to float as OpenCV stores it)
    a0 = np.floor(d * scale)
    afx = ((d + 1) - (a0 + 1) * inv_scale).astype(np.float32).astype(np.float64)
    afx = np.where(afx <= 0, 0.0, afx - np.floor(afx))
    a1 = np.minimum(a0 + 1, last)
    a0 = np.minimum(a0, last)
    pick = area[:, None]
    taps = np.stack([np.where(pick, a0, s0), np.where(pick, a1, s1)], 2).astype(np.int64) + lo[:, None, None]
    weight = np.where(pick, afx, fx)
    weights = np.stack([1 - weight, weight], 2).astype(np.float32)

    # INTER_AREA where both axes shrink: each output pixel's source span [d*scale, (d+1)*scale), its edges moved
    # onto whole pixels within OpenCV's tolerance, as corners of the integral image
    start = d * scale
    end = start + scale
    up, down = np.ceil(start), np.floor(end)
    start = np.where(up - start <= AREA_EPSILON, up, start) + lo[:, None]
    end = np.where(end - down <= AREA_EPSILON, down, end) + lo[:, None]
    edges = np.concatenate([start, end], 1)  # (N, 2 * size)
    base = np.floor(edges)
    frac = edges - base
    corners = base.astype(np.int64)[..., None] + np.arange(2)
    corner_weights = np.stack([1 - frac, frac], 2)
    return _Axis(taps, weights, corners, corner_weights, inside, scale[:, 0])


def _gather(source: Any, rows: Any, row_weights: Any, cols: Any, col_weights: Any) -> Any:
    """sum over a, b of row_weights[n, r, a] * col_weights[n, c, b] * source[rows[n, r, a], cols[n, c, b]], for an
    (H, W, C) source: (N, R, K, C), one gather and two contractions for every crop."""
    pixels = source[rows[:, :, :, None, None], cols[:, None, None, :, :]]  # (N, R, A, K, B, C)
    pixels = pixels.to(row_weights.dtype)
    across = (pixels * col_weights[:, None, None, :, :, None]).sum(4)  # (N, R, A, K, C)
    return (across * row_weights[:, :, :, None, None]).sum(2)  # (N, R, K, C)


def _upload(arrays: list[np.ndarray], device: Any) -> list[Any]:
    """Host arrays to the device without waiting: through page-locked memory where the device is a GPU."""
    import torch

    tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
    if device.type != "cuda":
        return tensors
    return [t.pin_memory().to(device, non_blocking=True) for t in tensors]


def crop_resize_device(frame: Any, xyxy: np.ndarray, spec: CropSpec) -> Any:
    """(N, spec.height, spec.width, C) uint8 crops of `frame` ((H, W, C) uint8, on its device), as
    engines/preprocess.py's `crop_resize` cuts them on the host."""
    import torch

    with torch.inference_mode():
        return _cut(frame, xyxy, spec)


def _cut(frame: Any, xyxy: np.ndarray, spec: CropSpec) -> Any:
    import torch

    height, width, channels = (int(d) for d in frame.shape)
    plan = crop_plan(np.asarray(xyxy, np.float32).reshape(-1, 4), spec, height, width)
    n = len(plan.empty)
    if n == 0 or plan.empty.all():
        return torch.zeros((n, spec.height, spec.width, channels), dtype=torch.uint8, device=frame.device)
    source, target, shrinks = plan.source, plan.target, plan.shrinks  # INTER_AREA: by height, as the host decides
    y = _axis(source[:, 1], source[:, 3], target[:, 1], target[:, 3] - target[:, 1], spec.height, shrinks)
    x = _axis(source[:, 0], source[:, 2], target[:, 0], target[:, 2] - target[:, 0], spec.width, shrinks)
    area = shrinks & (y.scale >= 1) & (x.scale >= 1)  # OpenCV's area path: no axis grows
    inside = y.inside[:, :, None] & x.inside[:, None, :] & ~plan.empty[:, None, None]
    rows, row_w, cols, col_w, inside_d = _upload([y.taps, y.weights, x.taps, x.weights, inside], frame.device)
    pixels = _gather(frame, rows, row_w, cols, col_w)  # (N, h, w, C) float32
    if area.any():
        pixels = torch.where(torch.from_numpy(area).to(frame.device)[:, None, None, None],
                             _area(frame, plan.source[area], y, x, area, spec), pixels)
    return torch.where(inside_d[..., None], pixels.round().clamp(0, 255), 0.0).to(torch.uint8)


def _area(frame: Any, sources: np.ndarray, y: _Axis, x: _Axis, area: np.ndarray, spec: CropSpec) -> Any:
    """Area averages for every crop (rows of boxes not on the area path are ignored by the caller): from the
    integral image of the part of the frame the area boxes read (exact in int64 for any frame), at the corners
    of each output pixel's source span."""
    import torch

    y0, x0 = int(sources[:, 1].min()), int(sources[:, 0].min())
    y1, x1 = int(sources[:, 3].max()), int(sources[:, 2].max())
    part = frame[y0:y1, x0:x1].to(torch.int64)
    table = torch.nn.functional.pad(part.cumsum(0).cumsum(1), (0, 0, 1, 0, 1, 0)).double()
    rows = np.clip(y.corners - y0, 0, y1 - y0)  # the area boxes' corners lie within the part
    cols = np.clip(x.corners - x0, 0, x1 - x0)
    rows_d, row_w, cols_d, col_w = _upload([rows, y.corner_weights, cols, x.corner_weights], frame.device)
    summed = _gather(table, rows_d, row_w, cols_d, col_w)  # (N, 2h, 2w, C)
    h, w = spec.height, spec.width
    rect = summed[:, h:, w:] - summed[:, :h, w:] - summed[:, h:, :w] + summed[:, :h, :w]
    scale = torch.from_numpy(y.scale * x.scale).to(frame.device)
    return (rect / scale[:, None, None, None]).float()
