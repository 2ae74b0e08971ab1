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


def many_faces() -> np.ndarray:
    """Eight faces in one photo (768x1536): the committed portraits, mirrored and tiled at 384x384, so the
    classifiers get eight crops per request (the benchmark's many-object image)."""
    astronaut, camera, cmyk = read(ASTRONAUT), read(CAMERA), read(DATA / "astronaut_cmyk.jpg")
    tiles = [astronaut, astronaut[:, ::-1], camera, camera[:, ::-1], cmyk, cmyk[:, ::-1], astronaut, camera]
    tiles = [cv2.resize(t, (384, 384), interpolation=cv2.INTER_AREA) for t in tiles]
    return np.concatenate([np.concatenate(tiles[:4], axis=1), np.concatenate(tiles[4:], axis=1)], axis=0)
