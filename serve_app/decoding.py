"""Turn request bytes into one BGR uint8 frame, refusing bad input before it costs anything.

The pixel count is read from the file header and checked before decoding, so a small file that
declares an enormous image (a decompression bomb) is refused without allocating it; bytes whose header
cannot be read are refused too (engines/image.py reads every format the decoder takes).
"""

from __future__ import annotations

import numpy as np

from engines.image import ImageRefused, check_size, decode_bgr, image_dimensions


class InputError(ValueError):
    """A client error: carries the HTTP status and a stable error code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def check_header(data: bytes, max_pixels: int) -> tuple[int, int]:
    """The image's (width, height); refused before decoding: an empty body, bytes whose header this service
    cannot read, an image that declares a zero or too large size (engines.image.check_size)."""
    try:
        return check_size(data, max_pixels)
    except ImageRefused as exc:
        raise InputError(exc.status, exc.code, exc.message) from None


def decode_checked(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode bytes whose header `check_header` passed: BGR uint8 (H, W, 3)."""
    frame = decode_bgr(data)
    if frame is None:
        raise InputError(400, "undecodable_image", "the body is not an image OpenCV can decode (JPEG, PNG, ...)")
    if frame.shape[0] * frame.shape[1] > max_pixels:
        raise InputError(413, "image_too_large", f"the decoded image exceeds {max_pixels} pixels")
    return frame


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """BGR uint8 (H, W, 3) frame; grey, 16-bit and alpha images are converted, not refused."""
    check_header(data, max_pixels)
    return decode_checked(data, max_pixels)


__all__ = ["InputError", "check_header", "decode_checked", "decode_image", "image_dimensions"]
