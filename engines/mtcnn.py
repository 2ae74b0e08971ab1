"""MTCNN face detector cascade (P-Net -> R-Net -> O-Net) in numpy/OpenCV over any Engine.

A faithful port of facenet-pytorch 2.6.0's `detect_face` (MIT): same image pyramid, box
regression, squaring, NMS thresholds and landmark arithmetic, so its pretrained weights give
the same faces. Networks take RGB float32 NCHW, normalised as (x - 127.5) / 128.

The box arithmetic (`square`, `regress`, `candidates`, `landmarks_of`, `cell_boxes`) takes its array module
as `xp`, so the GPU-resident cascade (engines/mtcnn_torch.py) runs the very same functions on torch tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import cv2
import numpy as np

from engines.base import Engine
from engines.batching import bucket_samples, pad_batch
from engines.detections import Detections

STAGE_BATCH = 256  # candidates per R-Net / O-Net call
PIXEL_OFFSET, PIXEL_SCALE = 127.5, 0.0078125  # the nets' input: (x - 127.5) / 128


@dataclass(frozen=True)
class MtcnnParams:
    min_face_size: float = 20.0
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)
    scale_factor: float = 0.709


def pyramid_scales(height: int, width: int, min_face_size: float, factor: float) -> list[float]:
    """Scales at which P-Net's 12x12 window covers faces from min_face_size up to the image size."""
    m = 12.0 / min_face_size
    min_side = min(height, width) * m
    scales = []
    scale = m
    while min_side >= 12:
        scales.append(scale)
        scale *= factor
        min_side *= factor
    return scales


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """IoU non-maximum suppression through OpenCV; indices by descending score."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    rects = np.column_stack([boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]])
    keep = cv2.dnn.NMSBoxes(rects.tolist(), scores.astype(float).tolist(), 0.0, threshold)
    return np.asarray(keep, dtype=np.int64).reshape(-1)


def nms_min(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """MTCNN's final NMS: overlap = intersection / smaller area (pixel-inclusive boxes). Ties in score keep
    the earlier box first (a stable order, as the GPU cascade's)."""
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        overlap = w * h / np.minimum(area[i], area[rest])
        order = rest[overlap <= threshold]
    return np.asarray(keep, dtype=np.int64)


def square(boxes: Any, xp: ModuleType = np) -> Any:
    """facenet-pytorch `rerec`: grow each box (x1 y1 x2 y2, then any other columns) to a square around its
    centre."""
    h = boxes[:, 3] - boxes[:, 1]
    w = boxes[:, 2] - boxes[:, 0]
    side = xp.maximum(w, h)
    x1 = boxes[:, 0] + (w * 0.5 - side * 0.5)
    y1 = boxes[:, 1] + (h * 0.5 - side * 0.5)
    return xp.concatenate([xp.stack([x1, y1, x1 + side, y1 + side], axis=1), boxes[:, 4:]], axis=1)


def regress(boxes: Any, reg: Any, xp: ModuleType = np) -> Any:
    """facenet-pytorch `bbreg` (pixel-inclusive widths): x1 y1 x2 y2 moved by the regression, other columns kept."""
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    moved = [boxes[:, 0] + reg[:, 0] * w, boxes[:, 1] + reg[:, 1] * h,
             boxes[:, 2] + reg[:, 2] * w, boxes[:, 3] + reg[:, 3] * h]
    return xp.concatenate([xp.stack(moved, axis=1), boxes[:, 4:]], axis=1)


def candidates(cand: Any, xp: ModuleType = np) -> Any:
    """P-Net's (K, 9) boxes (x1 y1 x2 y2 score + 4 regression values) with their regression applied:
    (K, 5) x1 y1 x2 y2 score."""
    rw, rh = cand[:, 2] - cand[:, 0], cand[:, 3] - cand[:, 1]
    return xp.stack([
        cand[:, 0] + cand[:, 5] * rw,
        cand[:, 1] + cand[:, 6] * rh,
        cand[:, 2] + cand[:, 7] * rw,
        cand[:, 3] + cand[:, 8] * rh,
        cand[:, 4],
    ], axis=1)


def landmarks_of(boxes: Any, points: Any, xp: ModuleType = np) -> Any:
    """O-Net's 10 landmark values per box (x1..x5 then y1..y5, relative) -> (K, 5, 2) pixels."""
    bw = boxes[:, 2] - boxes[:, 0] + 1
    bh = boxes[:, 3] - boxes[:, 1] + 1
    return xp.stack([bw[:, None] * points[:, :5] + boxes[:, 0:1] - 1,
                     bh[:, None] * points[:, 5:] + boxes[:, 1:2] - 1], axis=2)


def cell_boxes(xs: Any, ys: Any, scale: Any, xp: ModuleType = np) -> tuple[Any, Any, Any, Any]:
    """The image window (x1, y1, x2, y2) of the P-Net output cells at (xs, ys) (float32) of a pyramid level at
    `scale`: its 12x12 window at stride 2, floored."""
    x, y = xs * 2, ys * 2
    return xp.floor((x + 1) / scale), xp.floor((y + 1) / scale), xp.floor((x + 12) / scale), xp.floor((y + 12) / scale)


def _normalise(pixels: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) RGB -> (N, 3, H, W) float32, (x - 127.5) / 128."""
    x = (pixels.astype(np.float32) - PIXEL_OFFSET) * PIXEL_SCALE
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _patches(rgb: np.ndarray, boxes: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """facenet-pytorch `pad` + crop + area resize; returns patches and the indices of boxes kept."""
    h, w = rgb.shape[:2]
    b = np.trunc(boxes[:, :4]).astype(np.int64)
    x, y = np.maximum(b[:, 0], 1), np.maximum(b[:, 1], 1)
    ex, ey = np.minimum(b[:, 2], w), np.minimum(b[:, 3], h)
    kept = np.flatnonzero((ey > y - 1) & (ex > x - 1))
    out = np.empty((len(kept), size, size, 3), dtype=np.float32)
    for j, k in enumerate(kept):
        region = rgb[y[k] - 1 : ey[k], x[k] - 1 : ex[k]]
        out[j] = cv2.resize(region, (size, size), interpolation=cv2.INTER_AREA)
    return out, kept


class Mtcnn:
    """Face detector: BGR uint8 frame -> Detections with 5 landmarks per face."""

    class_names = ("face",)

    def __init__(
        self,
        pnet: Engine,
        rnet: Engine,
        onet: Engine,
        params: MtcnnParams | None = None,
        pad_batches: bool = False,
    ) -> None:
        self.pnet, self.rnet, self.onet = pnet, rnet, onet
        self.params = params or MtcnnParams()
        self.pad_batches = pad_batches  # pad R-Net/O-Net batches to power-of-two sizes (see engines.batching)
        self.device = pnet.device
        self.backend = pnet.backend

    def _run_batched(self, engine: Engine, patches: np.ndarray) -> dict[str, np.ndarray]:
        x = _normalise(patches)
        chunks = []
        limit = engine.batch_limit(STAGE_BATCH)
        for i in range(0, len(x), limit):
            part = x[i : i + limit]
            out = engine.run_single(pad_batch(part, limit) if self.pad_batches else part)
            chunks.append({name: value[: len(part)] for name, value in out.items()})
        return {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}

    def warm_up(self) -> None:
        """Prepare R-Net and O-Net for every batch bucket (run once, or captured as CUDA graphs; only with
        pad_batches)."""
        if self.pad_batches:
            for engine, size in ((self.rnet, 24), (self.onet, 48)):
                engine.prepare(bucket_samples(engine.inputs[0].name, (3, size, size), np.dtype(np.float32),
                                              engine.batch_limit(STAGE_BATCH)))

    def _refine(
        self, engine: Engine, frames: list[tuple[np.ndarray, np.ndarray]], size: int, threshold: float
    ) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """Run a refinement net on the patch of each box of each (rgb, boxes) frame, all frames in one
        batch; keep the boxes it scores above `threshold`. Per frame: (K, 5) boxes with the net's score, and
        the net's other outputs for the same K rows."""
        cut = [_patches(rgb, boxes, size) for rgb, boxes in frames]
        counts = [len(kept) for _, kept in cut]
        empty = (np.zeros((0, 5), np.float32), {})
        if sum(counts) == 0:
            return [empty for _ in frames]
        out = self._run_batched(engine, np.concatenate([patches for patches, _ in cut]))
        results: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []
        offset = 0
        for (_, boxes), (_, kept), n in zip(frames, cut, counts):
            if n == 0:
                results.append(empty)
                continue
            rows = {k: v[offset : offset + n] for k, v in out.items()}
            offset += n
            score = rows["probability"][:, 1]
            passed = score > threshold
            results.append((np.column_stack([boxes[kept][passed, :4], score[passed]]),
                            {k: v[passed] for k, v in rows.items()}))
        return results

    def _stage1(self, rgb: np.ndarray) -> np.ndarray:
        """P-Net over the pyramid: (K, 9) boxes x1 y1 x2 y2 score + 4 regression values."""
        h, w = rgb.shape[:2]
        threshold = self.params.thresholds[0]
        found = []
        for scale in pyramid_scales(h, w, self.params.min_face_size, self.params.scale_factor):
            size = (int(w * scale + 1), int(h * scale + 1))
            scaled = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
            out = self.pnet.run_single(_normalise(scaled[None]))
            reg, prob = out["regression"][0], out["probability"][0, 1]
            ys, xs = np.nonzero(prob >= threshold)
            if len(ys) == 0:
                continue
            x1, y1, x2, y2 = cell_boxes(xs.astype(np.float32), ys.astype(np.float32), np.float32(scale))
            boxes = np.column_stack([x1, y1, x2, y2, prob[ys, xs], reg[:, ys, xs].T]).astype(np.float32)
            found.append(boxes[nms(boxes[:, :4], boxes[:, 4], 0.5)])
        if not found:
            return np.zeros((0, 9), np.float32)
        boxes = np.concatenate(found)
        return boxes[nms(boxes[:, :4], boxes[:, 4], 0.7)]

    def detect_batch(self, frames_bgr: list[np.ndarray]) -> list[Detections]:
        """Faces of several frames. P-Net runs frame by frame (its input size differs per frame and pyramid
        level); the candidates of every frame go through R-Net together, then through O-Net together."""
        for frame in frames_bgr:
            if frame.ndim != 3 or frame.shape[2] != 3:
                raise ValueError(f"frame must be (H, W, 3) BGR, got {frame.shape}")
        rgbs = [cv2.cvtColor(frame, cv2.COLOR_BGR2RGB).astype(np.float32) for frame in frames_bgr]
        _, t2, t3 = self.params.thresholds
        stage1 = [square(candidates(self._stage1(rgb))) for rgb in rgbs]

        # Stage 2: R-Net refines and rejects.
        stage2 = []
        for boxes, out in self._refine(self.rnet, list(zip(rgbs, stage1)), 24, t2):
            keep = nms(boxes[:, :4], boxes[:, 4], 0.7)
            stage2.append(square(regress(boxes[keep], out["regression"][keep])) if len(keep) else boxes[:0])

        # Stage 3: O-Net gives final boxes, scores and landmarks.
        refined = self._refine(self.onet, list(zip(rgbs, stage2)), 48, t3)
        return [self._finish(boxes, out, frame) for (boxes, out), frame in zip(refined, frames_bgr)]

    def detect(self, frame_bgr: np.ndarray) -> Detections:
        return self.detect_batch([frame_bgr])[0]

    def close(self) -> None:
        for engine in (self.pnet, self.rnet, self.onet):
            engine.close()

    def _finish(self, boxes: np.ndarray, out: dict[str, np.ndarray], frame_bgr: np.ndarray) -> Detections:
        empty = Detections.empty(self.class_names, num_landmarks=5)
        if len(boxes) == 0:
            return empty
        landmarks = landmarks_of(boxes, out["landmarks"])
        boxes = regress(boxes, out["regression"])
        keep = nms_min(boxes[:, :4], boxes[:, 4], 0.7)
        boxes, landmarks = boxes[keep], landmarks[keep]
        if len(boxes) == 0:
            return empty
        h, w = frame_bgr.shape[:2]
        return Detections(
            boxes[:, :4].astype(np.float32),
            boxes[:, 4].astype(np.float32),
            np.zeros(len(boxes), np.int32),
            self.class_names,
            landmarks.astype(np.float32),
        ).clip(w, h)

