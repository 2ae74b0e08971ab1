"""Test images: the committed photos (see data/README.md) and ones built from them."""

from __future__ import annotations

from functools import cache
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


def phone_photo(image: np.ndarray, orientation: int, fmt: str = "JPEG") -> bytes:
    """`image` (BGR, as it is to be displayed) stored as a phone stores it: the pixels turned the way the camera
    held them, with the EXIF Orientation tag saying how to display them. Turned and written by Pillow (not by the
    project's own code), quality 100 for lossy formats."""
    import io

    from PIL import Image

    T = Image.Transpose
    # Pillow's exif_transpose displays orientation o with these; storing undoes them (6 and 8 undo each other)
    store = {2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM, 5: T.TRANSPOSE, 6: T.ROTATE_90,
             7: T.TRANSVERSE, 8: T.ROTATE_270}
    picture = Image.fromarray(np.ascontiguousarray(image[..., ::-1]))
    stored = picture.transpose(store[orientation]) if orientation in store else picture
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    options = {"quality": 100} if fmt in ("JPEG", "WEBP", "AVIF") else {}
    stored.save(buffer, fmt, exif=exif.tobytes(), **options)
    return buffer.getvalue()


UNCOMPRESSED = {".bmp": 3, ".ppm": 3, ".tiff": 3}  # bytes per pixel of the formats OpenCV writes raw


@cache  # each layout's test sends the same bytes: written once (the 12 Mpx JPEG 2000 takes 1.6 s)
def largest_legal(ext: str, max_pixels: int, max_bytes: int) -> tuple[bytes, tuple[int, int], float]:
    """The collage scaled up to the largest image of format `ext` a service with these limits takes: `max_pixels`
    for compressed formats, what fits in `max_bytes` for uncompressed ones (with room for the header). Returns
    the bytes, the (width, height) and the scale from the collage."""
    small = collage()
    per_pixel = UNCOMPRESSED.get(ext)
    pixels = min(max_pixels, (max_bytes - 65536) // per_pixel) if per_pixel else max_pixels
    scale = (pixels / (small.shape[0] * small.shape[1])) ** 0.5
    size = (int(small.shape[1] * scale), int(small.shape[0] * scale))
    image = cv2.resize(small, size, interpolation=cv2.INTER_LINEAR)
    options = {".tiff": [cv2.IMWRITE_TIFF_COMPRESSION, 1], ".webp": [cv2.IMWRITE_WEBP_QUALITY, 90]}.get(ext, [])
    ok, data = cv2.imencode(ext, image, options)
    assert ok, ext
    assert len(data) <= max_bytes and size[0] * size[1] <= max_pixels, (ext, len(data), size)
    return data.tobytes(), size, size[0] / small.shape[1]


@cache
def heavy_below(ext: str, pixels: int) -> tuple[bytes, tuple[int, int], float]:
    """The collage scaled to just under `pixels`, with strong noise over it, so that its body is as large as the
    format makes it at that size (over 4 MiB for PNG, JPEG at quality 100, BMP, TIFF, PPM: a transport cap between
    deployments would refuse the bytes). Returns the bytes, the (width, height) and the scale from the collage."""
    small = collage()
    scale = ((pixels - 1) / (small.shape[0] * small.shape[1])) ** 0.5
    size = (int(small.shape[1] * scale), int(small.shape[0] * scale))
    image = cv2.resize(small, size, interpolation=cv2.INTER_LINEAR)
    noise = np.random.default_rng(0).integers(-30, 31, image.shape)
    image = np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    options = {".tiff": [cv2.IMWRITE_TIFF_COMPRESSION, 1], ".jpg": [cv2.IMWRITE_JPEG_QUALITY, 100],
               ".webp": [cv2.IMWRITE_WEBP_QUALITY, 100]}.get(ext, [])
    ok, data = cv2.imencode(ext, image, options)
    assert ok, ext
    return data.tobytes(), size, size[0] / small.shape[1]
