"""Test videos built from the committed photos with cv2.VideoWriter."""

from __future__ import annotations

import struct
from pathlib import Path

import cv2
import numpy as np

from tests.images import ASTRONAUT, read

FPS = 25.0


def _sprite(size: int, mirrored: bool = False) -> np.ndarray:
    face = read(ASTRONAUT)
    return cv2.resize(face[:, ::-1] if mirrored else face, (size, size), interpolation=cv2.INTER_AREA)


def _put(canvas: np.ndarray, sprite: np.ndarray, x: int, y: int) -> None:
    h, w = sprite.shape[:2]
    canvas[y : y + h, x : x + w] = sprite


def write(path: Path, frames: list[np.ndarray], fourcc: str = "mp4v") -> Path:
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), FPS, (width, height))
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path


def two_faces(path: Path, frames: int = 100, enters_at: int = 40, fourcc: str = "mp4v") -> Path:
    """A face that moves left to right across `frames` frames, and a second (mirrored) one that appears at
    `enters_at` and stays to the end (800x300, 25 fps). Past frame 289 the first face turns back at the edge."""
    a, b = _sprite(200), _sprite(200, mirrored=True)
    out = []
    for i in range(frames):
        canvas = np.full((300, 800, 3), 90, np.uint8)
        _put(canvas, a, 10 + 2 * (289 - abs(289 - i % 578)), 50)
        if i >= enters_at:
            _put(canvas, b, 580, 60)
        out.append(canvas)
    return write(path, out, fourcc)


def growing_face(path: Path, frames: int = 60, start: int = 120, end: int = 280) -> Path:
    """One face whose sprite grows linearly from `start` to `end` pixels (area x5.4 over the video)."""
    out = []
    for i in range(frames):
        size = int(start + (end - start) * i / (frames - 1))
        canvas = np.full((300, 300, 3), 90, np.uint8)
        _put(canvas, _sprite(size), (300 - size) // 2, (300 - size) // 2)
        out.append(canvas)
    return write(path, out)


def turned_display(clip: Path, out: Path) -> Path:
    """`clip` (an MP4) written to `out` with a display matrix of 90 degrees, as a phone records a video held
    upright: the stored frames stay as they are, players turn them."""
    data = bytearray(clip.read_bytes())
    at = data.find(b"tkhd") + 4
    matrix = at + 4 + (20 if data[at] == 0 else 32) + 16  # version/flags, times and ids, reserved, layer..volume
    data[matrix : matrix + 36] = struct.pack(">9i", 0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000)  # 90 degrees
    out.write_bytes(bytes(data))
    return out
