"""The MTCNN cascade in fixed shapes, so that a whole batch of frames, P-Net to O-Net, is one CUDA graph replay.

engines/mtcnn_torch.py's cascade follows the data: `nonzero` picks P-Net's candidates, each NMS loops until it
settles, R-Net and O-Net take exactly the boxes that passed. Every one of those waits for the device, and the
Python between them launches about 600 operations a batch: the host, not the card, bounds the detector (measured
on an H100: 4.95 ms of host CPU a frame in batches of 4, 17 synchronisations and 598 launches a batch).

Here every stage has a fixed number of slots per frame and a mask saying which hold a box:

- P-Net's candidates: the first `k1` cells (in cell order) whose face probability passes the threshold;
- each NMS: the exact greedy answer by a fixed number of matrix passes (torch_boxes.greedy_nms's fixed point),
  the last pass checked against the one before on the device;
- R-Net takes `k2` boxes a frame, O-Net `k3`, pooled over the frames of the batch (a crowded frame uses its
  neighbours' spare slots), moved to the front of their slots in order (a prefix sum).

So the work and the launches do not depend on the frame, nothing waits for the device, and the cascade captures
as one graph per frame size and batch. It gives the data-following cascade's faces exactly, in the same order,
as long as no stage had more boxes than its slots and every NMS settled within its passes; the replay says so
(`Outcome`), and the caller runs the data-following cascade for the frames of a replay that did not, and grows
the slots or passes that were short (`Limits.grown`) before capturing again. Slots are per frame, so a frame's
crowd costs its own slots, not its neighbours'.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from engines.mtcnn import PIXEL_OFFSET, PIXEL_SCALE, candidates, cell_boxes, landmarks_of, regress, square
from engines.torch_boxes import crop_resize, integral_image, suppression

ROW = 17  # a face's row: x1 y1 x2 y2 score, the 5 landmarks' x, y pairs (10), its frame, 1 where the slot holds one


POOLED = ("k2", "k3")  # the limits whose slots are pooled over a batch's frames (R-Net's and O-Net's)


@dataclass(frozen=True)
class Limits:
    """Slots per frame at each stage and NMS passes. Every slot costs kernel time whether it holds a box or not
    (R-Net's and O-Net's patches most), so the defaults are about what a 720p camera frame with two faces needs
    (P-Net passes 176-184 of its cells, 87-89 boxes go to R-Net, 13-15 to O-Net; photos: 85-648, 47-324, 8-26;
    every NMS settled within 6 passes): a frame that needs more is answered by the data-following cascade once,
    and the limit doubles for its size and batch (H100, batches of 16 720p frames: twice these slots cost 1.80
    against 1.27 ms of kernels a frame for the data-following cascade)."""

    k1: int = 256  # P-Net cells past the first threshold
    k2: int = 128  # boxes into R-Net, per frame of the batch (one pool of k2 * frames slots)
    k3: int = 24  # boxes into O-Net, likewise
    passes_level: int = 8  # NMS of P-Net's boxes within each pyramid level
    passes_frame: int = 4  # NMS of P-Net's boxes across the levels of a frame
    passes_rnet: int = 4
    passes_onet: int = 4

    def grown(self, short: list[str], most: Limits, frames: int, needed: dict[str, int] | None = None) -> Limits:
        """Each limit named in `short` doubled, up to `most`'s (k2 and k3 there are per batch of `frames`: their
        slots are pooled, and what they cost is the pool's size); a slot count doubled as often as it takes to
        hold what the run `needed` of it (per frame), so that a crowded size is short once, not once a doubling."""
        def top(name: str) -> int:
            return getattr(most, name) // frames if name in POOLED else getattr(most, name)

        def doubled(name: str) -> int:
            value = getattr(self, name) * 2
            while value < (needed or {}).get(name, 0):
                value *= 2
            return value

        return replace(self, **{name: max(getattr(self, name), min(doubled(name), top(name))) for name in short})


# The largest limits: what a slot costs in memory grows with them (P-Net's NMS holds a (frames, k1, k1) bool
# matrix, its float64 overlaps computed a few frames at a time (torch_boxes.suppression), R-Net's and O-Net's patches
# gather 221 and 884 KB of float64 a box: about 1 GB each at k2 4096 and k3 1024), and a graph keeps its memory:
# four replicas on one H100, each with graphs for 1 to 16 frames at k1 2048, ran out of it while the overlaps were
# computed for all frames at once (docs/benchmarks.md, run 10). k1 is per frame; k2 and k3 are per batch (one
# frame may have them all). k1 2048: the eight-face photo at its 1280x640 working size passes 1003 P-Net cells in
# fp32, and in fp16 on an H100 it gave up the fixed shapes at 1024 (docs/benchmarks.md, run 9); its R-Net slots, not
# k1, set its host memory (2.3 GB at its peak for 4 frames on the CPU device, at k1 1024 and 2048 alike). A batch
# that needs more (a crowd, or noise that passes P-Net everywhere) stays with the data-following cascade, which
# takes any count (its NMS moves to the host past 2048 boxes).
MOST = Limits(k1=2048, k2=4096, k3=1024, passes_level=64, passes_frame=64, passes_rnet=64, passes_onet=64)
_LIMITS_FIELDS = tuple(f.name for f in fields(Limits))  # `cascade`'s flags come in this order
_NEEDED = ("k1", "k2", "k3")  # then the slots each stage needed


@dataclass(frozen=True)
class Outcome:
    """What one run of `cascade` gave, read on the host: the face rows, and the limits that were short (empty:
    the answer is exact)."""

    rows: Any  # (n, 16) float32 numpy: box, score, landmarks, the frame's index in the batch; by frame, then score
    short: list[str]
    needed: dict[str, int]  # slots the run's boxes took at each stage, per frame (k2, k3: the pool's share)


def cascade(detector: Any, rgb: Any, pyramid: Any, limits: Limits) -> Any:
    """The cascade over (B, 3, H, W) float32 RGB frames of one size, in fixed shapes: one flat float32 tensor,
    (k3 * B, ROW) face rows, one flag per limit (1: it was short), then the slots per frame that P-Net's, R-Net's
    and O-Net's boxes needed (the pooled stages' over the frames, rounded up). `detector`: the TorchMtcnn whose nets,
    parameters and P-Net maps this uses. Launches only; nothing here waits for the device."""
    import torch

    t1, t2, t3 = detector.params.thresholds
    frames = int(rgb.shape[0])
    table = integral_image(rgb)
    prob, reg = detector._pnet_maps(rgb, pyramid)  # (B, M), (B, 4, M)

    # Stage 1: the first k1 passing cells of each frame, in cell order (nonzero's order), then NMS per level.
    cells = int(prob.shape[1])
    k1 = min(limits.k1, cells)
    passing = prob >= t1
    order = torch.arange(cells, device=rgb.device)
    key = torch.where(passing, order, order + cells)
    cell = torch.topk(key, k1, dim=1, largest=False, sorted=True).indices  # (B, k1)
    valid = passing.gather(1, cell)
    needed_k1 = passing.sum(1).max()
    short_k1 = needed_k1 > k1
    x1, y1, x2, y2 = cell_boxes(pyramid.xs[cell], pyramid.ys[cell], pyramid.scales[cell], torch)
    boxes = torch.cat([torch.stack([x1, y1, x2, y2, prob.gather(1, cell)], 2),
                       reg.gather(2, cell[:, None, :].expand(-1, 4, -1)).permute(0, 2, 1)], 2)  # (B, k1, 9)
    boxes, valid, settled_level = _nms(boxes, boxes[..., 4], pyramid.level_of[cell], valid, 0.5, "iou",
                                       limits.passes_level)
    # across the levels of the frame: by score, ties in the order the levels left them
    boxes, valid, settled_frame = _nms(boxes, boxes[..., 4], None, valid, 0.7, "iou", limits.passes_frame)
    boxes = _rows(boxes, lambda b: square(candidates(b, torch), torch))  # (B, k1, 5)

    # R-Net and O-Net take the boxes of every frame of the batch in one pool of slots (as the data-following
    # cascade takes them in one batch), each box with its frame: a frame with many faces uses its neighbours'
    # spare slots. Their NMS is per frame (the frame is the group).
    frame_of = torch.arange(frames, device=rgb.device, dtype=boxes.dtype)[:, None, None].expand(-1, boxes.shape[1], 1)
    boxes = torch.cat([boxes, frame_of], 2).reshape(1, -1, 6)  # (1, B * k1, 6): frame-major, each frame in order
    valid = valid.reshape(1, -1)

    # Stage 2: R-Net refines and rejects.
    boxes, valid, needed_k2 = _compact(boxes, valid, limits.k2 * frames)
    short_k2 = needed_k2 > limits.k2 * frames
    frame_of = boxes[..., 5].long()
    score, out, passed = _refine(detector.rnet, rgb, table, boxes, valid, frame_of, 24, t2)
    boxes = torch.cat([boxes[..., :4], score[..., None], out["regression"], boxes[..., 5:6]], 2)
    boxes, valid, settled_rnet = _nms(boxes, score, frame_of, passed, 0.7, "iou", limits.passes_rnet)
    boxes = torch.cat([_rows(boxes, lambda b: square(regress(b[:, :5], b[:, 5:9], torch), torch)), boxes[..., 9:]], 2)

    # Stage 3: O-Net gives final boxes, scores and landmarks.
    boxes, valid, needed_k3 = _compact(boxes, valid, limits.k3 * frames)
    short_k3 = needed_k3 > limits.k3 * frames
    frame_of = boxes[..., 5].long()
    score, out, passed = _refine(detector.onet, rgb, table, boxes, valid, frame_of, 48, t3)
    boxes = torch.cat([boxes[..., :4], score[..., None]], 2)
    points = _rows(torch.cat([boxes, out["landmarks"]], 2),
                   lambda b: landmarks_of(b[:, :5], b[:, 5:], torch).reshape(-1, 10))
    boxes = _rows(torch.cat([boxes, out["regression"]], 2), lambda b: regress(b[:, :5], b[:, 5:], torch))
    rows = torch.cat([boxes, points, frame_of[..., None].to(boxes.dtype)], 2)  # (1, k3 * B, 16)
    rows, valid, settled_onet = _nms(rows, rows[..., 4], frame_of, passed, 0.7, "min", limits.passes_onet)

    flags = torch.stack([short_k1, short_k2, short_k3, ~settled_level, ~settled_frame, ~settled_rnet,
                         ~settled_onet]).float()
    needed = torch.stack([needed_k1, (needed_k2 + frames - 1) // frames, (needed_k3 + frames - 1) // frames]).float()
    return torch.cat([torch.cat([rows, valid[..., None].to(rows.dtype)], 2).reshape(-1), flags, needed])


def read(flat: Any) -> Outcome:
    """`cascade`'s output, on the host (numpy), as the faces it holds, the limits that were short and the slots
    each stage needed."""
    tail = len(_LIMITS_FIELDS) + len(_NEEDED)
    flags, needed = flat[-tail : -len(_NEEDED)], flat[-len(_NEEDED):]
    rows = flat[:-tail].reshape(-1, ROW)
    return Outcome(rows[rows[:, ROW - 1] > 0.5, : ROW - 1],
                   [name for name, flag in zip(_LIMITS_FIELDS, flags) if flag > 0.5],
                   {name: int(round(float(count))) for name, count in zip(_NEEDED, needed)})


def _rows(boxes: Any, fn: Any) -> Any:
    """`fn` of (N, C) rows applied to (B, K, C) slots."""
    frames, slots = boxes.shape[:2]
    out = fn(boxes.reshape(frames * slots, -1))
    return out.reshape(frames, slots, -1)


def _nms(boxes: Any, scores: Any, groups: Any | None, valid: Any, threshold: float, overlap: str,
         passes: int) -> tuple[Any, Any, Any]:
    """Greedy NMS within each frame (and within `groups` of it, when given) over slots: the boxes reordered as
    greedy NMS orders them (group, then score descending, ties in slot order; empty slots last), which of them
    it keeps, and whether `passes` matrix passes reached the greedy answer (the last pass changed nothing)."""
    import torch

    frames, slots = scores.shape
    ranked = torch.where(valid, scores, torch.full_like(scores, -float("inf")))
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
    if groups is not None:
        last = torch.iinfo(torch.int64).max
        grouped = torch.where(valid, groups, torch.full_like(groups, last)).gather(1, order)
        order = order.gather(1, torch.sort(grouped, dim=1, stable=True).indices)
    boxes = boxes.gather(1, order[..., None].expand(-1, -1, boxes.shape[2]))
    valid = valid.gather(1, order)
    suppresses = suppression(boxes, overlap, threshold)
    if groups is not None:
        mine = groups.gather(1, order)
        suppresses &= mine[:, :, None] == mine[:, None, :]
    # only an earlier box in the order suppresses, and only a box that is there
    suppresses &= torch.ones(slots, slots, dtype=torch.bool, device=scores.device).tril(-1)
    suppresses &= valid[:, None, :]
    keep = previous = valid
    for _ in range(max(passes, 1)):
        previous, keep = keep, valid & ~(suppresses & keep[:, None, :]).any(2)
    return boxes, keep, (previous == keep).all()


def _compact(boxes: Any, valid: Any, slots: int) -> tuple[Any, Any, Any]:
    """The boxes of `valid` slots moved to the front, in order, into `slots` slots per frame (the rest zero), their
    mask, and the most boxes a frame had (more than `slots`: some did not fit)."""
    import torch

    frames, _, columns = boxes.shape
    rank = valid.long().cumsum(1) - 1
    target = torch.where(valid & (rank < slots), rank, torch.full_like(rank, slots))  # the rest: one spare slot
    out = boxes.new_zeros((frames, slots + 1, columns))
    out.scatter_(1, target[..., None].expand(-1, -1, columns), boxes)
    count = valid.sum(1)
    kept = torch.arange(slots, device=boxes.device)[None, :] < count[:, None]
    return out[:, :slots], kept, count.max()


def _refine(engine: Any, rgb: Any, table: Any, boxes: Any, valid: Any, frame_of: Any, size: int,
            threshold: float) -> tuple[Any, dict[str, Any], Any]:
    """A refinement net over the patch of every slot ((1, N, 4+) boxes on frames `frame_of`): (1, N) scores, its
    (1, N, ...) outputs, and which slots hold a box whose region is not empty and that it scores above
    `threshold`."""
    patches, kept = crop_resize(rgb, frame_of.reshape(-1), boxes.reshape(-1, boxes.shape[2]), size, table)
    outputs = engine.forward_tensors([(patches - PIXEL_OFFSET) * PIXEL_SCALE])
    out = {spec.name: value.reshape(1, len(patches), -1) for spec, value in zip(engine.outputs, outputs)}
    score = out["probability"][..., 1]
    return score, out, valid & kept.reshape(valid.shape) & (score > threshold)
