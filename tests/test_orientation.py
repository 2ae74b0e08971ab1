"""Orientation, read from the header and applied by the project's decode: for every format that carries one and
every orientation, the frame is the image as Pillow displays it (Pillow writes the files, and its
`exif_transpose` is the reference), and the size read from the header is that frame's.

OpenCV alone turns JPEG, PNG, WebP and TIFF, but not AVIF (irot/imir), and the header's size was the stored one:
the two disagreed for every photo a phone stores on its side."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from engines.image import decode_bgr, decode_for_detection, image_dimensions, read_header

LOSSY = {"JPEG": 40, "AVIF": 60}  # the largest difference a lossy codec may make on this noisy image


def _written(image: np.ndarray, fmt: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    options = {"quality": 100} if fmt in LOSSY else {"lossless": True} if fmt == "WEBP" else {}
    Image.fromarray(np.ascontiguousarray(image[..., ::-1])).save(buffer, fmt, exif=exif.tobytes(), **options)
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF", "AVIF"])
def test_each_format_is_decoded_as_displayed_and_sized_from_its_header(fmt: str, orientation: int) -> None:
    stored = np.random.default_rng(orientation).integers(0, 256, (60, 100, 3), dtype=np.uint8)
    stored = cv2.GaussianBlur(stored, (5, 5), 0)  # smooth enough for lossy codecs to keep it close
    data = _written(stored, fmt, orientation)
    displayed = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))[..., ::-1]
    frame = decode_bgr(data)
    assert frame is not None and frame.shape == displayed.shape
    assert np.abs(frame.astype(int) - displayed).max() <= LOSSY.get(fmt, 0)
    assert image_dimensions(data) == (displayed.shape[1], displayed.shape[0])
    assert read_header(data).orientation == orientation


@pytest.mark.parametrize("orientation", [6, 8])
def test_a_large_phone_jpeg_decoded_reduced_is_turned_and_scaled_per_axis(orientation: int) -> None:
    """A 4000x3000 photo stored on its side, decoded at a quarter by the JPEG decoder for the detector: the frame
    is turned, and its scale maps it back onto the displayed image's pixels."""
    stored = np.zeros((3000, 4000, 3), np.uint8)
    stored[:100, :200] = 255  # a mark in the stored top-left corner
    data = _written(stored, "JPEG", orientation)
    frame, scale = decode_for_detection(data, 40_000_000, 1280)
    assert frame is not None and frame.shape[:2] == (1280, 960)
    assert scale == pytest.approx((960 / 3000, 1280 / 4000))
    ys, xs = np.nonzero(frame[..., 0] > 128)
    # orientation 6 displays the stored top-left at the top-right, 8 at the bottom-left
    corner = (0, 960) if orientation == 6 else (1280, 0)
    assert abs(ys.mean() - corner[0]) < 80 and abs(xs.mean() - corner[1]) < 80
