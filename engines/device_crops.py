"""Classifier crops cut on the device where the frame is (a GPU), all of a frame's objects in one batched pass: the
device's twin of engines/preprocess.py's `crop_resize`, on the same `crop_plan` (square, padding, letterbox,
black outside the frame).

Each crop resizes the part of its box inside the frame to the output pixels it covers, as OpenCV's `resize` does
on the host: INTER_AREA where the box shrinks (an area average where both axes shrink, read from an integral image
at the corners of each output pixel's source rectangle; OpenCV's two-tap "linear area" weights where one axis
grows), INTER_LINEAR where it grows (two taps per axis, pixel centres aligned). The host works out, in numpy,
which source pixels and weights every output pixel takes (a few KB: objects x output size x 2); the device only
gathers and sums, a fixed handful of kernels whatever the objects, and nothing waits for it. The crops of many
frames (a batch of requests, or of streams) are cut together, from the frames laid end to end, with the host's
arrays sent in one copy; so are the crops of several geometries (the classifiers' input sizes), each on the
largest geometry's canvas and cut to its own size after (one frame's crops for the face demo: 1.8 -> 1.2 ms of
host time on 2 CPU cores, `python -m bench.crop_host`). Pixels are within one level of OpenCV's (its arithmetic is
partly fixed point; tests/test_device_crops.py). Nothing here imports torch at module level.
"""

from __future__ import annotations

from collections.abc import Sequence
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


def _gather(flat: Any, rows: Any, row_weights: Any, cols: Any, col_weights: Any, channels: int) -> Any:
    """sum over a, b of row_weights[n, r, a] * col_weights[n, c, b] * flat[rows[n, r, a] + cols[n, c, b] + ch]: (N,
    R, K, C), one gather and two contractions for every crop of every frame. `flat` is every frame's pixels end to
    end (H, W, C row-major each); `rows` are element offsets of source rows (the frame's own offset included),
    `cols` of source columns."""
    import torch

    channel = torch.arange(channels, device=flat.device)
    index = rows[:, :, :, None, None, None] + cols[:, None, None, :, :, None] + channel  # (N, R, A, K, B, C)
    pixels = flat[index].to(row_weights.dtype)
    across = (pixels * col_weights[:, None, None, :, :, None]).sum(4)  # (N, R, A, K, C)
    return (across * row_weights[:, :, :, None, None]).sum(2)  # (N, R, K, C)


