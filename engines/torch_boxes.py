"""Box and pixel operations of the GPU-resident MTCNN, in torch, on whatever device the tensors are.

- `greedy_nms`: exact greedy non-maximum suppression for many groups at once (frames, pyramid levels), the
  same answer as OpenCV's `NMSBoxes` (IoU) or MTCNN's min-area overlap, without a loop over boxes: the
  greedy result is the one fixed point of "keep a box unless an earlier kept box of its group overlaps it",
  which a few matrix passes reach.
- `resize_weights` / `crop_resize`: OpenCV's `resize(..., INTER_AREA)` as two small matrix products per box
  (the area weights where both axes shrink, OpenCV's linear-area weights otherwise), so the pyramid levels
  and the R-Net/O-Net patches are cut and resized on the device in a few launches.

Nothing here imports torch at module level: the numpy cascade does not need it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_MAX_MATRIX_BOXES = 2048  # beyond this the K x K overlap matrices get large (32 MB each): NMS runs on the host
_WINDOW_ELEMENTS = 1 << 25  # floats of gathered pixel windows per crop chunk (128 MB)
_AREA_EPSILON = 1e-3  # OpenCV's resizeArea ignores partial pixel overlaps up to this


def greedy_nms(boxes: Any, scores: Any, groups: Any, threshold: float, overlap: str = "iou") -> Any:
    """Indices of the boxes greedy NMS keeps within each group, ordered by group, then score (descending),
    then index (ties keep the earlier box first, as OpenCV's stable sort does).

    `overlap`: "iou" (OpenCV's NMSBoxes on float rectangles: intersection over union, in float64) or "min"
    (MTCNN's final NMS: pixel-inclusive intersection over the smaller area, in float32, as engines/mtcnn.py's
    nms_min). A box is dropped when its overlap with a kept box is above `threshold`."""
    import torch

    n = int(scores.shape[0])
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=scores.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    order = order[torch.sort(groups[order], stable=True).indices]
    if n > _MAX_MATRIX_BOXES:
        return order[_host_nms(boxes[order], scores[order], groups[order], threshold, overlap)]
    b, g = boxes[order], groups[order]
    suppresses = _overlaps(b, b, overlap) > threshold
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


def _overlaps(a: Any, b: Any, overlap: str) -> Any:
    """(len(a), len(b)) overlap of every pair of x1 y1 x2 y2 boxes."""
    import torch

    if overlap == "iou":
        a, b = a[:, :4].double(), b[:, :4].double()
        area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
        area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        w = (torch.minimum(a[:, None, 2], b[None, :, 2]) - torch.maximum(a[:, None, 0], b[None, :, 0])).clamp(min=0)
        h = (torch.minimum(a[:, None, 3], b[None, :, 3]) - torch.maximum(a[:, None, 1], b[None, :, 1])).clamp(min=0)
        inter = w * h
        total = area_a[:, None] + area_b[None, :]
        # OpenCV: two empty rectangles overlap fully (jaccard distance 0)
        return torch.where(total <= np.finfo(np.float64).eps, torch.ones_like(inter), inter / (total - inter))
    if overlap == "min":
        a, b = a[:, :4].float(), b[:, :4].float()
        area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)
        area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
        w = (torch.minimum(a[:, None, 2], b[None, :, 2]) - torch.maximum(a[:, None, 0], b[None, :, 0]) + 1).clamp(min=0)
        h = (torch.minimum(a[:, None, 3], b[None, :, 3]) - torch.maximum(a[:, None, 1], b[None, :, 1]) + 1).clamp(min=0)
        return w * h / torch.minimum(area_a[:, None], area_b[None, :])
    raise ValueError(f"overlap must be 'iou' or 'min', got {overlap!r}")


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
    both axes, with area-shaped coefficients)."""
    import torch

    device = lo.device
    length = (hi - lo).double()[:, None, None]  # (N, 1, 1)
    # OpenCV: inv_scale = dsize / ssize, scale = 1 / inv_scale, in float64 (tensor / tensor: a python number
    # over a tensor is a reciprocal and a product in torch, one rounding off, which moves floor() at integers)
    inv_scale = torch.full_like(length, float(size)) / length
    scale = torch.ones_like(inv_scale) / inv_scale  # source pixels per output pixel
    d = torch.arange(size, device=device, dtype=torch.float64)[None, :, None]  # (1, size, 1)
    p = torch.arange(window, device=device, dtype=torch.float64)[None, None, :]  # (1, 1, window)
    if area:  # the share of output pixel d's span [d*scale, (d+1)*scale) that source pixel p covers
        start = d * scale
        covered = (torch.minimum(start + scale, p + 1) - torch.maximum(start, p)).clamp(min=0)
        covered = covered * (covered > _AREA_EPSILON)
        return (covered / torch.minimum(scale, length - start)).float()
    # linear-area: taps sx and sx + 1 (clamped to the span) with weights 1 - fx and fx
    sx = torch.floor(d * scale)
    fx = ((d + 1) - (sx + 1) * inv_scale).float().double()
    fx = torch.where(fx <= 0, torch.zeros_like(fx), fx - torch.floor(fx))
    last = length - 1
    return ((1 - fx) * (p == torch.minimum(sx, last)) + fx * (p == torch.minimum(sx + 1, last))).float()


def crop_resize(images: Any, frame_of: Any, boxes: Any, size: int) -> tuple[Any, Any]:
    """MTCNN's patches (engines/mtcnn.py `_patches`) on the device: for each x1 y1 x2 y2 box (float) on
    `images[frame_of[i]]` ((B, 3, H, W) float32 RGB), the source region clipped as facenet-pytorch does,
    resized to `size` x `size` as cv2.INTER_AREA does. Returns (K, 3, size, size) float32 patches and the
    indices of the K boxes whose region is not empty.

    Pixels are gathered in square windows as large as the largest region of a chunk of boxes (boxes sorted by
    size, so windows fit their boxes), so memory and work follow the boxes' areas, not the image's."""
    import torch

    _, _, height, width = images.shape
    b = torch.trunc(boxes[:, :4]).long()
    x, y = b[:, 0].clamp(min=1), b[:, 1].clamp(min=1)
    ex, ey = b[:, 2].clamp(max=width), b[:, 3].clamp(max=height)
    spans = torch.stack([x - 1, ex, y - 1, ey], dim=1)  # lo_x, hi_x, lo_y, hi_y
    host = spans.cpu().numpy()  # one sync: the chunks are planned on the host
    widths, heights = host[:, 1] - host[:, 0], host[:, 3] - host[:, 2]
    kept = np.flatnonzero((heights > 0) & (widths > 0))
    out = images.new_empty((len(kept), 3, size, size))
    if not len(kept):
        return out, torch.from_numpy(kept).to(images.device)
    lengths = np.maximum(widths, heights)
    area = (widths >= size) & (heights >= size)
    # Weights for every box at once (they are small: size x longest span), one call per resize mode; x and y
    # spans side by side.
    longest = int(lengths[kept].max())
    weights = images.new_empty((len(boxes), 2, size, longest))
    for mode in (True, False):
        rows = kept[area[kept] == mode]
        if len(rows):
            index = torch.from_numpy(rows).to(images.device)
            lo, hi = spans[index][:, [0, 2]].reshape(-1), spans[index][:, [1, 3]].reshape(-1)
            weights[index] = resize_weights(lo, hi, size, longest, mode).reshape(len(rows), 2, size, longest)
    by_size = kept[np.argsort(-lengths[kept], kind="stable")]  # largest first: each chunk's window fits it
    steps = torch.arange(longest, device=images.device)
    start = 0
    while start < len(by_size):
        window = int(lengths[by_size[start]])
        count = max(1, min(len(by_size) - start, _WINDOW_ELEMENTS // (3 * window * window)))
        rows = by_size[start : start + count]
        start += count
        index = torch.from_numpy(rows).to(images.device)
        lo_x, lo_y = spans[index, 0], spans[index, 2]
        iy = (lo_y[:, None] + steps[:window]).clamp(max=height - 1)  # (n, window); past a span its weights are 0
        ix = (lo_x[:, None] + steps[:window]).clamp(max=width - 1)
        pixels = images[frame_of[index][:, None, None], :, iy[:, :, None], ix[:, None, :]]  # (n, window, window, 3)
        w = weights[index, :, :, :window]
        patches = torch.einsum("nsxc,ntx->ncst", torch.einsum("nsy,nyxc->nsxc", w[:, 1], pixels), w[:, 0])
        out[torch.from_numpy(np.searchsorted(kept, rows)).to(images.device)] = patches
    return out, torch.from_numpy(kept).to(images.device)


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
