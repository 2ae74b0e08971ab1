"""Draw detections and their attributes onto the frame (POST /v1/annotate, and every frame of /v1/video/annotate)."""

from __future__ import annotations

import cv2
import numpy as np

from serve_app.schema import DetectedObject


def _caption_lines(obj: DetectedObject) -> list[str]:
    lines = [f"{obj.label} {obj.score:.2f}" if obj.track_id is None else f"#{obj.track_id} {obj.label} {obj.score:.2f}"]
    for name, attr in obj.attributes.items():
        lines.append(f"{name}: {attr['label']}" if "label" in attr else f"{name}: {attr.get('value')}")
    return lines


def annotate(frame: np.ndarray, objects: list[DetectedObject], quality: int = 90) -> bytes:
    """JPEG of `frame` with each object's box, landmarks and one caption line per attribute."""
    ok, encoded = cv2.imencode(".jpg", draw(frame, objects), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return encoded.tobytes()


def draw(frame: np.ndarray, objects: list[DetectedObject]) -> np.ndarray:
    """A copy of `frame` with each object's box, landmarks, track id and one caption line per attribute."""
    canvas = frame.copy()
    height, width = canvas.shape[:2]
    thickness = max(1, round(min(height, width) / 400))
    scale = 0.4 * thickness
    for obj in objects:
        x1, y1, x2, y2 = (int(round(v)) for v in obj.box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), (0, 255, 0), thickness)
        for x, y in obj.landmarks or []:
            cv2.circle(canvas, (int(x), int(y)), thickness + 1, (0, 200, 255), -1)
        lines = _caption_lines(obj)
        sizes = [cv2.getTextSize(t, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0] for t in lines]
        line_h = max(h for _, h in sizes) + 6
        block_h = line_h * len(lines)
        top = y2 + 2 if y2 + 2 + block_h <= height else max(y1 - 2 - block_h, 0)
        left = min(max(x1, 0), max(width - max(w for w, _ in sizes) - 4, 0))
        for i, (text, (tw, _)) in enumerate(zip(lines, sizes)):
            y = top + i * line_h
            cv2.rectangle(canvas, (left, y), (left + tw + 4, y + line_h), (0, 255, 0), -1)
            cv2.putText(canvas, text, (left + 2, y + line_h - 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1,
                        cv2.LINE_AA)
    return canvas
