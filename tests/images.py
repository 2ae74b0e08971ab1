"""Test images: the committed photos (see data/README.md) and ones built from them."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

DATA = Path(__file__).parent / "data"
ASTRONAUT = DATA / "astronaut.png"
CAMERA = DATA / "camera.png"
NO_FACE = DATA / "coffee.jpg"


def read(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, path
    return image


def encode(image: np.ndarray, ext: str = ".png") -> bytes:
    ok, data = cv2.imencode(ext, image)
    assert ok
    return data.tobytes()


def collage() -> np.ndarray:
    """Three faces side by side: astronaut, astronaut mirrored, camera man (512x1536)."""
    astronaut = read(ASTRONAUT)
    return np.concatenate([astronaut, astronaut[:, ::-1], read(CAMERA)], axis=1)
