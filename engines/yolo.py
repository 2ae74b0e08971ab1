"""YOLO-family detectors over any Engine: letterbox, decode the common export layouts, class-aware NMS.

Layouts (one image per call, batch 1):
- "v8": ultralytics v8/v11-style `[1, 4 + C, N]`: cx, cy, w, h, then C class scores; no objectness.
- "v5": v5/v7-style `[1, N, 5 + C]`: cx, cy, w, h, objectness, then C class scores (score = obj * cls).
Boxes are in network-input pixels; they are mapped back through the letterbox to original pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from engines.base import Engine, EngineError
from engines.detections import Detections

LAYOUTS = ("v8", "v5")
LETTERBOX_FILL = 114


@dataclass(frozen=True)
class YoloParams:
    input_width: int
    input_height: int
    class_names: tuple[str, ...] = ()
    layout: str = "auto"
    confidence_threshold: float = 0.25
    iou_threshold: float = 0.45
    max_detections: int = 300


@dataclass(frozen=True)
class Letterbox:
    """How a frame was fitted into the network input: scale, then pad (left, top)."""

    scale: float
    pad_x: float
    pad_y: float

    def to_original(self, xyxy: np.ndarray) -> np.ndarray:
        out = xyxy.copy()
        out[:, [0, 2]] = (out[:, [0, 2]] - self.pad_x) / self.scale
        out[:, [1, 3]] = (out[:, [1, 3]] - self.pad_y) / self.scale
        return out


def letterbox(frame: np.ndarray, width: int, height: int) -> tuple[np.ndarray, Letterbox]:
    """Resize keeping the aspect ratio, centre on a grey (114) canvas of width x height."""
    h, w = frame.shape[:2]
    scale = min(width / w, height / h)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    resized = cv2.resize(frame, (new_w, new_h), interpolation=cv2.INTER_LINEAR if scale > 1 else cv2.INTER_AREA)
    pad_x, pad_y = (width - new_w) / 2, (height - new_h) / 2
    left, top = int(round(pad_x - 0.1)), int(round(pad_y - 0.1))
    canvas = np.full((height, width, 3), LETTERBOX_FILL, dtype=np.uint8)
    canvas[top : top + new_h, left : left + new_w] = resized
    return canvas, Letterbox(scale, left, top)


def infer_layout(shape: tuple[int | str | None, ...], num_classes: int | None, model: str) -> str:
    """The layout of a `[1, A, B]` output; raises EngineError naming the model and the shape."""
    supported = "ultralytics v8/v11 [1, 4+C, N] (layout v8) or v5 [1, N, 5+C] (layout v5)"
    dims = [d if isinstance(d, int) and d > 0 else None for d in shape]
    if len(dims) != 3 or dims[0] not in (1, None):
        raise EngineError(f"{model}: output shape {list(shape)} is not a YOLO output; supported: {supported}")
    a, b = dims[1], dims[2]
    if num_classes:
        v8, v5 = a == 4 + num_classes, b == 5 + num_classes
        if v8 and not v5:
            return "v8"
        if v5 and not v8:
            return "v5"
        if not (v8 or v5):
            raise EngineError(
                f"{model}: output shape {list(shape)} does not fit {num_classes} classes; supported: {supported}"
            )
    if a is not None and b is not None:
        return "v8" if a < b else "v5"
    raise EngineError(f"{model}: cannot tell the layout of output shape {list(shape)}; set layout (v8 or v5)")


def decode(output: np.ndarray, layout: str, confidence: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(xyxy, score, class_id) of the rows above `confidence`, in network-input pixels."""
    rows = output[0].T if layout == "v8" else output[0]  # -> (N, 4 + [obj] + C)
    rows = rows.astype(np.float32, copy=False)
    if layout == "v8":
        class_scores = rows[:, 4:]
    else:
        class_scores = rows[:, 5:] * rows[:, 4:5]
    if class_scores.shape[1] == 0:
        raise EngineError(f"YOLO output has no class columns: {output.shape}")
    class_id = class_scores.argmax(axis=1).astype(np.int32)
    score = class_scores[np.arange(len(rows)), class_id]
    keep = score >= confidence
    cx, cy, w, h = (rows[keep, i] for i in range(4))
    xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    return xyxy, score[keep], class_id[keep]


