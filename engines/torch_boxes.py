"""Box and pixel operations of the GPU-resident MTCNN, in torch, on whatever device the tensors are.

- `greedy_nms`: exact greedy non-maximum suppression for many groups at once (frames, pyramid levels), the
  same answer as OpenCV's `NMSBoxes` (IoU) or MTCNN's min-area overlap, without a loop over boxes: the
  greedy result is the one fixed point of "keep a box unless an earlier kept box of its group overlaps it",
  which a few matrix passes reach.
- `resize_weights` / `resize_image`: OpenCV's `resize(..., INTER_AREA)` of a whole image as two matrix
  products (the pyramid levels), and `crop_resize`: the same resize for every R-Net/O-Net box at once, from
  the frame's integral image, in a fixed number of launches whatever the boxes.

Nothing here imports torch at module level: the numpy cascade does not need it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_MAX_MATRIX_BOXES = 2048  # beyond this the K x K overlap matrices get large (32 MB each): NMS runs on the host
AREA_EPSILON = 1e-3  # OpenCV's resizeArea ignores partial pixel overlaps up to this
# overlap entries `suppression` computes at once: its float64 temporaries (corners, intersections, areas) cost about
# 40 bytes an entry, so a block holds about 160 MB of them (the fixed-shape cascade's P-Net NMS over 16 frames of
# 2048 candidates is 67 M entries: 2.7 GB at once, and each replica's graphs keep theirs)
_SUPPRESSION_BLOCK = 1 << 22


def greedy_nms(boxes: Any, scores: Any, groups: Any, threshold: float, overlap: str = "iou") -> Any:
    """Indices of the boxes greedy NMS keeps within each group, ordered by group, then score (descending),
    then index (ties keep the earlier box first, as OpenCV's stable sort does).

    `overlap`: "iou" (OpenCV's NMSBoxes on float rectangles: intersection over union, in float64) or "min"
    (MTCNN's final NMS: pixel-inclusive intersection over the smaller area, in float32, as engines/mtcnn.py's
    nms_min). A box is dropped when its overlap with a kept box is above `threshold`."""
    import torch

    n = int(scores.shape[0])
    if n <= 1:
        return torch.arange(n, dtype=torch.int64, device=scores.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    order = order[torch.sort(groups[order], stable=True).indices]
    if n > _MAX_MATRIX_BOXES:
        return order[_host_nms(boxes[order], scores[order], groups[order], threshold, overlap)]
    b, g = boxes[order], groups[order]
    suppresses = suppression(b, overlap, threshold)
    suppresses &= g[:, None] == g[None, :]
    suppresses &= torch.ones(n, n, dtype=torch.bool, device=b.device).tril(-1)  # only earlier boxes suppress
    keep = torch.ones(n, dtype=torch.bool, device=b.device)
    steps, done = 2, 0
    while done <= n:
        for _ in range(steps):
            previous, keep = keep, ~(suppresses & keep[None, :]).any(dim=1)
        done += steps
        if torch.equal(previous, keep):  # a fixed point: the greedy answer
            break
        steps *= 2
    return order[keep]


def suppression(boxes: Any, overlap: str, threshold: float, block: int = _SUPPRESSION_BLOCK) -> Any:
    """`overlaps(boxes, overlap) > threshold` as a bool (..., K, K), computed a few leading rows (frames) at a time
    when the whole would pass `block` entries: the same answer, with each block's float64 temporaries freed before
    the next block's (in a CUDA graph's capture too: its pool reuses them)."""
    import torch

    k = int(boxes.shape[-2])
    if boxes.dim() < 3 or boxes.shape[0] * k * k <= block:
        return overlaps(boxes, overlap) > threshold
    rows = max(1, block // max(k * k, 1))
    return torch.cat([overlaps(part, overlap) > threshold for part in boxes.split(rows)])


def overlaps(boxes: Any, overlap: str) -> Any:
    """(..., K, K) overlap of every pair of x1 y1 x2 y2 boxes of (..., K, 4+)."""
    import torch

    if overlap not in ("iou", "min"):
        raise ValueError(f"overlap must be 'iou' or 'min', got {overlap!r}")
    b = boxes[..., :4].double() if overlap == "iou" else boxes[..., :4].float()
    one = 0 if overlap == "iou" else 1  # "min" counts pixels inclusively
    corner_lo = torch.maximum(b[..., :, None, :2], b[..., None, :, :2])
    corner_hi = torch.minimum(b[..., :, None, 2:], b[..., None, :, 2:])
    inter = (corner_hi - corner_lo + one).clamp(min=0).prod(-1)
    area = (b[..., 2:] - b[..., :2] + one).prod(-1)
    if overlap == "min":
        return inter / torch.minimum(area[..., :, None], area[..., None, :])
    # OpenCV: two empty rectangles overlap fully (jaccard distance 0): 0 / 0 here
    return torch.nan_to_num(inter / (area[..., :, None] + area[..., None, :] - inter), nan=1.0)


def _host_nms(boxes: Any, scores: Any, groups: Any, threshold: float, overlap: str) -> Any:
    """The same NMS on the host, group by group (inputs already in group, score order): for box counts whose
    suppression matrix would not fit."""
    import torch

    from engines.mtcnn import nms, nms_min

    host_boxes, host_scores = boxes[:, :4].cpu().numpy(), scores.cpu().numpy()
    host_groups = groups.cpu().numpy()
    kept = []
    for group in np.unique(host_groups):
        rows = np.flatnonzero(host_groups == group)
        select = nms if overlap == "iou" else nms_min
        kept.append(rows[select(host_boxes[rows], host_scores[rows], threshold)])
    return torch.from_numpy(np.concatenate(kept)).to(boxes.device)


def resize_weights(lo: Any, hi: Any, size: int, window: int, area: bool) -> Any:
    """(N, size, window) weights that resize the source span [lo, hi) of each of N rows (its first pixel at
    window position 0) to `size` pixels as OpenCV's INTER_AREA does: `area` weights where both axes of the
    boxes shrink, OpenCV's linear-area weights otherwise (when an axis grows, OpenCV interpolates linearly on
    both axes, with area-shaped coefficients). Used for whole images (the pyramid); boxes go through
    `crop_resize`, which computes the same sums without a weight per source pixel."""
    import torch

    device = lo.device
    length, inv_scale, scale = _scales(lo, hi, size)
    length, inv_scale, scale = length[:, None, None], inv_scale[:, None, None], scale[:, None, None]
    d = torch.arange(size, device=device, dtype=torch.float64)[None, :, None]  # (1, size, 1)
    p = torch.arange(window, device=device, dtype=torch.float64)[None, None, :]  # (1, 1, window)
    if area:  # the share of output pixel d's span [d*scale, (d+1)*scale) that source pixel p covers
        start = d * scale
        covered = (torch.minimum(start + scale, p + 1) - torch.maximum(start, p)).clamp(min=0)
        covered = covered * (covered > AREA_EPSILON)
        return (covered / torch.minimum(scale, length - start)).float()
    tap0, tap1, fx = _linear_taps(d, scale, inv_scale, length)
    return ((1 - fx) * (p == tap0) + fx * (p == tap1)).float()


def _scales(lo: Any, hi: Any, size: int) -> tuple[Any, Any, Any]:
    """Span length, OpenCV's inv_scale = dsize / ssize and scale = 1 / inv_scale, in float64 (tensor / tensor:
    a python number over a tensor is a reciprocal and a product in torch, one rounding off, which moves
    floor() at integers). Empty spans count as one pixel (their boxes are dropped by the caller)."""
    import torch

    length = (hi - lo).clamp(min=1).double()
    inv_scale = torch.full_like(length, float(size)) / length
    return length, inv_scale, torch.ones_like(inv_scale) / inv_scale


def _linear_taps(d: Any, scale: Any, inv_scale: Any, length: Any) -> tuple[Any, Any, Any]:
    """OpenCV's INTER_AREA when the image grows on an axis: taps sx and sx + 1 (clamped to the span), weights
    1 - fx and fx, with sx = floor(d * scale) and fx = (d + 1) - (sx + 1) * inv_scale (0 if negative, else its
    fractional part), fx rounded to float as OpenCV stores it."""
    import torch

    sx = torch.floor(d * scale)
    fx = ((d + 1) - (sx + 1) * inv_scale).float().double()
    fx = torch.where(fx <= 0, torch.zeros_like(fx), fx - torch.floor(fx))
    last = length - 1
    return torch.minimum(sx, last), torch.minimum(sx + 1, last), fx


def integral_image(images: Any) -> Any:
    """(B, C, H, W) -> (B, C, H + 1, W + 1) float64 summed-area table: entry [y, x] is the sum of the pixels
    above and left of (y, x). Exact for 8-bit images of any size a frame can have (float64 holds integers up
    to 2^53)."""
    import torch

    table = images.double().cumsum(2).cumsum(3)
    return torch.nn.functional.pad(table, (1, 0, 1, 0))


def crop_resize(images: Any, frame_of: Any, boxes: Any, size: int, table: Any | None = None) -> tuple[Any, Any]:
    """MTCNN's patches (engines/mtcnn.py `_patches`) on the device: for each x1 y1 x2 y2 box (float) on
    `images[frame_of[i]]` ((B, 3, H, W) float32 RGB), the source region clipped as facenet-pytorch does,
    resized to `size` x `size` as cv2.INTER_AREA does. Returns (N, 3, size, size) float32 patches, one per box,
    and a mask of the boxes whose region is not empty (the numpy cascade drops the others; their patches
    here are meaningless).

    The work and the launches do not depend on the boxes' sizes and nothing waits for the device: where both
    axes shrink, each output pixel is an area average, the integral image (`table`, from `integral_image`:
    pass it when cutting several stages from one frame) evaluated at the corners of its source rectangle
    (the summed-area table of a piecewise-constant image is exactly bilinear between its lattice points, and
    OpenCV's rule that drops partial pixels of at most 1e-3 moves those corners to the pixel edge); where an
    axis grows, OpenCV's two-tap linear-area weights, four pixels gathered per output pixel."""
    import torch

    _, _, height, width = images.shape
    b = torch.trunc(boxes[:, :4]).long()
    lo = torch.stack([b[:, 1].clamp(min=1) - 1, b[:, 0].clamp(min=1) - 1], 1)  # (N, 2): y, x
    hi = torch.stack([b[:, 3].clamp(max=height), b[:, 2].clamp(max=width)], 1)
    kept = (hi > lo).all(1)
    length, inv_scale, scale = _scales(lo, hi, size)  # (N, 2) each
    grows = (length < size).any(1)  # OpenCV's area branch needs both axes to shrink (or keep their size)
    d = torch.arange(size, device=images.device, dtype=torch.float64)

    # where both axes shrink: area sums from the integral image
    start = d * scale[..., None]  # (N, 2, size), relative to lo
    end = start + scale[..., None]
    up, down = torch.ceil(start), torch.floor(end)
    start = torch.where(up - start <= AREA_EPSILON, up, start) + lo[..., None]
    end = torch.where(end - down <= AREA_EPSILON, down, end) + lo[..., None]
    corners = torch.cat([start, end], 2)  # (N, 2, 2 * size): the rectangles' top/left, then bottom/right edges
    # (1, 2, 1): y, x; made on the device by a kernel, not copied from the host, so a CUDA graph can hold it
    last = torch.where(torch.arange(2, device=images.device) == 0, height - 1, width - 1)[None, :, None]
    base = torch.floor(corners).clamp(max=last)
    frac = (corners - base)[..., None]
    two = torch.arange(2, device=images.device)
    taps = base.long()[..., None] + two  # (N, 2, 2s, 2): the lattice points around each corner
    table = integral_image(images) if table is None else table
    summed = _gather_separable(table, frame_of, taps, torch.cat([1 - frac, frac], 3))  # (N, 2s, 2s, C)
    s = size
    rect = summed[:, s:, s:] - summed[:, :s, s:] - summed[:, s:, :s] + summed[:, :s, :s]
    area = rect / (scale[:, 0] * scale[:, 1])[:, None, None, None]

    # where an axis grows: OpenCV's linear-area taps
    tap0, tap1, fx = _linear_taps(d, scale[..., None], inv_scale[..., None], length[..., None])
    taps = (torch.stack([tap0, tap1], 3) + lo[..., None, None]).long().clamp(max=last[..., None])  # empty boxes
    fx = fx.float()[..., None]
    linear = _gather_separable(images, frame_of, taps, torch.cat([1 - fx, fx], 3))  # (N, s, s, C)

    patches = torch.where(grows[:, None, None, None], linear, area.float())
    return patches.permute(0, 3, 1, 2).contiguous(), kept


def _gather_separable(source: Any, frame_of: Any, taps: Any, weights: Any) -> Any:
    """sum over a, b of weights_y[n, r, a] * weights_x[n, c, b] * source[frame_of[n], :, taps_y[n, r, a],
    taps_x[n, c, b]]: one gather and one contraction for every box. `taps` and `weights` are (N, 2, R, K)
    (axis 0 rows, axis 1 columns; K taps each); returns (N, R, R, channels)."""
    rows, cols = taps[:, 0], taps[:, 1]
    pixels = source[frame_of[:, None, None, None, None], :, rows[:, :, :, None, None], cols[:, None, None, :, :]]
    weights = weights.to(pixels.dtype)
    across = (pixels * weights[:, 1][:, None, None, :, :, None]).sum(4)  # (N, R, 2, X, C)
    return (across * weights[:, 0][:, :, :, None, None]).sum(2)


def image_resize_weights(height: int, width: int, out_height: int, out_width: int, device: Any) -> tuple[Any, Any]:
    """(out_height, H) and (out_width, W) weights: W_y @ image @ W_x.T is cv2.resize(image, INTER_AREA)."""
    import torch

    zero = torch.zeros(1, dtype=torch.int64, device=device)
    area = out_height <= height and out_width <= width
    return (resize_weights(zero, zero + height, out_height, height, area)[0],
            resize_weights(zero, zero + width, out_width, width, area)[0])


def resize_image(images: Any, weights: tuple[Any, Any]) -> Any:
    """(B, C, H, W) float32 resized by `image_resize_weights` (two matrix products)."""
    import torch

    wy, wx = weights
    return torch.matmul(torch.matmul(wy, images), wx.T)
