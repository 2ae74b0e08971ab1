"""Classifier pre-processing, shared by every backend, in two steps:

1. geometry (`crop_resize`): cut each object out of the frame and resize it to the network's
   input size, still uint8 BGR. This runs where the frame is (the ingress), so only small uint8
   crops at network resolution travel to the classifier deployments.
2. photometric (`to_tensor`): colour conversion and DeepStream-style normalisation,
   y = scale * (x - mean) / std, to a float32 NCHW batch. This runs next to the model: on the host in
   numpy, or, where the engine runs on a GPU and takes the uint8 crops as they are, on the device inside
   the engine's forward (`DeviceNormalization`, the same arithmetic on torch tensors; tested equal).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

COLOR_FORMATS = ("RGB", "BGR", "GRAY")
# OpenCV's BGR -> grey for uint8, in fixed point: (3735 B + 19235 G + 9798 R + 2^14) >> 15 (equal to
# cv2.cvtColor on all 2^24 colours: tests/test_preprocess.py)
GRAY_Q15 = (3735, 19235, 9798)


@dataclass(frozen=True)
class CropSpec:
    """How an object's box becomes a network input (geometry only)."""

    width: int
    height: int
    square: bool = True  # grow the box to a square around its centre (MTCNN-style)
    padding: float = 0.0  # grow the box by this fraction of its size on each side
    keep_aspect: bool = False  # letterbox the crop into width x height instead of stretching it

    def boxes(self, xyxy: np.ndarray) -> np.ndarray:
        """The crop boxes (float, may extend past the image) for detections `xyxy`."""
        xyxy = np.asarray(xyxy, dtype=np.float32).reshape(-1, 4)
        cx = (xyxy[:, 0] + xyxy[:, 2]) / 2
        cy = (xyxy[:, 1] + xyxy[:, 3]) / 2
        w = xyxy[:, 2] - xyxy[:, 0]
        h = xyxy[:, 3] - xyxy[:, 1]
        if self.square:
            w = h = np.maximum(w, h)
        w = w * (1 + 2 * self.padding)
        h = h * (1 + 2 * self.padding)
        return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)


@dataclass(frozen=True)
class CropPlan:
    """Where each object's crop comes from and goes to, in whole pixels (the one geometry the host and the device
    crops share): the part of its crop box inside the frame (`source`, x1 y1 x2 y2), the output pixels it covers
    (`target`, on the spec's width x height canvas; the rest is black), and which boxes have no part inside the
    frame (`empty`: all black)."""

    source: np.ndarray  # (N, 4) int64
    target: np.ndarray  # (N, 4) int64
    empty: np.ndarray  # (N,) bool

    @property
    def shrinks(self) -> np.ndarray:
        """Boxes resized down (their source taller than their target): OpenCV's INTER_AREA, else INTER_LINEAR."""
        return (self.source[:, 3] - self.source[:, 1]) > (self.target[:, 3] - self.target[:, 1])


def crop_plan(xyxy: np.ndarray, spec: CropSpec, frame_height: int | np.ndarray,
              frame_width: int | np.ndarray) -> CropPlan:
    """Each crop box (stretched onto the output, or scaled to fit and centred: `keep_aspect`), cut to the frame:
    only the part inside the frame is resized, straight to the output pixels it covers. The frame's size may be
    given per box (the boxes of several frames planned in one call)."""
    boxes = np.round(spec.boxes(xyxy)).astype(np.int64)
    source = np.zeros((len(boxes), 4), np.int64)
    target = np.zeros((len(boxes), 4), np.int64)
    empty = np.zeros(len(boxes), bool)
    heights = np.broadcast_to(np.asarray(frame_height, np.int64), (len(boxes),)).tolist()
    widths = np.broadcast_to(np.asarray(frame_width, np.int64), (len(boxes),)).tolist()
    for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        frame_height, frame_width = heights[i], widths[i]
        x2, y2 = max(x2, x1 + 1), max(y2, y1 + 1)
        w, h = x2 - x1, y2 - y1
        if spec.keep_aspect:
            sx = sy = min(spec.width / w, spec.height / h)
            left, top = (spec.width - max(1, round(w * sx))) // 2, (spec.height - max(1, round(h * sy))) // 2
        else:
            sx, sy, left, top = spec.width / w, spec.height / h, 0, 0
        vx1, vy1, vx2, vy2 = max(x1, 0), max(y1, 0), min(x2, frame_width), min(y2, frame_height)
        if vx2 <= vx1 or vy2 <= vy1:
            empty[i] = True
            continue
        ox1, ox2 = left + round((vx1 - x1) * sx), left + round((vx2 - x1) * sx)
        oy1, oy2 = top + round((vy1 - y1) * sy), top + round((vy2 - y1) * sy)
        ox1, oy1 = min(max(ox1, 0), spec.width - 1), min(max(oy1, 0), spec.height - 1)
        ox2, oy2 = min(max(ox2, ox1 + 1), spec.width), min(max(oy2, oy1 + 1), spec.height)
        source[i], target[i] = (vx1, vy1, vx2, vy2), (ox1, oy1, ox2, oy2)
    return CropPlan(source, target, empty)