def class_aware_nms(xyxy: np.ndarray, score: np.ndarray, class_id: np.ndarray, iou: float, limit: int) -> np.ndarray:
    if len(xyxy) == 0:
        return np.zeros(0, dtype=np.int64)
    rects = np.column_stack([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]]).tolist()
    keep = cv2.dnn.NMSBoxesBatched(rects, score.astype(float).tolist(), class_id.tolist(), 0.0, iou)
    return np.asarray(keep, dtype=np.int64).reshape(-1)[:limit]


class Yolo:
    """YOLO detector: BGR uint8 frame -> Detections in original pixels."""

    def __init__(self, engine: Engine, params: YoloParams, model_name: str = "model") -> None:
        if len(engine.inputs) != 1:
            raise EngineError(f"{model_name}: a YOLO model needs one input, found {len(engine.inputs)}")
        engine.check_input_shape(engine.inputs[0].name, (1, 3, params.input_height, params.input_width))
        num_classes = len(params.class_names) or None
        output_shape = engine.outputs[0].shape
        if params.layout == "auto":
            layout = infer_layout(output_shape, num_classes, model_name)
        elif params.layout in LAYOUTS:
            layout = params.layout
        else:
            raise EngineError(f"layout must be auto, v8 or v5, got {params.layout!r}")
        self.engine = engine
        self.device = engine.device
        self.backend = engine.backend
        self.params = params
        self.layout = layout
        self.class_names = params.class_names
        self._input = engine.inputs[0]
        self._output = engine.outputs[0].name
        batch_axis = self._input.fixed_dims()[0]
        self._fixed_batch: int | None = batch_axis  # None: any batch size; else the export's fixed batch

    def close(self) -> None:
        self.engine.close()

    def detect(self, frame_bgr: np.ndarray) -> Detections:
        return self.detect_batch([frame_bgr])[0]

    def detect_batch(self, frames_bgr: list[np.ndarray]) -> list[Detections]:
        """Every frame letterboxed to the network size, then one engine call for all (DeepStream's
        stream muxer does the same), or one call per frame where the model's batch axis is fixed."""
        p = self.params
        boxed = [letterbox(frame, p.input_width, p.input_height) for frame in frames_bgr]
        x = np.stack([cv2.cvtColor(canvas, cv2.COLOR_BGR2RGB).transpose(2, 0, 1) for canvas, _ in boxed])
        x = (x.astype(np.float32) / 255.0).astype(self._input.dtype, copy=False)
        if self._fixed_batch is None:
            outputs = self.engine.run({self._input.name: x})[self._output]
            if len(outputs) != len(x):
                raise EngineError(f"YOLO output batch is {len(outputs)} for {len(x)} frames: {outputs.shape}")
        else:
            step = self._fixed_batch
            outputs = np.concatenate(
                [self.engine.run({self._input.name: x[i : i + step]})[self._output] for i in range(0, len(x), step)]
            )
        return [self._finish(outputs[i : i + 1], box, frame) for i, ((_, box), frame) in enumerate(zip(boxed, frames_bgr))]

    def _finish(self, output: np.ndarray, box: Letterbox, frame_bgr: np.ndarray) -> Detections:
        p = self.params
        xyxy, score, class_id = decode(output, self.layout, p.confidence_threshold)
        keep = class_aware_nms(xyxy, score, class_id, p.iou_threshold, p.max_detections)
        num_classes = len(self.class_names)
        if num_classes and len(class_id) and class_id.max() >= num_classes:
            raise EngineError(f"model gave class {int(class_id.max())}, but only {num_classes} class names are set")
        h, w = frame_bgr.shape[:2]
        return Detections(
            box.to_original(xyxy[keep]).astype(np.float32),
            score[keep].astype(np.float32),
            class_id[keep],
            self.class_names,
        ).clip(w, h)
