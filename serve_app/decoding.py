"""Turn request bytes into one BGR uint8 frame, refusing bad input before it costs anything.

The pixel count is read from the file header and checked before decoding, so a small file that
declares an enormous image (a decompression bomb) is refused without allocating it.
"""

from __future__ import annotations

import struct

import numpy as np

from engines.image import decode_bgr


class InputError(ValueError):
    """A client error: carries the HTTP status and a stable error code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return width, height
        i += 2 + length
    return None


def image_dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header of a PNG, JPEG, GIF, BMP or WebP file; None if unknown."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return struct.unpack("<HH", data[6:10])
    if data[:2] == b"BM" and len(data) >= 26:
        width, height = struct.unpack("<ii", data[18:26])
        return abs(width), abs(height)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        chunk = data[12:16]
        if chunk == b"VP8X":
            return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
        if chunk == b"VP8L":
            bits = int.from_bytes(data[21:25], "little")
            return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
        if chunk == b"VP8 ":
            width, height = struct.unpack("<HH", data[26:30])
            return width & 0x3FFF, height & 0x3FFF
    return None


def check_header(data: bytes, max_pixels: int) -> None:
    """Refuse an empty body, or an image whose header declares a zero or too large size, before decoding."""
    if not data:
        raise InputError(400, "empty_body", "the request body is empty; send image bytes")
    size = image_dimensions(data)
    if size is not None:
        width, height = size
        if width == 0 or height == 0:
            raise InputError(400, "undecodable_image", "the image header declares a zero width or height")
        if width * height > max_pixels:
            raise InputError(
                413,
                "image_too_large",
                f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
            )


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