def crop_resize(frame: np.ndarray, xyxy: np.ndarray, spec: CropSpec) -> np.ndarray:
    """(N, H, W, C) uint8 crops of `frame` at the network's size; out-of-image parts are black (`crop_plan`).

    A crop costs memory for its output size whatever the box and the padding (resizing the padded
    full-resolution region first would cost (1 + 2 x padding)^2 times the box's pixels). The device's twin,
    engines/device_crops.py, cuts the same plan on a GPU."""
    fh, fw = frame.shape[:2]
    plan = crop_plan(xyxy, spec, fh, fw)
    channels = frame.shape[2] if frame.ndim == 3 else 1
    out = np.zeros((len(plan.empty), spec.height, spec.width, channels), dtype=np.uint8)
    for i in np.flatnonzero(~plan.empty).tolist():
        vx1, vy1, vx2, vy2 = plan.source[i].tolist()
        ox1, oy1, ox2, oy2 = plan.target[i].tolist()
        region = frame[vy1:vy2, vx1:vx2]
        resized = cv2.resize(region, (ox2 - ox1, oy2 - oy1),
                             interpolation=cv2.INTER_AREA if plan.shrinks[i] else cv2.INTER_LINEAR)
        out[i, oy1:oy2, ox1:ox2] = resized.reshape(oy2 - oy1, ox2 - ox1, channels)
    return out


def cut_crops(frame: Any, xyxy: np.ndarray, spec: CropSpec) -> Any:
    """`crop_resize` where the frame is: on the host for a numpy frame, on its device for a torch tensor
    (engines/device_crops.py), the same crops either way."""
    if isinstance(frame, np.ndarray):
        return crop_resize(frame, xyxy, spec)
    from engines.device_crops import crop_resize_device

    return crop_resize_device(frame, xyxy, spec)


def cut_crops_many(frames: Sequence[Any], xyxys: Sequence[np.ndarray], spec: CropSpec) -> Any:
    """`cut_crops` of several frames, their crops one after another: on the device in one pass
    (engines/device_crops.py `crop_resize_device_many`), on the host frame by frame."""
    if frames and not isinstance(frames[0], np.ndarray):
        from engines.device_crops import crop_resize_device_many

        return crop_resize_device_many(frames, xyxys, spec)
    cut = [crop_resize(frame, xyxy, spec) for frame, xyxy in zip(frames, xyxys, strict=True)]
    channels = frames[0].shape[2] if frames and frames[0].ndim == 3 else 1
    return np.concatenate(cut) if cut else np.zeros((0, spec.height, spec.width, channels), np.uint8)


def cut_crops_specs(frames: Sequence[Any], xyxys_by_spec: Sequence[Sequence[np.ndarray]],
                    specs: Sequence[CropSpec]) -> list[Any]:
    """`cut_crops_many` for several crop geometries (`xyxys_by_spec[k][frame]`: that frame's boxes for spec k): on
    the device every geometry in one pass (engines/device_crops.py `crop_resize_device_specs`), on the host one
    geometry and frame at a time."""
    if frames and not isinstance(frames[0], np.ndarray):
        from engines.device_crops import crop_resize_device_specs

        return crop_resize_device_specs(frames, xyxys_by_spec, specs)
    return [cut_crops_many(frames, xyxys, spec) for xyxys, spec in zip(xyxys_by_spec, specs, strict=True)]