class _Upload:
    """Host arrays gathered into one buffer and sent to the device in one copy (through page-locked memory on a
    GPU, without waiting): a frame's crops needed nine small copies, each its own page-locked allocation."""

    _ALIGN = 8

    def __init__(self) -> None:
        self._parts: list[np.ndarray] = []

    def add(self, array: np.ndarray) -> int:
        self._parts.append(np.ascontiguousarray(array))
        return len(self._parts) - 1

    def send(self, device: Any) -> list[Any]:
        import torch

        offsets, size = [], 0
        for part in self._parts:
            offsets.append(size)
            size += -(-part.nbytes // self._ALIGN) * self._ALIGN
        packed = np.zeros(max(size, self._ALIGN), np.uint8)
        for part, offset in zip(self._parts, offsets):
            packed[offset : offset + part.nbytes] = part.reshape(-1).view(np.uint8)
        host = torch.from_numpy(packed)
        on_device = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host
        out = []
        for part, offset in zip(self._parts, offsets):
            out.append(on_device[offset : offset + part.nbytes].view(_torch_dtype(part.dtype)).reshape(part.shape))
        return out


def _torch_dtype(dtype: np.dtype) -> Any:
    import torch

    return {np.dtype(np.int64): torch.int64, np.dtype(np.float32): torch.float32,
            np.dtype(np.float64): torch.float64, np.dtype(np.bool_): torch.bool}[dtype]


def crop_resize_device(frame: Any, xyxy: np.ndarray, spec: CropSpec) -> Any:
    """(N, spec.height, spec.width, C) uint8 crops of `frame` ((H, W, C) uint8, on its device), as
    engines/preprocess.py's `crop_resize` cuts them on the host."""
    return crop_resize_device_many([frame], [xyxy], spec)


def crop_resize_device_many(frames: Sequence[Any], xyxys: Sequence[np.ndarray], spec: CropSpec) -> Any:
    """The crops of every frame's boxes, frame after frame, in one pass: (sum of N, spec.height, spec.width, C)
    uint8 on the frames' device (all frames on one device, any sizes). The same pixels as `crop_resize_device`
    frame by frame, in a fixed number of launches and one host-to-device copy whatever the frames."""
    return crop_resize_device_specs(frames, [xyxys], [spec])[0]


def crop_resize_device_specs(frames: Sequence[Any], xyxys_by_spec: Sequence[Sequence[np.ndarray]],
                             specs: Sequence[CropSpec]) -> list[Any]:
    """`crop_resize_device_many` for several crop geometries in one pass: per spec k, the crops of every frame's
    boxes `xyxys_by_spec[k][frame]`, (sum of N, height, width, C) uint8. Every geometry's boxes are planned and
    gathered together, each on the largest geometry's canvas (its pixels past its own size are cut away after), so
    that the classifiers' geometries cost the launches and the one upload of a single geometry."""
    import torch

    if len(xyxys_by_spec) != len(specs):
        raise ValueError(f"{len(specs)} crop specs but {len(xyxys_by_spec)} lists of boxes")
    for xyxys in xyxys_by_spec:
        if len(frames) != len(xyxys):
            raise ValueError(f"{len(frames)} frames but {len(xyxys)} box arrays")
    boxes = [[np.asarray(b, np.float32).reshape(-1, 4) for b in xyxys] for xyxys in xyxys_by_spec]
    with torch.inference_mode():
        return _cut(frames, boxes, list(specs))


def _cut(frames: Sequence[Any], boxes: list[list[np.ndarray]], specs: list[CropSpec]) -> list[Any]:
    import torch

    if not frames:
        raise ValueError("no frames to cut crops from")
    device, channels = frames[0].device, int(frames[0].shape[2])
    shapes = [tuple(int(d) for d in f.shape) for f in frames]
    if any(f.device != device for f in frames) or any(s[2] != channels for s in shapes):
        raise ValueError("frames to cut crops from together must share one device and channel count")
    heights, widths = np.array([s[0] for s in shapes], np.int64), np.array([s[1] for s in shapes], np.int64)
    plans, frame_ofs = [], []
    for xyxys, spec in zip(boxes, specs):  # every frame's boxes of a geometry planned at once
        frame_of = np.repeat(np.arange(len(frames)), [len(b) for b in xyxys])
        plans.append(crop_plan(np.concatenate(xyxys), spec, heights[frame_of], widths[frame_of]))
        frame_ofs.append(frame_of)
    counts = [len(plan.empty) for plan in plans]
    tall, wide = max(spec.height for spec in specs), max(spec.width for spec in specs)  # the shared canvas
    frame_of = np.concatenate(frame_ofs)
    source = np.concatenate([plan.source for plan in plans])
    target = np.concatenate([plan.target for plan in plans])
    empty = np.concatenate([plan.empty for plan in plans])
    shrinks = np.concatenate([plan.shrinks for plan in plans])  # INTER_AREA: by height, as the host decides
    n = len(empty)
    if n == 0 or empty.all():
        return [torch.zeros((count, spec.height, spec.width, channels), dtype=torch.uint8, device=device)
                for count, spec in zip(counts, specs)]
    used = np.unique(frame_of[~empty]).tolist()  # frames with something to cut: the only ones gathered from
    y = _axis(source[:, 1], source[:, 3], target[:, 1], target[:, 3] - target[:, 1], tall, shrinks)
    x = _axis(source[:, 0], source[:, 2], target[:, 0], target[:, 2] - target[:, 0], wide, shrinks)
    area = shrinks & (y.scale >= 1) & (x.scale >= 1) & ~empty  # OpenCV's area path: no axis grows
    inside = y.inside[:, :, None] & x.inside[:, None, :] & ~empty[:, None, None]

    # every frame used, end to end: element offsets of each frame and of each of its rows
    sizes = np.array([shapes[i][0] * shapes[i][1] * channels for i in used], np.int64)
    start = np.zeros(len(frames), np.int64)
    start[used] = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    row_stride = (widths * channels)[frame_of]
    upload = _Upload()
    slots = [upload.add(y.taps * row_stride[:, None, None] + start[frame_of][:, None, None]), upload.add(y.weights),
             upload.add(x.taps * channels), upload.add(x.weights), upload.add(inside)]
    area_slots = _area_plan(upload, len(frames), frame_of, source, area, y, x, channels) if area.any() else None
    sent = upload.send(device)
    rows, row_w, cols, col_w, inside_d = (sent[i] for i in slots)
    flat = frames[used[0]].reshape(-1) if len(used) == 1 else torch.cat([frames[i].reshape(-1) for i in used])
    pixels = _gather(flat, rows, row_w, cols, col_w, channels)  # (N, tall, wide, C) float32
    if area_slots is not None:
        pixels = torch.where(sent[area_slots.mask][:, None, None, None],
                             _area(frames, area_slots, sent, tall, wide, channels), pixels)
    crops = torch.where(inside_d[..., None], pixels.round().clamp(0, 255), 0.0).to(torch.uint8)
    return [part if (spec.height, spec.width) == (tall, wide) else part[:, : spec.height, : spec.width].contiguous()
            for part, spec in zip(crops.split(counts), specs)]


@dataclass(frozen=True)
class _AreaSlots:
    """Where the area path's arrays are in the upload, and the part of each frame its integral image covers."""

    parts: list[tuple[int, int, int, int, int]]  # (frame, y0, x0, y1, x1) of each frame with area crops
    padded: tuple[int, int] | None  # every part's table in one (height, width) block, or each its own size
    rows: int
    row_weights: int
    cols: int
    col_weights: int
    scale: int
    mask: int


def _area_plan(upload: _Upload, frames: int, frame_of: np.ndarray, source: np.ndarray, area: np.ndarray, y: _Axis,
               x: _Axis, channels: int) -> _AreaSlots:
    """The area crops read integral images of the part of their frame that their boxes cover (exact in int64 for
    any frame), laid end to end as the frames are: each output pixel's source span's corners as element offsets
    into them. Rows of boxes not on the area path point at offset 0 and are ignored by the caller."""
    parts = []
    offset, width = np.zeros(frames, np.int64), np.ones(frames, np.int64)
    top, left = np.zeros(frames, np.int64), np.zeros(frames, np.int64)
    extent_y, extent_x = np.zeros(frames, np.int64), np.zeros(frames, np.int64)
    for frame in np.unique(frame_of[area]).tolist():
        mine = source[area & (frame_of == frame)]
        y0, x0, y1, x1 = int(mine[:, 1].min()), int(mine[:, 0].min()), int(mine[:, 3].max()), int(mine[:, 2].max())
        parts.append((frame, y0, x0, y1, x1))
        top[frame], left[frame], extent_y[frame], extent_x[frame] = y0, x0, y1 - y0, x1 - x0
    # each part's table has a zero row and column first; laid in blocks of one size (one cumulative sum for all,
    # a few launches whatever the frames) unless that would take more than twice the memory of their own sizes
    tall, wide = int(max(extent_y[f] for f, *_ in parts)), int(max(extent_x[f] for f, *_ in parts))
    own = sum(int((extent_y[f] + 1) * (extent_x[f] + 1)) for f, *_ in parts)
    padded = (tall, wide) if len(parts) > 1 and len(parts) * (tall + 1) * (wide + 1) <= 2 * own else None
    total = 0
    for frame, *_ in parts:
        block = (tall + 1, wide + 1) if padded else (int(extent_y[frame]) + 1, int(extent_x[frame]) + 1)
        offset[frame], width[frame] = total, block[1]
        total += block[0] * block[1] * channels
    f, keep = frame_of, area[:, None, None]
    rows = np.clip(y.corners - top[f][:, None, None], 0, extent_y[f][:, None, None])
    cols = np.clip(x.corners - left[f][:, None, None], 0, extent_x[f][:, None, None])
    rows = np.where(keep, rows * (width[f] * channels)[:, None, None] + offset[f][:, None, None], 0)
    cols = np.where(keep, cols * channels, 0)
    return _AreaSlots(parts, padded, upload.add(rows), upload.add(y.corner_weights), upload.add(cols),
                      upload.add(x.corner_weights), upload.add(np.where(area, y.scale * x.scale, 1.0)),
                      upload.add(area))


def _area(frames: Sequence[Any], slots: _AreaSlots, sent: list[Any], h: int, w: int, channels: int) -> Any:
    """Area averages for every crop from the integral images of the parts `_area_plan` chose."""
    import torch

    if slots.padded is not None:  # every part in one block of zeros, summed together
        block = torch.zeros((len(slots.parts), *slots.padded, channels), dtype=torch.int64, device=frames[0].device)
        for k, (frame, y0, x0, y1, x1) in enumerate(slots.parts):
            block[k, : y1 - y0, : x1 - x0] = frames[frame][y0:y1, x0:x1]
        flat = torch.nn.functional.pad(block.cumsum(1).cumsum(2), (0, 0, 1, 0, 1, 0)).reshape(-1).double()
    else:
        tables = []
        for frame, y0, x0, y1, x1 in slots.parts:
            part = frames[frame][y0:y1, x0:x1].to(torch.int64)
            tables.append(torch.nn.functional.pad(part.cumsum(0).cumsum(1), (0, 0, 1, 0, 1, 0)).reshape(-1))
        flat = (tables[0] if len(tables) == 1 else torch.cat(tables)).double()
    summed = _gather(flat, sent[slots.rows], sent[slots.row_weights], sent[slots.cols], sent[slots.col_weights],
                     channels)  # (N, 2h, 2w, C)
    rect = summed[:, h:, w:] - summed[:, :h, w:] - summed[:, h:, :w] + summed[:, :h, :w]
    return (rect / sent[slots.scale][:, None, None, None]).float()
