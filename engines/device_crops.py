"""Classifier crops cut on the device where the frame is (a GPU), all of a frame's objects in one batched pass: the
device's twin of engines/preprocess.py's `crop_resize`, on the same `crop_plan` (square, padding, letterbox,
black outside the frame).

Each crop resizes the part of its box inside the frame to the output pixels it covers, as OpenCV's `resize` does
on the host: INTER_AREA where the box shrinks (an area average where both axes shrink, read from the frame's
integral image at the corners of each output pixel's source rectangle; OpenCV's two-tap "linear area" weights
where one axis grows), INTER_LINEAR where it grows (two taps per axis, pixel centres aligned). The arithmetic is
float where OpenCV's is partly fixed point, so a pixel may differ by a level or two (tests/test_device_crops.py).
The launches and the memory depend on the number of objects and the output size, never on the boxes' sizes, and
nothing waits for the device. Nothing here imports torch at module level.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engines.preprocess import CropSpec, crop_plan
from engines.torch_boxes import _AREA_EPSILON, _linear_taps


def _axis(lo: Any, hi: Any, first: Any, count: Any, size: int, area: Any) -> dict[str, Any]:
    """One axis of every crop: output pixels 0..size-1, the box covering `count` of them from `first`, its source
    span [lo, hi). Returns the two-tap indices and weights (INTER_LINEAR, or INTER_AREA's linear-area where
    `area`), the area corners' taps and weights, and the mask of output pixels inside the box."""
    import torch

    device = lo.device
    d = torch.arange(size, device=device, dtype=torch.float64)[None, :] - first[:, None].double()  # (N, size)
    inside = (d >= 0) & (d < count[:, None])
    d = d.clamp(min=0)
    length = (hi - lo).clamp(min=1).double()[:, None]
    inv_scale = count.double()[:, None] / length  # dsize / ssize, then its reciprocal, as OpenCV rounds them
    scale = torch.ones_like(inv_scale) / inv_scale
    last = length - 1

    # INTER_LINEAR: source = (d + 0.5) * scale - 0.5, two taps, clamped to the span
    source = (d + 0.5) * scale - 0.5
    s0 = torch.floor(source)
    fx = source - s0
    fx = torch.where(s0 < 0, torch.zeros_like(fx), fx)
    s0 = s0.clamp(min=0)
    fx = torch.where(s0 >= last, torch.zeros_like(fx), fx)
    s0 = torch.minimum(s0, last)
    s1 = torch.minimum(s0 + 1, last)
    # INTER_AREA where an axis grows: OpenCV's linear-area taps
    a0, a1, afx = _linear_taps(d, scale, inv_scale, length)
    pick = area[:, None]
    tap0, tap1 = torch.where(pick, a0, s0), torch.where(pick, a1, s1)
    weight = torch.where(pick, afx, fx)
    taps = torch.stack([tap0, tap1], 2).long() + lo[:, None, None]  # (N, size, 2)
    weights = torch.stack([1 - weight, weight], 2).float()

    # INTER_AREA where both axes shrink: each output pixel's source span [d*scale, (d+1)*scale), its edges moved
    # onto whole pixels within OpenCV's tolerance, as corners of the integral image
    start = d * scale
    end = start + scale
    up, down = torch.ceil(start), torch.floor(end)
    start = torch.where(up - start <= _AREA_EPSILON, up, start) + lo[:, None]
    end = torch.where(end - down <= _AREA_EPSILON, down, end) + lo[:, None]
    corners = torch.cat([start, end], 1)  # (N, 2 * size)
    base = torch.floor(corners)
    frac = corners - base
    corner_taps = base.long()[..., None] + torch.arange(2, device=device)  # (N, 2 * size, 2)
    corner_weights = torch.stack([1 - frac, frac], 2)
    return {"taps": taps, "weights": weights, "corner_taps": corner_taps, "corner_weights": corner_weights,
            "inside": inside, "scale": scale[:, 0]}


def _gather(source: Any, rows: Any, row_weights: Any, cols: Any, col_weights: Any) -> Any:
    """sum over a, b of row_weights[n, r, a] * col_weights[n, c, b] * source[rows[n, r, a], cols[n, c, b]], for an
    (H, W, C) source: (N, R, K, C) -> one gather and two contractions for every crop."""
    rows = rows.clamp(0, source.shape[0] - 1)
    cols = cols.clamp(0, source.shape[1] - 1)
    pixels = source[rows[:, :, :, None, None], cols[:, None, None, :, :]]  # (N, R, A, K, B, C)
    pixels = pixels.to(row_weights.dtype)
    across = (pixels * col_weights[:, None, None, :, :, None]).sum(4)  # (N, R, A, K, C)
    return (across * row_weights[:, :, :, None, None]).sum(2)  # (N, R, K, C)


def integral_hwc(frame: Any) -> Any:
    """(H, W, C) -> (H + 1, W + 1, C) float64 summed-area table (exact for 8-bit frames of any size)."""
    import torch

    table = frame.double().cumsum(0).cumsum(1)
    return torch.nn.functional.pad(table, (0, 0, 1, 0, 1, 0))


def crop_resize_device(frame: Any, xyxy: np.ndarray, spec: CropSpec, table: Any | None = None) -> Any:
    """(N, spec.height, spec.width, C) uint8 crops of `frame` ((H, W, C) uint8, on its device), as
    engines/preprocess.py's `crop_resize` cuts them on the host. `table`: the frame's `integral_hwc`, to share it
    between the crop specs of one frame."""
    import torch

    height, width = int(frame.shape[0]), int(frame.shape[1])
    plan = crop_plan(np.asarray(xyxy, np.float32).reshape(-1, 4), spec, height, width)
    n = len(plan.empty)
    if n == 0 or plan.empty.all():
        return torch.zeros((n, spec.height, spec.width, frame.shape[2]), dtype=torch.uint8, device=frame.device)
    device = frame.device
    source = torch.from_numpy(plan.source).to(device)
    target = torch.from_numpy(plan.target).to(device)
    both_shrink = torch.from_numpy(plan.shrinks).to(device)  # INTER_AREA (by height, as the host decides)
    y = _axis(source[:, 1], source[:, 3], target[:, 1], target[:, 3] - target[:, 1], spec.height, both_shrink)
    x = _axis(source[:, 0], source[:, 2], target[:, 0], target[:, 2] - target[:, 0], spec.width, both_shrink)
    two_tap = _gather(frame, y["taps"], y["weights"], x["taps"], x["weights"])  # (N, h, w, C) float32
    area_boxes = both_shrink & (y["scale"] >= 1) & (x["scale"] >= 1)  # OpenCV's area path: no axis grows
    if bool(plan.shrinks.any()):
        table = integral_hwc(frame) if table is None else table
        h, w = spec.height, spec.width
        summed = _gather(table, y["corner_taps"], y["corner_weights"], x["corner_taps"], x["corner_weights"])
        rect = summed[:, h:, w:] - summed[:, :h, w:] - summed[:, h:, :w] + summed[:, :h, :w]
        area = (rect / (y["scale"] * x["scale"])[:, None, None, None]).float()
        pixels = torch.where(area_boxes[:, None, None, None], area, two_tap)
    else:
        pixels = two_tap
    inside = (y["inside"][:, :, None] & x["inside"][:, None, :])[..., None]
    inside &= ~torch.from_numpy(plan.empty).to(device)[:, None, None, None]
    return torch.where(inside, pixels.round().clamp(0, 255), torch.zeros_like(pixels)).to(torch.uint8)