def take_rows(batch: Any, rows: np.ndarray) -> Any:
    """Rows of a numpy array or a torch tensor, by host indices."""
    if isinstance(batch, np.ndarray):
        return batch[rows]
    import torch

    return batch[torch.as_tensor(rows, device=batch.device)]


@dataclass(frozen=True)
class Normalization:
    """Photometric pre-processing: DeepStream's model-color-format, net-scale-factor, offsets,
    plus a per-channel std (torchvision-style models): y = scale * (x - mean) / std."""

    color_format: str = "RGB"  # what the network wants; crops arrive as BGR
    scale: float = 1.0
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0,)
    dtype: type = np.float32

    def __post_init__(self) -> None:
        if self.color_format not in COLOR_FORMATS:
            raise ValueError(f"color_format must be one of {COLOR_FORMATS}, got {self.color_format!r}")
        channels = 1 if self.color_format == "GRAY" else 3
        for name in ("mean", "std"):
            if len(getattr(self, name)) not in (1, channels):
                raise ValueError(
                    f"{name} needs {'1 value' if channels == 1 else f'1 or {channels} values'} for "
                    f"{self.color_format}, got {len(getattr(self, name))}"
                )
        if any(v == 0 for v in self.std):
            raise ValueError("std values must be non-zero")

    @property
    def channels(self) -> int:
        return 1 if self.color_format == "GRAY" else 3


def to_tensor(crops_bgr: np.ndarray, spec: Normalization) -> np.ndarray:
    """(N, H, W, 3) uint8 BGR crops -> (N, C, H, W) float tensor, y = scale * (x - mean) / std."""
    if crops_bgr.ndim != 4 or crops_bgr.shape[3] != 3 or crops_bgr.dtype != np.uint8:
        raise ValueError(f"crops must be (N, H, W, 3) uint8 BGR, got {crops_bgr.shape} {crops_bgr.dtype}")
    if spec.color_format == "RGB":
        pixels = crops_bgr[..., ::-1]
    elif spec.color_format == "GRAY":
        n, h, w, _ = crops_bgr.shape
        flat = crops_bgr.reshape(n * h, w, 3)
        pixels = cv2.cvtColor(flat, cv2.COLOR_BGR2GRAY).reshape(n, h, w, 1) if n else crops_bgr[..., :1]
    else:
        pixels = crops_bgr
    x = pixels.astype(np.float32)
    x -= np.asarray(spec.mean, dtype=np.float32)
    x *= np.float32(spec.scale)
    if any(v != 1.0 for v in spec.std):
        x /= np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=spec.dtype)


class DeviceNormalization:
    """`to_tensor` for torch tensors on `device`: (N, H, W, 3) uint8 BGR -> (N, C, H, W) float32, the same
    operations in the same order (grey through OpenCV's fixed-point weights), so an engine can take uint8
    crops and normalise them on its GPU (4x fewer bytes to copy, no float work on the host). Its constants are
    made on the device once, here: a tensor made from Python numbers inside a CUDA-graph capture would be a
    host-to-device copy, which a capture refuses."""

    def __init__(self, spec: Normalization, device: str) -> None:
        import torch

        self.spec = spec
        self._mean = torch.tensor(spec.mean, dtype=torch.float32, device=device).reshape(1, -1, 1, 1)
        self._scale = torch.tensor(spec.scale, dtype=torch.float32, device=device)
        self._std = torch.tensor(spec.std, dtype=torch.float32, device=device).reshape(1, -1, 1, 1)
        self._divide = any(v != 1.0 for v in spec.std)

    def __call__(self, crops_bgr: Any) -> Any:
        if crops_bgr.dim() != 4 or crops_bgr.shape[3] != 3:
            raise ValueError(f"crops must be (N, H, W, 3) uint8 BGR, got {tuple(crops_bgr.shape)}")
        x = crops_bgr.permute(0, 3, 1, 2)  # N, 3 (B, G, R), H, W
        if self.spec.color_format == "RGB":
            x = x.flip(1).float()
        elif self.spec.color_format == "GRAY":
            b, g, r = (x[:, i : i + 1].int() for i in range(3))
            x = ((b * GRAY_Q15[0] + g * GRAY_Q15[1] + r * GRAY_Q15[2] + (1 << 14)) >> 15).float()
        else:
            x = x.float()
        x = (x - self._mean) * self._scale
        if self._divide:
            x = x / self._std
        return x.contiguous()
